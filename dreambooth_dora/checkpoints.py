"""Training checkpoints: accelerate's state (optimiser, LR schedule, RNG) plus the adapter
tensors only (never the frozen base weights), written atomically and rotated.

    output_dir/checkpoint-<step>/pytorch_lora_weights.safetensors   the adapters at that step
    output_dir/checkpoint-<step>/optimizer.bin, scheduler.bin, random_states_<rank>.pkl ...
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

from .adapters import load_adapter_state_dict
from .outputs import ADAPTER_FILE, layout_prefix, save_adapter

CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Finished checkpoints, oldest first (half-written `.tmp` folders are ignored)."""
    folder = Path(output_dir)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if p.is_dir() and (m := CHECKPOINT.match(p.name))]
    return [p for _, p in sorted(found)]


def checkpoint_step(path: str | Path) -> int:
    m = CHECKPOINT.match(Path(path).name)
    if not m:
        raise ValueError(f"{str(path)!r} is not a checkpoint-<step> folder")
    return int(m.group(1))


def register_adapter_hooks(accelerator, models: dict) -> None:
    """Make `save_state`/`load_state` store only adapter tensors for the prepared models.

    `models` maps a prefix ('unet', 'text_encoder') to the unwrapped model."""

    def prefix_of(model):
        unwrapped = accelerator.unwrap_model(model)
        for prefix, m in models.items():
            if unwrapped is m:
                return prefix
        return None

    def save_hook(prepared, weights, output_dir):
        if accelerator.is_main_process:
            save_adapter(output_dir, {p: m for p, m in models.items()}, {"checkpoint": True})
        for i in reversed(range(len(prepared))):  # keep accelerate from writing whole models
            if prefix_of(prepared[i]) is not None and i < len(weights):
                weights.pop(i)

    def load_hook(prepared, input_dir):
        from safetensors.torch import load_file

        tensors = load_file(str(Path(input_dir) / ADAPTER_FILE))
        for i in reversed(range(len(prepared))):
            prefix = prefix_of(prepared.pop(i))
            if prefix is not None:
                model = models[prefix]
                load_adapter_state_dict(model, tensors, prefix=f"{prefix}.{layout_prefix(model)}")

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def save_checkpoint(accelerator, output_dir: str | Path, step: int, total_limit: int | None) -> Path:
    """Save into `checkpoint-<step>.tmp`, rename when complete, then drop the oldest beyond the limit."""
    final = Path(output_dir) / f"checkpoint-{step}"
    tmp = final.with_name(final.name + ".tmp")
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        if total_limit is not None:
            for old in list_checkpoints(output_dir)[:-total_limit]:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def resolve_resume(output_dir: str | Path, resume_from_checkpoint: str | None) -> Path | None:
    """'latest' -> newest finished checkpoint (None when there is none yet); a path -> that path."""
    if resume_from_checkpoint is None:
        return None
    if resume_from_checkpoint == "latest":
        found = list_checkpoints(output_dir)
        return found[-1] if found else None
    path = Path(resume_from_checkpoint)
    if not path.is_dir():
        path = Path(output_dir) / resume_from_checkpoint
    if not (path / ADAPTER_FILE).is_file():
        raise FileNotFoundError(f"resume_from_checkpoint {resume_from_checkpoint!r} is not a finished checkpoint")
    return path

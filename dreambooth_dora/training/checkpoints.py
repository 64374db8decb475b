"""Training checkpoints: accelerate's state (optimiser, LR schedule, RNG) plus the adapter
tensors only (never the frozen base weights), written atomically, verified and rotated.

    output_dir/checkpoint-<step>/pytorch_lora_weights.safetensors   the adapters at that step
    output_dir/checkpoint-<step>/optimizer.bin, scheduler.bin, random_states_<rank>.pkl ...
    output_dir/checkpoint-<step>/checkpoint.json    run id, step, settings; size + SHA-256 per file

A checkpoint is built in `checkpoint-<step>.tmp` and renamed when complete, so a folder named
`checkpoint-<step>` is whole when written; the manifest tells one damaged later (a truncated copy,
a disk error) before a resume trusts it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

from ..adapters.inject import load_adapter_state_dict
from ..adapters.file import AdapterInfo, layout_prefix, save_adapter
from ..outputs import ADAPTER_FILE, CHECKPOINT, OutputError, atomic_path, make_readable, named_write_errors
from ..adapters.pivotal import EMBEDDINGS_FILE, read_embeddings, save_embeddings

MANIFEST = "checkpoint.json"


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_manifest(folder: Path, run_id: str, step: int, settings: dict) -> None:
    """checkpoint.json: what a complete checkpoint holds, to tell a damaged one on resume."""
    files = {str(p.relative_to(folder)): {"size": p.stat().st_size, "sha256": file_digest(p)}
             for p in sorted(folder.rglob("*")) if p.is_file() and p.name != MANIFEST}
    with atomic_path(folder / MANIFEST) as tmp:
        tmp.write_text(json.dumps({"run_id": run_id, "step": step, "settings": settings, "files": files},
                                  indent=1), encoding="utf-8")


def read_manifest(folder: Path) -> dict | None:
    try:
        return json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def checkpoint_problem(folder: Path) -> str | None:
    """Why the checkpoint cannot be resumed from (a missing, truncated or changed file), or None."""
    manifest = read_manifest(folder)
    if manifest is None:
        if (folder / MANIFEST).exists():
            return f"{MANIFEST} is unreadable"
        # from before manifests: at least the adapter file must read completely
        from safetensors import safe_open

        try:
            with safe_open(str(folder / ADAPTER_FILE), "pt") as f:
                for k in f.keys():
                    f.get_tensor(k)
        except Exception as err:  # safetensors raises several types for a damaged file
            return f"{ADAPTER_FILE} does not load ({type(err).__name__})"
        return None
    for name, want in manifest.get("files", {}).items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != want["size"]:
            return f"{name} is {path.stat().st_size} bytes, {want['size']} when saved (truncated?)"
        if file_digest(path) != want["sha256"]:
            return f"{name} differs from what was saved"
    return None


def list_checkpoints(output_dir: str | Path, run_id: str | None = None, up_to: int | None = None) -> list[Path]:
    """Finished checkpoints, oldest first (`.tmp` folders are half-written and ignored); with
    `run_id`, only those this run wrote (their manifest says so), and with `up_to`, only those at
    or before that step (a resume from an earlier checkpoint leaves the later ones alone)."""
    folder = Path(output_dir)
    if not folder.is_dir():
        return []
    found = []
    for p in folder.iterdir():
        m = CHECKPOINT.match(p.name)
        if not (m and p.is_dir()):
            continue
        step = int(m.group(1))
        if up_to is not None and step > up_to:
            continue
        if run_id is not None and (read_manifest(p) or {}).get("run_id") != run_id:
            continue
        found.append((step, p))
    return [p for _, p in sorted(found)]


def checkpoint_step(path: str | Path) -> int:
    m = CHECKPOINT.match(Path(path).name)
    if not m:
        raise ValueError(f"{str(path)!r} is not a checkpoint-<step> folder")
    return int(m.group(1))


def register_adapter_hooks(accelerator, models: dict, pivotal=None, sharded=None) -> None:
    """Make `save_state`/`load_state` store only adapter tensors for the prepared models, and with
    pivotal tuning the new tokens' rows (`embeddings.safetensors`, so a checkpoint is a complete
    adapter with its tokens).

    `models` maps a prefix ('unet', 'text_encoder') to the unwrapped model. `sharded`: (the
    FSDP-sharded denoiser, the module owning every trained tensor, the optimizer), which
    accelerate does not hold: every process gathers the adapter and the optimizer state, the main
    process writes them; loading shards them again."""

    def prefix_of(model):
        unwrapped = accelerator.unwrap_model(model)
        for prefix, m in models.items():
            if unwrapped is m:
                return prefix
        return None

    def save_hook(prepared, weights, output_dir):
        if accelerator.is_main_process or sharded is not None:  # sharded: every process gathers
            if pivotal is not None:
                save_embeddings(output_dir, pivotal.vectors(), pivotal.tokens, webui=False)
            save_adapter(output_dir, dict(models), AdapterInfo(checkpoint=True,
                                                               tokens=pivotal.tokens if pivotal else None),
                         write=accelerator.is_main_process)
        if sharded is not None:
            from .sharding import save_optimizer

            save_optimizer(*sharded[1:], output_dir, write=accelerator.is_main_process)
        for i in reversed(range(len(prepared))):  # keep accelerate from writing whole models
            if prefix_of(prepared[i]) is not None and i < len(weights):
                weights.pop(i)

    def load_hook(prepared, input_dir):
        from safetensors.torch import load_file

        tensors = load_file(str(Path(input_dir) / ADAPTER_FILE))
        if pivotal is not None:
            pivotal.load_vectors(read_embeddings(Path(input_dir) / EMBEDDINGS_FILE)[0])
        for i in reversed(range(len(prepared))):
            prefix = prefix_of(prepared.pop(i))
            if prefix is not None:
                model = models[prefix]
                load_adapter_state_dict(model, tensors, prefix=f"{prefix}.{layout_prefix(model)}")
        if sharded is not None:  # the denoiser is not among accelerate's models: loaded here, sharded
            from .sharding import load_optimizer

            for prefix, model in models.items():
                if model is sharded[0]:
                    load_adapter_state_dict(model, tensors, prefix=f"{prefix}.{layout_prefix(model)}")
            load_optimizer(*sharded[1:], input_dir)

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def checkpoint_owner(folder: Path) -> str | None:
    """The run id a checkpoint's manifest names (None: no readable manifest, owner unknown)."""
    return (read_manifest(folder) or {}).get("run_id")


def save_checkpoint(accelerator, output_dir: str | Path, step: int, total_limit: int | None,
                    run_id: str, settings: dict) -> Path:
    """Save into `checkpoint-<step>.tmp` with its manifest, rename when complete, then drop this
    run's oldest checkpoints beyond the limit (never another run's, never later steps).

    A checkpoint of the same step that this run did not write is never replaced (OutputError,
    before anything is written). A failed write (a full disk) removes the half-written folder and
    raises WriteError naming the checkpoint."""
    final = Path(output_dir) / f"checkpoint-{step}"
    tmp = final.with_name(final.name + ".tmp")
    if final.exists() and checkpoint_owner(final) != run_id:
        raise OutputError(f"{final} was written by another run; not replacing it (move it away to let this run "
                          "save its checkpoint there)")
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    try:
        with named_write_errors(final):
            accelerator.save_state(str(tmp))
            accelerator.wait_for_everyone()
            if accelerator.is_main_process:
                write_manifest(tmp, run_id, step, settings)
                make_readable(tmp)
    except BaseException:
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    if accelerator.is_main_process:
        if final.exists():  # this run's own checkpoint of the same step, from before a resume
            shutil.rmtree(final)
        os.replace(tmp, final)
        if total_limit is not None:
            for old in list_checkpoints(output_dir, run_id=run_id, up_to=step)[:-total_limit]:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final

"""Everything the project writes goes through here: atomic files, the adapter file."""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import save_file

from .adapters import adapted_layers, adapter_state_dict

ADAPTER_FILE = "pytorch_lora_weights.safetensors"
LORA_ADAPTER_METADATA_KEY = "lora_adapter_metadata"  # the key diffusers reads adapter configs from


@contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temporary path beside `path`; rename it onto `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file the usual permissions
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@contextmanager
def atomic_dir(path: str | os.PathLike):
    """Yield a temporary folder beside `path`; when the block succeeds it replaces `path` (an
    older folder there is removed first), otherwise it is deleted: the folder appears complete
    or not at all."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        yield tmp
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def lora_config_dict(model: torch.nn.Module) -> dict:
    """The model's adapter settings as a PEFT `LoraConfig` dict (what diffusers rebuilds from)."""
    layers = list(adapted_layers(model))
    if not layers:
        return {}
    first = layers[0][1]
    ranks = {n: layer.rank for n, layer in layers if layer.rank != first.rank}
    alphas = {n: layer.alpha for n, layer in layers if layer.alpha != first.alpha}
    return {
        "r": first.rank,
        "lora_alpha": first.alpha,
        "use_dora": first.use_dora,
        "use_rslora": first.use_rslora,
        "lora_dropout": float(getattr(first.lora_dropout, "p", 0.0)),
        "target_modules": sorted(n for n, _ in layers),
        "rank_pattern": ranks,
        "alpha_pattern": alphas,
        "init_lora_weights": True,
        "bias": "none",
    }


def layout_prefix(model: torch.nn.Module) -> str:
    """'text_model.' for a transformers CLIP text model whose modules no longer sit under
    `text_model` (transformers 5), so that files keep the key layout every loader knows
    (`text_encoder.text_model.encoder.layers.0.self_attn.q_proj...`); '' otherwise."""
    is_clip_text = type(model).__name__ in ("CLIPTextModel", "CLIPTextModelWithProjection")
    if is_clip_text and not hasattr(model, "text_model") and hasattr(model, "encoder"):
        return "text_model."
    return ""


def save_adapter(output_dir: str | os.PathLike, models: dict[str, torch.nn.Module], info: dict) -> Path:
    """Write `pytorch_lora_weights.safetensors`: `<prefix>.<path>.lora_*` tensors for each model
    (prefix `unet`, `text_encoder`, ...), the LoRA configs as diffusers' adapter metadata, and
    `info` (base model, prompts, steps) under the key `dreambooth_dora`."""
    tensors, configs = {}, {}
    for prefix, model in models.items():
        sd = adapter_state_dict(model, prefix=f"{prefix}.{layout_prefix(model)}")
        tensors.update({k: v.detach().to("cpu", torch.float32).contiguous() for k, v in sd.items()})
        config = lora_config_dict(model)
        if layout_prefix(model) and config:
            # a regex that matches the modules with and without the `text_model.` level, so the
            # config rebuilds the same adapters under transformers 4 and 5
            names = "|".join(re.escape(n) for n in config["target_modules"])
            config["target_modules"] = rf"(?:{re.escape(layout_prefix(model))})?(?:{names})"
        configs.update({f"{prefix}.{k}": v for k, v in config.items()})
    metadata = {
        "format": "pt",
        LORA_ADAPTER_METADATA_KEY: json.dumps(configs, indent=2, sort_keys=True),
        "dreambooth_dora": json.dumps(info, sort_keys=True),
    }
    out = Path(output_dir) / ADAPTER_FILE
    with atomic_path(out) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    return out

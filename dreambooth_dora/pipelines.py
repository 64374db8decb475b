"""Adapter files in diffusers pipelines: read, check against a base model, load exactly.

Stock diffusers (0.42) loads our files with `pipe.load_lora_weights(dir)`. Its text-encoder path
(transformers' `load_adapter`) drops DoRA magnitude vectors: the file's
`text_encoder.<m>.lora_magnitude_vector` is looked for as `...lora_magnitude_vector.<name>` while
PEFT's parameter is `...lora_magnitude_vector.<name>.weight`, so the layer keeps its initial
magnitude (the base weight's norm) and the model is silently wrong. `load_adapter` loads through
the stock path, then compares every tensor of the file with what landed in the model and
restores what was dropped, so the pipeline stays a normal PEFT-backed diffusers pipeline
(`set_adapters`, `disable_lora`, `fuse_lora` all work) and is exact.
"""

from __future__ import annotations

import json
import logging
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from .models import PARTS as PREFIXES, pipeline_models
from .outputs import ADAPTER_FILE, LORA_ADAPTER_METADATA_KEY, layout_prefix

log = logging.getLogger(__name__)


class AdapterError(ValueError):
    """Not an adapter, or an adapter for another model; the message names the first mismatch."""


@dataclass
class AdapterFile:
    path: Path
    tensors: dict[str, torch.Tensor]  # "<prefix>.<module>.lora_A.weight" ...
    configs: dict[str, dict] = field(default_factory=dict)  # prefix -> LoraConfig kwargs
    info: dict = field(default_factory=dict)  # what training recorded (base model, steps, ...)

    def part(self, prefix: str, model: torch.nn.Module | None = None) -> dict[str, torch.Tensor]:
        """Tensors of one model, without the prefix; with `model`, module names follow that
        model's layout (files say `text_model.encoder...`, transformers 5 says `encoder...`)."""
        out = {k[len(prefix) + 1:]: v for k, v in self.tensors.items() if k.startswith(prefix + ".")}
        if model is not None and layout_prefix(model):
            extra = layout_prefix(model)
            out = {k[len(extra):] if k.startswith(extra) else k: v for k, v in out.items()}
        return out

    def modules(self, prefix: str, model: torch.nn.Module | None = None) -> list[str]:
        return sorted({k.rsplit(".lora_", 1)[0] for k in self.part(prefix, model)})

    @property
    def use_dora(self) -> bool:
        return any(k.endswith("lora_magnitude_vector") for k in self.tensors)

    def rank_alpha(self, prefix: str) -> tuple[int, float]:
        """Rank and alpha of `prefix` (metadata, else inferred from shapes with alpha = rank)."""
        cfg = self.configs.get(prefix)
        if cfg:
            return int(cfg["r"]), float(cfg["lora_alpha"])
        rank = next(v.shape[0] for k, v in self.part(prefix).items() if k.endswith("lora_A.weight"))
        return int(rank), float(rank)


def adapter_path(path: str | Path) -> Path:
    """The `.safetensors` file of an adapter folder or file; pickled `.bin` files are refused
    (loading them can run code)."""
    path = Path(path)
    if path.is_dir():
        path = path / ADAPTER_FILE
    if path.suffix == ".bin":
        raise AdapterError(f"{str(path)!r}: only .safetensors adapters are read (a pickled .bin can run code)")
    if not path.is_file():
        raise AdapterError(f"no adapter file at {str(path)!r}")
    return path


def read_adapter(path: str | Path) -> AdapterFile:
    file = adapter_path(path)
    try:
        with safe_open(str(file), "pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
            meta = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as err:
        raise AdapterError(f"{str(file)!r} is not a readable safetensors file: {err}") from None
    lora_keys = [k for k in tensors if ".lora_" in k]
    if not lora_keys:
        raise AdapterError(f"{str(file)!r} holds no LoRA/DoRA tensors (no '.lora_A/.lora_B' keys)")
    unknown = sorted({k.split(".", 1)[0] for k in tensors} - set(PREFIXES))
    if unknown:
        raise AdapterError(f"{str(file)!r} has tensors for unknown model part(s) {unknown}; "
                           f"expected prefixes {', '.join(PREFIXES)}")
    configs: dict[str, dict] = {}
    if LORA_ADAPTER_METADATA_KEY in meta:
        for key, value in json.loads(meta[LORA_ADAPTER_METADATA_KEY]).items():
            prefix, _, name = key.partition(".")
            configs.setdefault(prefix, {})[name] = value
    info = json.loads(meta["dreambooth_dora"]) if "dreambooth_dora" in meta else {}
    return AdapterFile(file, tensors, configs, info)


def check_fits(adapter: AdapterFile, models: dict[str, torch.nn.Module]) -> None:
    """Raise AdapterError naming the first module that is missing or has other shapes."""
    for prefix in sorted({k.split(".", 1)[0] for k in adapter.tensors}):
        model = models.get(prefix)
        if model is None:
            raise AdapterError(f"the adapter has {prefix} tensors but the pipeline has no {prefix}")
        part = adapter.part(prefix, model)
        for module_name in adapter.modules(prefix, model):
            try:
                module = model.get_submodule(module_name)
            except AttributeError:
                raise AdapterError(f"adapter does not fit this base model: {prefix} has no module "
                                   f"{module_name!r} (an adapter for another model?)") from None
            base = getattr(module, "base_layer", module)  # already wrapped by PEFT: look inside
            weight = getattr(base, "weight", None)
            if weight is None:
                raise AdapterError(f"adapter does not fit: {prefix}.{module_name} has no weight")
            a, b = part.get(f"{module_name}.lora_A.weight"), part.get(f"{module_name}.lora_B.weight")
            if a is None or b is None:
                raise AdapterError(f"adapter is incomplete: {prefix}.{module_name} lacks lora_A or lora_B")
            in_features = weight.shape[1] * (weight[0, 0].numel() if weight.dim() > 2 else 1)
            if a[0].numel() != in_features or b.shape[0] != weight.shape[0]:
                raise AdapterError(
                    f"adapter does not fit this base model: {prefix}.{module_name} has weight "
                    f"{tuple(weight.shape)}, the adapter's lora_A is {tuple(a.shape)} and lora_B {tuple(b.shape)} "
                    "(an adapter for another base model?)")
            mag = part.get(f"{module_name}.lora_magnitude_vector")
            if mag is not None and mag.numel() != weight.shape[0]:
                raise AdapterError(f"adapter does not fit: {prefix}.{module_name} magnitude has "
                                   f"{mag.numel()} entries for {weight.shape[0]} output features")


@torch.no_grad()
def load_adapter(pipe, path: str | Path, adapter_name: str = "default", scale: float = 1.0) -> dict:
    """Load an adapter into a diffusers pipeline exactly, under `adapter_name`.

    Uses the stock `pipe.load_lora_weights`, then checks every tensor of the file against the
    model and restores what the stock loader dropped (text-encoder DoRA magnitudes with the
    pinned versions). Returns a report: {"restored": [...keys...]}. `scale` activates this
    adapter alone at that weight (diffusers' `set_adapters`).
    """
    adapter = read_adapter(path)
    models = pipeline_models(pipe)
    check_fits(adapter, models)
    with warnings.catch_warnings():  # PEFT warns for every named adapter after the first; several are normal here
        warnings.filterwarnings("ignore", message="Already found a `peft_config`")
        pipe.load_lora_weights(str(adapter.path.parent), weight_name=adapter.path.name, adapter_name=adapter_name)
    restored = []
    for prefix, model in models.items():
        for rest, value in adapter.part(prefix, model).items():  # names in this model's layout
            module_name, _, kind = rest.partition(".lora_")
            module = model.get_submodule(module_name)
            if kind == "magnitude_vector":
                target = module.lora_magnitude_vector[adapter_name].weight
            else:  # "A.weight" / "B.weight"
                target = getattr(module, "lora_" + kind.split(".")[0])[adapter_name].weight
            value = value.to(target.device, target.dtype).reshape(target.shape)
            if not torch.equal(target, value):
                target.copy_(value)
                restored.append(f"{prefix}.{layout_prefix(model)}{rest}")
    if restored:
        log.warning("stock load_lora_weights left %d tensor(s) of %s wrong (e.g. %s); restored them",
                    len(restored), adapter.path, restored[0])
    if scale != 1.0:
        pipe.set_adapters([adapter_name], adapter_weights=[scale])
    return {"restored": restored}

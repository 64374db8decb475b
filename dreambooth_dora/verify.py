"""`dreambooth-dora verify FILE --base MODEL --against ADAPTER`: merge a file with every consumer
rule we know and compare with the adapter's exact weights, layer by layer, before shipping it.

The truth is the adapter (`--against`, our file) applied to the base model by our exact layers:
W' per adapted layer. The file (kohya / LyCORIS / full, our adapter, or a fused pipeline folder) is
merged by each rule of `consumers.RULES`; the error of a layer is `||W'_rule - W'|| / ||W' - W0||`
(relative to the adapter's own change: 1.0 means as wrong as leaving the adapter out).
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .adapter_file import AdapterError, apply_to_models, base_model_of, layout_prefix, read_adapter
from .adapters import adapted_layers
from .consumers import RULE_NAMES, RULES, KohyaModule, kohya_key, merge, read_kohya_modules
from .file_info import read_safetensors
from .models import load_pipeline, pipeline_models

EXACT = {"fp32": 1e-4, "16-bit": None}  # what "exact" allows: float rounding of the stored tensors


@dataclass
class VerifyReport:
    file: str
    layers: list[str]
    errors: dict[str, list[float]]  # rule -> per layer, in `layers` order
    missing: list[str] = field(default_factory=list)  # adapted layers the file does not cover
    unmatched: list[str] = field(default_factory=list)  # file modules that match no adapted layer
    bound: float = EXACT["fp32"]

    def exact(self, rule: str) -> bool:
        """Within float rounding: 1e-4 for fp32 files; a 16-bit file's own rounding (the best rule's
        error, which no rule can beat) x 1.5 for 16-bit files."""
        worst = max(self.errors[rule], default=0.0)
        if self.missing:
            return False
        if self.bound == EXACT["fp32"]:
            return worst <= self.bound
        best = min(max(v, default=0.0) for v in self.errors.values())
        return best <= 0.1 and worst <= max(EXACT["fp32"], 1.5 * best)

    def table(self, per_layer: bool = True) -> list[str]:
        head = "| layer | " + " | ".join(RULE_NAMES[r] for r in RULES) + " |"
        lines = [head, "|---" * (len(RULES) + 1) + "|"]
        if per_layer:
            for i, layer in enumerate(self.layers):
                lines.append(f"| {layer} | " + " | ".join(f"{self.errors[r][i]:.2e}" for r in RULES) + " |")
        lines.append("| **max** | " + " | ".join(f"{max(self.errors[r], default=0):.2e}" for r in RULES) + " |")
        lines.append("| **median** | " + " | ".join(f"{statistics.median(self.errors[r] or [0]):.2e}"
                                                      for r in RULES) + " |")
        lines.append("| **verdict** | " + " | ".join("exact" if self.exact(r) else "WRONG" for r in RULES) + " |")
        return lines


def _file_modules(path: Path, base: str, adapted_keys: list[str], sdxl: bool) -> dict[str, KohyaModule]:
    """The file as kohya modules keyed like the adapted layers."""
    if path.is_dir() and (path / "model_index.json").is_file():  # fused: its weights are W' already
        fused = pipeline_models(load_pipeline(str(path)))
        out = {}
        base_models = pipeline_models(load_pipeline(base))
        for prefix, model in fused.items():
            base_named = dict(base_models[prefix].named_modules())
            for name, module in model.named_modules():
                key = kohya_key(prefix, layout_prefix(model) + name, sdxl)
                if key in adapted_keys:
                    out[key] = KohyaModule(diff=module.weight.detach().float() - base_named[name].weight.detach().float())
        return out
    file = path / "pytorch_lora_weights.safetensors" if path.is_dir() else path
    tensors, _ = read_safetensors(file)
    if {k.split(".", 1)[0] for k in tensors} <= {"unet", "text_encoder", "text_encoder_2"}:
        adapter = read_adapter(file)  # ours: its tensors as kohya modules (what `export --format kohya` writes)
        models = pipeline_models(load_pipeline(base))
        apply_to_models(adapter, models)
        out = {}
        for prefix, model in models.items():
            for name, layer in adapted_layers(model):
                mod = KohyaModule(down=layer.lora_A.weight.detach().float(), up=layer.lora_B.weight.detach().float(),
                                  alpha=float(layer.scaling * layer.rank))
                if layer.use_dora:
                    mod.dora_scale = layer.lora_magnitude_vector.detach().float().reshape(
                        (-1,) + (1,) * (layer.weight.dim() - 1))
                out[kohya_key(prefix, layout_prefix(model) + name, sdxl)] = mod
        return out
    return read_kohya_modules(tensors)


@torch.no_grad()
def verify(file: str | Path, against: str | Path, base: str | None = None) -> VerifyReport:
    adapter = read_adapter(against)
    base = base_model_of(adapter, base)
    pipe = load_pipeline(base)
    models = pipeline_models(pipe)
    apply_to_models(adapter, models)
    sdxl = "text_encoder_2" in models
    truths = {}
    for prefix, model in models.items():
        for name, layer in adapted_layers(model):
            truths[kohya_key(prefix, layout_prefix(model) + name, sdxl)] = (layer.weight.detach().float(),
                                                                           layer.merged_weight().float())
    path = Path(file)
    if not path.exists():
        raise AdapterError(f"no file at {str(path)!r}")
    modules = _file_modules(path, base, list(truths), sdxl)
    layers = [k for k in truths if k in modules]
    errors = {r: [] for r in RULES}
    sixteen = any(isinstance(t, torch.Tensor) and t.dtype in (torch.float16, torch.bfloat16)
                  for m in modules.values() for t in vars(m).values())
    for key in layers:
        w0, target = truths[key]
        change = max((target - w0).norm().item(), 1e-30)
        for rule in RULES:
            errors[rule].append((merge(rule, w0, modules[key]) - target).norm().item() / change)
    return VerifyReport(str(path), layers, errors, missing=[k for k in truths if k not in modules],
                        unmatched=sorted(k for k in modules if k not in truths),
                        bound=EXACT["16-bit" if sixteen else "fp32"])

"""`dreambooth-dora verify FILE --base MODEL --against ADAPTER`: merge a file with every consumer
rule we know and compare with the adapter's exact weights, layer by layer, before shipping it.

The truth is the adapter (`--against`, our file) applied to the base model by our exact layers:
W' per adapted layer. The file (kohya / LyCORIS / full, our adapter, or a fused pipeline folder) is
merged by each rule of `consumers.RULES`; the error of a layer is `||W'_rule - W'|| / ||W' - W0||`
(relative to the adapter's own change: 1.0 means as wrong as leaving the adapter out; a layer the
adapter leaves unchanged is judged against ||W0||, and the report says how many).

Verdicts, per rule: "exact" (every layer within fp32 rounding, 1e-4); for a 16-bit file,
"rounding: X%" where the rule is as good as the file's precision allows (within 1.5x of the best
rule) and X is its measured worst error; "WRONG" otherwise, and always for a layer whose merge is
NaN / inf or a layer the file does not cover.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..adapters.file import AdapterError, apply_to_models, base_model_of, layout_prefix, read_adapter
from .consumers import (EXACT, RULE_NAMES, ROUNDING_LIMIT, RULES, KohyaModule, has_no_change, layers_by_kohya_key,
                        merge, read_kohya_modules, relative_error)
from .export import kohya_module, web_ui_names
from .info import read_safetensors, stored_dtype
from ..families import ADAPTER_PARTS, family_of_pipeline, pipeline_models
from ..families.models import load_pipeline
from ..outputs import ADAPTER_FILE

ROUNDING_ADVICE = 0.01  # a 16-bit file that loses more than this gets a recommendation


def worst(values: list[float]) -> float:
    """The largest error, NaN when any is NaN (Python's max would skip it by order)."""
    if any(math.isnan(v) for v in values):
        return math.nan
    return max(values, default=0.0)


@dataclass
class VerifyReport:
    file: str
    layers: list[str]
    errors: dict[str, list[float]]  # rule -> per layer, in `layers` order
    missing: list[str] = field(default_factory=list)  # adapted layers the file does not cover
    unmatched: list[str] = field(default_factory=list)  # file modules that match no adapted layer
    dtype: str = "fp32"  # the file's stored precision: fp32, fp16 or bf16
    unchanged: list[str] = field(default_factory=list)  # layers the adapter leaves as they were: judged vs ||W0||

    @property
    def rounding(self) -> float:
        """A 16-bit file's own rounding: the best rule's worst error (no rule can beat it)."""
        return min((w for w in map(worst, self.errors.values()) if math.isfinite(w)), default=math.nan)

    def verdict(self, rule: str) -> str:
        """'exact', 'rounding: X%' (16-bit files, as good as their precision allows) or 'WRONG'."""
        w = worst(self.errors[rule])
        if self.missing or not math.isfinite(w):
            return "WRONG"
        if w <= EXACT:
            return "exact"
        best = self.rounding
        if self.dtype != "fp32" and best <= ROUNDING_LIMIT and w <= 1.5 * best:
            return f"rounding: {100 * w:.2g}%"
        return "WRONG"

    def advice(self) -> str | None:
        """What to use instead when the file's precision loses more than 1% of the change."""
        best = self.rounding
        if self.dtype == "fp32" or not (math.isfinite(best) and best > ROUNDING_ADVICE):
            return None
        return (f"{self.dtype} storage loses {100 * best:.2g}% of the adapter's change here; for under 1% export "
                f"--format full{' or --dtype fp16' if self.dtype == 'bf16' else ''} (or --dtype fp32: exact)")

    def table(self, per_layer: bool = True) -> list[str]:
        head = "| layer | " + " | ".join(RULE_NAMES[r] for r in RULES) + " |"
        lines = [head, "|---" * (len(RULES) + 1) + "|"]
        if per_layer:
            for i, layer in enumerate(self.layers):
                mark = " (unchanged: vs ‖W0‖)" if layer in self.unchanged else ""
                lines.append(f"| {layer}{mark} | " + " | ".join(f"{self.errors[r][i]:.2e}" for r in RULES) + " |")
        lines.append("| **max** | " + " | ".join(f"{worst(self.errors[r]):.2e}" for r in RULES) + " |")
        lines.append("| **median** | " + " | ".join(f"{statistics.median(self.errors[r] or [0]):.2e}"
                                                      for r in RULES) + " |")
        lines.append("| **verdict** | " + " | ".join(self.verdict(r) for r in RULES) + " |")
        return lines


def _is_fused(path: Path) -> bool:
    return path.is_dir() and (path / "model_index.json").is_file()


def _read_file(path: Path):
    """Before any model loads: our adapter (an AdapterFile), a kohya / LyCORIS file (its modules),
    or None for a fused pipeline folder; a missing or unreadable file is one AdapterError."""
    if not path.exists():
        raise AdapterError(f"no file at {str(path)!r}")
    if _is_fused(path):
        return None
    file = path / ADAPTER_FILE if path.is_dir() else path
    tensors, _ = read_safetensors(file)
    if {k.split(".", 1)[0] for k in tensors} <= set(ADAPTER_PARTS):
        return read_adapter(file)  # ours: compared as what `export --format kohya` writes from it
    return read_kohya_modules(tensors)


def _file_modules(path: Path, read, base: str, stacks: dict, truths: dict) -> dict[str, KohyaModule]:
    """The file as kohya modules keyed like the web UI modules of the adapted layers."""
    if read is None:  # a fused pipeline: its weights are W' already, the difference to W0 is the module
        fused = pipeline_models(load_pipeline(str(path)))
        out = {}
        for key, stack in stacks.items():
            model = fused.get(stack.part)
            head = layout_prefix(model) if model is not None else ""
            try:
                weight = torch.cat([model.get_submodule(n[len(head):]).weight.detach().float() for n in stack.names])
            except AttributeError:  # the fused pipeline lacks the part or the layer: the report says missing
                continue
            out[key] = KohyaModule(diff=weight - truths[key][0])
        return out
    if isinstance(read, dict):
        return read
    pipe = load_pipeline(base)
    models = pipeline_models(pipe)
    apply_to_models(read, models)
    return {key: kohya_module(stack) for key, stack in layers_by_kohya_key(family_of_pipeline(pipe), models).items()}


def _error(rule: str, truth: tuple, module: KohyaModule) -> float:
    """The rule's relative error on one layer; inf where its tensors do not fit the layer or each
    other (a wrong rank or shape: no consumer can apply the module)."""
    try:
        return relative_error(merge(rule, truth[0], module), *truth)
    except (RuntimeError, ValueError):
        return math.inf


@torch.no_grad()
def verify(file: str | Path, against: str | Path, base: str | None = None) -> VerifyReport:
    path = Path(file)
    read = _read_file(path)  # a missing or unreadable FILE stops before any model loads
    adapter = web_ui_names(read_adapter(against), "verify")
    base = base_model_of(adapter, base)
    pipe = load_pipeline(base)
    models = pipeline_models(pipe)
    apply_to_models(adapter, models)
    stacks = layers_by_kohya_key(family_of_pipeline(pipe), models)
    truths = {key: (stack.weight(), stack.merged()) for key, stack in stacks.items()}
    modules = _file_modules(path, read, base, stacks, truths)
    layers = [k for k in truths if k in modules]
    dtypes = {t.dtype for m in modules.values() for t in vars(m).values() if isinstance(t, torch.Tensor)}
    dtype = "bf16" if torch.bfloat16 in dtypes else "fp16" if torch.float16 in dtypes else "fp32"
    if read is None:  # a fused pipeline: its differences were taken in fp32 from weights stored in...
        dtype = stored_dtype(path)
    errors = {rule: [_error(rule, truths[k], modules[k]) for k in layers] for rule in RULES}
    return VerifyReport(str(path), layers, errors, missing=[k for k in truths if k not in modules],
                        unmatched=sorted(k for k in modules if k not in truths), dtype=dtype,
                        unchanged=[k for k in layers if has_no_change(*truths[k])])

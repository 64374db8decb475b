"""Which modules get adapters, and the adapter state dict in the PEFT / diffusers layout.

Keys are the ones `peft.get_peft_model_state_dict` gives for the same model and config::

    <module path>.lora_A.weight            (r, in)      conv: (r, in, kh, kw)
    <module path>.lora_B.weight            (out, r)     conv: (out, r, 1, 1)
    <module path>.lora_magnitude_vector    (out,)       conv: (1, out, 1, 1)   DoRA only
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable, Iterator

import torch
from torch import nn

from .dora import ADAPTED_TYPES, AdaptedLayer


def _matches(name: str, targets: str | Iterable[str]) -> bool:
    """PEFT's `target_modules` rule: a string is a regex that must match the whole name; a list
    matches a name equal to an entry or ending in `.<entry>`."""
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def add_adapters(
    model: nn.Module,
    target_modules: str | Iterable[str],
    rank: int,
    alpha: float | None = None,
    use_dora: bool = True,
    dropout: float = 0.0,
    use_rslora: bool = False,
    init_lora_weights: bool | str = True,
) -> list[str]:
    """Wrap every matching `nn.Linear` / `nn.Conv2d` in a DoRA (or LoRA) layer, freeze the rest.

    `alpha` defaults to `rank` (scale 1). Returns the wrapped module names, in model order.
    Raises ValueError when a target matches nothing (naming some real module names) or matches a
    layer type that has no adapter.
    """
    if not isinstance(target_modules, str):
        target_modules = list(target_modules)
        if not target_modules:
            raise ValueError("target_modules is empty")
    alpha = rank if alpha is None else alpha
    model.requires_grad_(False)
    names = [n for n, m in model.named_modules() if n and _matches(n, target_modules)]
    if not names:
        raise ValueError(_no_match_message(model, target_modules))
    if not isinstance(target_modules, str):
        unmatched = [t for t in target_modules if not any(_matches(n, [t]) for n in names)]
        if unmatched:
            raise ValueError(_no_match_message(model, unmatched))
    for name in names:
        module = model.get_submodule(name)
        if isinstance(module, AdaptedLayer):
            raise ValueError(f"module {name!r} already has an adapter")
        wrapper = ADAPTED_TYPES.get(type(module))
        if wrapper is None:
            supported = ", ".join(f"torch.nn.{t.__name__}" for t in ADAPTED_TYPES)
            raise ValueError(f"target {name!r} is a {type(module).__name__}; adapters support {supported}")
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, wrapper(module, rank, alpha, use_dora=use_dora, dropout=dropout,
                                       use_rslora=use_rslora, init_lora_weights=init_lora_weights))
    return names


def _no_match_message(model: nn.Module, targets) -> str:
    """Name the adaptable module names nearest to the bad targets first, then others."""
    leaves = [n for n, m in model.named_modules() if n and isinstance(m, tuple(ADAPTED_TYPES))]
    short = sorted({".".join(n.split(".")[-2:]) if n.split(".")[-1].isdigit() else n.rsplit(".", 1)[-1]
                    for n in leaves})
    wanted = [targets] if isinstance(targets, str) else targets
    near = [c for t in wanted for c in difflib.get_close_matches(t.rsplit(".", 1)[-1], short, n=4, cutoff=0.5)]
    shown = list(dict.fromkeys(near + short))[:12]
    return (f"target_modules {targets!r} matched no module in {type(model).__name__}; "
            f"Linear/Conv2d names there include: {', '.join(shown)}")


def adapted_layers(model: nn.Module) -> Iterator[tuple[str, AdaptedLayer]]:
    """(name, layer) for every adapter layer, found by type."""
    for name, module in model.named_modules():
        if isinstance(module, AdaptedLayer):
            yield name, module


def adapter_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for _, layer in adapted_layers(model) for p in layer.adapter_parameters()]


def adapter_parameters_by_role(model: nn.Module) -> dict[str, list[nn.Parameter]]:
    """{'A': [...], 'B': [...], 'magnitude': [...]}, found by module type (never by name)."""
    roles = {"A": [], "B": [], "magnitude": []}
    for _, layer in adapted_layers(model):
        roles["A"].append(layer.lora_A.weight)
        roles["B"].append(layer.lora_B.weight)
        if layer.use_dora:
            roles["magnitude"].append(layer.lora_magnitude_vector)
    return roles


def is_sharded(t) -> bool:
    """A DTensor: a parameter split over processes (FSDP2)."""
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a shard (a collective: every process must ask), or `t` itself."""
    return t.full_tensor() if is_sharded(t) else t


def assign(param: torch.Tensor, value: torch.Tensor) -> None:
    """Copy a whole tensor into a parameter, sharded like it when it is sharded."""
    if is_sharded(param):
        from torch.distributed.tensor import distribute_tensor

        value = distribute_tensor(value.to(param.device, param.dtype), param.device_mesh, param.placements)
    param.copy_(value)


def adapter_state_dict(model: nn.Module, prefix: str = "") -> dict[str, torch.Tensor]:
    """The adapter parameters only, keyed as PEFT's `get_peft_model_state_dict` keys them; whole
    tensors also when the model is sharded (then every process must ask: it gathers)."""
    out = {}
    for name, layer in adapted_layers(model):
        out[f"{prefix}{name}.lora_A.weight"] = full(layer.lora_A.weight.detach())
        out[f"{prefix}{name}.lora_B.weight"] = full(layer.lora_B.weight.detach())
        if layer.use_dora:
            out[f"{prefix}{name}.lora_magnitude_vector"] = full(layer.lora_magnitude_vector.detach())
    return out


def adapter_shapes(model: nn.Module, prefix: str = "") -> dict[str, torch.Size]:
    """adapter_state_dict's keys and (whole) shapes, without gathering anything."""
    out = {}
    for name, layer in adapted_layers(model):
        out[f"{prefix}{name}.lora_A.weight"] = layer.lora_A.weight.shape
        out[f"{prefix}{name}.lora_B.weight"] = layer.lora_B.weight.shape
        if layer.use_dora:
            out[f"{prefix}{name}.lora_magnitude_vector"] = layer.lora_magnitude_vector.shape
    return out


def load_adapter_state_dict(model: nn.Module, state_dict: dict[str, torch.Tensor], prefix: str = "") -> None:
    """Copy adapter tensors into the model's adapter layers. Every layer's tensors must be there
    with the right shapes and nothing else may be; otherwise ValueError names the bad keys and
    nothing is changed."""
    expected = adapter_shapes(model, prefix)
    if not expected:
        raise ValueError(f"{type(model).__name__} has no adapter layers; call add_adapters first")
    given = {k: v for k, v in state_dict.items() if k.startswith(prefix)}
    missing = sorted(expected.keys() - given.keys())
    extra = sorted(given.keys() - expected.keys())
    wrong = sorted(f"{k} {tuple(given[k].shape)} != {tuple(s)}" for k, s in expected.items()
                   if k in given and tuple(given[k].shape) != tuple(s))
    problems = []
    for label, items in (("missing", missing), ("unexpected", extra), ("wrong shape", wrong)):
        if items:
            more = f" (+{len(items) - 3} more)" if len(items) > 3 else ""
            problems.append(f"{len(items)} {label}: {', '.join(items[:3])}{more}")
    if problems:
        raise ValueError("adapter state dict does not fit the model: " + "; ".join(problems))
    with torch.no_grad():
        for name, layer in adapted_layers(model):
            assign(layer.lora_A.weight, given[f"{prefix}{name}.lora_A.weight"])
            assign(layer.lora_B.weight, given[f"{prefix}{name}.lora_B.weight"])
            if layer.use_dora:
                assign(layer.lora_magnitude_vector, given[f"{prefix}{name}.lora_magnitude_vector"])
            layer.clear_cache()


def set_adapters_enabled(model: nn.Module, enabled: bool) -> None:
    """Switch every adapter off (the exact base model, magnitude included) or back on."""
    for _, layer in adapted_layers(model):
        layer.adapter_enabled = enabled


def merge_adapters(model: nn.Module) -> nn.Module:
    """Replace every adapter layer by a plain layer holding the merged weight; returns model."""
    for name, layer in list(adapted_layers(model)):
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, layer.merged_layer())
    return model

"""How each consumer applies a kohya / LyCORIS file: module names, and each UI's merge rule.

Written from the consumers' published code (read through the public code index), per module with
`V = W0 + (alpha / r) · up @ down` (`up` (out, r), `down` (r, in) or conv (r, in, kh, kw)) and
DoRA's `dora_scale` d:

    lycoris        LyCORIS 3.x, PEFT, diffusers      W' = V · d / (‖V‖ + eps), the norm on the axis
                                                     d is laid out on: (out, 1, ...) per output row
    comfyui        ComfyUI and Forge today           output-axis d: W' = V · d / (‖W0‖_row + eps);
                   (`weight_decompose`)              input-axis d: W' = V · d / (‖V‖_col + eps)
    comfyui-15458  ComfyUI after PR #15458           output-axis d: W' = V · d / (‖V‖_row + eps)
    a1111          A1111's built-in Lora extension   W' = V · d / ‖V‖_col, per input column whatever
                   (`network.apply_weight_decompose`) d's layout (an output-axis d broadcasts wrong)

A module with `diff` (LyCORIS "full") is `W' = W0 + diff` in all of them; a module without
`dora_scale` is plain LoRA, `W' = V` in all of them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..adapters.file import AdapterError, layout_prefix
from ..adapters.inject import adapted_layers
from ..families import FAMILIES, KOHYA_PARTS

RULES = ("lycoris", "comfyui", "comfyui-15458", "a1111")
RULE_NAMES = {
    "lycoris": "LyCORIS / PEFT / diffusers",
    "comfyui": "ComfyUI and Forge today",
    "comfyui-15458": "ComfyUI after PR #15458",
    "a1111": "A1111 (built-in Lora)",
}


@dataclass
class Stack:
    """One web UI module: our layers whose weights it stacks along its output rows, in order. One
    layer for the UNet families; FLUX's and SD 3's fused q, k, v (and FLUX's single blocks' MLP
    input) for the DiTs, where a member the adapter leaves is a plain layer (its rows unchanged).
    DoRA's rescaling is per output row, so a stack of DoRA layers is one DoRA module exactly."""

    part: str  # the pipeline part ('unet', 'transformer', 'text_encoder', ...)
    names: tuple[str, ...]  # the members' module names (the file layout's, e.g. `text_model.` kept)
    members: tuple  # adapted layers (`AdaptedLayer`) or plain nn.Linear / nn.Conv2d

    @property
    def adapted(self) -> list:
        return [m for m in self.members if is_adapted(m)]

    def weight(self) -> torch.Tensor:
        """W0 (fp32): the members' base weights stacked."""
        return torch.cat([m.weight.detach().float() for m in self.members])

    def merged(self) -> torch.Tensor:
        """W' (fp32): the adapted members' exact weights, the others' base weights, stacked."""
        return torch.cat([(m.merged_weight() if is_adapted(m) else m.weight.detach()).float() for m in self.members])

    def rows(self, weight: torch.Tensor) -> list[torch.Tensor]:
        """`weight` (stacked) cut back into the members' rows."""
        return list(weight.split([m.weight.shape[0] for m in self.members]))


def is_adapted(module) -> bool:
    return hasattr(module, "merged_weight")


def layers_by_kohya_key(family, models: dict) -> dict[str, Stack]:
    """{web UI module name (kohya's key): Stack} for the adapted models of a pipeline of `family`
    ({part: model}); a layer the web UIs have no module for is one AdapterError."""
    out: dict[str, Stack] = {}
    for part, model in models.items():
        head = layout_prefix(model)
        for name, _ in adapted_layers(model):
            try:
                key, names = family.webui_stack(part, head + name, model)
            except ValueError as err:
                raise AdapterError(str(err)) from None
            if key not in out:
                out[key] = Stack(part, names, tuple(model.get_submodule(n[len(head):]) for n in names))
    return out


EXACT = 1e-4  # what "exact" allows: fp32 rounding of the stored tensors (verify's and info's verdicts)
ROUNDING_LIMIT = 0.1  # a 16-bit file within its precision loses at most this much of the change; more is WRONG


NO_CHANGE = 1e-6  # a layer whose change is below this fraction of ||W0|| has (almost) none


def has_no_change(w0: torch.Tensor, target: torch.Tensor) -> bool:
    """The adapter leaves this layer as it was (e.g. SDXL's last clip_l layer, which gets no
    gradient under penultimate-layer conditioning): ||W' - W0|| <= NO_CHANGE ||W0||."""
    return (target - w0).float().norm().item() <= NO_CHANGE * w0.float().norm().item()


def relative_error(merged: torch.Tensor, w0: torch.Tensor, target: torch.Tensor,
                   reference: torch.Tensor | None = None) -> float:
    """||W'_merged - W'|| / ||W' - W0||: a consumer's error relative to the adapter's own change
    (1.0 is as wrong as leaving the adapter out). A layer the adapter does not change is judged
    against ||W0|| instead (dividing by a change of ~0 would call float rounding a huge error).
    With `reference`, the error is measured against it instead of W' (the denominator stays).
    NaN / inf in the merged weights give NaN / inf: never a small number."""
    scale = (w0 if has_no_change(w0, target) else target - w0).float().norm().item()
    return (merged - (target if reference is None else reference)).float().norm().item() / max(scale, 1e-30)


def part_of(key: str, base_version: str | None = None) -> str | None:
    """The model part a kohya module name adapts ('unet', 'transformer', 'text_encoder', ...): by
    the prefixes of the family whose web UI files say `base_version` (`ss_base_model_version`),
    else by the kohya prefixes of every model family."""
    family = next((f for f in FAMILIES if base_version and base_version in f.webui_versions), None)
    prefixes = KOHYA_PARTS if family is None else {p: part for part, p in family.kohya_prefixes.items()}
    for start, part in sorted(prefixes.items(), key=lambda kv: -len(kv[0])):
        if key.startswith(start):
            return part
    return None


@dataclass
class KohyaModule:
    """One module's tensors in a kohya / LyCORIS file."""

    down: torch.Tensor | None = None  # lora_down.weight (r, in[, kh, kw])
    up: torch.Tensor | None = None  # lora_up.weight (out, r[, 1, 1])
    alpha: float | None = None
    dora_scale: torch.Tensor | None = None
    diff: torch.Tensor | None = None  # LyCORIS full: W' - W0
    other: tuple[str, ...] = ()  # keys of kinds not read here (LoHa, LoKr, ...)

    @property
    def kind(self) -> str:
        if self.diff is not None:
            return "full"
        if self.down is not None and self.up is not None:
            return "dora" if self.dora_scale is not None else "lora"
        return "other"

    @property
    def rank(self) -> int | None:
        return None if self.down is None else int(self.down.shape[0])

    def dora_axis(self, out_features: int | None = None) -> str | None:
        """'output' for d shaped (out, 1, ...), 'input' for (1, in, ...)."""
        if self.dora_scale is None:
            return None
        d = self.dora_scale
        if d.dim() >= 2 and d.shape[0] == 1 and (out_features is None or out_features != 1):
            return "input"
        return "output"


def read_kohya_modules(tensors: dict[str, torch.Tensor]) -> dict[str, KohyaModule]:
    """Group `<module>.<kind>` keys into modules (names keep kohya's `lora_unet_...` form)."""
    modules: dict[str, KohyaModule] = {}
    for key, value in tensors.items():
        if key.startswith(BUNDLE):  # embeddings bundled with the LoRA, not a module
            continue
        name, _, kind = key.partition(".")
        mod = modules.setdefault(name, KohyaModule())
        if kind == "lora_down.weight":
            mod.down = value
        elif kind == "lora_up.weight":
            mod.up = value
        elif kind == "alpha":
            mod.alpha = float(value)
        elif kind == "dora_scale":
            mod.dora_scale = value
        elif kind == "diff":
            mod.diff = value
        else:
            mod.other = (*mod.other, kind)
    return modules


def _eps(dtype) -> float:
    return torch.finfo(dtype).eps


def _row_norm(w: torch.Tensor) -> torch.Tensor:  # (out, 1, ...)
    return w.reshape(w.shape[0], -1).norm(dim=1).reshape(w.shape[0], *[1] * (w.dim() - 1))


def _col_norm(w: torch.Tensor) -> torch.Tensor:  # (1, in, ...)
    return w.transpose(0, 1).reshape(w.shape[1], -1).norm(dim=1).reshape(w.shape[1], *[1] * (w.dim() - 1)).transpose(0, 1)


def merge(rule: str, w0: torch.Tensor, mod: KohyaModule) -> torch.Tensor:
    """W' under `rule` (one of RULES), in fp32, for base weight `w0` (out, in[, kh, kw])."""
    w0 = w0.float()
    if mod.diff is not None:
        return w0 + mod.diff.float().reshape(w0.shape)
    if mod.kind not in ("lora", "dora"):
        raise ValueError(f"module kind {mod.kind!r} ({', '.join(mod.other)}) has no rule here")
    r = mod.down.shape[0]
    scale = (mod.alpha if mod.alpha is not None else r) / r
    v = w0 + scale * (mod.up.float().flatten(1) @ mod.down.float().flatten(1)).reshape(w0.shape)
    if mod.dora_scale is None:
        return v
    d = mod.dora_scale.float()
    eps = _eps(torch.float32)
    output_axis = mod.dora_axis(w0.shape[0]) == "output"
    if rule == "a1111":
        return v * (d / _col_norm(v))
    if not output_axis:  # every UI agrees on the input axis
        return v * (d / (_col_norm(v) + eps))
    d = d.reshape(w0.shape[0], *[1] * (w0.dim() - 1))
    if rule == "comfyui":  # the output-axis branch divides by the base weight's norm
        return v * (d / (_row_norm(w0) + eps))
    if rule in ("lycoris", "comfyui-15458"):
        return v * d / (_row_norm(v) + eps)
    raise ValueError(f"unknown rule {rule!r}; known: {', '.join(RULES)}")


# ---- textual-inversion embeddings (pivotal tuning's web UI files) -------------------------------
#
# A1111 (`modules/textual_inversion/textual_inversion.py`, `create_embedding_from_data`):
# `string_to_param` -> its tensor; `clip_g` and `clip_l` both present -> SDXL, one tensor per
# encoder; any other mapping of tensors must hold exactly one ("multiple terms" otherwise), which
# is the embedding (a 1-D tensor is one vector). ComfyUI (`comfy/sd1_clip.py`, `load_embed`):
# `string_to_param` -> its tensor; the encoder's key (`clip_l` / `clip_g`) when present; else the
# first tensor. Both insert all rows, in order, where the prompt names the file.

BUNDLE = "bundle_emb."


def a1111_bundled_embeddings(tensors: dict) -> dict[str, dict]:
    """A1111's `networks.load_network`: keys `bundle_emb.<name>.<vec>` of a LoRA file grouped
    into {name: {vec: tensor}} (`string_to_param.<k>` nested), each then read by
    `a1111_embedding` under the trigger word <name>."""
    out: dict[str, dict] = {}
    for key, weight in tensors.items():
        root, _, rest = key.partition(".")
        if root != "bundle_emb":
            continue
        name, vec = rest.split(".", 1)
        if vec.split(".")[0] == "string_to_param":
            out.setdefault(name, {})["string_to_param"] = {vec.split(".", 1)[1]: weight}
        else:
            out.setdefault(name, {})[vec] = weight
    return out


def a1111_embedding(data: dict) -> dict[str, torch.Tensor]:
    """The vectors A1111 reads from an embedding file: {"clip_l": (n, D)} or, SDXL, clip_l + clip_g."""
    if "string_to_param" in data:
        return {"clip_l": next(iter(data["string_to_param"].values()))}
    if "clip_g" in data and "clip_l" in data:
        return {"clip_l": data["clip_l"], "clip_g": data["clip_g"]}
    if len(data) != 1:
        raise ValueError("embedding file has multiple terms in it")  # A1111 skips such a file
    emb = next(iter(data.values()))
    return {"clip_l": emb.unsqueeze(0) if emb.dim() == 1 else emb}


def comfyui_embedding(data: dict, embed_key: str, embedding_size: int) -> torch.Tensor:
    """The vectors ComfyUI's text encoder `embed_key` ('clip_l' / 'clip_g') reads from the file."""
    if "string_to_param" in data:
        out = next(iter(data["string_to_param"].values()))
    elif embed_key in data:
        out = data[embed_key]
    else:
        out = next(iter(data.values()))
    if out.shape[-1] != embedding_size:
        raise ValueError(f"embedding width {out.shape[-1]}, the encoder's is {embedding_size}")
    return out

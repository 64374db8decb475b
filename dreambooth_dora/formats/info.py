"""`dreambooth-dora info` for any file we write or a user brings: format, method, rank, alpha,
targets by model part, dtype, base model, and which consumers apply it exactly.

Recognised: our adapter (diffusers / PEFT layout with `unet.` / `text_encoder.` keys), a PEFT
`adapter_model.safetensors` (`base_model.model.` keys), kohya / LyCORIS files (`lora_unet_`,
`lora_te_` modules: LoRA, DoRA on either axis, full `diff`), a fused pipeline folder.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from ..adapters.file import AdapterError, describe, nonfinite, read_adapter
from ..adapters.pivotal import EMBEDDINGS_FILE
from .consumers import (EXACT, ROUNDING_LIMIT, RULE_NAMES, RULES, a1111_bundled_embeddings, part_of,
                        read_kohya_modules)
from ..families import ADAPTER_PARTS, EMBEDDING_PARTS, FAMILIES

DIT_VERSIONS = {v for f in FAMILIES if f.fixed_encoders for v in f.webui_versions}  # FLUX.1's and SD 3's files
from ..outputs import ADAPTER_FILE, OUTPUT_MARKER
from .export import DIGEST_KEY, PRECISION_FILE, tensors_digest

# what an output-axis DoRA file is exact under when it does not say (LyCORIS's wd_on_output layout)
DEFAULT_RULE = "lycoris-exact"
KNOWN_TARGETS = ("to_out_0", "ff_net_0_proj", "ff_net_2", "proj_in", "proj_out", "q_proj", "k_proj", "v_proj",
                 "out_proj", "fc1", "fc2", "to_q", "to_k", "to_v", "conv1", "conv2", "conv_shortcut",
                 # the DiT checkpoints' names (FLUX.1, SD 3)
                 "img_attn_qkv", "txt_attn_qkv", "img_attn_proj", "txt_attn_proj", "img_mlp_0", "img_mlp_2",
                 "txt_mlp_0", "txt_mlp_2", "x_block_attn_qkv", "context_block_attn_qkv", "x_block_attn2_qkv",
                 "x_block_attn_proj", "context_block_attn_proj", "x_block_attn2_proj", "mlp_fc1", "mlp_fc2")
# the files' DiT names are the families' (webui_kind); these catch the UNet families' and the text encoders'



@dataclass
class PartInfo:
    modules: int
    targets: list[str]
    ranks: list[int]
    alphas: list[float]


@dataclass
class FileInfo:
    file: str
    format: str
    method: str
    dtype: str
    base_model: str
    parameters: int
    parts: dict[str, PartInfo] = field(default_factory=dict)
    exact_in: list[str] = field(default_factory=list)  # consumers.RULE_NAMES values
    wrong_in: list[str] = field(default_factory=list)
    rounding_in: list[str] = field(default_factory=list)  # a 16-bit file within its measured precision there
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return asdict(self)

    def lines(self) -> list[str]:
        out = [self.file, f"  format: {self.format}", f"  method: {self.method}", f"  dtype: {self.dtype}",
               f"  base model: {self.base_model}", f"  parameters: {self.parameters:,}"]
        for part, p in self.parts.items():
            ranks = "/".join(map(str, sorted(set(p.ranks)))) or "-"
            alphas = "/".join(f"{a:g}" for a in sorted(set(p.alphas))) or "-"
            out.append(f"  {part}: {p.modules} modules ({', '.join(p.targets)}), rank {ranks}, alpha {alphas}")
        out.append(f"  exact in: {', '.join(self.exact_in) or 'none known'}")
        if self.rounding_in:
            out.append(f"  within its precision in: {', '.join(self.rounding_in)}")
        if self.wrong_in:
            out.append(f"  applied wrongly by: {', '.join(self.wrong_in)}")
        out += [f"  note: {n}" for n in self.notes]
        return out


def _number(meta: dict, key: str) -> str:
    """A number the file's metadata states, formatted; a damaged one is said, never a traceback."""
    try:
        return f"{float(meta[key]):.2e}"
    except (KeyError, TypeError, ValueError):
        return f"an unknown amount (its {key} is {'missing' if key not in meta else 'damaged'})"


def _target(name: str, part: str | None) -> str:
    """The kind of module a kohya key names: the DiT checkpoints' own names (asked of the families),
    else the known suffixes, else the last word."""
    native = next((k for f in FAMILIES if (k := f.webui_kind(part, name))), None)
    return native or next((t for t in KNOWN_TARGETS if name.endswith("_" + t)), name.rsplit("_", 1)[-1])


def _dtype_of(tensors: dict) -> str:
    names = {"torch.float32": "fp32", "torch.float16": "fp16", "torch.bfloat16": "bf16"}
    return "/".join(sorted({names.get(str(v.dtype), str(v.dtype)) for k, v in tensors.items()
                            if not k.endswith(".alpha")}))


DTYPE_OF = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def stored_dtype(pipeline: Path) -> str:
    """The precision a pipeline folder's weights are stored in ('fp32', 'fp16', 'bf16'; the lowest
    found), read from the safetensors headers only."""
    names = {"F32": "fp32", "F16": "fp16", "BF16": "bf16"}
    found = set()
    for file in pipeline.glob("*/*.safetensors"):
        try:
            with safe_open(str(file), "pt") as f:
                found |= {names.get(f.get_slice(k).get_dtype(), "fp32") for k in list(f.keys())[:8]}
        except (SafetensorError, OSError, ValueError):
            continue
    return next((d for d in ("bf16", "fp16") if d in found), "fp32")


def read_safetensors(path: Path) -> tuple[dict, dict]:
    try:
        with safe_open(str(path), "pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as err:
        raise AdapterError(f"{str(path)!r} is not a readable safetensors file: {str(err)[:200]}") from None


def file_info(path: str | Path) -> FileInfo:
    path = Path(path)
    if path.is_dir() and (path / "model_index.json").is_file():
        marker = path / OUTPUT_MARKER
        kind = json.loads(marker.read_text()).get("kind") if marker.is_file() else None
        dtype = stored_dtype(path)
        meta = {}
        try:  # a fused export records its precision and what it cost (export.PRECISION_FILE)
            record = json.loads((path / PRECISION_FILE).read_text(encoding="utf-8"))
            meta = {"dreambooth_dora_dtype": str(record["dtype"]), "dreambooth_dora_dtype_error": record["dtype_error"]}
        except (OSError, ValueError, KeyError, TypeError):
            pass
        exact, rounding, said = _precision(list(RULES), {"w": torch.empty(0, dtype=DTYPE_OF[dtype])}, meta)
        return FileInfo(str(path), "fused diffusers pipeline" + (" (dreambooth-dora export)" if kind else ""),
                        "merged (plain weights)", dtype, "itself", 0,
                        exact_in=[RULE_NAMES[r] for r in exact] + (["diffusers"] if exact else []),
                        rounding_in=[RULE_NAMES[r] for r in rounding] + (["diffusers"] if rounding else []),
                        notes=["a complete model: load it as the base model, no adapter rule involved"]
                        + ([said] if said else [])
                        + ([f"new tokens (pivotal tuning), write them where a prompt had the identifier: "
                            f"{(path / 'tokens.json').read_text().strip()}"] if (path / "tokens.json").is_file() else []))
    file = path / ADAPTER_FILE if path.is_dir() else path
    if not file.is_file():
        raise AdapterError(f"no adapter file at {str(file)!r}")
    if file.suffix.lower() == ".bin":
        raise AdapterError(f"{str(file)!r}: only .safetensors files are read (a pickled .bin can run code)")
    tensors, meta = read_safetensors(file)
    roots = {k.split(".", 1)[0] for k in tensors}
    if roots and roots <= set(ADAPTER_PARTS):
        info = _ours(file, tensors)
    elif any(k.startswith("base_model.model.") for k in tensors):
        info = _peft(file, tensors)
    elif any(part_of(k) for k in tensors):
        info = _kohya(file, tensors, meta)
    elif tensors and all(v.dim() in (1, 2) for v in tensors.values()) and (
            set(tensors) <= {"emb_params", "clip_l", "clip_g", "t5"} or len(tensors) == 1):
        info = _embedding(file, tensors)
    else:
        raise AdapterError(f"{str(file)!r} holds no adapter this tool knows (keys like {sorted(tensors)[:2]})")
    bad = nonfinite(tensors)
    if bad:  # no consumer draws it: a run that diverged (verify says WRONG everywhere)
        _wrong_everywhere(info, f"BROKEN: {len(bad)} tensor(s) hold NaN or inf ({bad[0]}{' ...' if len(bad) > 1 else ''}): "
                                "every consumer draws black or noise; take an earlier checkpoint or train again with a "
                                "lower learning rate")
    return info


def _wrong_everywhere(info: FileInfo, why: str) -> None:
    everyone = list(dict.fromkeys([*info.exact_in, *info.rounding_in, *info.wrong_in])) or list(RULE_NAMES.values())
    info.exact_in, info.rounding_in, info.wrong_in = [], [], everyone
    info.notes.insert(0, why)


def _ours(file: Path, tensors: dict) -> FileInfo:
    d = describe(file)
    family = read_adapter(file).family
    parts = {p: PartInfo(s.modules, s.targets, [s.rank], [s.alpha]) for p, s in d.parts.items()}
    dora = d.method == "DoRA"
    notes = [f"{family.label} adapter; load it with dreambooth_dora.load_adapter (exact); stock diffusers "
             f"load_lora_weights is exact for the {family.denoiser_label}"
             + (" but drops text-encoder DoRA magnitudes" if dora and len(parts) > 1 else "")]
    if d.tokens:
        beside = file.parent / EMBEDDINGS_FILE
        notes.append("new tokens (pivotal tuning): " + ", ".join(f"{a}={''.join(t)}" for a, t in d.tokens.items())
                     + (f"; vectors in {beside.name} beside it" if beside.is_file() else f"; {beside.name} is MISSING"))
    return FileInfo(str(file), "diffusers / PEFT adapter (dreambooth-dora)", d.method, _dtype_of(tensors),
                    d.base_model, d.parameters, parts, exact_in=["diffusers / PEFT"],
                    notes=notes + [f"{family.webui_consumers}: export it (--format kohya, --comfyui or full)"])


def _peft(file: Path, tensors: dict) -> FileInfo:
    modules = {k.rsplit(".lora_", 1)[0] for k in tensors if ".lora_" in k}
    dora = any("lora_magnitude_vector" in k for k in tensors)
    ranks = [v.shape[0] for k, v in tensors.items() if k.endswith("lora_A.weight")]
    targets = sorted({m.rsplit(".", 1)[-1] for m in modules})
    part = PartInfo(len(modules), targets, ranks, [])
    return FileInfo(str(file), "PEFT adapter (base_model.model.* keys)", "DoRA" if dora else "LoRA",
                    _dtype_of(tensors), "not recorded", sum(v.numel() for v in tensors.values()), {"model": part},
                    exact_in=["PEFT"], notes=["alpha is in the adapter_config.json beside it"])


def _embedding(file: Path, tensors: dict) -> FileInfo:
    """Textual-inversion embeddings: A1111's `emb_params`, SDXL's `clip_l` / `clip_g`, or diffusers'
    `{token: vectors}`."""
    parts = {}
    for key, v in tensors.items():
        vectors = v.reshape(-1, v.shape[-1])
        part = "T5" if key == "t5" else EMBEDDING_PARTS.get(key, "text_encoder")
        parts[part] = PartInfo(vectors.shape[0], [f"{vectors.shape[0]} vector(s) of width {vectors.shape[1]}"], [], [])
    token = next(iter(tensors)) if set(tensors) - {"emb_params", "clip_l", "clip_g", "t5"} else None
    notes = [f"token {token!r}" if token else "the token is the file name in A1111 / ComfyUI"]
    return FileInfo(str(file), "textual-inversion embedding", "new token vectors", _dtype_of(tensors),
                    "not recorded", sum(v.numel() for v in tensors.values()), parts,
                    exact_in=["A1111", "ComfyUI", "Forge", "diffusers (load_textual_inversion)"], notes=notes)


def _kohya(file: Path, tensors: dict, meta: dict) -> FileInfo:
    modules = read_kohya_modules(tensors)
    kinds = {m.kind for m in modules.values()}
    parts: dict[str, PartInfo] = {}
    version = meta.get("ss_base_model_version")
    for name, mod in sorted(modules.items()):
        p = parts.setdefault(part_of(name, version) or "other", PartInfo(0, [], [], []))
        p.modules += 1
        target = _target(name, part_of(name, version))
        if target not in p.targets:
            p.targets.append(target)
        if mod.rank is not None:
            p.ranks.append(mod.rank)
        if mod.alpha is not None:
            p.alphas.append(mod.alpha)
    axes = {m.dora_axis() for m in modules.values() if m.kind == "dora"}
    rule = meta.get("dreambooth_dora_rule") or meta.get("dreambooth_dora_dora_scale")
    notes = []
    if kinds == {"full"}:
        fmt, method, exact = "LyCORIS full (weight differences)", "full difference", list(RULES)
    elif kinds <= {"lora"} and rule == "svd-lora":
        fmt, method, exact = "kohya LoRA re-extracted by SVD", "LoRA (approximation)", []
        notes.append(f"every UI applies it the same way; it differs from the adapter by "
                     f"{_number(meta, 'dreambooth_dora_svd_error')} of its change (max over layers)")
    elif kinds <= {"lora"}:
        fmt, method, exact = "kohya LoRA", "LoRA", list(RULES)
    elif "other" in kinds:
        fmt, method, exact = "LyCORIS (other algorithm)", "other", []
        notes.append("modules of kinds this tool cannot merge: " + ", ".join(sorted({
            o for m in modules.values() for o in m.other})[:5]))
    elif axes == {"input"}:
        fmt, method, exact = "kohya / LyCORIS DoRA, input axis", "DoRA", list(RULES)
        notes.append("input-axis DoRA: every UI normalises it the same way")
    else:
        rule = rule or DEFAULT_RULE
        if rule not in ("lycoris-exact", "comfyui-compensated"):
            rule = DEFAULT_RULE
        fmt = f"kohya / LyCORIS DoRA, output axis ({rule})"
        method = "DoRA"
        exact = ["lycoris", "comfyui-15458"] if rule == "lycoris-exact" else ["comfyui"]
        if not meta.get("dreambooth_dora_rule") and not meta.get("dreambooth_dora_dora_scale"):
            notes.append("the file does not say which dora_scale it holds; LyCORIS's (wd_on_output) assumed")
    exact, rounding, precision_note = _precision(exact, tensors, meta)
    if precision_note:
        notes.append(precision_note)
    bundled = a1111_bundled_embeddings(tensors)
    if bundled:
        notes.append("bundled embeddings, loaded with the LoRA by A1111 / Forge (write the trigger word in the "
                     "prompt): " + ", ".join(f"{name} ({next(iter(d.values())).shape[0]} vectors)"
                                             for name, d in bundled.items()))
    if version in DIT_VERSIONS:
        family = next(f for f in FAMILIES if version in f.webui_versions)
        notes.append(f"{family.label} module names of the original checkpoint (fused q/k/v): for "
                     f"{family.webui_consumers}; A1111's column is its rule only (A1111 runs no FLUX; its SD 3 LoRA "
                     "loading is not checked)")
    if meta.get("ss_v2") == "True":
        notes.append("SD 2.x file (ss_v2): A1111 lists it with an SD 2.x checkpoint loaded")
    base = meta.get("dreambooth_dora_base_model") or meta.get("ss_base_model_version") or "not recorded"
    info = FileInfo(str(file), fmt, method, _dtype_of(tensors), base, sum(v.numel() for v in tensors.values()),
                    parts, exact_in=[RULE_NAMES[r] for r in exact], rounding_in=[RULE_NAMES[r] for r in rounding],
                    wrong_in=[RULE_NAMES[r] for r in RULES if r not in exact and r not in rounding
                              and method not in ("other",) and rule != "svd-lora"], notes=notes)
    broken = next((why for name, mod in sorted(modules.items()) if (why := _module_problem(name, mod))), None)
    if broken:
        _wrong_everywhere(info, f"BROKEN: {broken}: no consumer can apply it")
    elif meta.get(DIGEST_KEY) and meta[DIGEST_KEY] != tensors_digest(tensors):
        # the verdicts above are what the export measured; edited tensors (a module's rank, a cast) void them
        info.exact_in, info.rounding_in, info.wrong_in = [], [], []
        info.notes.insert(0, "CHANGED since dreambooth-dora exported it (its tensors are not the ones written): no "
                             "verdict without the base model; run `dreambooth-dora verify FILE --against ADAPTER`")
    return info


def _module_problem(name: str, mod) -> str | None:
    """Why a module's tensors do not fit together (ranks, dora_scale's length), or None."""
    if mod.kind not in ("lora", "dora"):
        return None
    if mod.up.shape[1] != mod.down.shape[0]:
        return f"module {name} has lora_up of rank {mod.up.shape[1]} but lora_down of rank {mod.down.shape[0]}"
    if mod.dora_scale is not None and mod.dora_scale.numel() not in (mod.up.shape[0], mod.down.shape[1]):
        return (f"module {name} has a dora_scale of {mod.dora_scale.numel()} values for a layer of "
                f"{mod.up.shape[0]} outputs and {mod.down.shape[1]} inputs")
    return None


def _precision(exact: list[str], tensors: dict, meta: dict) -> tuple[list[str], list[str], str | None]:
    """(rules it is exact under, rules it is within its precision under, a note) for a file whose
    tensors may be 16-bit, judged as `verify` judges: the error a cast caused (measured by `export`
    into the file's metadata) up to EXACT is exact, up to ROUNDING_LIMIT is the precision's rounding,
    more is WRONG; a 16-bit file without that figure has no verdict here (it depends on the base)."""
    key = "dreambooth_dora_dtype_error"
    sixteen = bool({v.dtype for k, v in tensors.items() if not k.endswith(".alpha")} & {torch.float16, torch.bfloat16})
    dtype = meta.get("dreambooth_dora_dtype") or ("16-bit" if sixteen else "fp32")
    said = (f"{dtype} storage changed the merged weights by {_number(meta, key)} of the adapter's own change (max "
            "over layers)") if key in meta else None
    try:
        error = float(meta[key])
    except (KeyError, TypeError, ValueError):
        error = math.nan
    if not sixteen or not exact:
        return exact, [], said
    if not math.isfinite(error):
        return [], [], ((said + "; ") if said else f"{dtype} storage: ") + (
            "how much it loses depends on the base model and the file does not record it: no verdict here; run "
            "`dreambooth-dora verify FILE --against ADAPTER`")
    if error <= EXACT:
        return exact, [], said
    if error <= ROUNDING_LIMIT:
        return [], exact, said
    return [], [], f"{said}: WRONG in every UI; export again with --dtype fp32 (exact) or --format full"

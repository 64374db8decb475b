"""Exports of an adapter: a fused diffusers pipeline, the kohya/LyCORIS single file, and the
LyCORIS "full" file of exact weight differences that every UI applies the same way.

Full layout, per adapted module: `lora_unet_<path>.diff = W' - W0` (the weight's shape), read by
A1111 (`network_full.py`), Forge, ComfyUI (the `diff` patch) and LyCORIS alike as `W0 + diff`:
exact everywhere by construction, at the size of the adapted weights themselves.

Kohya/LyCORIS layout, per adapted module (dots of the diffusers module path become `_`)::

    lora_unet_<path>.lora_down.weight   = lora_A              (r, in)
    lora_unet_<path>.lora_up.weight     = lora_B              (out, r)
    lora_unet_<path>.alpha              = scale * r           ()  so that alpha / r is our scale
    lora_unet_<path>.dora_scale         = magnitude           (out, 1); conv: (out, 1, 1, 1)
    lora_te_<path>...                   the text encoder; SDXL: lora_te1_<path> and lora_te2_<path>

The merge rule this must satisfy is LyCORIS's (`lycoris/modules/locon.py`,
`LoConModule.apply_weight_decompose` with `wd_on_out=True`, LyCORIS 3.x; read through the public
code index): `V = W0 + (alpha / r) * up @ down`, `n = ||V|| per output row + eps`,
`W' = V * dora_scale / n`; `dora_scale` shaped (out, 1, ...) marks the output axis. PEFT's DoRA
(ours) is the same rule, so the file is exact for LyCORIS-correct loaders.

ComfyUI (`comfy/weight_adapter/base.py`, `weight_decompose`) picks the output axis when
`dora_scale.shape[0] == weight.shape[0]`, but in that branch divides by the norm of the *base*
weight W0 rather than of V. `comfyui_compatible=True` writes `dora_scale = m * ||W0|| / ||V||`,
which makes that branch compute our W' exactly (and LyCORIS-correct loaders wrong).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..adapters.file import (AdapterError, AdapterFile, apply_to_models, base_model_of, layout_prefix, load_tokens,
                             read_finite_adapter, token_plan)
from ..adapters.inject import merge_adapters
from .consumers import RULES, KohyaModule, is_adapted, layers_by_kohya_key, merge, relative_error
from ..families import family_of_pipeline, pipeline_models
from ..families.models import load_pipeline
from ..outputs import EXPORT_KEY, atomic_dir, atomic_path, claim_output
from ..adapters.pivotal import bundled_embeddings

PRECISION_FILE = "dreambooth_dora_precision.json"  # a fused export's stored precision and what it cost
TOKENS_FILE = "tokens.json"  # a fused export's new tokens (pivotal tuning): {abstraction: [token, ...]}
TOKENS_KEY = "dreambooth_dora_tokens"  # the same in a kohya / full file's metadata
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
RULE_KEY = "dreambooth_dora_rule"  # the rule a file is exact under: lycoris-exact, comfyui-compensated, full, lora
EXACT_KEY = "dreambooth_dora_exact_in"  # the consumers (consumers.RULES) that apply it exactly
DIGEST_KEY = "dreambooth_dora_tensors_sha256"  # the tensors as written (info: edited since?)
DTYPE_ERROR_KEY = "dreambooth_dora_dtype_error"  # max over layers of ||W'_file - W'|| / ||W' - W0||
# ComfyUI's and Forge's output-axis DoRA rule, and PEFT's: which exports each applies exactly
EXACT_UNDER = {"lycoris-exact": ("lycoris", "comfyui-15458"), "comfyui-compensated": ("comfyui",),
               "full": RULES, "lora": RULES, "svd-lora": ()}  # svd-lora: the same approximation everywhere


def tensors_digest(tensors: dict) -> str:
    """SHA-256 of a file's tensors (names, dtypes, shapes, bytes): `info` trusts the verdicts this
    export recorded only while the tensors are still the ones written."""
    import hashlib

    h = hashlib.sha256()
    for key in sorted(tensors):
        t = tensors[key].contiguous()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def web_ui_names(adapter: AdapterFile, what: str) -> AdapterFile:
    """The adapter, if the web UIs have a module for each of its layers (the family's
    `webui_stack`); else one AdapterError, before any model loads, naming the layer and what works."""
    family = adapter.family
    for part in adapter.prefixes:
        for name in adapter.modules(part):
            try:
                family.webui_stack(part, name)
            except (ValueError, KeyError) as err:
                raise AdapterError(f"{what}: {err.args[0]}") from None
    return adapter


def _adapted(adapter: AdapterFile, base: str | None):
    """The base pipeline with the adapter applied (our exact layers), and its adapted models."""
    pipe = load_pipeline(base_model_of(adapter, base))
    models = pipeline_models(pipe)
    apply_to_models(adapter, models)
    return pipe, models


def export_fused(adapter_dir: str | Path, out_dir: str | Path, base: str | None = None,
                 overwrite: bool = False, dtype: str = "fp32") -> Path:
    """A complete diffusers pipeline with the adapter merged into its weights (plain layers),
    saved in `dtype`. `out_dir` must be new or empty, or (with `overwrite`) an earlier fused export."""
    adapter = read_finite_adapter(adapter_dir, "export")
    with claim_output(out_dir, "fused-pipeline", overwrite=overwrite, sources=(adapter.path.parent,)) as out_dir:
        pipe, models = _adapted(adapter, base)
        error = _cast_error(models, DTYPES[dtype])
        for model in models.values():
            merge_adapters(model)
        tokens, vectors = token_plan(pipe, adapter, "fused")
        load_tokens(pipe, tokens, vectors)  # pivotal tuning: the tokenizers and tables gain the new tokens
        pipe.to(DTYPES[dtype])
        with atomic_dir(out_dir, "fused-pipeline") as tmp:
            pipe.save_pretrained(tmp)
            if tokens:
                (tmp / TOKENS_FILE).write_text(json.dumps(tokens, indent=1) + "\n", encoding="utf-8")
            (tmp / PRECISION_FILE).write_text(json.dumps({"dtype": dtype, "dtype_error": error}) + "\n",
                                              encoding="utf-8")
        return out_dir


@torch.no_grad()
def _cast_error(models: dict, dtype: torch.dtype) -> float:
    """Max over adapted layers of ||cast(W') - W'|| / ||W' - W0||: what storing the merged weights in
    `dtype` loses of the adapter's change."""
    from ..adapters.inject import adapted_layers

    worst = 0.0
    for model in models.values():
        for _, layer in adapted_layers(model):
            target = layer.merged_weight().float()
            w0 = layer.weight.detach().float()
            worst = max(worst, relative_error(target.to(dtype).float(), w0, target))
    return worst


def precision_said(out: Path) -> str | None:
    """What an export's stored precision cost, as measured when it was written (None: not recorded)."""
    try:
        if out.is_dir():
            record = json.loads((out / PRECISION_FILE).read_text(encoding="utf-8"))
            dtype, error = record["dtype"], float(record["dtype_error"])
        else:
            from safetensors import safe_open

            with safe_open(str(out), "pt") as f:
                meta = f.metadata() or {}
            dtype, error = meta["dreambooth_dora_dtype"], float(meta[DTYPE_ERROR_KEY])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    said = (f"{dtype} storage: the merged weights differ from the adapter's by {100 * error:.2g}% of its change "
            "(max over layers)")
    if dtype == "fp32" or error <= 0.01:
        return said
    return said + (": over 1%; for less, export --format full" + (" or --dtype fp16" if dtype == "bf16" else "")
                   + " (or --dtype fp32: exact)")


def _webui_metadata(pipe, adapter: AdapterFile, out_file: Path) -> dict:
    """What A1111 / Forge read to file a LoRA under a base model (the family's words), its name
    and our base model."""
    return {**family_of_pipeline(pipe).webui_metadata(pipe), "ss_output_name": out_file.stem,
            "dreambooth_dora_base_model": adapter.info.base_model or "unknown"}


def kohya_module(stack, comfyui_compatible: bool = False) -> KohyaModule:
    """A web UI module's kohya module (fp32) from a consumers.Stack: lora_down / lora_up, alpha so
    that alpha / r is the scale, and for DoRA the output-axis `dora_scale`, pre-compensated for
    ComfyUI's rule if asked. Several layers in one stack (FLUX's fused q, k, v) give one module of
    their summed rank: the downs stacked, each up (its scale folded in) on its own rows and its own
    columns (sd-scripts' split-qkv layout, which diffusers' kohya loader splits back), rows of
    members without an adapter zero; their `dora_scale` is ||W0|| per row, which every output-axis
    rule turns back into W0."""
    if len(stack.members) == 1:
        layer = stack.members[0]
        mod = KohyaModule(down=layer.lora_A.weight.detach().float(), up=layer.lora_B.weight.detach().float(),
                          alpha=float(layer.scaling * layer.rank))
    else:
        layers = stack.adapted
        rank = sum(layer.rank for layer in layers)
        up = torch.zeros(sum(member.weight.shape[0] for member in stack.members), rank)
        row = col = 0
        for member in stack.members:
            if is_adapted(member):
                b = member.lora_B.weight.detach().float().flatten(1) * member.scaling
                up[row:row + b.shape[0], col:col + b.shape[1]] = b
                col += b.shape[1]
            row += member.weight.shape[0]
        down = torch.cat([layer.lora_A.weight.detach().float() for layer in layers])
        mod = KohyaModule(down=down, up=up.reshape(up.shape[0], rank, *[1] * (down.dim() - 2)), alpha=float(rank))
    if any(getattr(layer, "use_dora", False) for layer in stack.adapted):
        scales = []
        for member in stack.members:
            if not is_adapted(member):
                scales.append(member.weight.detach().float().flatten(1).norm(dim=1))
                continue
            m = member.lora_magnitude_vector.detach().float().flatten()
            if comfyui_compatible:  # ComfyUI divides by ||W0||: pre-multiply by ||W0|| / ||V||
                m = m * member.weight.detach().float().flatten(1).norm(dim=1) / member.weight_norm()
            scales.append(m)
        mod.dora_scale = torch.cat(scales).reshape((-1,) + (1,) * (stack.members[0].weight.dim() - 1))
    return mod


@torch.no_grad()
def _write_module_file(adapter: AdapterFile, pipe, models, out_file: Path, rule: str, kind: str, dtype: str,
                       build, extra_metadata) -> Path:
    """What kohya, full and SVD files share: every web UI module's from `build(stack, W0, W')`,
    cast to `dtype`, the cast's error measured under the file's rule, the metadata, the atomic write.
    `extra_metadata`: a dict, or a function giving one once every module is built."""
    truths, modules = {}, {}
    for key, stack in layers_by_kohya_key(family_of_pipeline(pipe), models).items():
        truths[key] = (stack.weight(), stack.merged())
        modules[key] = build(stack, *truths[key])
    cast = {k: KohyaModule(**{f: (v.to(DTYPES[dtype]) if isinstance(v, torch.Tensor) else v)
                              for f, v in vars(m).items()}) for k, m in modules.items()}
    tensors = {}
    for key, mod in cast.items():
        for field, suffix in (("down", "lora_down.weight"), ("up", "lora_up.weight"), ("dora_scale", "dora_scale"),
                              ("diff", "diff")):
            if getattr(mod, field) is not None:
                tensors[f"{key}.{suffix}"] = getattr(mod, field).contiguous()
        if mod.alpha is not None:
            tensors[f"{key}.alpha"] = torch.tensor(mod.alpha, dtype=torch.float32)
    exact = EXACT_UNDER[rule]
    measure = (exact or RULES)[0]
    # the stored precision's error alone: the cast module against the same module in fp32, under the
    # file's rule (an SVD file's approximation error is its own field, dreambooth_dora_svd_error)
    error = max((relative_error(merge(measure, w0, cast[key]), w0, target, reference=merge(measure, w0, modules[key]))
                 for key, (w0, target) in truths.items()), default=0.0)
    metadata = {**_webui_metadata(pipe, adapter, out_file), RULE_KEY: rule, DIGEST_KEY: tensors_digest(tensors),
                EXACT_KEY: ",".join(exact), "dreambooth_dora_dtype": dtype, DTYPE_ERROR_KEY: f"{error:.3e}",
                EXPORT_KEY: kind,  # the export marker lets a later `--overwrite` recognise the file as ours
                **(extra_metadata() if callable(extra_metadata) else extra_metadata)}
    tokens, vectors = token_plan(pipe, adapter, "export")
    if tokens:  # pivotal tuning: the web UI embeddings ride along (A1111 / Forge load them with the LoRA)
        tensors.update({k: v.to(DTYPES[dtype]).contiguous() for k, v in bundled_embeddings(vectors, tokens).items()})
        metadata[TOKENS_KEY] = json.dumps(tokens)
        metadata[DIGEST_KEY] = tensors_digest(tensors)
    with atomic_path(out_file) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    return out_file


@torch.no_grad()
def export_kohya(adapter_dir: str | Path, out_file: str | Path, base: str | None = None,
                 comfyui_compatible: bool = False, overwrite: bool = False, dtype: str = "fp32") -> Path:
    """The kohya/LyCORIS single file (see the module docstring for the layout and rule), tensors in
    `dtype` (`dora_scale` computed in fp32 first). `out_file` must be new, or (with `overwrite`)
    an earlier kohya export."""
    adapter = web_ui_names(read_finite_adapter(adapter_dir, "export"), "--format kohya")
    with claim_output(out_file, "kohya", overwrite=overwrite, is_file=True,
                      sources=(adapter.path.parent,)) as out_file:
        pipe, models = _adapted(adapter, base)
        rule = ("comfyui-compensated" if comfyui_compatible else "lycoris-exact") if adapter.use_dora else "lora"
        rank, alpha = adapter.rank_alpha(adapter.main_prefix)
        metadata = {
            "ss_network_module": "lycoris.kohya" if adapter.use_dora else "networks.lora",
            "ss_network_dim": str(rank), "ss_network_alpha": str(alpha),
            "ss_network_args": json.dumps({"algo": "lora", "dora_wd": True, "wd_on_output": True} if adapter.use_dora
                                          else {"algo": "lora"}),
            **({"dreambooth_dora_dora_scale": rule} if adapter.use_dora else {}),  # only DoRA files say which
        }
        return _write_module_file(adapter, pipe, models, out_file, rule, "kohya", dtype,
                                  lambda stack, w0, target: kohya_module(stack, comfyui_compatible), metadata)


@torch.no_grad()
def export_full(adapter_dir: str | Path, out_file: str | Path, base: str | None = None,
                overwrite: bool = False, dtype: str = "fp32") -> Path:
    """The LyCORIS full-difference file: `diff = W' - W0` (computed in fp32, stored in `dtype`) for
    every adapted layer; exact in A1111, Forge, ComfyUI and LyCORIS."""
    adapter = web_ui_names(read_finite_adapter(adapter_dir, "export"), "--format full")
    with claim_output(out_file, "full", overwrite=overwrite, is_file=True,
                      sources=(adapter.path.parent,)) as out_file:
        pipe, models = _adapted(adapter, base)
        return _write_module_file(adapter, pipe, models, out_file, "full", "full", dtype,
                                  lambda stack, w0, target: KohyaModule(diff=target - w0),
                                  {"ss_network_module": "lycoris.kohya", "ss_network_args": json.dumps({"algo": "full"})})


@torch.no_grad()
def export_svd_lora(adapter_dir: str | Path, out_file: str | Path, rank: int, base: str | None = None,
                    overwrite: bool = False, dtype: str = "fp32") -> tuple[Path, float]:
    """A plain kohya LoRA of rank `rank` re-extracted from each layer's exact change `W' - W0` by
    SVD (the best rank-`rank` approximation), for consumers without DoRA. Every consumer applies it
    the same way; it is exact only where the change has rank <= `rank` (a LoRA adapter of that
    rank). Returns (file, max over layers of ||approximation - change|| / ||change||)."""
    if rank < 1:
        raise ValueError(f"--rank must be >= 1, got {rank}")
    adapter = web_ui_names(read_finite_adapter(adapter_dir, "export"), "--format svd")
    with claim_output(out_file, "kohya", overwrite=overwrite, is_file=True,
                      sources=(adapter.path.parent,)) as out_file:
        pipe, models = _adapted(adapter, base)
        worst = 0.0

        def build(stack, w0, target) -> KohyaModule:
            nonlocal worst
            change = (target - w0).flatten(1)  # (out, in·k·k)
            u, sv, vh = torch.linalg.svd(change, full_matrices=False)
            r = min(rank, sv.numel())
            root = sv[:r].sqrt()
            up, down = u[:, :r] * root, root[:, None] * vh[:r]
            worst = max(worst, ((up @ down - change).norm() / change.norm().clamp_min(1e-30)).item())
            if w0.dim() == 4:
                up, down = up.reshape(w0.shape[0], r, 1, 1), down.reshape(r, *w0.shape[1:])
            return KohyaModule(down=down.contiguous(), up=up.contiguous(), alpha=float(r))

        _write_module_file(adapter, pipe, models, out_file, "svd-lora", "kohya", dtype, build,
                           lambda: {"ss_network_module": "networks.lora", "ss_network_dim": str(rank),
                                    "ss_network_alpha": str(float(rank)), "ss_network_args": json.dumps({"algo": "lora"}),
                                    "dreambooth_dora_svd_error": f"{worst:.3e}"})  # after the builds measured it
        return out_file, worst


@torch.no_grad()
def consumer_view(adapter_dir: str | Path, rule: str, base: str | None = None):
    """The base pipeline with every adapted layer's weight as consumer `rule` (consumers.RULES:
    'comfyui', 'a1111', 'lycoris', 'comfyui-15458') computes it from our `--format kohya` file
    (the output-axis `dora_scale` layout): what that UI draws, to set beside the exact adapter.
    Plain layers (merged); the new tokens of a pivotal-tuning adapter are added as for `fused`."""
    if rule not in RULES:
        raise ValueError(f"unknown rule {rule!r}; one of {', '.join(RULES)}")
    adapter = read_finite_adapter(adapter_dir, "view")
    pipe, models = _adapted(adapter, base)
    for part, model in models.items():
        head = layout_prefix(model)
        for stack in layers_by_kohya_key(family_of_pipeline(pipe), {part: model}).values():
            rows = stack.rows(merge(rule, stack.weight(), kohya_module(stack)))
            for name, member, weight in zip(stack.names, stack.members, rows):
                if not is_adapted(member):  # a stacked layer without adapter: the rule may still move it
                    member.weight.copy_(weight.reshape(member.weight.shape))
                    continue
                plain = member.merged_layer()
                plain.weight.copy_(weight.reshape(plain.weight.shape))
                parent_name, _, child = name[len(head):].rpartition(".")
                setattr(model.get_submodule(parent_name) if parent_name else model, child, plain)
    load_tokens(pipe, *token_plan(pipe, adapter, "view"))
    return pipe

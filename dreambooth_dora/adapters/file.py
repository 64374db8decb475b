"""Adapter files, one home: write, read, describe, check the fit, apply to models, load exactly.

The file is `pytorch_lora_weights.safetensors` in the diffusers / PEFT layout
(`<part>.<module path>.lora_A.weight`, `lora_B.weight`, `lora_magnitude_vector` for DoRA; parts
`unet`, `text_encoder`, `text_encoder_2`), with two metadata entries: the LoRA config per part as
diffusers' `lora_adapter_metadata` (what stock loaders rebuild the adapter from), and what
training recorded (`AdapterInfo`, under `dreambooth_dora`).

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
import os
import re
import warnings
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .inject import adapted_layers, adapter_state_dict, add_adapters, load_adapter_state_dict
from ..families import ADAPTER_PARTS as PREFIXES, KOHYA_PARTS, family_of_pipeline, pipeline_models
from ..families.models import resolve_model
from ..outputs import ADAPTER_FILE, atomic_path
from .pivotal import EMBEDDINGS_FILE, read_embeddings

LORA_ADAPTER_METADATA_KEY = "lora_adapter_metadata"  # the key diffusers reads adapter configs from
INFO_KEY = "dreambooth_dora"  # the key training's AdapterInfo is stored under

log = logging.getLogger(__name__)


class AdapterError(ValueError):
    """Not an adapter, or an adapter for another model; the message names the first mismatch."""


@dataclass
class AdapterInfo:
    """What training records in the adapter file, typed; every field may be missing (None) in a
    file made elsewhere or by an older version."""

    method: str | None = None  # "dora" or "lora"
    rank: int | None = None
    lora_alpha: float | None = None
    base_model: str | None = None  # as given to training: hub id, folder or embedded:<name>
    instance_prompt: str | None = None
    class_prompt: str | None = None
    steps: int | None = None
    train_text_encoder: bool | None = None
    architecture: str | None = None  # the model family's name (`families`): "sd" (1.x / 2.x) or "sdxl"
    final_loss: float | None = None
    run_id: str | None = None
    settings: dict | None = None  # the training settings that made it
    tokens: dict | None = None  # pivotal tuning: {abstraction: [new token, ...]}, vectors in embeddings.safetensors
    checkpoint: bool = False  # a training checkpoint's copy, not a final adapter

    def to_json(self) -> str:
        return json.dumps({k: v for k, v in asdict(self).items() if v is not None and v is not False},
                          sort_keys=True)


@dataclass(frozen=True)
class PartSummary:
    modules: int
    targets: list[str]
    rank: int
    alpha: float
    parameters: int


@dataclass(frozen=True)
class AdapterSummary:
    """What `dreambooth-dora info` prints (`as_dict()` for --json)."""

    file: str
    method: str  # "DoRA" or "LoRA"
    base_model: str
    steps: int | None
    instance_prompt: str | None
    parameters: int
    parts: dict[str, PartSummary]
    tokens: dict | None = None  # pivotal tuning: {identifier: [new token, ...]}

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class AdapterFile:
    path: Path
    tensors: dict[str, torch.Tensor]  # "<prefix>.<module>.lora_A.weight" ...
    configs: dict[str, dict] = field(default_factory=dict)  # prefix -> LoraConfig kwargs
    info: AdapterInfo = field(default_factory=AdapterInfo)  # what training recorded

    @property
    def prefixes(self) -> list[str]:
        """The model parts the file adapts ('unet', 'text_encoder', ...), sorted."""
        return sorted({k.split(".", 1)[0] for k in self.tensors})

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
    def family(self):
        """The model family the file was trained on: recorded (`architecture`), or for files from
        before the field, the narrowest family whose parts cover the file's."""
        from ..families import family_named, family_of_parts

        return family_named(self.info.architecture) if self.info.architecture else family_of_parts(self.prefixes)

    @property
    def main_prefix(self) -> str:
        """The part whose rank and alpha name the file: the denoiser's, else the first."""
        denoiser = self.family.denoiser_part
        return denoiser if self.part(denoiser) else self.prefixes[0]

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


_GAP_SAID: list = []  # load_adapter's note on the stock loader's known gap, said once per process
_REPORTING = "transformers.integrations.peft"  # where transformers logs its adapter "LOAD REPORT"


class quiet_load_reports(logging.Filter):
    """While the stock loader runs, drop transformers' "LOAD REPORT" for a text encoder's adapter:
    its "MISSING ... newly initialized" lines are the DoRA magnitudes the stock loader skips, which
    `load_adapter` then checks tensor by tensor against the file and sets (said in one note)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "LOAD REPORT" not in str(record.msg)

    def __enter__(self):
        logging.getLogger(_REPORTING).addFilter(self)
        return self

    def __exit__(self, *exc):
        logging.getLogger(_REPORTING).removeFilter(self)
BIN_REFUSED = "pickled .bin weights are refused on purpose: loading a pickle can run code; save it as .safetensors"


def adapter_path(path: str | Path) -> Path:
    """The `.safetensors` file of an adapter folder or file; pickled `.bin` files are refused
    (loading them can run code), and the message says so."""
    path = Path(path)
    if path.is_dir():
        bins = [] if (path / ADAPTER_FILE).is_file() else sorted(p.name for p in path.glob("*.bin"))
        if bins:
            raise AdapterError(f"{str(path)!r} holds {bins[0]} but no {ADAPTER_FILE}: {BIN_REFUSED}")
        path = path / ADAPTER_FILE
    if path.suffix == ".bin":
        raise AdapterError(f"{str(path)!r}: {BIN_REFUSED}")
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
        kohya = any(u.startswith(tuple(KOHYA_PARTS)) for u in unknown)
        hint = ("a kohya / LyCORIS file (an export): `dreambooth-dora info` describes it; training tools read "
                "the diffusers layout" if kohya else f"expected prefixes {', '.join(PREFIXES)}")
        raise AdapterError(f"{str(file)!r} is not in the diffusers adapter layout ({len(unknown)} module(s) like "
                           f"{unknown[0]!r}); {hint}")
    configs: dict[str, dict] = {}
    for key, value in metadata_json(file, meta, LORA_ADAPTER_METADATA_KEY).items():
        prefix, _, name = key.partition(".")
        configs.setdefault(prefix, {})[name] = value
    known = {f.name for f in fields(AdapterInfo)}  # a newer file's extra fields are ignored
    info = AdapterInfo(**{k: v for k, v in metadata_json(file, meta, INFO_KEY).items() if k in known})
    return AdapterFile(file, tensors, configs, info)


def nonfinite(tensors: dict) -> list[str]:
    """The keys of tensors holding NaN or inf (a run that diverged): whatever loads them draws black
    or noise."""
    return sorted(k for k, v in tensors.items() if v.is_floating_point() and not bool(torch.isfinite(v).all()))


def read_finite_adapter(path: str | Path, what: str) -> AdapterFile:
    """`read_adapter`, refusing (one AdapterError) an adapter with NaN or inf: what `what` would make
    of it (a column, an export) would be broken."""
    adapter = read_adapter(path)
    bad = nonfinite(adapter.tensors)
    if bad:
        raise AdapterError(f"{what}: {adapter.path.parent.name}/{adapter.path.name} holds NaN or inf in {len(bad)} "
                           f"tensor(s) ({bad[0]}{' ...' if len(bad) > 1 else ''}): everything drawn with it would be "
                           "black or noise; take an earlier checkpoint, or train again with a lower learning rate")
    return adapter


def metadata_json(file: Path, meta: dict, key: str) -> dict:
    """The JSON object stored under `key` in a file's metadata ({} when absent); damaged (cut
    short, edited by hand, not an object) is one AdapterError naming the file and the field."""
    text = meta.get(key)
    if not text:
        return {}
    try:
        data = json.loads(text)
    except ValueError as err:
        raise AdapterError(f"{str(file)!r}: its metadata field {key!r} is damaged (not valid JSON: {err.msg} at "
                           f"character {err.pos}); the file was cut short or edited, so its settings cannot be "
                           "trusted: use the training run's copy or retrain") from None
    if not isinstance(data, dict):
        raise AdapterError(f"{str(file)!r}: its metadata field {key!r} is damaged (a JSON {type(data).__name__}, "
                           "not an object)")
    return data


def check_fits(adapter: AdapterFile, models: dict[str, torch.nn.Module]) -> None:
    """Raise AdapterError naming the first module that is missing or has other shapes."""
    for prefix in adapter.prefixes:
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
    pinned versions). With pivotal tuning the new tokens load too, the stock way
    (`load_textual_inversion`, from `embeddings.safetensors` beside the adapter). Returns a report:
    {"restored": [...keys...], "tokens": {abstraction: [token, ...]}} (write the tokens where a
    prompt has the abstraction: `pivotal.insert_tokens`). `scale` activates this adapter alone at
    that weight (diffusers' `set_adapters`).
    """
    adapter = read_adapter(path)
    models = pipeline_models(pipe)
    check_fits(adapter, models)
    tokens, vectors = token_plan(pipe, adapter, adapter_name)  # checked before the pipeline changes
    with warnings.catch_warnings(), quiet_load_reports():
        # PEFT warns for every named adapter after the first; several are normal here
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
    if restored and not _GAP_SAID:  # normal for DoRA with a text encoder: information, said once a process
        _GAP_SAID.append(True)
        log.info("note: stock load_lora_weights does not load every DoRA tensor (text-encoder magnitudes); "
                 "load_adapter set %d of %s from the file, as it does for every such adapter", len(restored),
                 adapter.path.name)
    if scale != 1.0:
        pipe.set_adapters([adapter_name], adapter_weights=[scale])
    load_tokens(pipe, tokens, vectors)
    return {"restored": restored, "tokens": tokens}


def load_tokens(pipe, tokens: dict[str, list[str]], vectors: dict) -> None:
    """Add the new tokens to the pipeline the stock way (`load_textual_inversion`, per encoder)."""
    names = [t for group in tokens.values() for t in group]
    if not names:
        return
    family = family_of_pipeline(pipe)
    for key, tok, enc in family.embedding_parts(vectors):
        tokenizer, encoder = getattr(pipe, tok), getattr(pipe, enc)
        if hasattr(pipe, "load_textual_inversion"):
            pipe.load_textual_inversion(vectors[key], token=names, text_encoder=encoder, tokenizer=tokenizer)
        else:  # StableDiffusion3Pipeline has no loader: the same three steps by hand
            append_token_rows(tokenizer, encoder, names, vectors[key])


@torch.no_grad()
def append_token_rows(tokenizer, encoder, names: list[str], rows: torch.Tensor) -> None:
    """What stock `load_textual_inversion` does, for pipelines without it: the tokens added to the
    tokenizer, the encoder's table resized to the tokenizer, the rows written at the new ids."""
    tokenizer.add_tokens(names)
    encoder.resize_token_embeddings(len(tokenizer))
    table = encoder.get_input_embeddings().weight
    table[tokenizer.convert_tokens_to_ids(names)] = rows.to(table)


def token_plan(pipe, adapter: AdapterFile, adapter_name: str) -> tuple[dict[str, list[str]], dict]:
    """Pivotal tuning's new tokens for this pipeline: ({abstraction: token names}, vectors).

    The file's own names (`<s0>`...) when the tokenizers do not know them yet, so prompts written
    for stock diffusers work; otherwise (another adapter brought `<s0>` already) names made unique
    with the adapter name (`<dora_2_s0>`). ({}, {}) for an adapter without new tokens."""
    if not adapter.info.tokens:
        return {}, {}
    file = adapter.path.parent / EMBEDDINGS_FILE
    if not file.is_file():
        raise AdapterError(f"{adapter.path} was trained with new tokens (pivotal tuning) but {file} is missing; "
                           "keep the adapter's folder together")
    try:
        vectors, _ = read_embeddings(file)
    except Exception as err:  # safetensors raises several types for a damaged file
        raise AdapterError(f"{file} does not load ({type(err).__name__})") from None
    family = family_of_pipeline(pipe)
    parts = family.embedding_parts(set(family.embedding_keys) | set(vectors))
    tokenizers = [getattr(pipe, tok) for _, tok, _ in parts]
    count = sum(len(t) for t in adapter.info.tokens.values())
    for key, _, enc in parts:
        encoder = getattr(pipe, enc)
        rows = vectors.get(key)
        width = encoder.get_input_embeddings().weight.shape[1]
        if rows is None or rows.shape != (count, width):
            raise AdapterError(f"{file}: {key} is {None if rows is None else tuple(rows.shape)}, this pipeline needs "
                               f"({count}, {width}) (embeddings for another base model?)")
    tokens = adapter.info.tokens
    if any(t in tok.get_vocab() for names in tokens.values() for t in names for tok in tokenizers):
        tokens = {a: [f"<{adapter_name}_{t.strip('<>')}>" for t in names] for a, names in tokens.items()}
        taken = [t for names in tokens.values() for t in names for tok in tokenizers if t in tok.get_vocab()]
        if taken:
            raise AdapterError(f"the pipeline already has the token {taken[0]!r}; load under another adapter_name")
    return tokens, vectors


# ---- writing ------------------------------------------------------------------------------

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


def save_adapter(output_dir: str | os.PathLike, models: dict[str, torch.nn.Module], info: AdapterInfo | dict,
                 write: bool = True) -> Path:
    """Write `pytorch_lora_weights.safetensors` atomically: `<prefix>.<path>.lora_*` tensors for
    each model (prefix `unet`, `text_encoder`, ...), the LoRA configs as diffusers' adapter
    metadata, and `info` under the key `dreambooth_dora`. A sharded model's tensors are gathered
    first, which every process must join: the others call this with `write=False`."""
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
    out = Path(output_dir) / ADAPTER_FILE
    if not write:
        return out
    metadata = {
        "format": "pt",
        LORA_ADAPTER_METADATA_KEY: json.dumps(configs, indent=2, sort_keys=True),
        INFO_KEY: (info if isinstance(info, AdapterInfo) else AdapterInfo(**info)).to_json(),
    }
    with atomic_path(out) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    return out


# ---- applying and describing ------------------------------------------------------------

def base_model_of(adapter: AdapterFile, base: str | None) -> str:
    base = base or adapter.info.base_model
    if not base:
        raise AdapterError(f"{adapter.path} does not record its base model; pass --base MODEL")
    return resolve_model(base)


def apply_to_models(adapter: AdapterFile, models: dict[str, torch.nn.Module]) -> None:
    """Wrap the adapter's modules in our DoRA/LoRA layers and load its tensors (exact)."""
    check_fits(adapter, models)
    for prefix in adapter.prefixes:
        rank, alpha = adapter.rank_alpha(prefix)
        cfg = adapter.configs.get(prefix, {})
        part = adapter.part(prefix, models[prefix])
        names = adapter.modules(prefix, models[prefix])
        use_dora = any(k.endswith("lora_magnitude_vector") for k in part)
        add_adapters(models[prefix], names, rank=rank, alpha=alpha, use_dora=use_dora,
                     use_rslora=bool(cfg.get("use_rslora", False)))
        for name in names:  # per-module ranks/alphas (rank_pattern / alpha_pattern)
            layer = models[prefix].get_submodule(name)
            r = part[f"{name}.lora_A.weight"].shape[0]
            if r != layer.rank:
                raise AdapterError(f"{prefix}.{name}: rank {r} differs from the adapter's rank {layer.rank}; "
                                   "per-module ranks are not supported by this loader")
            layer.set_alpha(float(cfg.get("alpha_pattern", {}).get(name, alpha)))
        load_adapter_state_dict(models[prefix], part)


def describe(path: str | Path | AdapterFile) -> AdapterSummary:
    """What `dreambooth-dora info` prints: method, rank, alpha, targets, sizes, base model (of a
    path, or of an adapter file already read)."""
    adapter = path if isinstance(path, AdapterFile) else read_adapter(path)
    parts = {}
    for prefix in adapter.prefixes:
        rank, alpha = adapter.rank_alpha(prefix)
        modules = adapter.modules(prefix)
        targets = sorted({m.rsplit(".", 1)[-1] if not m.split(".")[-1].isdigit() else ".".join(m.split(".")[-2:])
                          for m in modules})
        parts[prefix] = PartSummary(len(modules), targets, rank, alpha,
                                    sum(v.numel() for v in adapter.part(prefix).values()))
    return AdapterSummary(
        file=str(adapter.path), method="DoRA" if adapter.use_dora else "LoRA",
        base_model=adapter.info.base_model or "unknown (not recorded)", steps=adapter.info.steps,
        instance_prompt=adapter.info.instance_prompt,
        parameters=sum(v.numel() for v in adapter.tensors.values()), parts=parts, tokens=adapter.info.tokens)

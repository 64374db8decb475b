"""The model card (`README.md`) written beside a finished adapter."""

from __future__ import annotations

from ..adapters.file import AdapterInfo
from .config import TrainConfig
from ..families import Family, family_named
from ..families.models import EMBEDDED_PREFIX


def load_snippet(pipeline: str, base: str, adapter_dir: str, prompt: str, pivotal: bool = False,
                 call: dict | None = None) -> str:
    """Python that loads the adapter exactly and draws one picture; it runs as written (an
    `embedded:` base is resolved to its folder first, which `from_pretrained` needs). With
    `pivotal`, the new tokens come with the adapter and replace the identifier in the prompt;
    `call`: the pipeline call's arguments that differ from its defaults (size, T5 length)."""
    names = ["load_adapter"] + (["insert_tokens"] if pivotal else [])
    source = repr(base)
    if base.startswith(EMBEDDED_PREFIX):
        names.append("resolve_model")
        source = f"resolve_model({base!r})"
    args = "".join(f", {k}={v!r}" for k, v in (call or {}).items())
    imports = [f"from diffusers import {pipeline}", f"from dreambooth_dora import {', '.join(names)}"]
    return "\n".join([
        *imports,
        f"pipe = {pipeline}.from_pretrained({source})",
        ("report = " if pivotal else "") + f"load_adapter(pipe, {adapter_dir!r})  # exact; stock pipe.load_lora_weights "
        "drops text-encoder DoRA magnitudes" + ("; the new tokens too" if pivotal else ""),
        f"image = pipe(insert_tokens({prompt!r}, report['tokens']){args}).images[0]" if pivotal
        else f"image = pipe({prompt!r}{args}).images[0]",
    ])


def pivotal_section(cfg: TrainConfig, info: AdapterInfo, family: Family) -> str:
    """How to use the new tokens in diffusers (stock), A1111 / Forge and ComfyUI."""
    if not info.tokens:
        return ""
    rows = "\n".join(f"| `{a}` | `{''.join(t)}` | `webui_embeddings/{a}.safetensors` |" for a, t in info.tokens.items())
    first, names = next(iter(info.tokens.items()))
    loads = family.textual_inversion_lines(names, family.pivotal_keys(cfg))
    return f"""
## New tokens (pivotal tuning)

{cfg.num_new_tokens_per_abstraction} new token(s) per identifier, trained for the first
{cfg.train_text_encoder_ti_frac:g} of the steps{f' from "{cfg.initializer_concept}"' if cfg.initializer_concept else ''}.

| identifier | tokens (diffusers) | web UI embedding (trigger word = identifier) |
|---|---|---|
{rows}

- dreambooth-dora: `load_adapter` loads the tokens with the adapter (above).
- stock diffusers: `pipe.load_lora_weights(dir)`, then, from `embeddings.safetensors`
  (`emb = safetensors.torch.load_file(...)`{'' if len(info.tokens) == 1 else ', rows of all identifiers in order'}):
  `{'`; `'.join(loads)}`; write `{''.join(names)}` where the prompt had `{first}`.
- A1111 / Forge / ComfyUI: copy `webui_embeddings/{first}.safetensors` into the `embeddings` folder and write
  `{first}` (ComfyUI: `embedding:{first}`) in the prompt, with an export of the adapter (`dreambooth-dora export`).
"""


def dora_groups(cfg: TrainConfig) -> str:
    """The DoRA-aware optimiser settings, when any is set."""
    parts = [f"magnitude lr {cfg.magnitude_lr}" if cfg.magnitude_lr is not None else "",
             f"magnitude weight decay {cfg.magnitude_weight_decay}" if cfg.magnitude_weight_decay is not None else "",
             f"LoRA+ ratio {cfg.loraplus_lr_ratio}" if cfg.loraplus_lr_ratio is not None else "",
             f"trains the {cfg.dora_train} only" if cfg.dora_train != "both" else "",
             f"caption dropout {cfg.caption_dropout_rate}" if cfg.caption_dropout_rate else ""]
    return "".join(f"; {p}" for p in parts if p)


def options(cfg: TrainConfig) -> str:
    """The trainer's optional features that were on, or 'none'."""
    parts = [f"EMA of the adapter (decay {cfg.ema_decay})" if cfg.use_ema else "",
             "masked loss" + (f" (masks from {cfg.mask_data_dir})" if cfg.mask_data_dir else " (alpha channel)")
             if cfg.masked_loss else "",
             "aspect buckets" + (f" {', '.join(cfg.bucket_sizes)}" if cfg.bucket_sizes else f" (steps of {cfg.bucket_step})")
             if cfg.aspect_buckets else "",
             f"{len(cfg.datasets)} subject sets" if cfg.datasets else ""]
    return ", ".join(p for p in parts if p) or "none"


def model_card(cfg: TrainConfig, info: AdapterInfo, call: dict | None = None) -> str:
    """`call`: the pipeline call's arguments the snippet passes (the family's `card_call`)."""
    method = "DoRA" if cfg.use_dora else "LoRA"
    family = family_named(info.architecture)
    pipeline = family.pipeline_class
    loss = "n/a" if info.final_loss is None else round(info.final_loss, 5)
    snippet = load_snippet(pipeline, cfg.pretrained_model_name_or_path, cfg.output_dir, cfg.instance_prompt,
                           pivotal=bool(info.tokens), call=call)
    return f"""---
base_model: {cfg.pretrained_model_name_or_path}
tags: [dreambooth, {method.lower()}, {family.tag}, dreambooth-dora]
---
# {method} DreamBooth adapter

Trained with dreambooth-dora on `{cfg.pretrained_model_name_or_path}`.

| setting | value |
|---|---|
| instance prompt | `{cfg.instance_prompt}` |
| class prompt (prior preservation) | {f'`{cfg.class_prompt}`' if cfg.with_prior_preservation else 'none'} |
| method | {method}, rank {cfg.rank}, alpha {cfg.lora_alpha:g}{', rsLoRA' if cfg.use_rslora else ''} |
| {family.denoiser_label} targets | {', '.join(family.denoiser_targets(cfg))} |
| text encoder | {'adapted: ' + ', '.join(cfg.text_encoder_target_modules) if cfg.train_text_encoder
                  else 'new tokens only (pivotal tuning)' if info.tokens else 'frozen'} |
| steps | {info.steps} (batch {cfg.train_batch_size} x accumulation {cfg.gradient_accumulation_steps}) |
| learning rate | {cfg.learning_rate} ({cfg.optimizer}, {cfg.lr_scheduler}){dora_groups(cfg)} |
| options | {options(cfg)} |
| final loss | {loss} |

```python
{snippet}
```
{pivotal_section(cfg, info, family)}
The settings that made it are in `train_config.json` (and inside the adapter file's metadata).
"""

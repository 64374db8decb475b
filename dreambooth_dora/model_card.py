"""The model card (`README.md`) written beside a finished adapter."""

from __future__ import annotations

from .adapter_file import AdapterInfo
from .config import TrainConfig
from .models import EMBEDDED_PREFIX


def load_snippet(pipeline: str, base: str, adapter_dir: str, prompt: str) -> str:
    """Python that loads the adapter exactly and draws one picture; it runs as written (an
    `embedded:` base is resolved to its folder first, which `from_pretrained` needs)."""
    imports = [f"from diffusers import {pipeline}", "from dreambooth_dora import load_adapter"]
    source = repr(base)
    if base.startswith(EMBEDDED_PREFIX):
        imports.append("from dreambooth_dora.models import resolve_model")
        source = f"resolve_model({base!r})"
    return "\n".join([
        *imports,
        f"pipe = {pipeline}.from_pretrained({source})",
        f"load_adapter(pipe, {adapter_dir!r})  # exact; stock pipe.load_lora_weights drops text-encoder DoRA magnitudes",
        f"image = pipe({prompt!r}).images[0]",
    ])


def dora_groups(cfg: TrainConfig) -> str:
    """The DoRA-aware optimiser settings, when any is set."""
    parts = [f"magnitude lr {cfg.magnitude_lr}" if cfg.magnitude_lr is not None else "",
             f"magnitude weight decay {cfg.magnitude_weight_decay}" if cfg.magnitude_weight_decay is not None else "",
             f"LoRA+ ratio {cfg.loraplus_lr_ratio}" if cfg.loraplus_lr_ratio is not None else "",
             f"trains the {cfg.dora_train} only" if cfg.dora_train != "both" else "",
             f"caption dropout {cfg.caption_dropout_rate}" if cfg.caption_dropout_rate else ""]
    return "".join(f"; {p}" for p in parts if p)


def model_card(cfg: TrainConfig, info: AdapterInfo) -> str:
    method = "DoRA" if cfg.use_dora else "LoRA"
    sdxl = info.architecture == "sdxl"
    pipeline = "StableDiffusionXLPipeline" if sdxl else "StableDiffusionPipeline"
    loss = "n/a" if info.final_loss is None else round(info.final_loss, 5)
    snippet = load_snippet(pipeline, cfg.pretrained_model_name_or_path, cfg.output_dir, cfg.instance_prompt)
    return f"""---
base_model: {cfg.pretrained_model_name_or_path}
tags: [dreambooth, {method.lower()}, {'stable-diffusion-xl' if sdxl else 'stable-diffusion'}, dreambooth-dora]
---
# {method} DreamBooth adapter

Trained with dreambooth-dora on `{cfg.pretrained_model_name_or_path}`.

| setting | value |
|---|---|
| instance prompt | `{cfg.instance_prompt}` |
| class prompt (prior preservation) | {f'`{cfg.class_prompt}`' if cfg.with_prior_preservation else 'none'} |
| method | {method}, rank {cfg.rank}, alpha {cfg.lora_alpha:g}{', rsLoRA' if cfg.use_rslora else ''} |
| UNet targets | {', '.join(cfg.unet_target_modules)} |
| text encoder | {'adapted: ' + ', '.join(cfg.text_encoder_target_modules) if cfg.train_text_encoder else 'frozen'} |
| steps | {info.steps} (batch {cfg.train_batch_size} x accumulation {cfg.gradient_accumulation_steps}) |
| learning rate | {cfg.learning_rate} ({cfg.optimizer}, {cfg.lr_scheduler}){dora_groups(cfg)} |
| final loss | {loss} |

```python
{snippet}
```

The settings that made it are in `train_config.json` (and inside the adapter file's metadata).
"""

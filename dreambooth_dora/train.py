"""The DreamBooth training loop: setup, then per step batch -> loss -> backward -> clip -> step."""

from __future__ import annotations

import json
import math
import random
from dataclasses import asdict
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .adapters import adapter_parameters, add_adapters
from .config import TrainConfig
from .data import load_image_folder, to_training_tensor
from .losses import diffusion_loss, diffusion_target
from .outputs import save_adapter, write_text
from .tiny import resolve_model


class TrainingError(RuntimeError):
    pass


def load_models(path: str, revision: str | None = None, variant: str | None = None):
    """Tokenizer, text encoder, VAE, UNet and the training noise scheduler of an SD 1.x/2.x model."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    kw = {"revision": revision}
    tokenizer = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer", **kw)
    text_encoder = CLIPTextModel.from_pretrained(path, subfolder="text_encoder", variant=variant, **kw)
    vae = AutoencoderKL.from_pretrained(path, subfolder="vae", variant=variant, **kw)
    unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", variant=variant, **kw)
    noise_scheduler = DDPMScheduler.from_pretrained(path, subfolder="scheduler", **kw)
    return tokenizer, text_encoder, vae, unet, noise_scheduler


def encode_prompt(tokenizer, text_encoder, prompts: list[str]) -> torch.Tensor:
    ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    return text_encoder(ids.to(text_encoder.device))[0]  # (B, 77, D)


def train(cfg: TrainConfig) -> Path:
    """Train an adapter as `cfg` says; returns the adapter file's path."""
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration, set_seed
    from diffusers.optimization import get_scheduler

    out_dir = Path(cfg.output_dir)
    accelerator = Accelerator(
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        mixed_precision=cfg.mixed_precision,
        log_with=None if cfg.report_to == "none" else cfg.report_to,
        project_config=ProjectConfiguration(project_dir=str(out_dir), logging_dir=str(out_dir / cfg.logging_dir)),
    )
    set_seed(cfg.seed)
    images = load_image_folder(cfg.instance_data_dir)  # bad data fails before any model loads
    model_path = resolve_model(cfg.pretrained_model_name_or_path)
    try:
        tokenizer, text_encoder, vae, unet, noise_scheduler = load_models(model_path, cfg.revision, cfg.variant)
    except (OSError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise TrainingError(f"cannot load model {cfg.pretrained_model_name_or_path!r}: {first}") from None

    # Frozen parts in the compute dtype; adapter parameters are created in fp32.
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    vae.requires_grad_(False).to(accelerator.device, dtype=weight_dtype)
    text_encoder.requires_grad_(False).to(accelerator.device, dtype=weight_dtype)
    unet.to(accelerator.device, dtype=weight_dtype)
    adapter_kw = dict(rank=cfg.rank, alpha=cfg.lora_alpha, dora=cfg.use_dora, dropout=cfg.lora_dropout,
                      use_rslora=cfg.use_rslora)
    add_adapters(unet, cfg.unet_target_modules, **adapter_kw)
    groups = [{"params": adapter_parameters(unet), "lr": cfg.learning_rate}]
    if cfg.train_text_encoder:
        add_adapters(text_encoder, cfg.text_encoder_target_modules, **adapter_kw)
        groups.append({"params": adapter_parameters(text_encoder), "lr": cfg.text_encoder_lr or cfg.learning_rate})
    optimizer = torch.optim.AdamW(groups, betas=(cfg.adam_beta1, cfg.adam_beta2),
                                  weight_decay=cfg.adam_weight_decay, eps=cfg.adam_epsilon)
    lr_scheduler = get_scheduler(cfg.lr_scheduler, optimizer=optimizer,
                                 num_warmup_steps=cfg.lr_warmup_steps * accelerator.num_processes,
                                 num_training_steps=cfg.max_train_steps * accelerator.num_processes)
    unet, text_encoder, optimizer, lr_scheduler = accelerator.prepare(unet, text_encoder, optimizer, lr_scheduler)
    if accelerator.is_main_process and cfg.report_to != "none":
        accelerator.init_trackers("dreambooth-dora", config={k: str(v) for k, v in asdict(cfg).items()})

    rng = random.Random(cfg.seed + accelerator.process_index)
    params = [p for g in groups for p in g["params"]]
    progress = tqdm(range(cfg.max_train_steps), desc="train", disable=not accelerator.is_local_main_process)
    step, loss_value = 0, float("nan")
    unet.train()
    text_encoder.train(cfg.train_text_encoder)
    while step < cfg.max_train_steps:
        with accelerator.accumulate(unet, text_encoder):
            batch = [images[rng.randrange(len(images))] for _ in range(cfg.train_batch_size)]
            pixels = torch.stack([to_training_tensor(im, cfg.resolution, cfg.center_crop, cfg.random_flip, rng)
                                  for im in batch]).to(accelerator.device, dtype=weight_dtype)
            with torch.no_grad():
                latents = vae.encode(pixels).latent_dist.sample() * vae.config.scaling_factor
            noise = torch.randn_like(latents)
            timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (latents.shape[0],),
                                      device=latents.device)
            noisy = noise_scheduler.add_noise(latents, noise, timesteps)
            with torch.set_grad_enabled(cfg.train_text_encoder):
                cond = encode_prompt(tokenizer, text_encoder, [cfg.instance_prompt] * len(batch))
            model_pred = unet(noisy, timesteps, cond).sample
            loss = diffusion_loss(model_pred, diffusion_target(noise, latents, timesteps, noise_scheduler))
            if not torch.isfinite(loss):
                raise TrainingError(f"loss became {loss.item()} at step {step}; lower the learning rate")
            accelerator.backward(loss)
            if accelerator.sync_gradients:
                accelerator.clip_grad_norm_(params, cfg.max_grad_norm)
            optimizer.step()
            lr_scheduler.step()
            optimizer.zero_grad(set_to_none=True)
        if accelerator.sync_gradients:
            step += 1
            loss_value = loss.detach().item()
            progress.update(1)
            progress.set_postfix(loss=f"{loss_value:.4f}")
            accelerator.log({"loss": loss_value, "lr": lr_scheduler.get_last_lr()[0]}, step=step)

    accelerator.wait_for_everyone()
    path = out_dir / "pytorch_lora_weights.safetensors"
    if accelerator.is_main_process:
        models = {"unet": accelerator.unwrap_model(unet)}
        if cfg.train_text_encoder:
            models["text_encoder"] = accelerator.unwrap_model(text_encoder)
        info = {"base_model": cfg.pretrained_model_name_or_path, "instance_prompt": cfg.instance_prompt,
                "steps": step, "method": "dora" if cfg.use_dora else "lora", "rank": cfg.rank,
                "final_loss": None if math.isnan(loss_value) else loss_value}
        path = save_adapter(out_dir, models, info)
        write_text(out_dir / "train_config.json", json.dumps(asdict(cfg), indent=2))
    accelerator.end_training()
    return path

"""Validation images during training: fixed prompts and seeds, saved as PNG grids."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from .outputs import atomic_path


def image_grid(rows: list[list[Image.Image]], labels: list[str] | None = None,
               column_labels: list[str] | None = None) -> Image.Image:
    """Rows of equally sized images in one picture, each row optionally captioned on its left and
    each column on top."""
    w, h = rows[0][0].size
    label_w = 0 if not labels else max(96, 7 * max(len(s) for s in labels) // 2)
    head = 14 if column_labels else 0
    grid = Image.new("RGB", (label_w + w * max(len(r) for r in rows), head + h * len(rows)), "white")
    draw = ImageDraw.Draw(grid)
    for j, text in enumerate(column_labels or []):
        draw.text((label_w + j * w + 2, 1), text[: max(1, w // 6)], fill="black")
    for i, row in enumerate(rows):
        if labels:
            text, y = labels[i], head + i * h + 2
            for k in range(0, len(text), max(1, label_w // 7)):  # crude wrap, no font files needed
                draw.text((2, y), text[k:k + label_w // 7], fill="black")
                y += 11
        for j, im in enumerate(row):
            grid.paste(im, (label_w + j * w, head + i * h))
    return grid


@torch.no_grad()
def generate_validation(unet, vae, scheduler_config, prompt_embeds: torch.Tensor, negative_embeds: torch.Tensor,
                        num_images: int, seed: int, steps: int, resolution: int,
                        guidance_scale: float = 7.5, pooled: torch.Tensor | None = None,
                        negative_pooled: torch.Tensor | None = None) -> list[list[Image.Image]]:
    """`num_images` images per prompt embedding (P, 77, D); image j of every prompt uses seed + j,
    so grids from different steps and runs compare like with like. With `pooled` (P, D') the
    UNet is SDXL's and an SDXL pipeline draws."""
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

    scheduler = DPMSolverMultistepScheduler.from_config(scheduler_config)
    if pooled is None:
        pipe = StableDiffusionPipeline(vae=vae, text_encoder=None, tokenizer=None, unet=unet, scheduler=scheduler,
                                       safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    else:
        pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=None, text_encoder_2=None, tokenizer=None,
                                         tokenizer_2=None, unet=unet, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    rows = []
    for p in range(prompt_embeds.shape[0]):
        gens = [torch.Generator("cpu").manual_seed(seed + j) for j in range(num_images)]
        extra = {} if pooled is None else {
            "pooled_prompt_embeds": pooled[p:p + 1].expand(num_images, -1),
            "negative_pooled_prompt_embeds": negative_pooled.expand(num_images, -1)}
        rows.append(pipe(prompt_embeds=prompt_embeds[p:p + 1].expand(num_images, -1, -1),
                         negative_prompt_embeds=negative_embeds.expand(num_images, -1, -1),
                         num_inference_steps=steps, guidance_scale=guidance_scale, generator=gens,
                         height=resolution, width=resolution, **extra).images)
    return rows


def save_grid(path: str | Path, rows, labels) -> Path:
    path = Path(path)
    with atomic_path(path) as tmp:
        image_grid(rows, labels).save(tmp, format="PNG")
    return path


@torch.no_grad()
def validate(accelerator, unet, vae, scheduler_config, encode, text_encoders: list, prompts: list[str], step: int,
             out_dir: Path, *, num_images: int, seed: int, steps: int, resolution: int) -> None:
    """Main process: images for the validation prompts with fixed seeds -> PNG grid + TensorBoard.
    `encode` is the run's PromptEncoder; `text_encoders` the prepared ones when they are trained."""
    if accelerator.is_main_process:
        model = accelerator.unwrap_model(unet)
        model.eval()
        encoders = [accelerator.unwrap_model(te).eval() for te in text_encoders]
        embeds, pooled = encode(prompts, encoders)
        if pooled is None:
            negative, negative_pooled = encode([""], encoders)[0], None
        else:  # SDXL pipelines use zeros for an empty negative prompt (force_zeros_for_empty_prompt)
            negative, negative_pooled = torch.zeros_like(embeds[:1]), torch.zeros_like(pooled[:1]).to(model.dtype)
            pooled = pooled.to(model.dtype)
        for te in encoders:
            te.train()
        with accelerator.autocast():
            rows = generate_validation(model, vae, scheduler_config, embeds.to(model.dtype), negative.to(model.dtype),
                                       num_images, seed, steps, resolution, pooled=pooled,
                                       negative_pooled=negative_pooled)
        model.train()
        save_grid(Path(out_dir) / "validation" / f"step-{step:06d}.png", rows, prompts)
        for tracker in accelerator.trackers:
            if tracker.name == "tensorboard":
                for i, row in enumerate(rows):
                    tracker.writer.add_images(f"validation/{i}: {prompts[i]}",
                                              np.stack([np.asarray(im) for im in row]), step, dataformats="NHWC")
    accelerator.wait_for_everyone()


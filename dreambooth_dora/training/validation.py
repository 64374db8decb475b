"""Validation images during training: fixed prompts and seeds, saved as PNG grids."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from ..outputs import atomic_path


MIN_CELL = 256  # small models' pictures are enlarged (nearest neighbour) to at least this many pixels


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: the fixed bitmap font
        return ImageFont.load_default()


def _wrap(draw, text: str, font, width: int) -> list[str]:
    """`text` in lines no wider than `width` pixels (words kept whole where they fit)."""
    lines, line = [], ""
    for word in text.split():
        trial = f"{line} {word}".strip()
        if draw.textlength(trial, font=font) <= width or not line:
            line = trial
        else:
            lines.append(line)
            line = word
        while draw.textlength(line, font=font) > width and len(line) > 1:  # a word wider than the cell
            cut = max(1, int(len(line) * width / draw.textlength(line, font=font)))
            lines.append(line[:cut])
            line = line[cut:]
    return lines + ([line] if line else [])


def cell_scale(size: tuple[int, int], min_cell: int = MIN_CELL) -> int:
    """The whole-number enlargement that brings a picture's longer side to at least `min_cell`."""
    return max(1, -(-min_cell // max(size)))


def image_grid(rows: list[list[Image.Image]], labels: list[str] | None = None,
               column_labels: list[str] | None = None, min_cell: int = MIN_CELL) -> Image.Image:
    """Rows of equally sized pictures in one image, enlarged by a whole factor (nearest
    neighbour: every pixel stays visible) to at least `min_cell` pixels, each row optionally
    captioned on its left and each column on top, captions wrapped, never cut off."""
    k = cell_scale(rows[0][0].size, min_cell)
    w, h = rows[0][0].width * k, rows[0][0].height * k
    font, line_h = _font(16), 20
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    label_w = 0 if not labels else min(320, max(120, max(int(probe.textlength(s, font=font)) for s in labels) + 12))
    heads = [_wrap(probe, t, font, w - 8) for t in column_labels] if column_labels else []
    head = (max(len(x) for x in heads) * line_h + 8) if heads else 0
    row_lines = [_wrap(probe, t, font, label_w - 12) for t in labels] if labels else []
    rows_h = [max(h, len(row_lines[i]) * line_h + 8 if row_lines else 0) for i in range(len(rows))]
    grid = Image.new("RGB", (label_w + w * max(len(r) for r in rows), head + sum(rows_h)), "white")
    draw = ImageDraw.Draw(grid)
    for j, lines in enumerate(heads):
        for n, line in enumerate(lines):
            draw.text((label_w + j * w + 4, 4 + n * line_h), line, fill="black", font=font)
    y = head
    for i, row in enumerate(rows):
        for n, line in enumerate(row_lines[i] if row_lines else []):
            draw.text((6, y + 4 + n * line_h), line, fill="black", font=font)
        for j, im in enumerate(row):
            grid.paste(im.resize((w, h), Image.NEAREST) if k > 1 else im, (label_w + j * w, y))
        y += rows_h[i]
    return grid


@torch.no_grad()
def generate_validation(family, denoiser, vae, scheduler_config, prompt_embeds: torch.Tensor,
                        negative_embeds: torch.Tensor, num_images: int, seed: int, steps: int, resolution: int,
                        guidance_scale: float = 7.5, pooled: torch.Tensor | None = None,
                        negative_pooled: torch.Tensor | None = None) -> list[list[Image.Image]]:
    """`num_images` images per prompt embedding (P, 77, D) (and pooled (P, D') where the family
    has one), drawn by the family's pipeline; image j of every prompt uses seed + j, so grids from
    different steps and runs compare like with like."""
    from diffusers import DPMSolverMultistepScheduler

    pipe = family.inference_pipeline(vae, denoiser, DPMSolverMultistepScheduler.from_config(scheduler_config))
    pipe.set_progress_bar_config(disable=True)
    rows = []
    for p in range(prompt_embeds.shape[0]):
        gens = [torch.Generator("cpu").manual_seed(seed + j) for j in range(num_images)]
        rows.append(pipe(**family.embedding_kwargs(prompt_embeds, negative_embeds, pooled, negative_pooled, p,
                                                   num_images),
                         num_inference_steps=steps, guidance_scale=guidance_scale, generator=gens,
                         height=resolution, width=resolution).images)
    return rows


def save_grid(path: str | Path, rows, labels) -> Path:
    path = Path(path)
    with atomic_path(path) as tmp:
        image_grid(rows, labels).save(tmp, format="PNG")
    return path


@torch.no_grad()
def validate(accelerator, family, denoiser, vae, scheduler_config, encode, text_encoders: list, prompts: list[str],
             step: int, out_dir: Path, *, num_images: int, seed: int, steps: int, resolution: int,
             guidance_scale: float = 7.5, everyone: bool = False) -> None:
    """Main process: images for the validation prompts with fixed seeds -> PNG grid + TensorBoard.
    `encode` is the run's PromptEncoder; `text_encoders` the prepared ones when they are trained.
    `everyone`: every process draws (a sharded denoiser's forward needs them all); the main one writes."""
    if accelerator.is_main_process or everyone:
        model = accelerator.unwrap_model(denoiser)
        model.eval()
        encoders = [accelerator.unwrap_model(te).eval() for te in text_encoders]
        embeds, pooled = encode(prompts, encoders)
        negative, negative_pooled = family.negative_embeddings(encode, encoders, embeds, pooled)
        pooled, negative, negative_pooled = (None if t is None else t.to(model.dtype)
                                             for t in (pooled, negative, negative_pooled))
        for te in encoders:
            te.train()
        with accelerator.autocast():
            rows = generate_validation(family, model, vae, scheduler_config, embeds.to(model.dtype), negative,
                                       num_images, seed, steps, resolution, guidance_scale=guidance_scale,
                                       pooled=pooled, negative_pooled=negative_pooled)
        model.train()
    if accelerator.is_main_process:
        save_grid(Path(out_dir) / "validation" / f"step-{step:06d}.png", rows, prompts)
        for tracker in accelerator.trackers:
            if tracker.name == "tensorboard":
                for i, row in enumerate(rows):
                    tracker.writer.add_images(f"validation/{i}: {prompts[i]}",
                                              np.stack([np.asarray(im) for im in row]), step, dataformats="NHWC")
    accelerator.wait_for_everyone()

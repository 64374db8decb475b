"""DreamBooth data: subject images from a folder, made into training tensors."""

from __future__ import annotations

import random
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff"}
MIN_SIDE = 8


class DataError(ValueError):
    pass


def load_image(path: Path) -> Image.Image:
    """Open an image as 8-bit RGB: EXIF rotation applied, alpha flattened on white, 16-bit and
    palette images converted."""
    with Image.open(path) as im:
        im = ImageOps.exif_transpose(im)
        if im.mode in ("I;16", "I;16B", "I;16L", "I"):
            arr = np.asarray(im, dtype=np.float64)
            im = Image.fromarray((arr / max(arr.max(), 1) * 255).round().astype(np.uint8), "L")
        if im.mode in ("P", "PA", "LA", "RGBA") or "transparency" in im.info:
            im = im.convert("RGBA")
            canvas = Image.new("RGBA", im.size, (255, 255, 255, 255))
            im = Image.alpha_composite(canvas, im)
        return im.convert("RGB")


def load_image_folder(folder: str | Path) -> list[Image.Image]:
    """All readable images in `folder`; unreadable or tiny ones are skipped with a warning
    naming them, and DataError is raised when none remain."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"image folder {str(folder)!r} does not exist")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise DataError(f"image folder {str(folder)!r} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    images, bad = [], []
    for path in files:
        try:
            im = load_image(path)
        except (UnidentifiedImageError, OSError, ValueError) as err:
            bad.append(f"{path.name} ({type(err).__name__})")
            continue
        if min(im.size) < MIN_SIDE:
            bad.append(f"{path.name} (only {im.size[0]}x{im.size[1]} px)")
            continue
        images.append(im)
    if not images:
        raise DataError(f"no usable images in {str(folder)!r}: {', '.join(bad)}")
    if bad:
        warnings.warn(f"skipped {len(bad)} image(s) in {folder}: {', '.join(bad)}", stacklevel=2)
    return images


def to_training_tensor(im: Image.Image, resolution: int, center_crop: bool, random_flip: bool,
                       rng: random.Random) -> torch.Tensor:
    """Resize the short side to `resolution`, crop a square, maybe flip; (3, H, W) in [-1, 1]."""
    w, h = im.size
    scale = resolution / min(w, h)
    im = im.resize((max(resolution, round(w * scale)), max(resolution, round(h * scale))), Image.BICUBIC)
    w, h = im.size
    if center_crop:
        left, top = (w - resolution) // 2, (h - resolution) // 2
    else:
        left, top = rng.randint(0, w - resolution), rng.randint(0, h - resolution)
    im = im.crop((left, top, left + resolution, top + resolution))
    if random_flip and rng.random() < 0.5:
        im = ImageOps.mirror(im)
    arr = torch.from_numpy(np.asarray(im, dtype=np.float32).copy()).permute(2, 0, 1)
    return arr / 127.5 - 1.0

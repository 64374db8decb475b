"""DreamBooth data: subject (and class) images with their captions, and training batches.

Sources go through `datasets`: a local folder of images (an `imagefolder`, whose
`metadata.jsonl` may carry captions), or a dataset id / local dataset with image and caption
columns. Images are decoded here rather than by `datasets`, so that odd files (EXIF-rotated,
16-bit, palette, RGBA, grayscale, tiny, unreadable) are handled one way everywhere.

Batches are drawn by *global step*, not by a stateful loader: the images of step k, their crops
and flips depend only on (seed, k), so a resumed run and an uninterrupted one see the same data,
and N processes with batch b see exactly what one process with batch N·b sees.
"""

from __future__ import annotations

import functools
import io
import json
import math
import random
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError
from tqdm.auto import tqdm


IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff"}
MIN_SIDE = 8


class DataError(ValueError):
    """Bad training data; the CLI prints the message on one line."""


@dataclass
class Example:
    image: Image.Image  # 8-bit RGB
    caption: str
    mask: Image.Image | None = None  # 8-bit L, the image's size: white = the subject (masked loss)
    name: str = ""  # the file name, when the image came from a file


def load_image(source) -> Image.Image:
    """Open a path or bytes as 8-bit RGB: EXIF rotation applied, alpha flattened on white,
    16-bit and 32-bit integer images rescaled, palette and grayscale converted."""
    return _open_image(source, with_alpha=False)[0]


def _open_image(source, with_alpha: bool) -> tuple[Image.Image, Image.Image | None]:
    """`load_image`'s picture and, with `with_alpha`, its alpha channel (8-bit L; None without one),
    from one opening of the file."""
    with Image.open(io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source) as im:
        im = ImageOps.exif_transpose(im)
        alpha = None
        if with_alpha and (im.mode in ("RGBA", "LA", "PA", "La") or (im.mode == "P" and "transparency" in im.info)):
            alpha = im.convert("RGBA").getchannel("A")
        if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
            arr = np.asarray(im, dtype=np.float64)
            top = 65535.0 if im.mode.startswith("I;16") else max(float(arr.max()), 1.0)
            im = Image.fromarray((np.clip(arr / top, 0, 1) * 255).round().astype(np.uint8), "L")
        if im.mode in ("P", "PA", "LA", "RGBA", "La") or "transparency" in im.info:
            im = im.convert("RGBA")
            im = Image.alpha_composite(Image.new("RGBA", im.size, (255, 255, 255, 255)), im)
        return im.convert("RGB"), alpha


def _decode_rows(rows, image_column: str, caption_column: str | None, default_caption: str, where: str,
                 keep_alpha: bool = False):
    examples, bad = [], []
    for i, row in enumerate(rows):
        cell = row[image_column]
        name = Path(cell["path"]).name if isinstance(cell, dict) and cell.get("path") else f"row {i}"
        try:
            if isinstance(cell, Image.Image):
                source = _to_png_bytes(cell)
            else:
                source = cell["bytes"] if cell.get("bytes") is not None else cell["path"]
            image, alpha = _open_image(source, with_alpha=keep_alpha)
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as err:
            bad.append(f"{name} ({type(err).__name__})")
            continue
        except Image.DecompressionBombError:  # more pixels than the image library agrees to decode
            bad.append(f"{name} (too large to decode: over {Image.MAX_IMAGE_PIXELS * 2:,} pixels)")
            continue
        if min(image.size) < MIN_SIDE:
            bad.append(f"{name} (only {image.size[0]}x{image.size[1]} px)")
            continue
        caption = row.get(caption_column) if caption_column else None
        examples.append(Example(image, caption if caption else default_caption, alpha, name))
    if not examples:
        raise DataError(f"no usable images in {where}: {', '.join(bad[:5])}")
    if bad:
        warnings.warn(f"skipped {len(bad)} unusable image(s) in {where}: {', '.join(bad)}", stacklevel=3)
    return examples


def _to_png_bytes(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def load_examples(instance_data_dir: str | None = None, dataset_name: str | None = None,
                  image_column: str = "image", caption_column: str | None = None,
                  default_caption: str = "", split: str = "train", masked: bool = False,
                  mask_data_dir: str | None = None) -> list[Example]:
    """Subject images and captions from a local folder or a `datasets` source; with `masked`,
    each with its mask: the file of the same name in `mask_data_dir`, else the image's alpha."""
    from datasets import Image as ImageFeature
    from datasets import load_dataset

    if instance_data_dir is not None:
        folder = Path(instance_data_dir)
        if not folder.is_dir():
            raise DataError(f"image folder {str(folder)!r} does not exist")
        if not any(p.suffix.lower() in IMAGE_SUFFIXES for p in folder.rglob("*") if p.is_file()):
            raise DataError(f"image folder {str(folder)!r} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
        where, args = repr(str(folder)), dict(path="imagefolder", data_dir=str(folder))
        check_metadata(folder)
    else:
        where, args = repr(dataset_name), dict(path=dataset_name)
    try:
        ds = load_dataset(**args, split=split)
    except Exception as err:  # datasets raises many types; the user needs the first line
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise DataError(f"cannot load dataset {where}: {first}") from None
    if image_column not in ds.column_names:
        raise DataError(f"dataset {where} has no column {image_column!r}; columns: {', '.join(ds.column_names)}")
    if caption_column is not None and caption_column not in ds.column_names:
        raise DataError(f"dataset {where} has no caption column {caption_column!r}; "
                        f"columns: {', '.join(ds.column_names)}")
    if isinstance(ds.features[image_column], ImageFeature):
        ds = ds.cast_column(image_column, ImageFeature(decode=False))
    examples = _decode_rows(ds, image_column, caption_column, default_caption, where,
                            keep_alpha=masked and not mask_data_dir)
    if masked:
        attach_masks(examples, mask_data_dir, where)
    return examples


def is_colour(im: Image.Image) -> bool:
    """Whether a picture given as a mask is a colour picture, not a mask: more than 1% of its
    pixels have channels apart by over 16 of 255 (a grey or black-and-white mask has none)."""
    rgb = np.asarray(im.convert("RGB"), dtype=np.int16)
    return bool(((rgb.max(axis=2) - rgb.min(axis=2)) > 16).mean() > 0.01)


def check_metadata(folder: Path) -> None:
    """A folder's metadata.jsonl (captions) must name every picture beside it: `datasets` drops the
    pictures it leaves out without a word, and fails obscurely on an empty file."""
    meta = folder / "metadata.jsonl"
    if not meta.is_file():
        return
    named = set()
    for n, line in enumerate(meta.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        if line.strip():
            try:
                named.add(str(json.loads(line)["file_name"]))
            except (ValueError, KeyError, TypeError):
                raise DataError(f"{str(meta)!r} line {n} is not a JSON object with a file_name") from None
    if not named:
        raise DataError(f"{str(meta)!r} is empty: give each picture a line {{\"file_name\": ..., \"text\": ...}}, "
                        "or remove the file")
    left_out = sorted(p.name for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.name not in named)
    if left_out:
        raise DataError(f"{str(meta)!r} has no line for {len(left_out)} picture(s) beside it, which would not train: "
                        f"{', '.join(left_out[:3])}{' ...' if len(left_out) > 3 else ''} (add their lines; the text "
                        "may be empty)")


def attach_masks(examples: list[Example], mask_data_dir: str | None, where: str) -> None:
    """Masks from `mask_data_dir` (same file name, or the same stem with any image suffix), or the
    alpha already read; every example must have one (DataError naming those without), of its
    image's shape (another aspect ratio would be stretched over the wrong pixels: DataError; the
    same shape at another size is scaled, with a warning) and not all black (it would train on
    nothing: DataError)."""
    missing, shapes, black, scaled, colour = [], [], [], [], []
    for ex in examples:
        name = ex.name or "an image"
        if mask_data_dir:
            stem = Path(ex.name).stem
            found = [p for p in [Path(mask_data_dir) / ex.name, *sorted(Path(mask_data_dir).glob(f"{stem}.*"))]
                     if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]
            picture = load_image(found[0]) if found else None
            if picture is not None and is_colour(picture):
                colour.append(found[0].name)
            ex.mask = picture.convert("L") if found else None
        if ex.mask is None:
            missing.append(name)
            continue
        (mw, mh), (iw, ih) = ex.mask.size, ex.image.size
        if (mw, mh) != (iw, ih):
            if abs(math.log((mw / mh) / (iw / ih))) > 0.01:
                shapes.append(f"{name} ({mw}x{mh}, image {iw}x{ih})")
                continue
            scaled.append(f"{name} ({mw}x{mh} -> {iw}x{ih})")
            ex.mask = ex.mask.resize(ex.image.size, Image.BILINEAR)
        if ex.mask.getextrema()[1] == 0:
            black.append(name)
    if missing:
        source = f"in {mask_data_dir!r}" if mask_data_dir else "(no alpha channel; give mask_data_dir)"
        raise DataError(f"masked_loss: no mask {source} for {len(missing)} image(s) of {where}: "
                        f"{', '.join(missing[:5])}")
    if shapes:
        raise DataError(f"masked_loss: {len(shapes)} mask(s) of {where} have another shape than their image and "
                        f"would be stretched over the wrong pixels: {', '.join(shapes[:3])}; give each mask its "
                        "image's size")
    if black:
        raise DataError(f"masked_loss: {len(black)} mask(s) of {where} are all black, so their images would train "
                        f"nothing (white marks the subject): {', '.join(black[:5])}")
    if colour:
        warnings.warn(f"masked_loss: {len(colour)} mask(s) in {mask_data_dir!r} are colour pictures, not masks (white "
                      f"= the subject, black = not); they are read as grey levels: {', '.join(colour[:3])}"
                      f"{' ...' if len(colour) > 3 else ''}", stacklevel=2)
    if scaled:
        warnings.warn(f"masked_loss: {len(scaled)} mask(s) of {where} are scaled to their image's size (same shape): "
                      f"{', '.join(scaled[:3])}", stacklevel=2)


def load_image_folder(folder: str | Path, caption: str = "") -> list[Example]:
    """Every readable image directly in `folder` (class images), without `datasets`."""
    folder = Path(folder)
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES) if folder.is_dir() else []
    if not files:
        raise DataError(f"image folder {str(folder)!r} holds no images")
    return _decode_rows([{"image": {"path": str(p), "bytes": None}} for p in files], "image", None, caption,
                        repr(str(folder)))


# ---- transforms ---------------------------------------------------------------------------

def target_size(resolution: int | tuple[int, int]) -> tuple[int, int]:
    """(width, height) of a training picture: a square side, or an aspect bucket (w, h)."""
    return (resolution, resolution) if isinstance(resolution, int) else (int(resolution[0]), int(resolution[1]))


def crop_box(size: tuple[int, int], resolution: int | tuple[int, int], center_crop: bool, rng: random.Random):
    """Resize target (w, h) that just covers the target (a square side `resolution`, or a bucket
    (tw, th)), and the crop box of the target's size in it."""
    w, h = size
    tw, th = target_size(resolution)
    scale = max(tw / w, th / h)  # a square target: resolution / the short side
    rw, rh = max(tw, round(w * scale)), max(th, round(h * scale))
    if center_crop:
        left, top = (rw - tw) // 2, (rh - th) // 2
    else:
        left, top = rng.randint(0, rw - tw), rng.randint(0, rh - th)
    return (rw, rh), (left, top, left + tw, top + th)


def training_view(im: Image.Image, resolution: int | tuple[int, int], center_crop: bool, flip: bool,
                  rng: random.Random) -> tuple[torch.Tensor, tuple[int, int, int, int]]:
    """Resize to cover `resolution` (a square side, or an aspect bucket (w, h)), crop it, maybe
    mirror: (3, H, W) in [-1, 1],
    and SDXL's size conditioning (original height, original width, crop top, crop left). The crop
    corner is given in the mirrored picture when mirrored, as if the mirror came first."""
    original = (im.height, im.width)
    im, (rw, rh), box = _resized_crop(im, resolution, center_crop, flip, rng, Image.BICUBIC)
    left = rw - box[2] if flip else box[0]
    arr = torch.from_numpy(np.asarray(im, dtype=np.float32).copy()).permute(2, 0, 1)
    return arr / 127.5 - 1.0, (*original, box[1], left)


def _resized_crop(im: Image.Image, resolution, center_crop: bool, flip: bool, rng: random.Random, resample):
    """The geometry `training_view` and `mask_view` share: resized to cover the target, a crop
    of its size (drawn from `rng` unless centred), maybe mirrored; returns (picture, resized size, box)."""
    size, box = crop_box(im.size, resolution, center_crop, rng)
    im = im.resize(size, resample).crop(box)
    return (ImageOps.mirror(im) if flip else im), size, box


def mask_view(mask: Image.Image, resolution, center_crop: bool, flip: bool,
              rng: random.Random) -> torch.Tensor:
    """The mask through the same resize, crop and mirror as `training_view` with a generator in
    the same state: (1, H, W) in [0, 1]."""
    mask = _resized_crop(mask, resolution, center_crop, flip, rng, Image.BILINEAR)[0]
    return torch.from_numpy(np.asarray(mask, dtype=np.float32).copy())[None] / 255.0


def to_training_tensor(im: Image.Image, resolution: int, center_crop: bool, flip: bool,
                       rng: random.Random) -> torch.Tensor:
    """`training_view` without the size conditioning."""
    return training_view(im, resolution, center_crop, flip, rng)[0]


# ---- batches by step ----------------------------------------------------------------------

def step_rng(seed: int, *key: int) -> random.Random:
    """A generator that depends only on (seed, key): resumable, process-count independent.
    (String seeds are hashed with SHA-512 by `random`, identically in every process.)"""
    return random.Random(":".join(map(str, ("step", seed, *key))))


@functools.lru_cache(maxsize=64)
def epoch_order(n: int, seed: int, epoch: int) -> tuple[int, ...]:
    order = list(range(n))
    random.Random(f"epoch:{seed}:{epoch}").shuffle(order)
    return tuple(order)


def batch_indices(n: int, global_batch: int, micro_step: int, seed: int) -> list[int]:
    """Example indices of the global micro-batch `micro_step`: epochs are shuffled permutations of
    range(n) laid end to end, so every example is seen once per epoch."""
    start = micro_step * global_batch
    out = []
    for pos in range(start, start + global_batch):
        epoch, offset = divmod(pos, n)
        out.append(epoch_order(n, seed, epoch)[offset])
    return out


@functools.lru_cache(maxsize=16)
def batches_per_epoch(keys: tuple, global_batch: int) -> int:
    counts: dict = {}
    for k in keys:
        counts[k] = counts.get(k, 0) + 1
    return sum(math.ceil(c / global_batch) for c in counts.values())


@functools.lru_cache(maxsize=16)
def bucket_epoch(keys: tuple, global_batch: int, seed: int, epoch: int) -> tuple[tuple[int, ...], ...]:
    """The epoch's global batches as positions into the epoch order (`keys[i]`: position i's
    aspect bucket), each from one bucket: the positions shuffled as without buckets, grouped by
    bucket in that order, cut into global batches (a bucket's last batch filled from its start),
    the batches shuffled. Keyed by (seed, epoch) only, so a resumed run and N processes (each
    taking its slice of the global batch) see exactly the same batches."""
    groups: dict = {}
    for i in epoch_order(len(keys), seed, epoch):
        groups.setdefault(keys[i], []).append(i)
    batches = []
    for key in sorted(groups):
        g = groups[key]
        for start in range(0, len(g), global_batch):
            chunk = g[start:start + global_batch]
            batches.append(tuple(chunk + [g[j % len(g)] for j in range(global_batch - len(chunk))]))
    random.Random(f"buckets:{seed}:{epoch}").shuffle(batches)
    return tuple(batches)


def bucket_batch(keys: tuple, global_batch: int, micro_step: int, seed: int) -> tuple[int, ...]:
    """Positions (into the epoch order) of global micro-batch `micro_step`."""
    epoch, k = divmod(micro_step, batches_per_epoch(keys, global_batch))
    return bucket_epoch(keys, global_batch, seed, epoch)[k]


def micro_steps_per_epoch(n: int, global_batch: int, keys: tuple | None = None) -> int:
    """Global micro-batches in an epoch of `n` positions; with aspect buckets (`keys[i]`: position
    i's bucket) a bucket's last batch is filled, so each bucket rounds up on its own."""
    return math.ceil(n / global_batch) if keys is None else batches_per_epoch(keys, global_batch)


def example_generator(seed: int, position: int, is_class: int) -> torch.Generator:
    """Noise and timestep generator of the example at `position` in the stream of examples."""
    return torch.Generator().manual_seed(step_rng(seed, position, is_class, 1).getrandbits(63))


@torch.no_grad()
def cache_latents(vae, examples: list[Example], resolution, flips: tuple[bool, ...], device, dtype, *,
                  first: int = 0, buckets: bool = False, progress: bool = True):
    """{(example index, flip): (latent mean, latent std, size conditioning)} from center crops;
    one entry per flip variant. `resolution`: a square side, a bucket (w, h), or a list with each
    example's bucket; with `buckets` the keys are (index, flip, bucket). Indices start at `first`."""
    cache = {}
    for i, ex in enumerate(tqdm(examples, desc="cache latents", leave=False, disable=not progress)):
        target = resolution[i] if isinstance(resolution, list) else resolution
        for flip in flips:
            pixels, size = training_view(ex.image, target, True, flip, step_rng(0, 0))
            dist = vae.encode(pixels[None].to(device, dtype)).latent_dist
            key = (first + i, flip, tuple(target)) if buckets else (first + i, flip)
            cache[key] = (dist.mean, dist.std, size)  # sampled per step, as without the cache
    return cache


def time_ids(original_hw: tuple[int, int], crop_top_left: tuple[int, int], target_hw: tuple[int, int]) -> torch.Tensor:
    """One picture's size record (6,): original size, crop, target size; SDXL's "time ids"."""
    return torch.tensor([*original_hw, *crop_top_left, *target_hw], dtype=torch.float32)


@dataclass
class Batch:
    latents: torch.Tensor  # (B, 4, h, w) VAE samples x scaling factor, compute dtype
    noise: torch.Tensor  # (B, 4, h, w)
    timesteps: torch.Tensor  # (B,)
    captions: list[str]
    masks: torch.Tensor | None  # (B, 1, h, w) at latent resolution with masked loss (class images: ones)
    sizes: torch.Tensor  # (B, 6) each picture's size record (`time_ids`; SDXL conditions on it)
    num_prior: int  # the last num_prior examples are class images


@dataclass
class BatchMaker:
    """This process's slice of global micro-batch k: `batch_size` subject examples (and as many
    class examples with prior preservation), every random choice keyed by (seed, position)."""

    examples: list[Example]
    class_examples: list[Example]
    seed: int
    batch_size: int  # per process
    num_processes: int
    process_index: int
    order: list[int]  # one epoch of subject examples: indices into `examples`, each image x its set's repeats
    resolution: int
    center_crop: bool
    random_flip: bool
    caption_dropout_rate: float  # subject examples trained with the empty caption
    draw: Callable  # (latent (1, C, h, w), generator) -> (noise, timestep): the family's, bound to the run
    vae: torch.nn.Module  # frozen; encodes when there is no latent cache
    latent_cache: dict | None
    device: torch.device
    dtype: torch.dtype  # of the returned latents and noise
    masked: bool = False
    buckets: list | None = None  # aspect buckets: (w, h) per example of `examples`; None: square `resolution`
    latent_space: Callable | None = None  # (vae, sample) -> latent: the family's shift / scale (None: scale only)
    vae_mode: bool = False  # the latent distribution's mode instead of a sample (the family's choice)

    @classmethod
    def from_settings(cls, cfg, examples: list[Example], class_examples: list[Example], order: list[int], *,
                      num_processes: int, process_index: int, draw: Callable, vae, latent_cache: dict | None,
                      device, dtype, buckets: list | None, latent_space: Callable | None = None,
                      vae_mode: bool = False) -> "BatchMaker":
        """The batch maker of a run: the data settings from `cfg` (a TrainConfig), the rest explicit."""
        return cls(examples, class_examples, cfg.seed, cfg.train_batch_size, num_processes, process_index, order,
                   cfg.resolution, cfg.center_crop, cfg.random_flip, cfg.caption_dropout_rate, draw, vae,
                   latent_cache, device, dtype, masked=cfg.masked_loss, buckets=buckets, latent_space=latent_space,
                   vae_mode=vae_mode)

    def __post_init__(self):
        self.keys = None if self.buckets is None else tuple(tuple(self.buckets[i]) for i in self.order)

    def __call__(self, micro_step: int) -> Batch:
        global_batch = self.batch_size * self.num_processes
        slots = range(self.process_index * self.batch_size, (self.process_index + 1) * self.batch_size)
        if self.keys is None:
            inst, target = batch_indices(len(self.order), global_batch, micro_step, self.seed), self.resolution
        else:  # the whole global batch from one bucket: every process's slice has its shape
            inst = list(bucket_batch(self.keys, global_batch, micro_step, self.seed))
            target = self.keys[inst[0]]
        tw, th = target_size(target)
        chosen = [(self.examples, self.order[inst[s]], s, 0) for s in slots]
        if self.class_examples:
            cls = batch_indices(len(self.class_examples), global_batch, micro_step, self.seed + 1)
            chosen += [(self.class_examples, cls[s], s, 1) for s in slots]
        latents, captions, noises, timesteps, sizes, masks = [], [], [], [], [], []
        for source, idx, slot, is_class in chosen:
            position = micro_step * global_batch + slot
            rng = step_rng(self.seed, position, is_class)
            flip = self.random_flip and rng.random() < 0.5
            crop_rng = random.Random()
            crop_rng.setstate(rng.getstate())  # the mask is cropped by the same draws as the image
            gen = example_generator(self.seed, position, is_class)
            if self.latent_cache is not None:
                key = (idx + (len(self.examples) if is_class else 0), flip)
                if self.keys is not None:  # per bucket; a class image meets the buckets of its batches
                    key += (target,)
                    if key not in self.latent_cache:
                        self.latent_cache.update(cache_latents(self.vae, [source[idx]], target, (flip,), self.device,
                                                               self.vae.dtype, first=key[0], buckets=True,
                                                               progress=False))
                mean, std, size = self.latent_cache[key]
            else:
                pixels, size = training_view(source[idx].image, target, self.center_crop, flip, rng)
                with torch.no_grad():
                    dist = self.vae.encode(pixels[None].to(self.device, self.vae.dtype)).latent_dist
                mean, std = dist.mean, dist.std
            sizes.append(time_ids(size[:2], size[2:], (th, tw)))
            if self.masked:
                mask = source[idx].mask if not is_class else None
                if mask is None:
                    masks.append(torch.ones(1, *mean.shape[-2:]))
                else:
                    cached = self.latent_cache is not None  # cached latents are center crops
                    m = mask_view(mask, target, cached or self.center_crop, flip,
                                  step_rng(0, 0) if cached else crop_rng)
                    masks.append(F.interpolate(m[None], size=mean.shape[-2:], mode="area")[0])
            eps = torch.randn(mean.shape, generator=gen, dtype=torch.float32).to(mean)
            sample = mean if self.vae_mode else mean + std * eps  # a VAE sample, our generator (eps drawn either way)
            latents.append((sample * self.vae.config.scaling_factor if self.latent_space is None
                            else self.latent_space(self.vae, sample))[0])
            drop = (not is_class and self.caption_dropout_rate > 0  # its own generator: the others' draws stay
                    and step_rng(self.seed, position, is_class, 3).random() < self.caption_dropout_rate)
            captions.append("" if drop else source[idx].caption)
            noise, timestep = self.draw(latents[-1][None], gen)
            noises.append(noise[0])
            timesteps.append(timestep)
        return Batch(torch.stack(latents).to(self.dtype), torch.stack(noises).to(self.dtype),
                     torch.tensor(timesteps, device=self.device), captions,
                     torch.stack(masks).to(self.device) if masks else None, torch.stack(sizes),
                     len(slots) if self.class_examples else 0)


"""Prior preservation: make sure `class_data_dir` holds enough class images, generating the
missing ones with the base model (batched, with a progress bar, resumable: images already there
are kept and counted, each new one is written atomically)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .data import IMAGE_SUFFIXES
from ..outputs import atomic_path


def count_images(folder: Path) -> int:
    return sum(1 for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES) if folder.is_dir() else 0


def ensure_class_images(class_data_dir: str | Path, class_prompt: str, num_class_images: int, model_path: str,
                        sample_batch_size: int = 4, precision: str | None = None, revision: str | None = None,
                        variant: str | None = None, device: str | torch.device = "cpu", seed: int = 0,
                        num_inference_steps: int = 25, show_progress: bool = True, vae_path: str | None = None) -> int:
    """Generate class images until `class_data_dir` holds `num_class_images`; returns how many were
    made. `vae_path`: a VAE to use instead of the model's (the fp16-safe one training was given)."""
    from ..families.models import load_pipeline

    folder = Path(class_data_dir)
    folder.mkdir(parents=True, exist_ok=True)
    have = count_images(folder)
    missing = num_class_images - have
    if missing <= 0:
        return 0
    device = torch.device(device)
    if precision is None:
        precision = "fp16" if device.type == "cuda" else "fp32"
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]
    pipe = load_pipeline(model_path, revision=revision, variant=variant, torch_dtype=dtype, vae_path=vae_path)
    pipe.to(device)
    tag = hashlib.sha1(class_prompt.encode()).hexdigest()[:10]
    made = 0
    with tqdm(total=missing, desc="class images", disable=not show_progress) as bar:
        while made < missing:
            n = min(sample_batch_size, missing - made)
            index = have + made
            # one generator per image: the k-th class image is the same however it is batched
            gens = [torch.Generator(device="cpu").manual_seed(seed * 1_000_003 + index + i) for i in range(n)]
            images = pipe(prompt=[class_prompt] * n, num_inference_steps=num_inference_steps, generator=gens).images
            for i, image in enumerate(images):
                k = index + i
                while (folder / f"class-{tag}-{k:05d}.png").exists():  # never overwrite a kept image
                    k += num_class_images
                with atomic_path(folder / f"class-{tag}-{k:05d}.png") as tmp:
                    image.save(tmp, format="PNG")
            made += n
            bar.update(n)
    del pipe
    return made

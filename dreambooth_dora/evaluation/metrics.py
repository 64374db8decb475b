"""Image metrics for `dreambooth-dora evaluate`.

Subject and prompt fidelity as in the DreamBooth paper (Ruiz et al. 2023, section 4.1):

    DINO    mean cosine of DINO ViT-S/16 [CLS] embeddings, generated image vs each instance image
    CLIP-I  the same with CLIP image embeddings
    CLIP-T  cosine of the CLIP image embedding with the CLIP text embedding of its prompt

and, for prior drift (an adapter's picture vs the base model's picture from the same seed and
latents), pixel MSE and SSIM (Wang et al. 2004: 11x11 Gaussian window, sigma 1.5, K1 0.01,
K2 0.03, data range 1, mean over the valid region and the RGB channels).
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image


class MetricModelError(ValueError):
    """A feature model that cannot be loaded; the message says what to pass instead."""


def to_unit_tensor(images: list[Image.Image]) -> torch.Tensor:
    """(N, 3, H, W) float64 in [0, 1]."""
    arr = np.stack([np.asarray(im.convert("RGB"), dtype=np.float64) / 255.0 for im in images])
    return torch.from_numpy(arr).permute(0, 3, 1, 2)


def pixel_mse(a: list[Image.Image], b: list[Image.Image]) -> torch.Tensor:
    """(N,) mean squared difference per image pair, pixels in [0, 1]."""
    x, y = to_unit_tensor(a), to_unit_tensor(b)
    return ((x - y) ** 2).flatten(1).mean(1)


def _gaussian_window(size: int, sigma: float) -> torch.Tensor:
    r = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(r ** 2) / (2 * sigma ** 2))
    g = g / g.sum()
    return (g[:, None] * g[None, :])[None, None]  # (1, 1, size, size)


def ssim(a: list[Image.Image], b: list[Image.Image], sigma: float = 1.5) -> torch.Tensor:
    """(N,) structural similarity per image pair (1 = identical)."""
    x, y = to_unit_tensor(a), to_unit_tensor(b)
    size = 2 * int(3.5 * sigma + 0.5) + 1  # 11 for sigma 1.5: the window the paper uses
    if min(x.shape[-2:]) < size:
        raise ValueError(f"SSIM needs images of at least {size}x{size} pixels, got {tuple(x.shape[-2:])}")
    n, c, h, w = x.shape
    win = _gaussian_window(size, sigma)

    def blur(t):  # each channel separately, valid region only
        return F.conv2d(t.reshape(n * c, 1, h, w), win)

    mx, my = blur(x), blur(y)
    vx, vy, cxy = blur(x * x) - mx ** 2, blur(y * y) - my ** 2, blur(x * y) - mx * my
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2))
    return s.reshape(n, -1).mean(1)


def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(N, M) cosine similarities of two batches of feature vectors."""
    return F.normalize(a.double(), dim=-1) @ F.normalize(b.double(), dim=-1).T


def _batches(items, size: int = 32):
    for i in range(0, len(items), size):
        yield items[i:i + size]


def _load(kind: str, name: str, loader):
    try:
        return loader()
    except (OSError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise MetricModelError(f"cannot load the {kind} model {name!r} ({first}); give a local folder "
                               f"(save_pretrained layout), or 'none' to skip {kind}") from None


@torch.no_grad()
def _embed(embedder, images: list[Image.Image], features) -> torch.Tensor:
    """(N, D) features of `images` in batches: the embedder's processor, then `features(pixels)`."""
    out = []
    for chunk in _batches([im.convert("RGB") for im in images]):
        pixels = embedder.processor(images=chunk, return_tensors="pt")["pixel_values"].to(embedder.device)
        out.append(features(pixels).float().cpu())
    return torch.cat(out)


class DinoEmbedder:
    """DINO ViT image embeddings: the [CLS] token of the last layer (after its layer norm), the
    feature the DINO authors use for retrieval and the DreamBooth paper for subject fidelity."""

    def __init__(self, name_or_path: str, device="cpu"):
        from transformers import AutoConfig, AutoImageProcessor, AutoModel

        self.name, self.device = "DINO", torch.device(device)
        self.processor = _load("DINO", name_or_path, lambda: AutoImageProcessor.from_pretrained(name_or_path))
        config = _load("DINO", name_or_path, lambda: AutoConfig.from_pretrained(name_or_path))
        extra = {"add_pooling_layer": False} if config.model_type == "vit" else {}  # DINO checkpoints have no pooler
        self.model = _load("DINO", name_or_path, lambda: AutoModel.from_pretrained(name_or_path, **extra))
        self.model.to(self.device).eval()

    def images(self, images: list[Image.Image]) -> torch.Tensor:
        return _embed(self, images, lambda pixels: self.model(pixel_values=pixels).last_hidden_state[:, 0])


def _features(out) -> torch.Tensor:
    # transformers 5 returns a model output whose pooler_output holds the projected features;
    # transformers 4 returned the tensor itself
    return out if isinstance(out, torch.Tensor) else out.pooler_output


class ClipEmbedder:
    """CLIP image and text embeddings (the projected features the contrastive loss compares)."""

    def __init__(self, name_or_path: str, device="cpu"):
        from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

        self.name, self.device = "CLIP", torch.device(device)
        self.processor = _load("CLIP", name_or_path, lambda: AutoImageProcessor.from_pretrained(name_or_path))
        self.tokenizer = _load("CLIP", name_or_path, lambda: AutoTokenizer.from_pretrained(name_or_path))
        self.model = _load("CLIP", name_or_path, lambda: CLIPModel.from_pretrained(name_or_path))
        self.model.to(self.device).eval()

    def images(self, images: list[Image.Image]) -> torch.Tensor:
        return _embed(self, images, lambda pixels: _features(self.model.get_image_features(pixel_values=pixels)))

    @torch.no_grad()
    def texts(self, texts: list[str]) -> torch.Tensor:
        out = []
        for chunk in _batches(list(texts)):
            tok = self.tokenizer(chunk, padding=True, truncation=True, return_tensors="pt").to(self.device)
            out.append(_features(self.model.get_text_features(input_ids=tok["input_ids"],
                                                              attention_mask=tok["attention_mask"])).float().cpu())
        return torch.cat(out)


class ToyEmbedder:
    """The embedded toy world's own judge: penultimate features of its classifier. Pictures are
    seen at the generating model's resolution (instance images are down- and up-sampled to it)."""

    def __init__(self, classifier: str | Path | torch.nn.Module, resolution: int):
        """`classifier`: the loaded judge or its folder."""
        from ..toy.world import load_classifier

        self.name, self.resolution = "toy", resolution
        self.model = classifier if isinstance(classifier, torch.nn.Module) else load_classifier(classifier)

    @torch.no_grad()
    def images(self, images: list[Image.Image]) -> torch.Tensor:
        from ..toy.world import classify, degrade

        return classify(self.model, [degrade(im, self.resolution) for im in images])[2]


KINDS = ("subject", "class", "unrelated")


def clip_text(prompt: str, identifier: str) -> str:
    """The prompt CLIP-T compares with: the identifier token removed ('a sks dog' -> 'a dog')."""
    return re.sub(rf"\s*\b{re.escape(identifier)}\b", "", prompt).strip()


def _stats(values: list[float]) -> dict:
    v = np.asarray(values, dtype=np.float64)
    return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0,
            "per_seed": [float(x) for x in v]}


def compute_metrics(images: dict, prompts: list[tuple[str, str]], instances: list[Image.Image], embedders: list,
                    clip: ClipEmbedder | None, seeds: list[int], identifier: str) -> dict:
    """{model: {metric: {"mean", "std", "per_seed"}}} (see the module docstring)."""
    names = list(images)
    keys = [(j, s) for j in range(len(prompts)) for s in seeds]
    # features of every picture once per embedder: feats[embedder][model][key] -> (n, D)
    order = [(m, k) for m in names for k in keys]
    feats = {}
    for emb in embedders:
        f = emb.images([im for m, k in order for im in images[m][k]])
        feats[emb.name] = {m: {} for m in names}
        for (m, k), rows in zip(order, torch.split(f, [len(images[m][k]) for m, k in order])):
            feats[emb.name][m][k] = rows
    inst = {emb.name: emb.images(instances) for emb in embedders}
    texts = clip.texts([clip_text(p, identifier) for _, p in prompts]) if clip else None
    by_kind = {kind: [j for j, (k, _) in enumerate(prompts) if k == kind] for kind in KINDS}

    results = {}
    for m in names:
        per_seed: dict[str, list[float]] = {}

        def add(metric, value):
            per_seed.setdefault(metric, []).append(float(value))

        for s in seeds:
            subj = [(j, s) for j in by_kind["subject"]]
            for emb in embedders:
                g = torch.cat([feats[emb.name][m][k] for k in subj])
                add(f"{emb.name}-I", cosine(g, inst[emb.name]).mean())
            if clip:
                add("CLIP-T", torch.cat([cosine(feats["CLIP"][m][(j, s)], texts[j:j + 1]).flatten()
                                         for j, _ in subj]).mean())
            for kind in ("class", "unrelated"):
                ks = [(j, s) for j in by_kind[kind]]
                if not ks:
                    continue
                if clip:
                    add(f"{kind} CLIP-T", torch.cat([cosine(feats["CLIP"][m][k], texts[k[0]:k[0] + 1]).flatten()
                                                     for k in ks]).mean())
                if m == names[0]:
                    continue  # the base model's drift from itself is zero by definition
                gen = [im for k in ks for im in images[m][k]]
                ref = [im for k in ks for im in images[names[0]][k]]
                add(f"{kind} MSE", pixel_mse(gen, ref).mean())
                add(f"{kind} SSIM", ssim(gen, ref).mean())
                for emb in embedders:
                    a = torch.cat([feats[emb.name][m][k] for k in ks])
                    b = torch.cat([feats[emb.name][names[0]][k] for k in ks])
                    add(f"{kind} {emb.name} dist", (1 - cosine(a, b).diagonal()).mean())
        results[m] = {metric: _stats(v) for metric, v in per_seed.items()}
    return results

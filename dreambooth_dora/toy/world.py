"""A toy world for the embedded base model: captioned 64 px pictures of simple things with
ground-truth labels (shape class, colour), rendered procedurally.

Classes are flat or lightly shaded objects on plain backgrounds: icons of several shapes,
Lego-like bricks of several sizes, plain balls and cubes. The sample subjects (the orange
rounded icon with a ring emblem, the yellow brick with a red stripe) are never drawn: icons here
carry no emblem and bricks no stripe.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import numpy as np
from PIL import Image

SIZE = 64
CLASSES = ("circle icon", "square icon", "triangle icon", "star icon", "brick", "ball", "cube")
COLOURS = {
    "red": (215, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (240, 205, 30),
    "orange": (245, 130, 30), "purple": (140, 60, 190), "pink": (240, 120, 180), "black": (30, 30, 30),
}
BACKGROUNDS = {"white": (248, 248, 248), "gray": (200, 200, 200), "beige": (240, 228, 205), "light blue": (205, 225, 245)}
TEMPLATES = ("a {colour} {cls}", "a {colour} {cls} on a {bg} background", "a photo of a {colour} {cls}",
             "a 3d render of a {colour} {cls}", "a {colour} {cls}, {bg} background")


@dataclass
class Sample:
    image: Image.Image
    caption: str
    cls: int
    colour: int


def caption_for(cls: str, colour: str, bg: str, template: int) -> str:
    return TEMPLATES[template % len(TEMPLATES)].format(cls=cls, colour=colour, bg=bg)


def _grid(scale: float, cx: float, cy: float):
    ys, xs = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32)
    return (xs - cx) / (SIZE * 0.3 * scale), (ys - cy) / (SIZE * 0.3 * scale)


def _shade(colour, amount):
    return np.clip(np.array(colour, np.float32)[None, None] * amount[..., None], 0, 255)


def render(cls: str, colour: str, bg: str, rng: random.Random) -> Image.Image:
    """One picture of `colour` `cls` on `bg`, at a random place, size, angle and light."""
    img = np.empty((SIZE, SIZE, 3), np.float32)
    img[:] = BACKGROUNDS[bg]
    scale = rng.uniform(0.75, 1.15)
    cx, cy = SIZE / 2 + rng.uniform(-6, 6), SIZE / 2 + rng.uniform(-6, 6)
    u, v = _grid(scale, cx, cy)
    angle = rng.uniform(-0.4, 0.4)
    ru, rv = u * math.cos(angle) - v * math.sin(angle), u * math.sin(angle) + v * math.cos(angle)
    light = rng.uniform(0.85, 1.1)
    col = COLOURS[colour]
    if cls.endswith("icon"):  # flat icon: rounded square tile in a lighter tint holding the shape
        shape = cls.split()[0]
        if shape == "circle":
            mask = u * u + v * v < 0.8
        elif shape == "square":
            mask = (np.abs(ru) < 0.75) & (np.abs(rv) < 0.75)
        elif shape == "triangle":
            mask = (rv < 0.6) & (rv > 2.0 * np.abs(ru) - 0.9)
        else:  # star: radius modulated by angle
            r, a = np.sqrt(ru * ru + rv * rv), np.arctan2(rv, ru)
            mask = r < 0.45 + 0.4 * (0.5 + 0.5 * np.cos(5 * a))
        shade = light * (1.0 - 0.15 * (v + 1) / 2)
        img[mask] = _shade(col, shade)[mask]
    elif cls == "ball":
        r2 = u * u + v * v
        mask = r2 < 0.8
        nz = np.sqrt(np.clip(1 - r2 / 0.8, 0, 1))
        diffuse = np.clip(0.35 + 0.75 * (nz * 0.8 - 0.4 * u / 0.9 - 0.4 * v / 0.9), 0.2, 1.2) * light
        img[mask] = _shade(col, diffuse)[mask]
        hl = ((u + 0.35) ** 2 + (v + 0.35) ** 2 < 0.03) & mask
        img[hl] = 250
    else:  # cube or brick: an isometric box (bricks are wider, with studs)
        w = 0.55 if cls == "cube" else rng.choice((0.8, 1.0))
        d, h = 0.45, (0.55 if cls == "cube" else 0.35)
        top = (np.abs(ru) < w) & (np.abs(rv + h + 0.1) < d * 0.5)
        front = (np.abs(ru) < w) & (rv > -h + 0.1 - d * 0.5 + 0.2) & (rv < h + 0.1)
        side = (ru > w) & (ru < w + 0.3) & (rv > -h - 0.15 - (ru - w) * 0.8) & (rv < h + 0.1 - (ru - w) * 0.8)
        img[front] = _shade(col, np.full(u.shape, 0.8 * light))[front]
        img[side] = _shade(col, np.full(u.shape, 0.6 * light))[side]
        img[top] = _shade(col, np.full(u.shape, 1.05 * light))[top]
        if cls == "brick":
            n = 3 if w > 0.9 else 2
            for k in range(n):
                sx = -w + (k + 0.5) * 2 * w / n
                stud = ((ru - sx) ** 2 / 0.03 + (rv + h + 0.15) ** 2 / 0.012) < 1
                img[stud] = _shade(col, np.full(u.shape, 1.2 * light))[stud]
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), "RGB")


def sample(rng: random.Random, held_out: set[tuple[int, int, int]] = frozenset()) -> Sample:
    """A random labelled picture; (class, colour, template) combinations in `held_out` are skipped."""
    while True:
        c, k, t = rng.randrange(len(CLASSES)), rng.randrange(len(COLOURS)), rng.randrange(len(TEMPLATES))
        if (c, k, t) not in held_out:
            break
    bg = rng.choice(list(BACKGROUNDS))
    colour = list(COLOURS)[k]
    return Sample(render(CLASSES[c], colour, bg, rng), caption_for(CLASSES[c], colour, bg, t), c, k)


def held_out_prompts(n: int = 64, seed: int = 1234) -> list[tuple[str, int, int, tuple[int, int, int]]]:
    """`n` (prompt, class, colour, key) whose exact caption never appears in training: each
    (class, colour, template) combination here is excluded from the training stream."""
    rng = random.Random(seed)
    combos = [(c, k, t) for c in range(len(CLASSES)) for k in range(len(COLOURS)) for t in range(len(TEMPLATES))]
    rng.shuffle(combos)
    out = []
    for c, k, t in combos[:n]:
        bg = list(BACKGROUNDS)[rng.randrange(len(BACKGROUNDS))]
        out.append((caption_for(CLASSES[c], list(COLOURS)[k], bg, t), c, k, (c, k, t)))
    return out


# ---- the judge: a small CNN that names class and colour ------------------------------------

def _classifier_module(width: int = 32):
    import torch.nn as nn

    class ToyClassifier(nn.Module):
        """(B, 3, H, W) in [-1, 1] -> class logits, colour logits; `features` is the penultimate
        layer (B, 4·width), used as the feature distance for subject fidelity."""

        def __init__(self):
            super().__init__()
            c = width
            self.body = nn.Sequential(
                nn.Conv2d(3, c, 3, padding=1), nn.BatchNorm2d(c), nn.GELU(), nn.MaxPool2d(2),
                nn.Conv2d(c, 2 * c, 3, padding=1), nn.BatchNorm2d(2 * c), nn.GELU(), nn.MaxPool2d(2),
                nn.Conv2d(2 * c, 4 * c, 3, padding=1), nn.BatchNorm2d(4 * c), nn.GELU(), nn.MaxPool2d(2),
                nn.Conv2d(4 * c, 4 * c, 3, padding=1), nn.BatchNorm2d(4 * c), nn.GELU(),
                nn.AdaptiveAvgPool2d(1), nn.Flatten(),
            )
            self.cls_head = nn.Linear(4 * c, len(CLASSES))
            self.colour_head = nn.Linear(4 * c, len(COLOURS))

        def features(self, x):
            return self.body(x)

        def forward(self, x):
            f = self.body(x)
            return self.cls_head(f), self.colour_head(f)

    return ToyClassifier()


def to_tensor(images: list[Image.Image], size: int = SIZE):
    import torch

    arr = np.stack([np.asarray(im.convert("RGB").resize((size, size), Image.BICUBIC), np.float32) for im in images])
    return torch.from_numpy(arr).permute(0, 3, 1, 2) / 127.5 - 1


def degrade(im: Image.Image, resolution: int) -> Image.Image:
    """What a `resolution`-pixel model can draw of a picture: down- and back up-sampled."""
    return im.resize((resolution, resolution), Image.BICUBIC) if resolution < SIZE else im


def train_classifier(steps: int = 600, batch: int = 64, seed: int = 0, resolution: int = SIZE, log=print):
    import torch

    torch.manual_seed(seed)
    rng = random.Random(seed)
    model = _classifier_module()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps)
    for step in range(steps):
        batch_samples = [sample(rng) for _ in range(batch)]
        x = to_tensor([degrade(s.image, rng.choice((resolution, SIZE))) for s in batch_samples])
        x = x + 0.05 * torch.randn_like(x)  # generated pictures are noisier than renders
        yc = torch.tensor([s.cls for s in batch_samples])
        yk = torch.tensor([s.colour for s in batch_samples])
        lc, lk = model(x)
        loss = torch.nn.functional.cross_entropy(lc, yc) + torch.nn.functional.cross_entropy(lk, yk)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % 100 == 0 or step == steps - 1:
            log(f"classifier step {step}: loss {loss.item():.4f}")
    return model.eval()


def save_classifier(model, folder) -> None:
    from pathlib import Path

    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "model.safetensors"),
              metadata={"classes": ",".join(CLASSES), "colours": ",".join(COLOURS), "size": str(SIZE)})


def load_classifier(folder):
    from pathlib import Path

    from safetensors.torch import load_file

    model = _classifier_module()
    model.load_state_dict(load_file(str(Path(folder) / "model.safetensors")))
    return model.eval()


def classify(model, images: list[Image.Image]):
    """(class indices, colour indices, features) for PIL images."""
    import torch

    with torch.no_grad():
        x = to_tensor(images)
        lc, lk = model(x)
        return lc.argmax(1).tolist(), lk.argmax(1).tolist(), model.features(x)

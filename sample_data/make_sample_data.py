"""Render the sample subject sets procedurally, so the pictures are ours to ship.

    python sample_data/make_sample_data.py

3d_icon/: one glossy rounded-square app icon (one colour, one emblem) from varied angles and light.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
from PIL import Image

SIZE = 128
HERE = Path(__file__).resolve().parent


def render_icon(yaw: float, light: tuple[float, float], scale: float, bg: tuple[int, int, int]) -> Image.Image:
    """A rounded box with a bevelled, Lambert + Phong shaded face and a white ring emblem."""
    ys, xs = np.mgrid[0:SIZE, 0:SIZE].astype(np.float64)
    u = (xs - SIZE / 2) / (SIZE * 0.32 * scale)
    v = (ys - SIZE / 2) / (SIZE * 0.32 * scale)
    u = u / max(math.cos(yaw), 0.35)  # foreshortening when turned
    r, k = 1.0, 0.35  # half-size and corner radius (unit square)
    qx, qy = np.maximum(np.abs(u) - (r - k), 0), np.maximum(np.abs(v) - (r - k), 0)
    dist = np.hypot(qx, qy) - k  # signed distance to the rounded square
    inside = dist < 0
    bevel = np.clip(-dist / 0.25, 0, 1)
    # normal: flat face tilted by yaw, bent towards the edge on the bevel
    gx, gy = np.gradient(dist)
    gn = np.hypot(gx, gy) + 1e-9
    nx = np.sin(yaw) + (1 - bevel) * gx / gn
    ny = (1 - bevel) * gy / gn
    nz = np.cos(yaw) * bevel + 0.2
    nn = np.sqrt(nx**2 + ny**2 + nz**2)
    nx, ny, nz = nx / nn, ny / nn, nz / nn
    lx, ly = light
    lz = math.sqrt(max(1 - lx * lx - ly * ly, 0.1))
    diffuse = np.clip(nx * lx + ny * ly + nz * lz, 0, 1)
    spec = np.clip(2 * diffuse * nz - lz, 0, 1) ** 24
    base = np.array([235, 90, 40], dtype=np.float64)  # the subject's orange
    colour = base[None, None] * (0.35 + 0.65 * diffuse[..., None]) + 255 * 0.8 * spec[..., None]
    ring = np.abs(np.hypot(u, v) - 0.45) < 0.12
    colour[ring & inside] = 0.9 * colour[ring & inside] + 0.1 * 255 + 120 * diffuse[ring & inside, None]
    img = np.empty((SIZE, SIZE, 3))
    img[:] = bg
    shadow = (np.hypot(qx, qy - 0.15) - k < 0.1) & ~inside
    img[shadow] *= 0.8
    img[inside] = colour[inside]
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), "RGB")


ICON_VIEWS = [  # yaw (rad), light direction (x, y), scale, background
    (0.0, (-0.4, -0.5), 1.0, (245, 245, 245)),
    (0.35, (-0.5, -0.3), 0.95, (230, 236, 245)),
    (-0.4, (0.4, -0.4), 0.9, (245, 240, 228)),
    (0.6, (-0.2, -0.6), 1.05, (240, 240, 240)),
    (-0.2, (0.5, -0.2), 0.85, (225, 240, 230)),
    (0.15, (0.0, -0.7), 1.1, (250, 250, 250)),
]


def main() -> None:
    out = HERE / "3d_icon"
    out.mkdir(exist_ok=True)
    rows = []
    for i, (yaw, light, scale, bg) in enumerate(ICON_VIEWS):
        name = f"icon_{i:02d}.png"
        render_icon(yaw, light, scale, bg).save(out / name)
        rows.append({"file_name": name, "text": "a sks icon, 3d render"})
    (out / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


if __name__ == "__main__":
    main()

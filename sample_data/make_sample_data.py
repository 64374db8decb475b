"""Render the sample subject sets procedurally, so the pictures are ours to ship.

    python sample_data/make_sample_data.py

3d_icon/: one glossy rounded-square app icon (one colour, one emblem) from varied angles and light.
lego/: one 2x3 yellow brick with a red stripe, in isometric views with varied light and backgrounds.
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


def _shade(rgb, k):
    return tuple(int(max(0, min(255, c * k))) for c in rgb)


def render_brick(angle: float, light: float, scale: float, bg: tuple[int, int, int], studs=(2, 3)) -> Image.Image:
    """An isometric brick (rotation 0.2 to 0.95 rad keeps the front and right faces in view): top, front and right faces shaded by a light direction, cylindrical
    studs with a highlight, a red stripe on the long side."""
    from PIL import ImageDraw

    big = 4 * SIZE  # draw large, downsample: anti-aliasing without extra packages
    im = Image.new("RGB", (big, big), bg)
    d = ImageDraw.Draw(im)
    colour = (245, 200, 30)
    nx, ny = studs
    u = big * 0.15 * scale  # one stud pitch
    ca, sa = math.cos(angle), math.sin(angle)

    def project(x, y, z):  # world (x right, y back, z up) -> image
        px = (x * ca - y * sa) * u
        py = (x * sa + y * ca) * u * 0.5 - z * u
        return (big / 2 + px, big * 0.58 + py)

    w, dpt, h = nx, ny, 1.2
    x0, y0 = -w / 2, -dpt / 2
    top = [project(x0, y0, h), project(x0 + w, y0, h), project(x0 + w, y0 + dpt, h), project(x0, y0 + dpt, h)]
    front = [project(x0, y0 + dpt, 0), project(x0 + w, y0 + dpt, 0), project(x0 + w, y0 + dpt, h),
             project(x0, y0 + dpt, h)]
    side = [project(x0 + w, y0, 0), project(x0 + w, y0 + dpt, 0), project(x0 + w, y0 + dpt, h),
            project(x0 + w, y0, h)]
    d.polygon([project(x0 - 0.2, y0 + dpt + 0.3, 0), project(x0 + w + 0.3, y0 + dpt + 0.3, 0),
               project(x0 + w + 0.3, y0 - 0.2, 0)], fill=_shade(bg, 0.82))  # contact shadow
    d.polygon(side, fill=_shade(colour, 0.55 + 0.25 * light))
    d.polygon(front, fill=_shade(colour, 0.75 - 0.2 * light))
    stripe = [project(x0, y0 + dpt, 0.35), project(x0 + w, y0 + dpt, 0.35), project(x0 + w, y0 + dpt, 0.6),
              project(x0, y0 + dpt, 0.6)]
    d.polygon(stripe, fill=_shade((210, 40, 30), 0.8 - 0.2 * light))
    d.polygon(top, fill=_shade(colour, 1.0))
    r = 0.3
    for i in range(nx):
        for j in range(ny):
            cx, cy = x0 + i + 0.5, y0 + j + 0.5
            base_c, top_c = project(cx, cy, h), project(cx, cy, h + 0.25)
            rx, ry = r * u, r * u * 0.5
            d.rectangle([base_c[0] - rx, top_c[1], base_c[0] + rx, base_c[1]], fill=_shade(colour, 0.7))
            d.ellipse([base_c[0] - rx, base_c[1] - ry, base_c[0] + rx, base_c[1] + ry], fill=_shade(colour, 0.7))
            d.ellipse([top_c[0] - rx, top_c[1] - ry, top_c[0] + rx, top_c[1] + ry], fill=_shade(colour, 1.08))
            hx = top_c[0] - rx * 0.4 * (1 if light > 0 else -1)
            d.ellipse([hx - rx * 0.25, top_c[1] - ry * 0.35, hx + rx * 0.25, top_c[1] + ry * 0.1],
                      fill=(255, 250, 225))
    return im.resize((SIZE, SIZE), Image.LANCZOS)


BRICK_VIEWS = [  # rotation (rad), light (-1..1), scale, background
    (0.25, 0.8, 1.0, (240, 240, 240)),
    (0.45, -0.5, 0.9, (225, 235, 245)),
    (0.6, 0.2, 0.85, (245, 238, 225)),
    (0.35, 0.9, 0.95, (235, 245, 235)),
    (0.75, -0.9, 1.1, (250, 250, 250)),
    (0.9, 0.5, 0.8, (230, 230, 240)),
]


def write_set(folder: str, stem: str, render, views, caption: str) -> None:
    """One image per view plus the `datasets` imagefolder captions file."""
    out = HERE / folder
    out.mkdir(exist_ok=True)
    rows = []
    for i, view in enumerate(views):
        name = f"{stem}_{i:02d}.png"
        render(*view).save(out / name)
        rows.append({"file_name": name, "text": caption})
    (out / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def main() -> None:
    write_set("3d_icon", "icon", render_icon, ICON_VIEWS, "a sks icon, 3d render")
    write_set("lego", "brick", render_brick, BRICK_VIEWS, "a sks lego brick")


if __name__ == "__main__":
    main()

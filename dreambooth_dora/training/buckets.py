"""Aspect-ratio buckets: portrait and landscape pictures trained at their own shape, not cropped square.

Buckets are (width, height) pairs of about the area of `resolution`²: for each width a multiple
of `step` between resolution/2 and 2·resolution, the tallest height (a multiple of `step`) that
keeps w·h <= resolution² (both sides within [resolution/2, 2·resolution]), and the transposes;
so 512 gives 512x512, 576x448, 640x384, 704x320, 768x320, 832x256 ... 1024x256 and their
transposes, as kohya's `make_bucket_resolutions` does with its defaults (256 .. 1024, 64). Each picture goes to the
bucket nearest its aspect ratio (in log ratio), resized to cover it and cropped. With
`max_upscale`, a picture that would be enlarged more than that gets a bucket of its own instead,
its size times at most `max_upscale` (in steps, area at most resolution²): no blurry upscales.

Every global batch comes from one bucket (one tensor shape): see `data.bucket_epoch`.
"""

from __future__ import annotations

import math
import re

Bucket = tuple[int, int]  # (width, height)


def default_buckets(resolution: int, step: int) -> list[Bucket]:
    """kohya's rule: for every width w in steps of `step` from resolution/2 to 2·resolution, the
    height min(2·resolution, ⌊resolution² / w⌋ rounded down to `step`) if at least resolution/2;
    with every bucket its transpose; the square bucket always."""
    area, lo, hi = resolution * resolution, resolution / 2, 2 * resolution
    side = int(resolution // step * step)
    out = {(side, side)} if side >= step else set()
    for w in range(step, int(hi) + 1, step):
        if w < lo:
            continue
        h = min(int(hi), (area // w) // step * step)
        if h >= lo:
            out |= {(w, h), (h, w)}
    return sorted(out, key=lambda b: (b[0] / b[1], b[0]))


def parse_buckets(items: list[str], step: int) -> list[Bucket]:
    """'512x768' strings -> buckets; each side a positive multiple of `step`."""
    out = []
    for item in items:
        m = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", item)
        if not m:
            raise ValueError(f"bucket {item!r} is not WIDTHxHEIGHT (e.g. 512x768)")
        w, h = int(m.group(1)), int(m.group(2))
        if w < step or h < step or w % step or h % step:
            raise ValueError(f"bucket {item!r}: both sides must be positive multiples of bucket_step {step}")
        out.append((w, h))
    return sorted(set(out), key=lambda b: b[0] / b[1])


def assign(size: tuple[int, int], buckets: list[Bucket], resolution: int, step: int,
           max_upscale: float | None) -> Bucket:
    """The bucket of a picture of `size` (w, h): the nearest aspect ratio; with `max_upscale`, a
    bucket of its own when covering that one would enlarge it more."""
    w, h = size
    ratio = math.log(w / h)
    bucket = min(buckets, key=lambda b: (abs(math.log(b[0] / b[1]) - ratio), -b[0] * b[1]))
    if max_upscale is None or max(bucket[0] / w, bucket[1] / h) <= max_upscale:
        return bucket
    s = min(max_upscale, resolution / math.sqrt(w * h))
    own = max(step, int(w * s) // step * step), max(step, int(h * s) // step * step)
    if own[0] * own[1] > resolution * resolution:  # a side rounded up to one step: over the area budget
        raise ValueError(f"a {w}x{h} picture is too narrow for bucket_step {step} under bucket_max_upscale "
                         f"{max_upscale:g}: its own bucket would be {own[0]}x{own[1]}, "
                         f"{own[0] * own[1] / resolution ** 2:.1f}x the area budget {resolution}x{resolution}; "
                         "crop it, or raise bucket_max_upscale")
    return own

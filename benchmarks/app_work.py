"""Seconds per unit of the app's work measure (pixels x steps x images x columns), to size its
default per-request limit (`app.core.DEFAULT_MAX_WORK`).

    python benchmarks/app_work.py [--resolution 512] [--steps 2] [--device cpu]

An SD 1.5-architecture UNet (random weights, no hub) runs what one sampling step of one image of
one column costs: a forward pass on batch 2 (classifier-free guidance); the VAE decode is added
once per image. Printed: seconds per step, per megapixel-step, and the work one minute buys.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_train import sd15_unet, sd15_vae  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--steps", type=int, default=2, help="timed UNet steps (after one warm-up)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    dev = torch.device(args.device)
    dtype = torch.float16 if dev.type == "cuda" else torch.float32
    torch.manual_seed(0)
    unet = sd15_unet().to(dev, dtype).eval()
    vae = sd15_vae().to(dev, dtype).eval()
    side = args.resolution // 8
    x = torch.randn(2, 4, side, side, device=dev, dtype=dtype)
    cond = torch.randn(2, 77, 768, device=dev, dtype=dtype)

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    times = []
    with torch.no_grad():
        for i in range(args.steps + 1):
            sync()
            t0 = time.perf_counter()
            unet(x, torch.tensor([500], device=dev), cond)
            sync()
            if i:
                times.append(time.perf_counter() - t0)
        sync()
        t0 = time.perf_counter()
        vae.decode(x[:1])
        sync()
        decode = time.perf_counter() - t0
    step = statistics.median(times)
    pixels = args.resolution ** 2
    per_unit = step / pixels
    print(f"device={dev.type} threads={torch.get_num_threads()} resolution={args.resolution} torch={torch.__version__}")
    print(f"UNet step (batch 2, CFG): {step:.3f} s; VAE decode: {decode:.3f} s per image")
    print(f"seconds per megapixel-step: {per_unit * 1e6:.3f}")
    print(f"work in one minute (pixels x steps, decode included at 20 steps): "
          f"{60 / (per_unit + decode / pixels / 20):,.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Inference time of a fused export vs the base model vs the unmerged adapter.

    python benchmarks/bench_fused.py [--rounds 5] [--resolution 256] [--rank 8]

A UNet with SD 1.5's architecture (random weights), DoRA rank 8 on to_q/to_k/to_v/to_out.0 with
trained-looking tensors; "fused" is what `dreambooth-dora export --format fused` writes (the
adapter merged into plain layers). One UNet forward per call (batch 2, as classifier-free
guidance runs it), interleaved rounds, medians, printed as ratios to the base model.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from dreambooth_dora import add_adapters, merge_adapters  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_train import sd15_unet
    from timing import timed

    torch.manual_seed(0)
    dev = torch.device(args.device)
    base = sd15_unet().eval().requires_grad_(False)
    adapted = copy.deepcopy(base)
    add_adapters(adapted, ["to_q", "to_k", "to_v", "to_out.0"], rank=args.rank)
    with torch.no_grad():
        for name, p in adapted.named_parameters():
            if name.endswith("lora_B.weight"):
                p.normal_(std=1e-3)
            elif name.endswith("lora_magnitude_vector"):
                p.mul_(1 + 0.01 * torch.randn_like(p))
    fused = merge_adapters(copy.deepcopy(adapted))
    variants = {"base": base.to(dev), "fused": fused.to(dev), "adapter (unmerged)": adapted.to(dev).eval()}
    lat = args.resolution // 8
    x = torch.randn(2, 4, lat, lat, device=dev)
    cond = torch.randn(2, 77, 768, device=dev)
    t = torch.tensor([500, 500], device=dev)
    with torch.no_grad():
        ref = variants["adapter (unmerged)"](x, t, cond).sample
        err = (variants["fused"](x, t, cond).sample - ref).abs().max().item()
        times = {k: [] for k in variants}
        for unet in variants.values():  # warm-up: first calls allocate
            unet(x, t, cond)
        for _ in range(args.rounds):
            for name, unet in variants.items():
                times[name].append(timed(lambda unet=unet: unet(x, t, cond), dev))
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"device={dev} threads={torch.get_num_threads()} resolution={args.resolution} batch=2 rank={args.rank} "
          f"rounds={args.rounds}; fused vs unmerged max |diff| = {err:.2e}")
    print("| variant | s / UNet forward | ratio to base |")
    print("|---|---|---|")
    for name, v in med.items():
        print(f"| {name} | {v:.3f} | {v / med['base']:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

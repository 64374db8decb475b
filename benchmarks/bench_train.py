"""Training-step time: our DoRA vs our LoRA vs PEFT's DoRA on a UNet with SD 1.5's architecture.

    python benchmarks/bench_train.py [--steps 4] [--resolution 256] [--rank 8] [--device cpu]

Random weights (no hub), batch 1, adapters on to_q/to_k/to_v/to_out.0, AdamW; one full step is
noise -> UNet forward -> MSE -> backward -> clip -> optimiser step. "cached" feeds stored latents,
"uncached" encodes the image with SD 1.5's VAE every step. The variants' steps are interleaved
and medians reported, so machine noise hits them alike; results are printed as ratios.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from dreambooth_dora import adapter_parameters, add_adapters  # noqa: E402
from timing import timed  # noqa: E402

TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


def sd15_unet():
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8,
                                block_out_channels=(320, 640, 1280, 1280), layers_per_block=2)


def sd15_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
                         down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4, help="timed steps per variant and mode (after 1 warm-up)")
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    from peft import LoraConfig, inject_adapter_in_model

    torch.manual_seed(0)
    dev = torch.device(args.device)
    base = sd15_unet().requires_grad_(False)
    vae = sd15_vae().requires_grad_(False).to(dev).eval()
    variants = {}
    for name, dora in (("ours LoRA", False), ("ours DoRA", True)):
        unet = copy.deepcopy(base)
        add_adapters(unet, TARGETS, rank=args.rank, alpha=args.rank, use_dora=dora)
        variants[name] = unet.to(dev)
    peft = inject_adapter_in_model(LoraConfig(r=args.rank, lora_alpha=args.rank, target_modules=TARGETS,
                                              use_dora=True), copy.deepcopy(base))
    variants["PEFT DoRA"] = peft.to(dev)
    del base
    optimizers = {}
    for name, unet in variants.items():
        params = adapter_parameters(unet) if name.startswith("ours") else [p for p in unet.parameters() if p.requires_grad]
        for p in params:  # a trained-looking adapter (B != 0) so every term of the math runs
            if p.dim() == 2 and p.shape[1] == args.rank:
                torch.nn.init.normal_(p, std=1e-3)
        optimizers[name] = (torch.optim.AdamW(params, lr=1e-4), params)
        unet.train()

    latent = args.resolution // 8
    pixels = torch.randn(1, 3, args.resolution, args.resolution, device=dev)
    cached = torch.randn(1, 4, latent, latent, device=dev)
    cond = torch.randn(1, 77, 768, device=dev)

    def step(name, mode):
        unet, (opt, params) = variants[name], optimizers[name]
        if mode == "uncached":
            with torch.no_grad():
                lat = vae.encode(pixels).latent_dist.sample() * 0.18215
        else:
            lat = cached
        noise = torch.randn_like(lat)
        t = torch.randint(0, 1000, (1,), device=dev)
        pred = unet(lat + noise, t, cond).sample
        loss = torch.nn.functional.mse_loss(pred, noise)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    print(f"device={dev} threads={torch.get_num_threads()} resolution={args.resolution} batch=1 rank={args.rank} "
          f"steps={args.steps} torch={torch.__version__}")
    print("| mode | LoRA s/step | DoRA s/step | PEFT DoRA s/step | DoRA/LoRA | PEFT DoRA/ours DoRA |")
    print("|---|---|---|---|---|---|")
    for mode in ("cached", "uncached"):
        times = {name: [] for name in variants}
        for name in variants:
            step(name, mode)  # warm-up
        for _ in range(args.steps):
            for name in variants:
                times[name].append(timed(lambda name=name: step(name, mode), dev))
        med = {k: statistics.median(v) for k, v in times.items()}
        print(f"| {mode} latents | {med['ours LoRA']:.3f} | {med['ours DoRA']:.3f} | {med['PEFT DoRA']:.3f} "
              f"| {med['ours DoRA'] / med['ours LoRA']:.3f} | {med['PEFT DoRA'] / med['ours DoRA']:.3f} |")
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""What a ComfyUI user gets from our kohya export of a DoRA adapter, measured.

    python benchmarks/comfyui_gap.py ADAPTER_DIR [--base MODEL] [--steps 20]

ComfyUI's `weight_decompose` (comfy/weight_adapter/base.py) takes the output axis for our
(out, 1) `dora_scale`, then divides by the row norms of the base weight W0 instead of those of
V = W0 + s·B A. Each output row of every adapted weight is then scaled by r = ||V|| / ||W0||
instead of 1. This prints the distribution of |r - 1| over all rows, and compares images made
with the exact fused weights and with ComfyUI's weights (same prompt, seed and latents).
The `--comfyui` export compensates (dora_scale = m·||W0||/||V||) and is exact there.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from dreambooth_dora.adapters.inject import adapted_layers, merge_adapters  # noqa: E402
from dreambooth_dora.adapters.file import apply_to_models, base_model_of, read_adapter  # noqa: E402
from dreambooth_dora.families import pipeline_models
from dreambooth_dora.families.models import load_pipeline  # noqa: E402


@torch.no_grad()
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("adapter")
    parser.add_argument("--base")
    parser.add_argument("--prompt")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--seeds", type=int, default=4)
    args = parser.parse_args(argv)
    adapter = read_adapter(args.adapter)
    if not adapter.use_dora:
        print("a LoRA adapter: ComfyUI applies it exactly (no dora_scale)")
        return 0
    base = base_model_of(adapter, args.base)
    exact, comfy = load_pipeline(base), load_pipeline(base)
    ratios = []
    for pipe in (exact, comfy):
        apply_to_models(adapter, pipeline_models(pipe))
    for model in pipeline_models(comfy).values():
        for _, layer in adapted_layers(model):
            w0 = layer.weight.detach().float().flatten(1).norm(dim=1)
            r = layer.weight_norm() / w0  # ComfyUI multiplies row i of W' by r_i
            ratios.append((r - 1).abs())
            layer.lora_magnitude_vector.mul_(r.reshape(layer.lora_magnitude_vector.shape))
    for pipe in (exact, comfy):
        for model in pipeline_models(pipe).values():
            merge_adapters(model)
    dev = torch.cat(ratios).numpy()
    prompt = args.prompt or adapter.info.instance_prompt or "a photo"
    size = exact.unet.config.sample_size * exact.vae_scale_factor
    diffs, psnrs = [], []
    for seed in range(args.seeds):
        kw = dict(prompt=prompt, num_inference_steps=args.steps, output_type="np", height=size, width=size)
        a = exact(generator=torch.Generator().manual_seed(seed), **kw).images
        b = comfy(generator=torch.Generator().manual_seed(seed), **kw).images
        mse = float(((a - b) ** 2).mean())
        diffs.append(float(np.abs(a - b).mean()))
        psnrs.append(10 * np.log10(1.0 / max(mse, 1e-12)))
    print(f"adapter: {adapter.path}  base: {base}  rows: {dev.size}")
    print(f"|r - 1| per output row (r = ||V||/||W0||): median {np.median(dev):.2e}, 99th pct "
          f"{np.percentile(dev, 99):.2e}, max {dev.max():.2e}")
    print(f"images, exact vs ComfyUI ({args.seeds} seeds, {args.steps} steps, '{prompt}'): mean |diff| "
          f"{np.mean(diffs):.4f} of 1.0, PSNR {np.mean(psnrs):.1f} dB (min {np.min(psnrs):.1f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

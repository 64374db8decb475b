"""Sizes of the web UI files for the DiT families at their real widths, from the shapes alone.

    python benchmarks/webui_sizes.py [--rank 16]

FLUX.1 dev (19 double + 38 single blocks, hidden 3072) and SD 3.5 medium / large, built on the
meta device (no weights, no time); diffusers' default `--lora_layers` of each family. Per file,
fp32 bytes of: our adapter file (A, B, DoRA magnitude per layer), the kohya / ComfyUI file (the
checkpoints' fused modules: q/k/v in one module of rank 3r, the up factors block-diagonal, rows of
layers without adapter zero; `dora_scale` per row) and the full-difference file (W' - W0 of every
fused module, its unadapted rows included). Printed as a Markdown table.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dreambooth_dora.adapters.inject import _matches  # noqa: E402
from dreambooth_dora.families import Flux1, StableDiffusion3  # noqa: E402

MODELS = {  # name: (family, transformer class, config)
    "FLUX.1 dev": (Flux1(), "FluxTransformer2DModel", dict(num_layers=19, num_single_layers=38, guidance_embeds=True)),
    "SD 3.5 medium": (StableDiffusion3(), "SD3Transformer2DModel",
                      dict(num_layers=24, attention_head_dim=64, num_attention_heads=24, joint_attention_dim=4096,
                           caption_projection_dim=1536, pooled_projection_dim=2048, pos_embed_max_size=384,
                           dual_attention_layers=tuple(range(13)), qk_norm="rms_norm")),
    "SD 3.5 large": (StableDiffusion3(), "SD3Transformer2DModel",
                     dict(num_layers=38, attention_head_dim=64, num_attention_heads=38, joint_attention_dim=4096,
                          caption_projection_dim=2432, pooled_projection_dim=2048, pos_embed_max_size=192,
                          qk_norm="rms_norm")),
}


def sizes(family, model, rank: int) -> dict[str, int]:
    """Bytes (fp32) of each file for the family's default targets at `rank`."""
    targets = family.default_targets["transformer"]
    adapted = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and _matches(n, targets)}
    ours = sum(rank * m.in_features + m.out_features * rank + m.out_features for m in adapted.values())
    stacks = {}
    for name in adapted:
        native, members = family.native_module(name, model)
        stacks[native] = members
    kohya = full = 0
    for members in stacks.values():
        layers = [model.get_submodule(n) for n in members]
        rows, cols = sum(m.out_features for m in layers), layers[0].in_features
        r = rank * sum(n in adapted for n in members)
        kohya += r * cols + rows * r + rows + 1  # down, up, dora_scale, alpha
        full += rows * cols
    return {"layers": len(adapted), "modules": len(stacks), "ours": 4 * ours, "kohya": 4 * kohya, "full": 4 * full}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rank", type=int, default=16)
    args = parser.parse_args(argv)
    import diffusers

    mib = 2 ** 20
    print(f"| model (rank {args.rank}, default targets) | adapted layers | web UI modules | our adapter | "
          "kohya / --comfyui | full |")
    print("|---|---|---|---|---|---|")
    for label, (family, cls, config) in MODELS.items():
        with torch.device("meta"):
            model = getattr(diffusers, cls)(**config)
        s = sizes(family, model, args.rank)
        print(f"| {label} | {s['layers']} | {s['modules']} | {s['ours'] / mib:.0f} MiB | {s['kohya'] / mib:.0f} MiB | "
              f"{s['full'] / mib:.0f} MiB |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

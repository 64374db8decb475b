"""Forward+backward time and activation memory of one adapted layer on SD 1.5 or DiT shapes.

    python benchmarks/bench_layers.py [--repeats 15] [--ranks 4 16] [--device cpu] [--shapes sd15|dit]

`--shapes dit`: FLUX.1's and SD 3.5's projections at their real widths (FLUX.1 hidden 3072, its
feed-forward 3072 -> 12288 -> 3072; SD 3.5 medium 1536, large 2432), with 256 image + 64 text tokens
per sample (a 256 px picture; 512 px has 1024 + 512: too slow for CPU rounds, the ratios are
per-token ratios either way).

Variants per shape: the frozen base layer, our LoRA, our DoRA (norm recomputed every call, as with
one optimiser step per batch), our DoRA with the norm cached (gradient accumulation /
checkpoint recomputation), and PEFT's DoRA. Before each call of the adapted variants (not the
cached one) the adapter's A is updated in place, as an optimiser step does: that is what makes
our DoRA recompute its norm (the frozen W0's row norms stay cached, as in training). Runs are interleaved (one call of each variant per
round) and the median of the rounds is reported, so the machine's noise hits all variants alike;
results are printed as ratios. Memory is the bytes autograd saves for backward (unique storages,
parameters excluded), measured with saved-tensor hooks, which is exact and device independent.
"""

from __future__ import annotations

import argparse
import copy
import math
import statistics
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from dreambooth_dora.adapters.dora import AdaptedLinear  # noqa: E402
from timing import saved_for_backward, timed  # noqa: E402

# (in, out, tokens, where): SD 1.5 UNet attention at 64x64 / 32x32 / 16x16 / 8x8 latents, CLIP text encoder
SHAPES = [(320, 320, 4096, "unet 64x64"), (640, 640, 1024, "unet 32x32"), (1280, 1280, 256, "unet 16x16"),
          (1280, 1280, 64, "unet 8x8"), (768, 768, 77, "text encoder")]
# the DiT families' projections, 256 + 64 tokens (see the docstring)
DIT_SHAPES = [(3072, 3072, 320, "FLUX.1 attention"), (3072, 12288, 320, "FLUX.1 ff in"),
              (12288, 3072, 320, "FLUX.1 ff out"), (1536, 1536, 320, "SD 3.5 medium attention"),
              (2432, 2432, 320, "SD 3.5 large attention")]
BATCH = 2


def make_variants(width: int, rank: int, device: str, force: float | None = None,
                  out_features: int | None = None) -> dict[str, tuple[nn.Module, bool]]:
    """name -> (layer, simulate an optimiser step before each call)."""
    from peft import LoraConfig, inject_adapter_in_model

    torch.manual_seed(0)
    base = nn.Linear(width, out_features or width, bias=False, device=device).requires_grad_(False)

    def ours(dora):
        layer = AdaptedLinear(copy.deepcopy(base), rank=rank, alpha=rank, use_dora=dora)
        with torch.no_grad():
            layer.lora_B.weight.normal_(std=0.01)  # a trained-looking adapter, not the B = 0 start
        return layer

    holder = nn.Module()
    holder.proj = copy.deepcopy(base)
    peft = inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=rank, target_modules=["proj"], use_dora=True),
                                   holder).proj
    with torch.no_grad():
        peft.lora_B["default"].weight.normal_(std=0.01)
    dora = ours(True)
    variants = {"base": (base, False), "ours LoRA": (ours(False), True), "ours DoRA": (dora, True),
                "ours DoRA cached": (copy.deepcopy(dora), False), "PEFT DoRA": (peft, True)}
    if force is not None:  # compare the two code paths: 0 = always fused, inf = always composed
        for name in ("ours LoRA", "ours DoRA", "ours DoRA cached"):
            variants[name][0].fuse_min_tokens_per_feature = force
    return variants


@torch.no_grad()
def optimiser_step(layer: nn.Module) -> None:
    """What an optimiser step does to the adapter as far as caching goes: an in-place update of A
    (bumps its version counter; the values stay, so every round computes the same thing)."""
    a = layer.lora_A["default"] if isinstance(layer.lora_A, nn.ModuleDict) else layer.lora_A
    a.weight.mul_(1.0)


def step(layer: nn.Module, x: torch.Tensor, grad: torch.Tensor) -> None:
    y = layer(x)
    y.backward(grad)


def saved_bytes(layer: nn.Module, x: torch.Tensor) -> int:
    """Bytes autograd keeps for backward, counting each storage once and no parameters."""
    return saved_for_backward(lambda: layer(x), layer.parameters())


def bench(width, tokens, rank, repeats, device, force=None, out_features=None):
    variants = make_variants(width, rank, device, force, out_features)
    x = torch.randn(BATCH, tokens, width, device=device, requires_grad=True)  # upstream adapters need dx
    grad = torch.randn(BATCH, tokens, out_features or width, device=device)
    times = {name: [] for name in variants}
    for layer, _ in variants.values():  # warm-up
        step(layer, x, grad)
    for _ in range(repeats):
        for name, (layer, stepped) in variants.items():
            if stepped:
                optimiser_step(layer)
            x.grad = None
            layer.zero_grad(set_to_none=True)
            times[name].append(timed(lambda layer=layer: step(layer, x, grad), device))
    med = {name: statistics.median(v) for name, v in times.items()}
    mem = {name: saved_bytes(layer, x) for name, (layer, _) in variants.items()}
    return med, mem


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--ranks", type=int, nargs="+", default=[4, 16])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--path", choices=["auto", "fused", "composed"], default="auto",
                        help="force our layers' code path (to measure the crossover)")
    parser.add_argument("--shapes", choices=["sd15", "dit"], default="sd15",
                        help="SD 1.5's attention shapes, or FLUX.1's and SD 3.5's projections")
    args = parser.parse_args(argv)
    print(f"device={args.device} threads={torch.get_num_threads()} batch={BATCH} repeats={args.repeats} "
          f"torch={torch.__version__}")
    head = ("| in x out x tokens | where | rank | base ms | LoRA ms | DoRA/LoRA | DoRA cached/LoRA | PEFT DoRA/ours DoRA "
            "| extra act. MB DoRA-LoRA (output tensor MB) | PEFT extra act. MB |")
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    ratios = {"dora": [], "cached": [], "peft": []}
    force = {"auto": None, "fused": 0.0, "composed": float("inf")}[args.path]
    for rank in args.ranks:
        for width, out, tokens, where in (DIT_SHAPES if args.shapes == "dit" else SHAPES):
            med, mem = bench(width, tokens, rank, args.repeats, args.device, force, out)
            r_dora = med["ours DoRA"] / med["ours LoRA"]
            r_cached = med["ours DoRA cached"] / med["ours LoRA"]
            r_peft = med["PEFT DoRA"] / med["ours DoRA"]
            ratios["dora"].append(r_dora)
            ratios["cached"].append(r_cached)
            ratios["peft"].append(r_peft)
            out_mb = BATCH * tokens * out * 4 / 2**20
            extra = (mem["ours DoRA"] - mem["ours LoRA"]) / 2**20
            peft_extra = (mem["PEFT DoRA"] - mem["ours LoRA"]) / 2**20
            print(f"| {width} x {out} x {tokens} | {where} | {rank} | {med['base'] * 1e3:.2f} | {med['ours LoRA'] * 1e3:.2f} "
                  f"| {r_dora:.3f} | {r_cached:.3f} | {r_peft:.2f} | {extra:.2f} ({out_mb:.2f}) | {peft_extra:.2f} |")
            sys.stdout.flush()

    def gmean(v):
        return math.exp(sum(map(math.log, v)) / len(v))

    print(f"\ngeometric means: ours DoRA / ours LoRA = {gmean(ratios['dora']):.3f} (target <= 1.15); "
          f"cached-norm DoRA / LoRA = {gmean(ratios['cached']):.3f}; "
          f"PEFT DoRA / ours DoRA = {gmean(ratios['peft']):.2f} (target >= 1.4)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Training-step time: our DoRA vs our LoRA vs PEFT's DoRA on a UNet with SD 1.5's architecture.

    python benchmarks/bench_train.py [--steps 4] [--resolution 256] [--rank 8] [--device cpu]
    python benchmarks/bench_train.py --options [--runs 3] [--baseline REV]
    python benchmarks/bench_train.py --dit flux1|sd35|flux2_klein|z_image|chroma [--steps 3] [--rank 16]

`--options`: what the trainer's optional features cost. The real `train()` on the embedded
toy-world model (the quick start's settings, DoRA, batch 2) is timed at the code of `--baseline`
(default: the revision before the first of them was added, checked out into a temporary git
worktree), at this revision with every option off (the defaults), and with them on (pivotal
tuning, aspect buckets, masked loss, EMA, LoRA+, a magnitude learning rate, caption dropout).
Each measurement is one fresh process training 40 steps; the loop's progress bar stamps the time
of every step, and the median gap after 5 warm-up steps is its time per step (loading and
start-up do not count). Rounds are interleaved; the table gives medians over rounds.

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
from dreambooth_dora import adapted_layers, adapter_parameters, add_adapters  # noqa: E402
from timing import saved_for_backward, timed  # noqa: E402

TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


def sd15_unet():
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8,
                                block_out_channels=(320, 640, 1280, 1280), layers_per_block=2)


def sd15_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
                         down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)


REPO = Path(__file__).resolve().parents[1]
BASELINE = "2ad6180^"  # the revision before the DoRA-aware optimiser, the first of the options
ON = ["--train_text_encoder", "false", "--train_text_encoder_ti", "--token_abstraction", "sks",
      "--aspect_buckets", "--bucket_step", "8", "--masked_loss", "--mask_data_dir", str(REPO / "sample_data" / "3d_icon"),
      "--use_ema", "--loraplus_lr_ratio", "4", "--magnitude_lr", "1e-4", "--caption_dropout_rate", "0.1"]
RUN = """
import statistics, sys, time
import dreambooth_dora.training.loop as train_module
from dreambooth_dora.training.config import load_config

class Clock(train_module.tqdm):  # the loop's progress bar: a time stamp per finished step
    stamps = []

    def update(self, n=1):
        Clock.stamps.append(time.perf_counter())
        return super().update(n)

train_module.tqdm = Clock
train_module.train(load_config(sys.argv[1:]))
gaps = [b - a for a, b in zip(Clock.stamps[5:], Clock.stamps[6:])]  # after 5 warm-up steps
print("SECONDS", statistics.median(gaps))
"""


def step_seconds(code: Path, flags: list[str], out: Path, steps: int = 40) -> float:
    """Median time per optimiser step of `train()` at the code in `code`, in a fresh process."""
    import os
    import subprocess

    argv = ["--config", str(REPO / "train_configs" / "quickstart_tiny_icon_dora.yaml"), "--instance_data_dir",
            str(REPO / "sample_data" / "3d_icon"), "--max_train_steps", str(steps), "--output_dir", str(out),
            "--report_to", "none", "--validation_prompt", "none", "--checkpointing_steps", "1000", *flags]
    env = {**os.environ, "PYTHONPATH": str(code), "TQDM_DISABLE": "1"}
    proc = subprocess.run([sys.executable, "-c", RUN, *argv], cwd=code, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"training at {code} failed: {proc.stderr.strip().splitlines()[-1]}")
    return float(proc.stdout.split("SECONDS")[-1])


def dit_model(kind: str):
    """A DiT family's transformer at its real widths with fewer blocks (CPU memory and time), and
    one step's inputs (256 px: 256 image tokens, 64 text tokens), and diffusers' default targets."""
    from dreambooth_dora.families.flux1 import FLUX_TARGETS
    from dreambooth_dora.families.sd3 import SD3_TARGETS

    g = torch.Generator().manual_seed(0)
    if kind == "flux1":  # FLUX.1: hidden 3072 (24 heads x 128), 1 double + 2 single blocks (of 19 + 38)
        from diffusers import FluxTransformer2DModel

        model = FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=1, num_single_layers=2,
                                       attention_head_dim=128, num_attention_heads=24, joint_attention_dim=4096,
                                       pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=[16, 56, 56])
        inputs = dict(hidden_states=torch.randn(1, 256, 64, generator=g),
                      encoder_hidden_states=torch.randn(1, 64, 4096, generator=g),
                      pooled_projections=torch.randn(1, 768, generator=g), timestep=torch.tensor([0.5]),
                      guidance=torch.tensor([3.5]), txt_ids=torch.zeros(64, 3), img_ids=torch.zeros(256, 3))
        return model, inputs, list(FLUX_TARGETS)
    if kind == "flux2_klein":  # klein 4B: hidden 3072 (24 heads x 128), Qwen3-4B's 3 x 2560 text width, 1 + 2 (of 5 + 20)
        from diffusers import Flux2KleinPipeline, Flux2Transformer2DModel

        from dreambooth_dora.families.flux2 import Flux2Klein

        model = Flux2Transformer2DModel(num_layers=1, num_single_layers=2, num_attention_heads=24,
                                        joint_attention_dim=7680, guidance_embeds=False)
        text = torch.randn(1, 64, 7680, generator=g)
        inputs = dict(hidden_states=torch.randn(1, 256, 128, generator=g), encoder_hidden_states=text,
                      timestep=torch.tensor([0.5]), guidance=None, txt_ids=Flux2KleinPipeline._prepare_text_ids(text),
                      img_ids=Flux2KleinPipeline._prepare_latent_ids(torch.zeros(1, 128, 16, 16)))
        return model, inputs, Flux2Klein().denoiser_targets(argparse.Namespace(lora_layers=None), model)
    if kind == "z_image":  # Z-Image: hidden 3840 (30 heads x 128), Qwen3-4B's 2560-wide states; 1 refiner each + 2 of 30
        from diffusers import ZImageTransformer2DModel

        from dreambooth_dora.families.z_image import Z_IMAGE_TARGETS

        model = ZImageTransformer2DModel(n_layers=2, n_refiner_layers=1)
        inputs = dict(x=[torch.randn(16, 1, 32, 32, generator=g)], t=torch.tensor([0.5]),
                      cap_feats=[torch.randn(64, 2560, generator=g)])
        return model, inputs, list(Z_IMAGE_TARGETS)
    if kind == "chroma":  # Chroma: hidden 3072 (24 heads x 128), T5-XXL's 4096, 1 double + 2 single (of 19 + 38)
        from diffusers import ChromaPipeline, ChromaTransformer2DModel

        model = ChromaTransformer2DModel(num_layers=1, num_single_layers=2)
        mask = torch.cat([torch.ones(1, 20), torch.zeros(1, 44), torch.ones(1, 256)], dim=1)  # a 19-token prompt
        inputs = dict(hidden_states=torch.randn(1, 256, 64, generator=g),
                      encoder_hidden_states=torch.randn(1, 64, 4096, generator=g), timestep=torch.tensor([0.5]),
                      attention_mask=mask, txt_ids=torch.zeros(64, 3),
                      img_ids=ChromaPipeline._prepare_latent_image_ids(1, 16, 16, "cpu", torch.float32))
        return model, inputs, list(FLUX_TARGETS)
    from diffusers import SD3Transformer2DModel  # SD 3.5 medium: hidden 1536, 2 of its 24 blocks, one dual

    model = SD3Transformer2DModel(sample_size=64, patch_size=2, in_channels=16, out_channels=16, num_layers=2,
                                  attention_head_dim=64, num_attention_heads=24, joint_attention_dim=4096,
                                  caption_projection_dim=1536, pooled_projection_dim=2048, pos_embed_max_size=384,
                                  dual_attention_layers=(0,), qk_norm="rms_norm")
    inputs = dict(hidden_states=torch.randn(1, 16, 32, 32, generator=g),
                  encoder_hidden_states=torch.randn(1, 64, 4096, generator=g),
                  pooled_projections=torch.randn(1, 2048, generator=g), timestep=torch.tensor([500.0]))
    return model, inputs, list(SD3_TARGETS)


def output(pred):
    """A transformer's output as one tensor (Z-Image returns one per picture)."""
    return torch.stack(pred) if isinstance(pred, (list, tuple)) else pred


def dit(args) -> int:
    """`--dit <family>`: training steps of a DiT family's transformer, ours LoRA / DoRA vs PEFT's DoRA."""
    from peft import LoraConfig, inject_adapter_in_model

    torch.manual_seed(0)
    base, inputs, targets = dit_model(args.dit)
    base.requires_grad_(False)
    variants = {}
    for name, dora in (("ours LoRA", False), ("ours DoRA", True)):
        model = copy.deepcopy(base)
        add_adapters(model, targets, rank=args.rank, alpha=args.rank, use_dora=dora)
        variants[name] = model
    variants["PEFT DoRA"] = inject_adapter_in_model(LoraConfig(r=args.rank, lora_alpha=args.rank,
                                                               target_modules=targets, use_dora=True), base)
    optimizers = {}
    for name, model in variants.items():
        params = adapter_parameters(model) if name.startswith("ours") else [p for p in model.parameters()
                                                                            if p.requires_grad]
        for p in params:  # a trained-looking adapter (B != 0) so every term of the math runs
            if p.dim() == 2 and p.shape[1] == args.rank:
                torch.nn.init.normal_(p, std=1e-3)
        optimizers[name] = (torch.optim.AdamW(params, lr=1e-4), params)
        model.train()
    target = None

    def step(name):
        nonlocal target
        model, (opt, params) = variants[name], optimizers[name]
        pred = output(model(**inputs, return_dict=False)[0])
        target = torch.zeros_like(pred) if target is None else target
        torch.nn.functional.mse_loss(pred, target).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    kept = {name: saved_for_backward(lambda m=m: output(m(**inputs, return_dict=False)[0]), m.parameters())
            for name, m in variants.items()}
    adapted = sum(1 for _ in adapted_layers(variants["ours DoRA"]))
    print(f"{args.dit}: real widths, fewer blocks (see dit_model); {adapted} adapted layers, rank {args.rank}, "
          f"256 image + 64 text tokens, batch 1, fp32, threads={torch.get_num_threads()}, steps={args.steps}")
    times = {name: [] for name in variants}
    for name in variants:
        step(name)  # warm-up
    for _ in range(args.steps):
        for name in variants:  # interleaved: the machine's noise hits every variant alike
            times[name].append(timed(lambda name=name: step(name), torch.device("cpu")))
    med = {k: statistics.median(v) for k, v in times.items()}
    print("| model | LoRA s/step | DoRA s/step | PEFT DoRA s/step | DoRA/LoRA | PEFT DoRA/ours DoRA "
          "| kept for backward MiB: LoRA / DoRA / PEFT DoRA |")
    print("|---|---|---|---|---|---|---|")
    print(f"| {args.dit} | {med['ours LoRA']:.2f} | {med['ours DoRA']:.2f} | {med['PEFT DoRA']:.2f} "
          f"| {med['ours DoRA'] / med['ours LoRA']:.3f} | {med['PEFT DoRA'] / med['ours DoRA']:.3f} "
          f"| {kept['ours LoRA'] / 2**20:.0f} / {kept['ours DoRA'] / 2**20:.0f} / {kept['PEFT DoRA'] / 2**20:.0f} |")
    return 0


def options(args) -> int:
    import subprocess
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        old = Path(tmp) / "baseline"
        subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(old), args.baseline],
                       check=True, capture_output=True)
        try:
            variants = {"before the options": (old, []), "options off": (REPO, []), "options on": (REPO, ON)}
            per_step = {name: [] for name in variants}
            names = list(variants)
            for r in range(args.runs):
                for name in names[r % 3:] + names[:r % 3]:  # each variant first in turn: no order bias
                    code, flags = variants[name]
                    per_step[name].append(step_seconds(code, flags, Path(tmp) / f"{r}-{name}".replace(" ", "_")))
                    print(f"round {r + 1}: {name}: {per_step[name][-1] * 1000:.1f} ms/step", flush=True)
        finally:
            subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(old)], capture_output=True)
    med = {k: statistics.median(v) for k, v in per_step.items()}
    base = med["before the options"]
    print(f"\ntorch={torch.__version__} threads={torch.get_num_threads()} baseline={args.baseline} runs={args.runs}")
    print("| code | ms / step (median) | / before the options |")
    print("|---|---|---|")
    for name, value in med.items():
        print(f"| {name} | {value * 1000:.1f} | {value / base:.3f} |")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--options", action="store_true", help="time the trainer's options (see above)")
    parser.add_argument("--runs", type=int, default=6, help="--options: interleaved rounds")
    parser.add_argument("--baseline", default=BASELINE, help="--options: the revision before the options")
    parser.add_argument("--steps", type=int, default=4, help="timed steps per variant and mode (after 1 warm-up)")
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dit", choices=["flux1", "sd35", "flux2_klein", "z_image", "chroma"], help="time a DiT family's transformer instead")
    args = parser.parse_args(argv)
    if args.options:
        return options(args)
    if args.dit:
        return dit(args)
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

    def saved_bytes(name) -> int:  # what autograd keeps for backward in one forward, parameters excluded
        unet = variants[name]
        return saved_for_backward(lambda: unet(cached, torch.tensor([500], device=dev), cond).sample, unet.parameters())

    kept = {name: saved_bytes(name) for name in variants}
    print(f"device={dev} threads={torch.get_num_threads()} resolution={args.resolution} batch=1 rank={args.rank} "
          f"steps={args.steps} torch={torch.__version__}")
    print(f"memory kept for backward per step: LoRA {kept['ours LoRA'] / 2**20:.1f} MiB, DoRA "
          f"{kept['ours DoRA'] / 2**20:.1f} MiB (DoRA/LoRA {kept['ours DoRA'] / kept['ours LoRA']:.3f}), PEFT DoRA "
          f"{kept['PEFT DoRA'] / 2**20:.1f} MiB (PEFT/ours DoRA {kept['PEFT DoRA'] / kept['ours DoRA']:.3f})")
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

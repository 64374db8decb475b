"""The prepared device check: correctness, speed and memory on CUDA in one command (CPU without one).

    python benchmarks/gpu_check.py [--out DIR] [--size quick|full] [--repeats N]

1. Runs the tests marked `cuda` (tests/test_cuda.py: DoRA/LoRA layers vs PEFT in fp32 / fp16 /
   bf16 under autocast, both code paths, forward and backward; tiny SD and SDXL training with
   --mixed_precision fp16 and bf16, the adapter reloaded exactly; load_adapter and the fused
   export in fp16). Without CUDA their CPU variants run and the CUDA ones are listed as skipped.
2. Times, interleaved (medians), our LoRA, our DoRA and PEFT's DoRA: one adapted layer on SD 1.5
   attention shapes and the DiT families' projections (benchmarks/bench_layers.py), and a whole
   training step (noise, denoiser forward, MSE, backward, clip, AdamW; random weights, batch 1)
   on SD 1.5's UNet at 512 px and SDXL's at 1024 px (rank 8 on to_q/to_k/to_v/to_out.0), and at
   1024 px FLUX.1's transformer (its real widths with 2 of 19 double and 4 of 38 single blocks,
   4096 image + 512 T5 tokens; gradient checkpointing off and on) and SD 3.5 medium's whole
   transformer (4096 + 333 tokens), rank 16 on diffusers' default targets of each (bf16 autocast on
   CUDA, frozen weights in bf16, adapters fp32); `--size quick` (the default without CUDA) runs
   small models at 64 px (the code path only, no figures to quote).
   Memory per step: on CUDA the peak allocated during the step above what was allocated before
   it (`torch.cuda.max_memory_allocated`); everywhere the bytes autograd keeps for backward
   (exact, device independent). Reported as ratios.
3. Writes gpu_check.json and gpu_check.md in a new folder (printed) and exits with 1 if any
   correctness test failed (2 for bad arguments). Every test runs with TF32 off (fp32 is checked
   in true fp32) and the report gives each test's precision. Every model build, copy and step is
   inside the out-of-memory guard (frozen weights cast before they move to the device), so a
   report is always written; a part that did not fit says "out of memory at <stage>". Without
   CUDA the JSON says "cuda": "skipped", "ok" is null (the CPU variants' result is
   "cpu_variants_ok") and the output says that no GPU figure was produced.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


# ---- 1. the cuda-marked tests ------------------------------------------------------------------

def run_tests(out: Path, where: str = "tests/") -> dict:
    """The cuda-marked tests under `where`; each case is counted for the device it ran (or would
    have run) on: its `cpu` / `cuda` parameter, else the machine's accelerator."""
    xml = out / "cuda_tests.xml"
    cuda = torch.cuda.is_available()
    proc = subprocess.run([sys.executable, "-m", "pytest", "-m", "cuda", "-q", "-rs", "-p", "no:cacheprovider",
                           f"--junitxml={xml}", where], cwd=ROOT, capture_output=True, text=True)
    (out / "cuda_tests.log").write_text(proc.stdout + proc.stderr, encoding="utf-8")
    cases = []
    if xml.is_file():
        for case in ET.parse(xml).getroot().iter("testcase"):
            name = case.get("name")
            outcome, why = "passed", ""
            for tag in ("failure", "error", "skipped"):
                node = case.find(tag)
                if node is not None:
                    outcome, why = ("skipped" if tag == "skipped" else "failed"), (node.get("message") or "")[:200]
            params = name.partition("[")[2]
            on = ("cuda" if "cuda" in params else "cpu" if "cpu" in params
                  else "cuda" if cuda or "CUDA" in why else "cpu")
            precision = next((p for p in ("fp32", "fp16", "bf16") if p in params),
                             "fp16" if "half_precision" in name else "fp32")
            cases.append({"test": name, "outcome": outcome, "reason": why, "on": on, "precision": precision})
    summary = {on: {k: sum(c["outcome"] == k for c in cases if c["on"] == on) for k in ("passed", "failed", "skipped")}
               for on in ("cpu", "cuda")}
    ok = proc.returncode == 0 and bool(cases) and not any(c["outcome"] == "failed" for c in cases)
    return {"ok": ok, "exit_status": proc.returncode, "summary": summary, "cases": cases}


# ---- 2. timing and memory --------------------------------------------------------------------

class UNetInputs:
    """One UNet step's inputs on the device: latents (px / 8), text states, SDXL's pooled + size ids."""

    def __init__(self, px: int, ctx: int, pooled: int | None, device, dtype):
        g = torch.Generator().manual_seed(0)
        self.latents = torch.randn(1, 4, px // 8, px // 8, generator=g).to(device)
        self.cond = torch.randn(1, 77, ctx, generator=g).to(device, dtype)
        self.extra = {} if pooled is None else {"added_cond_kwargs": {
            "text_embeds": torch.randn(1, pooled, generator=g).to(device, dtype),
            "time_ids": torch.tensor([[px, px, 0, 0, px, px]], dtype=dtype, device=device)}}
        self.t = torch.tensor([500], device=device)

    def __call__(self, model, noisy):
        return model(noisy, self.t, self.cond, **self.extra).sample


class DiTInputs:
    """A transformer step's keyword inputs beside its latents (the denoised input)."""

    kw: dict

    def __call__(self, model, noisy):
        return model(hidden_states=noisy.to(self.kw["encoder_hidden_states"].dtype), **self.kw, return_dict=False)[0]


class FluxInputs(DiTInputs):
    """One FLUX.1 step: packed latents (px / 16)^2 tokens of 64, T5 states (`text` tokens, 4096 wide
    at full size), CLIP's pooled, guidance, position ids."""

    def __init__(self, px: int, text: int, model, device, dtype):
        g = torch.Generator().manual_seed(0)
        cfg = model.config
        n = (px // 16) ** 2
        self.latents = torch.randn(1, n, cfg.in_channels, generator=g).to(device)
        self.kw = dict(encoder_hidden_states=torch.randn(1, text, cfg.joint_attention_dim, generator=g).to(device, dtype),
                       pooled_projections=torch.randn(1, cfg.pooled_projection_dim, generator=g).to(device, dtype),
                       timestep=torch.tensor([0.5], device=device), guidance=torch.tensor([3.5], device=device),
                       txt_ids=torch.zeros(text, 3, device=device), img_ids=torch.zeros(n, 3, device=device))


class KleinInputs(DiTInputs):
    """One FLUX.2 [klein] step: (px / 16)^2 tokens of 128 (batch-normed 2x2 patches), Qwen3's stacked
    states (`text` tokens, 3 x 2560 wide for 4B), 4-D position ids, no pooled, no guidance."""

    def __init__(self, px: int, text: int, model, device, dtype):
        from diffusers import Flux2KleinPipeline

        g = torch.Generator().manual_seed(0)
        cfg = model.config
        n = (px // 16) ** 2
        self.latents = torch.randn(1, n, cfg.in_channels, generator=g).to(device)
        states = torch.randn(1, text, cfg.joint_attention_dim, generator=g).to(device, dtype)
        side = px // 16
        self.kw = dict(encoder_hidden_states=states, timestep=torch.tensor([0.5], device=device), guidance=None,
                       txt_ids=Flux2KleinPipeline._prepare_text_ids(torch.zeros(1, text, 1)).to(device),
                       img_ids=Flux2KleinPipeline._prepare_latent_ids(torch.zeros(1, 1, side, side)).to(device))


class ChromaInputs(DiTInputs):
    """One Chroma step: FLUX.1's packed latents, T5 states (`text` tokens, 4096 wide) through the
    pipeline's mask (a prompt of a quarter of them), no pooled, no guidance input."""

    def __init__(self, px: int, text: int, model, device, dtype):
        g = torch.Generator().manual_seed(0)
        cfg = model.config
        n = (px // 16) ** 2
        self.latents = torch.randn(1, n, cfg.in_channels, generator=g).to(device)
        kept = text // 4 + 1
        mask = torch.cat([torch.ones(1, kept), torch.zeros(1, text - kept), torch.ones(1, n)], dim=1)
        self.kw = dict(encoder_hidden_states=torch.randn(1, text, cfg.joint_attention_dim, generator=g).to(device, dtype),
                       attention_mask=mask.to(device, dtype), timestep=torch.tensor([0.5], device=device),
                       txt_ids=torch.zeros(text, 3, device=device), img_ids=torch.zeros(n, 3, device=device))


class ZImageInputs:
    """One Z-Image step: a (16, 1, px / 8, px / 8) latent and Qwen3's states (`text` tokens, 2560 wide
    for Z-Image), each a one-picture list as the transformer takes them."""

    def __init__(self, px: int, text: int, model, device, dtype):
        g = torch.Generator().manual_seed(0)
        cfg = model.config
        self.latents = torch.randn(1, cfg.in_channels, px // 8, px // 8, generator=g).to(device)
        self.caps = [torch.randn(text, cfg.cap_feat_dim, generator=g).to(device, dtype)]
        self.t = torch.tensor([0.5], device=device)

    def __call__(self, model, noisy):
        out = model([noisy[0].unsqueeze(1).to(self.caps[0].dtype)], self.t, self.caps, return_dict=False)[0]
        return out[0].squeeze(1).unsqueeze(0)


class SD3Inputs(DiTInputs):
    """One SD 3 step: 16-channel latents (px / 8), CLIP + T5 states (`text` tokens), pooled (2048)."""

    def __init__(self, px: int, text: int, model, device, dtype):
        g = torch.Generator().manual_seed(0)
        cfg = model.config
        self.latents = torch.randn(1, cfg.in_channels, px // 8, px // 8, generator=g).to(device)
        self.kw = dict(encoder_hidden_states=torch.randn(1, text, cfg.joint_attention_dim, generator=g).to(device, dtype),
                       pooled_projections=torch.randn(1, cfg.pooled_projection_dim, generator=g).to(device, dtype),
                       timestep=torch.tensor([500.0], device=device))


def sd15_unet(size: str):
    """(model, px, inputs(model, device, dtype), adapted modules, note)."""
    from diffusers import UNet2DConditionModel

    if size == "quick":
        unet = UNet2DConditionModel(sample_size=8, block_out_channels=(32, 64), layers_per_block=1,
                                    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32,
                                    attention_head_dim=4, norm_num_groups=8)
        return unet, 64, lambda m, d, t: UNetInputs(64, 32, None, d, t), TARGETS, ""
    unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8,
                                block_out_channels=(320, 640, 1280, 1280), layers_per_block=2)
    return unet, 512, lambda m, d, t: UNetInputs(512, 768, None, d, t), TARGETS, ""


def sdxl_unet():
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel(
        sample_size=128, block_out_channels=(320, 640, 1280), layers_per_block=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
        use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=2816)
    return unet, 1024, lambda m, d, t: UNetInputs(1024, 2048, 1280, d, t), TARGETS, ""


# FLUX.1 dev has 19 double and 38 single blocks; the full-size check builds its real widths with
# FLUX_BLOCKS of them (12B random weights times three variants would not fit beside the activations at
# 1024 px), so its ratios are per block and its absolute bytes a fraction of the whole model's
FLUX_BLOCKS = (2, 4)


def flux_transformer(size: str, checkpointing: bool):
    """FLUX.1's transformer (quick: a small one at 64 px) with diffusers' default FLUX targets; 1024 px
    is 4096 image tokens, with 512 T5 tokens."""
    from diffusers import FluxTransformer2DModel

    from dreambooth_dora.families.flux1 import FLUX_TARGETS

    if size == "quick":
        model = FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=1, num_single_layers=1,
                                       attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                       pooled_projection_dim=32, guidance_embeds=True, axes_dims_rope=[4, 4, 8])
        px, text, note = 64, 16, ""
    else:
        model = FluxTransformer2DModel(num_layers=FLUX_BLOCKS[0], num_single_layers=FLUX_BLOCKS[1], guidance_embeds=True)
        px, text = 1024, 512
        note = f"real widths, {FLUX_BLOCKS[0]} of 19 double + {FLUX_BLOCKS[1]} of 38 single blocks"
    if checkpointing:
        model.enable_gradient_checkpointing()
    note = ", ".join(x for x in (note, "gradient checkpointing" if checkpointing else "") if x)
    return model, px, lambda m, d, t: FluxInputs(px, text, m, d, t), list(FLUX_TARGETS), note


KLEIN_BLOCKS = (2, 4)  # of klein 4B's 5 double + 20 single blocks


def klein_transformer(size: str):
    """FLUX.2 [klein] 4B's transformer (quick: a small one at 64 px) with diffusers' klein targets;
    full: its real widths (24 heads x 128, Qwen3-4B's 7680-wide states) with fewer blocks, 1024 px
    (4096 image tokens) and 512 text tokens."""
    import argparse as _argparse

    from diffusers import Flux2Transformer2DModel

    from dreambooth_dora.families.flux2 import Flux2Klein

    if size == "quick":
        model = Flux2Transformer2DModel(num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
                                        joint_attention_dim=48, timestep_guidance_channels=32,
                                        axes_dims_rope=(4, 4, 4, 4), in_channels=32, guidance_embeds=False)
        px, text, note = 64, 16, ""
    else:
        model = Flux2Transformer2DModel(num_layers=KLEIN_BLOCKS[0], num_single_layers=KLEIN_BLOCKS[1],
                                        num_attention_heads=24, joint_attention_dim=7680, guidance_embeds=False)
        px, text = 1024, 512
        note = f"real widths, {KLEIN_BLOCKS[0]} of 5 double + {KLEIN_BLOCKS[1]} of 20 single blocks"
    targets = Flux2Klein().denoiser_targets(_argparse.Namespace(lora_layers=None), model)
    return model, px, lambda m, d, t: KleinInputs(px, text, m, d, t), targets, note


CHROMA_BLOCKS = (2, 4)  # of Chroma's 19 double + 38 single blocks


def chroma_transformer(size: str):
    """Chroma's transformer (quick: a small one at 64 px) with diffusers' FLUX.1 targets (its
    recipe's); full: its real widths with fewer blocks, 1024 px and 512 T5 tokens."""
    from diffusers import ChromaTransformer2DModel

    from dreambooth_dora.families.flux1 import FLUX_TARGETS

    if size == "quick":
        model = ChromaTransformer2DModel(num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
                                         joint_attention_dim=32, axes_dims_rope=(4, 4, 8), approximator_num_channels=16,
                                         approximator_hidden_dim=32, approximator_layers=1)
        px, text, note = 64, 16, ""
    else:
        model = ChromaTransformer2DModel(num_layers=CHROMA_BLOCKS[0], num_single_layers=CHROMA_BLOCKS[1])
        px, text = 1024, 512
        note = f"real widths, {CHROMA_BLOCKS[0]} of 19 double + {CHROMA_BLOCKS[1]} of 38 single blocks"
    return model, px, lambda m, d, t: ChromaInputs(px, text, m, d, t), list(FLUX_TARGETS), note


Z_IMAGE_LAYERS = 6  # of Z-Image's 30 main blocks (and its 2 + 2 refiner blocks)


def z_image_transformer(size: str):
    """Z-Image's transformer (quick: a small one at 64 px) with diffusers' Z-Image targets; full: its
    real widths (30 heads x 128, Qwen3-4B's 2560-wide states) with fewer main blocks, 1024 px, 512
    text tokens."""
    from diffusers import ZImageTransformer2DModel

    from dreambooth_dora.families.z_image import Z_IMAGE_TARGETS

    if size == "quick":
        model = ZImageTransformer2DModel(all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16, dim=32, n_layers=2,
                                         n_refiner_layers=1, n_heads=2, n_kv_heads=2, cap_feat_dim=16,
                                         axes_dims=[4, 6, 6], axes_lens=[512, 64, 64])
        px, text, note = 64, 16, ""
    else:
        model = ZImageTransformer2DModel(n_layers=Z_IMAGE_LAYERS)
        px, text = 1024, 512
        note = f"real widths, {Z_IMAGE_LAYERS} of 30 main blocks, all 4 refiner blocks"
    return model, px, lambda m, d, t: ZImageInputs(px, text, m, d, t), list(Z_IMAGE_TARGETS), note


def sd35_transformer(size: str):
    """SD 3.5 medium's transformer, whole (24 blocks, hidden 1536, MMDiT-X attention in the first 13;
    quick: a small one at 64 px), diffusers' default SD 3 targets; 1024 px with 77 + 256 text tokens."""
    from diffusers import SD3Transformer2DModel

    from dreambooth_dora.families.sd3 import SD3_TARGETS

    if size == "quick":
        model = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=16, out_channels=16, num_layers=2,
                                      attention_head_dim=8, num_attention_heads=4, joint_attention_dim=64,
                                      caption_projection_dim=32, pooled_projection_dim=64, pos_embed_max_size=96,
                                      dual_attention_layers=(0,), qk_norm="rms_norm")
        px, text = 64, 16
    else:
        model = SD3Transformer2DModel(sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24,
                                      attention_head_dim=64, num_attention_heads=24, joint_attention_dim=4096,
                                      caption_projection_dim=1536, pooled_projection_dim=2048, pos_embed_max_size=384,
                                      dual_attention_layers=tuple(range(13)), qk_norm="rms_norm")
        px, text = 1024, 333
    return model, px, lambda m, d, t: SD3Inputs(px, text, m, d, t), list(SD3_TARGETS), ""


def variants_of(base, rank: int, device, dtype, targets=TARGETS):
    """Our LoRA, our DoRA and PEFT's DoRA on copies of `base` (frozen weights in `dtype`, adapters fp32,
    B drawn small so every term of the math runs), each with its AdamW."""
    from peft import LoraConfig, inject_adapter_in_model

    from dreambooth_dora import adapter_parameters, add_adapters

    out = {}
    for name in ("ours LoRA", "ours DoRA", "PEFT DoRA"):
        unet = copy.deepcopy(base)  # `base` is frozen and already in `dtype`: each copy is its size
        if name == "PEFT DoRA":
            unet = inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=rank, target_modules=targets, use_dora=True),
                                           unet)
        else:
            add_adapters(unet, targets, rank=rank, alpha=rank, use_dora=name == "ours DoRA")
        params = adapter_parameters(unet) if name.startswith("ours") else \
            [p for p in unet.parameters() if p.requires_grad]
        for p in unet.parameters():  # cast on the host, then move: no fp32 copy of the model on the device
            p.data = p.data.float() if p.requires_grad else p.data.to(dtype)
        unet.to(device)
        for p in params:
            if p.dim() == 2 and p.shape[1] == rank:
                torch.nn.init.normal_(p, std=1e-3)
        out[name] = (unet.train(), torch.optim.AdamW(params, lr=1e-4), params)
    return out


def out_of_memory(err: BaseException) -> bool:
    return isinstance(err, torch.cuda.OutOfMemoryError) or (isinstance(err, RuntimeError)
                                                            and "out of memory" in str(err))


def train_step_bench(label: str, factory, device: torch.device, dtype, repeats: int, rank: int = 8) -> dict:
    """One row of the training-step table; every stage inside the out-of-memory guard, so a model
    that does not fit gives a row saying where ("out of memory at ..."), never a lost report."""
    variants: dict = {}
    stage = "building the model (host memory)"
    try:
        base, px, make_inputs, targets, note = factory()
        for p in base.requires_grad_(False).parameters():  # frozen weights in the compute dtype, on the host
            p.data = p.data.to(dtype)
        stage = "building the three variants (cast, then moved to the device)"
        variants.update(variants_of(base, rank, device, dtype, targets))
        stage = "making the inputs"
        inputs = make_inputs(base, device, dtype)
        del base
        row = _train_step_rows(label, variants, device, dtype, repeats, px, inputs)
        return {**row, "note": note} if note else row
    except Exception as err:
        first = str(err).splitlines()[0][:120] if str(err) else ""
        if out_of_memory(err):
            return {"model": label, "skipped": f"out of memory at {stage}: {first}"}
        if stage.startswith("building the model"):  # e.g. a host without the memory for SDXL's weights
            return {"model": label, "skipped": f"{type(err).__name__} at {stage}: {first}"}
        raise
    finally:
        variants.clear()  # the copies go before the next model is built
        if device.type == "cuda":
            torch.cuda.empty_cache()


def _train_step_rows(label, variants, device, dtype, repeats, px, inputs) -> dict:
    """The timed and measured steps of the three variants (out of memory: a row saying where).
    `inputs(model, noisy)`: the denoiser's prediction; `inputs.latents` the clean latents."""
    from timing import saved_for_backward, timed

    lat = inputs.latents
    amp = device.type == "cuda" and dtype != torch.float32

    def step(name):
        unet, opt, params = variants[name]
        noise = torch.randn_like(lat)
        with torch.autocast(device.type, dtype=dtype, enabled=amp):
            pred = inputs(unet, lat + noise)
        loss = torch.nn.functional.mse_loss(pred.float(), noise)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    def saved(name) -> int:  # bytes autograd keeps for backward in one forward, parameters excluded
        unet = variants[name][0]

        def forward():
            with torch.autocast(device.type, dtype=dtype, enabled=amp):
                return inputs(unet, lat)

        return saved_for_backward(forward, unet.parameters())

    stage = "the warm-up steps"
    try:
        times, peak = {n: [] for n in variants}, {}
        for name in variants:  # warm-up: optimiser states exist before memory is measured
            step(name)
        stage = "the peak-memory steps"
        for name in variants:
            if device.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                before = torch.cuda.memory_allocated()
                step(name)
                torch.cuda.synchronize()
                peak[name] = torch.cuda.max_memory_allocated() - before
        stage = "the timed steps"
        for _ in range(repeats):
            for name in variants:
                times[name].append(timed(lambda name=name: step(name), device))
        med = {n: statistics.median(v) for n, v in times.items()}
        stage = "measuring the bytes saved for backward"
        kept = {n: saved(n) for n in variants}
    except Exception as err:
        if not out_of_memory(err):
            raise
        return {"model": label, "skipped": f"out of memory at {stage}: {str(err).splitlines()[0][:120]}"}
    row = {"model": label, "px": px, "dtype": str(dtype).replace("torch.", ""),
           "seconds": med, "dora_over_lora": med["ours DoRA"] / med["ours LoRA"],
           "peft_over_ours_dora": med["PEFT DoRA"] / med["ours DoRA"],
           "saved_bytes": kept, "saved_dora_over_lora": kept["ours DoRA"] / kept["ours LoRA"],
           "saved_peft_over_ours_dora": kept["PEFT DoRA"] / kept["ours DoRA"]}
    if peak:
        row.update(peak_bytes=peak, peak_dora_over_lora=peak["ours DoRA"] / peak["ours LoRA"],
                   peak_peft_over_ours_dora=peak["PEFT DoRA"] / peak["ours DoRA"])
    return row


def layer_rows(device: torch.device, size: str, repeats: int) -> list[dict]:
    from bench_layers import DIT_SHAPES, SHAPES, bench

    # full size: SD 1.5's attention and the DiT families' projections (FLUX.1 at 512 px: 1024 + 512 tokens)
    shapes = SHAPES[-2:] if size == "quick" else SHAPES + [(i, o, 1536, w) for i, o, _, w in DIT_SHAPES]
    rows = []
    for width, out, tokens, where in shapes:
        try:
            med, mem = bench(width, tokens, 8, repeats, str(device), out_features=out)
        except Exception as err:
            if not out_of_memory(err):
                raise
            rows.append({"shape": f"{width} x {out} x {tokens}", "where": where, "skipped": "out of memory at this layer"})
            if device.type == "cuda":
                torch.cuda.empty_cache()
            continue
        rows.append({"shape": f"{width} x {out} x {tokens}", "where": where, "lora_ms": med["ours LoRA"] * 1e3,
                     "dora_over_lora": med["ours DoRA"] / med["ours LoRA"],
                     "peft_over_ours_dora": med["PEFT DoRA"] / med["ours DoRA"],
                     "extra_saved_mb_dora": (mem["ours DoRA"] - mem["ours LoRA"]) / 2**20,
                     "extra_saved_mb_peft": (mem["PEFT DoRA"] - mem["ours LoRA"]) / 2**20})
    return rows


# ---- 3. the report ---------------------------------------------------------------------------

NO_GPU = "no GPU figure was produced: no CUDA device here (the CPU variants ran; CUDA ones are skipped)"


def markdown(report: dict) -> str:
    t = report["tests"]["summary"]
    lines = [f"# GPU check: {report['device']}", "",
             f"torch {report['torch']}, {report['when']}, size {report['size']}, {report['seconds']:.0f} s in all", ""]
    if report["cuda"] == "skipped":
        lines += [f"**{NO_GPU[0].upper() + NO_GPU[1:]}.** Nothing below is a GPU result.", ""]
    lines += ["## Correctness (`pytest -m cuda`, TF32 off: fp32 is checked in true fp32)", "",
              "| variants | passed | failed | skipped |", "|---|---|---|---|",
              f"| CPU | {t['cpu']['passed']} | {t['cpu']['failed']} | {t['cpu']['skipped']} |",
              f"| CUDA | {t['cuda']['passed']} | {t['cuda']['failed']} | {t['cuda']['skipped']} |", "",
              "| device | precision | passed | failed | skipped |", "|---|---|---|---|---|"]
    cases = report["tests"]["cases"]
    for on in ("cpu", "cuda"):
        for prec in ("fp32", "fp16", "bf16"):
            mine = [c for c in cases if c["on"] == on and c.get("precision") == prec]
            if mine:
                lines.append(f"| {on.upper()} | {prec} | " + " | ".join(str(sum(c["outcome"] == k for c in mine))
                                                                   for k in ("passed", "failed", "skipped")) + " |")
    lines.append("")
    skipped = sorted({c["reason"] for c in report["tests"]["cases"] if c["outcome"] == "skipped"})
    if skipped:
        lines += ["Skipped (reported, not passed): " + "; ".join(skipped), ""]
    failed = [c["test"] for c in report["tests"]["cases"] if c["outcome"] == "failed"]
    if failed:
        lines += ["FAILED: " + ", ".join(failed), ""]
    lines += ["## Training step (interleaved medians)", "",
              "| model | px | dtype | LoRA s/step | DoRA/LoRA | PEFT DoRA/ours DoRA | peak mem DoRA/LoRA | "
              "PEFT/ours peak | saved-for-backward DoRA/LoRA | PEFT/ours saved |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in report["train_step"]:
        if "skipped" in r:
            lines.append(f"| {r['model']} | | | skipped: {r['skipped']} | | | | | | |")
            continue
        peak = (f"{r['peak_dora_over_lora']:.3f} ({r['peak_bytes']['ours DoRA'] / 2**30:.2f} vs "
                f"{r['peak_bytes']['ours LoRA'] / 2**30:.2f} GiB) | {r['peak_peft_over_ours_dora']:.3f}"
                if "peak_bytes" in r else "n/a (no CUDA) | n/a")
        model = f"{r['model']} ({r['note']})" if r.get("note") else r["model"]
        lines.append(f"| {model} | {r['px']} | {r['dtype']} | {r['seconds']['ours LoRA']:.3f} | "
                     f"{r['dora_over_lora']:.3f} | {r['peft_over_ours_dora']:.3f} | {peak} | "
                     f"{r['saved_dora_over_lora']:.3f} | {r['saved_peft_over_ours_dora']:.3f} |")
    lines += ["", "## One adapted layer, rank 8 (interleaved medians)", "",
              "| shape | where | LoRA ms | DoRA/LoRA | PEFT DoRA/ours DoRA | extra saved MB: DoRA | PEFT DoRA |",
              "|---|---|---|---|---|---|---|"]
    for r in report["layers"]:
        if "skipped" in r:
            lines.append(f"| {r['shape']} | {r['where']} | skipped: {r['skipped']} | | | | |")
            continue
        lines.append(f"| {r['shape']} | {r['where']} | {r['lora_ms']:.2f} | {r['dora_over_lora']:.3f} | "
                     f"{r['peft_over_ours_dora']:.2f} | {r['extra_saved_mb_dora']:.2f} | {r['extra_saved_mb_peft']:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="a new folder for the report (default: gpu_check-<time> here)")
    parser.add_argument("--size", choices=["quick", "full"], default="full" if torch.cuda.is_available() else "quick")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds per variant (after a warm-up)")
    parser.add_argument("--no-timing", action="store_true", help="the correctness tests only")
    parser.add_argument("--tests", default="tests/", help="where the cuda-marked tests are (default: tests/)")
    args = parser.parse_args(argv)
    out = Path(args.out or time.strftime("gpu_check-%Y%m%d-%H%M%S"))
    if out.exists() and any(out.iterdir()):
        print(f"error: {out} exists and is not empty; give a new folder", file=sys.stderr)
        return 2
    if args.repeats < 1:
        print("error: --repeats must be >= 1", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    name = torch.cuda.get_device_name(0) if cuda else f"CPU only ({torch.get_num_threads()} threads): CUDA parts skipped"
    print(f"device: {name}; report in {out}", flush=True)
    tests = run_tests(out, args.tests)
    print(f"tests: {tests['summary']}", flush=True)
    train_rows, layers = [], []
    if not args.no_timing:
        dtype = torch.bfloat16 if cuda else torch.float32
        train_rows.append(train_step_bench("SD 1.5" if args.size == "full" else "small (quick)",
                                           lambda: sd15_unet(args.size), device, dtype, args.repeats))
        big = [("SDXL", sdxl_unet), ("FLUX.1", lambda: flux_transformer(args.size, False)),
               ("FLUX.1", lambda: flux_transformer(args.size, True)), ("SD 3.5 medium", lambda: sd35_transformer(args.size)),
               ("FLUX.2 [klein] 4B", lambda: klein_transformer(args.size)),
               ("Chroma", lambda: chroma_transformer(args.size)), ("Z-Image", lambda: z_image_transformer(args.size))]
        for label, factory in big:
            if args.size == "full" and not cuda:
                train_rows.append({"model": label, "skipped": "needs CUDA (1024 px on CPU takes too long)"})
            elif args.size == "full" or label != "SDXL":  # quick: small DiTs at 64 px (the code path, no figures)
                quick = "" if args.size == "full" else " (quick)"
                train_rows.append(train_step_bench(label + quick, factory, device, dtype, args.repeats,
                                                   rank=8 if label == "SDXL" else 16))
        layers = layer_rows(device, args.size, args.repeats)
    report = {"device": name, "cuda": True if cuda else "skipped", "torch": torch.__version__, "size": args.size,
              "when": time.strftime("%Y-%m-%d %H:%M"), "seconds": time.perf_counter() - t0,
              "tests": tests, "train_step": train_rows, "layers": layers,
              "ok": tests["ok"] if cuda else None,  # no GPU: nothing here may read as a passed GPU check
              "cpu_variants_ok": tests["ok"], "tf32": "off in every test"}
    if not cuda:
        report["gpu_figures"] = NO_GPU
    (out / "gpu_check.json").write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    (out / "gpu_check.md").write_text(markdown(report), encoding="utf-8")
    print(markdown(report))
    print(f"wrote {out / 'gpu_check.json'} and {out / 'gpu_check.md'}")
    if not cuda:
        print(f"NOTE: {NO_GPU}")
    return 0 if tests["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())

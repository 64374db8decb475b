"""Stable Diffusion 3 / 3.5: the family's prompts equal the pipeline's, flow matching with
preconditioned outputs as diffusers' SD 3 script defines it, DoRA on the transformer and both
CLIPs, files stock `StableDiffusion3Pipeline.load_lora_weights` and `load_adapter` load exactly;
on a tiny SD 3 pipeline built from configs (tokenizers built locally)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dreambooth_dora.families import StableDiffusion3, family_of
from conftest import train_now
from dreambooth_dora.outputs import ADAPTER_FILE

REPO = Path(__file__).resolve().parents[1]
SD3 = StableDiffusion3()


def _pipe(path):
    from diffusers import StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline.from_pretrained(str(path))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _train(model, out, *extra):
    return train_now(["--pretrained_model_name_or_path", model, "--instance_data_dir", REPO / "sample_data/3d_icon",
                      "--instance_prompt", "a sks icon, 3d render", "--resolution", "64", "--learning_rate", "1e-2",
                      "--max_train_steps", "3", "--rank", "4", "--lora_alpha", "8", "--output_dir", out,
                      "--report_to", "none", "--seed", "3", "--center_crop", *extra])


@torch.no_grad()
def test_sd3_prompts_equal_the_pipelines_own(tiny_sd3_path):
    pipe = _pipe(tiny_sd3_path)
    assert family_of(str(tiny_sd3_path)).name == "sd3"
    tokenizers = [pipe.tokenizer, pipe.tokenizer_2, pipe.tokenizer_3]
    encoders = [pipe.text_encoder, pipe.text_encoder_2, pipe.text_encoder_3]
    for prompt in ("a sks icon", "a red ball on a white background"):
        ours, pooled = SD3.encode_prompts(tokenizers, encoders, [prompt], max_sequence_length=77)
        stock, _, stock_pooled, _ = pipe.encode_prompt(prompt, prompt, prompt, do_classifier_free_guidance=False,
                                                       max_sequence_length=77)
        assert torch.equal(ours, stock) and torch.equal(pooled, stock_pooled)
    fixed = SD3.encode_fixed(tokenizers, encoders, ["a sks icon"], max_sequence_length=77)  # T5 once, then reused
    again, _ = SD3.encode_prompts(tokenizers, encoders[:2], ["a sks icon"], max_sequence_length=77, fixed=fixed)
    assert torch.equal(again, SD3.encode_prompts(tokenizers, encoders, ["a sks icon"], max_sequence_length=77)[0])


@torch.no_grad()
def test_preconditioned_and_plain_flow_targets(tiny_sd3_path):
    from dreambooth_dora.training.data import Batch

    pipe = _pipe(tiny_sd3_path)
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(2, 16, 8, 8, generator=g), torch.randn(2, 16, 8, 8, generator=g)
    t = torch.tensor([250.0, 800.0])
    cond, pooled = torch.randn(2, 20, 64, generator=g), torch.randn(2, 64, generator=g)
    batch = Batch(x0, noise, t, ["a", "b"], None, torch.zeros(2, 6), 0)
    s = (t / 1000).reshape(-1, 1, 1, 1)
    noisy = (1 - s) * x0 + s * noise  # by hand
    out = pipe.transformer(hidden_states=noisy, timestep=t, encoder_hidden_states=cond, pooled_projections=pooled,
                           return_dict=False)[0]
    pred, target, weights = SD3.loss_inputs(pipe.transformer, pipe.scheduler, batch, cond, pooled, "logit_normal", True)
    assert torch.allclose(pred, out * (-s) + noisy, atol=1e-6) and torch.equal(target, x0)
    assert torch.equal(weights, torch.ones(2))
    pred, target, _ = SD3.loss_inputs(pipe.transformer, pipe.scheduler, batch, cond, pooled, "logit_normal", False)
    assert torch.allclose(pred, out, atol=1e-6) and torch.equal(target, noise - x0)


@pytest.mark.parametrize("method", ["dora", "lora"])
def test_sd3_training_loads_exactly_stock_and_ours(tiny_sd3_path, tmp_path, method):
    """DoRA / LoRA on the transformer and both CLIPs (T5 never trains), cached latents, a
    validation grid; stock loading exact for the transformer (and CLIP LoRA), `load_adapter` for all."""
    from dreambooth_dora import load_adapter
    from dreambooth_dora.adapters.file import apply_to_models, read_adapter
    from dreambooth_dora.families import pipeline_models

    out = tmp_path / method
    _train(tiny_sd3_path, out, "--train_text_encoder", "--use_dora", str(method == "dora"), "--cache_latents",
           "--validation_prompt", "a sks icon", "--validation_steps", "3", "--num_validation_images", "1",
           "--validation_inference_steps", "2")
    tensors = load_file(str(out / ADAPTER_FILE))
    assert {k.split(".", 1)[0] for k in tensors} == {"transformer", "text_encoder", "text_encoder_2"}
    assert (out / "validation" / "step-000003.png").is_file() and "StableDiffusion3Pipeline" in (out / "README.md").read_text()

    @torch.no_grad()
    def outputs(pipe):
        g = torch.Generator().manual_seed(0)
        x, cond, pooled = torch.randn(1, 16, 8, 8, generator=g), torch.randn(1, 20, 64, generator=g), torch.randn(1, 64, generator=g)
        ids = pipe.tokenizer(["a sks icon"], padding="max_length", max_length=77, return_tensors="pt").input_ids
        return (pipe.transformer(hidden_states=x, timestep=torch.tensor([500.0]), encoder_hidden_states=cond,
                                 pooled_projections=pooled, return_dict=False)[0],
                pipe.text_encoder(ids)[0], pipe.text_encoder_2(ids)[0])

    ref = _pipe(tiny_sd3_path)
    apply_to_models(read_adapter(out), pipeline_models(ref))
    ref, base = outputs(ref), outputs(_pipe(tiny_sd3_path))
    assert all((r - b).abs().max() > 1e-4 for r, b in zip(ref, base))  # every part trained
    ours = _pipe(tiny_sd3_path)
    report = load_adapter(ours, out)
    assert all((o - r).abs().max() <= 1e-5 for o, r in zip(outputs(ours), ref))
    assert bool(report["restored"]) == (method == "dora")
    stock = _pipe(tiny_sd3_path)
    stock.load_lora_weights(str(out))
    got = outputs(stock)
    assert (got[0] - ref[0]).abs().max() <= 1e-5  # the transformer: stock is exact
    if method == "lora":
        assert all((o - r).abs().max() <= 1e-5 for o, r in zip(got, ref))


def test_sd3_refuses_flux_settings_and_flux_refuses_sd3_settings(tiny_sd3_path, tiny_flux_path, tmp_path, capsys,
                                                                monkeypatch):
    from dreambooth_dora.cli import train_main

    monkeypatch.chdir(REPO)
    for model, flags, words in [(tiny_sd3_path, ["--guidance_scale", "3.5"], "FLUX.1 dev's distilled guidance"),
                                (tiny_sd3_path, ["--snr_gamma", "5"], "snr_gamma is a DDPM setting"),
                                (tiny_flux_path, ["--precondition_outputs"], "precondition_outputs is an SD 3 setting")]:
        assert train_main(["--pretrained_model_name_or_path", str(model), "--instance_data_dir", "sample_data/3d_icon",
                           "--instance_prompt", "a sks icon", "--output_dir", str(tmp_path / "out"), "--resolution",
                           "64", *flags]) == 2
        lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
        assert len(lines) == 1 and words in lines[0], lines


@pytest.mark.parametrize("recipe", sorted(p.name for p in (REPO / "train_configs").glob("sd35_*_dora.yaml")))
def test_sd35_recipes_run_on_a_local_tiny_model_in_bf16(tiny_sd3_path, tmp_path, monkeypatch, recipe):
    """The shipped SD 3.5 recipes (their LoRA twins differ only in use_dora, tests/test_repo.py)
    pointed at a local folder in the hub layout: bf16, gradient checkpointing, cached latents."""
    from dreambooth_dora.training.config import load_config

    monkeypatch.chdir(REPO)
    argv = ["--config", f"train_configs/{recipe}", "--pretrained_model_name_or_path", str(tiny_sd3_path),
            "--resolution", "64", "--max_train_steps", "2", "--gradient_accumulation_steps", "1",
            "--validation_steps", "2", "--num_validation_images", "1", "--validation_inference_steps", "2",
            "--output_dir", str(tmp_path / "out"), "--report_to", "none"]
    cfg = load_config(argv)
    assert cfg.mixed_precision == "bf16" and cfg.cache_latents and cfg.gradient_checkpointing
    path = train_now(argv)
    tensors = load_file(str(path))
    assert {k.split(".", 1)[0] for k in tensors} == {"transformer"}
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in tensors.values())
    assert (tmp_path / "out" / "validation" / "step-000002.png").is_file()


def test_sd3_fused_export_and_the_app(tiny_sd3_path, tmp_path):
    """`export --format fused` of an SD 3 adapter is our layers merged (1e-5); the app compares an SD 3
    base and its adapter from the same latents with the family's sampler."""
    import numpy as np

    from app.core import Comparison
    from dreambooth_dora.adapters.file import apply_to_models, read_adapter
    from dreambooth_dora.cli import main
    from dreambooth_dora.families import pipeline_models

    out = tmp_path / "runs" / "dora"
    _train(tiny_sd3_path, out, "--max_train_steps", "2")
    assert main(["export", str(out), "--format", "fused", "--out", str(tmp_path / "fused")]) == 0
    ref = _pipe(tiny_sd3_path)
    apply_to_models(read_adapter(out), pipeline_models(ref))
    g = torch.Generator().manual_seed(0)
    x, cond, pooled = torch.randn(1, 16, 8, 8, generator=g), torch.randn(1, 20, 64, generator=g), torch.randn(1, 64, generator=g)

    def run(pipe):
        with torch.no_grad():
            return pipe.transformer(hidden_states=x, timestep=torch.tensor([500.0]), encoder_hidden_states=cond,
                                    pooled_projections=pooled, return_dict=False)[0]

    assert (run(_pipe(tmp_path / "fused")) - run(ref)).abs().max() <= 1e-5
    comp = Comparison(str(tiny_sd3_path), adapters_root=tmp_path / "runs", device="cpu")
    comp.load("dora", out)
    assert list(comp.schedulers) == ["Euler (flow matching)"]
    first = comp.generate("a sks icon", seed=5, steps=2, width=32, height=32)
    again = comp.generate("a sks icon", seed=5, steps=2, width=32, height=32)
    base, dora = (np.asarray(first[c][0][0], np.int16) for c in ("base", "dora"))
    assert np.array_equal(base, np.asarray(again["base"][0][0], np.int16)) and np.abs(base - dora).max() > 0


def test_evaluate_takes_an_sd3_base(tiny_sd3_path, tmp_path):
    """`evaluate` on an SD 3 base: the family's sampler and guidance, the same latents for every model,
    the weight analysis over the transformer's blocks."""
    from conftest import evaluate_small

    _train(tiny_sd3_path, tmp_path / "dora", "--max_train_steps", "2")
    out, result = evaluate_small(tiny_sd3_path, str(tmp_path / "dora"), tmp_path / "report", guidance="7.0")
    m = result["metrics"]
    assert list(m) == ["base", "DoRA r4"] and m["DoRA r4"]["class MSE"]["mean"] > 0
    assert (out / "report.md").is_file() and (out / "weight_analysis.png").is_file()

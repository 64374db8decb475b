"""Z-Image: its own family, prompts as `ZImagePipeline.encode_prompt` gives them (one tensor per
prompt, of its own length), flow matching through the transformer as diffusers' Z-Image script
defines it (reversed time, negated output), files stock `load_lora_weights` loads exactly, resume =
uninterrupted, the app and the family's refusals; on a tiny Z-Image pipeline built from configs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import train_now
from dreambooth_dora.families import ZImage, family_of
from dreambooth_dora.outputs import ADAPTER_FILE

REPO = Path(__file__).resolve().parents[1]
ZI = ZImage()


def _args(model, out, *extra) -> list[str]:
    return ["--pretrained_model_name_or_path", str(model), "--instance_data_dir", str(REPO / "sample_data/3d_icon"),
            "--instance_prompt", "a sks icon, 3d render", "--resolution", "32", "--learning_rate", "1e-2",
            "--max_train_steps", "4", "--rank", "4", "--lora_alpha", "8", "--output_dir", str(out),
            "--report_to", "none", "--seed", "3", "--max_sequence_length", "48", "--checkpointing_steps", "2",
            *map(str, extra)]


@pytest.fixture(scope="module")
def z_runs(tiny_z_image_path, tmp_path_factory):
    """DoRA (cached latents, logit-normal noise levels, a checkpoint at 2, a validation grid) and its
    LoRA twin, 4 steps each."""
    root = tmp_path_factory.mktemp("z-image")
    common = ["--cache_latents", "--weighting_scheme", "logit_normal"]
    train_now(_args(tiny_z_image_path, root / "dora", *common, "--validation_prompt", "a sks icon",
                    "--validation_steps", "4", "--num_validation_images", "1", "--validation_inference_steps", "2"))
    train_now(_args(tiny_z_image_path, root / "lora", *common, "--use_dora", "false"))
    return {"dora": root / "dora", "lora": root / "lora"}


def _pipe(path):
    from diffusers import ZImagePipeline

    pipe = ZImagePipeline.from_pretrained(str(path))
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def _transformer_out(pipe):
    """The transformer on fixed latents (one (C, 1, h, w) each) and prompts of two lengths."""
    g = torch.Generator().manual_seed(0)
    x = [torch.randn(16, 1, 4, 4, generator=g) for _ in range(2)]
    caps = [torch.randn(7, 16, generator=g), torch.randn(12, 16, generator=g)]
    return torch.stack(pipe.transformer(x, torch.tensor([0.3, 0.9]), caps, return_dict=False)[0])


def test_z_image_is_its_own_family_and_encodes_prompts_as_its_pipeline(tiny_z_image_path):
    assert isinstance(family_of(str(tiny_z_image_path)), ZImage)
    pipe = _pipe(tiny_z_image_path)
    prompts = ["a sks icon, 3d render", "a red cube on a white background in a studio"]
    with torch.no_grad():
        embeds, mask = ZI.encode_prompts([pipe.tokenizer], [pipe.text_encoder], prompts, max_sequence_length=48)
        stock, _ = pipe.encode_prompt(list(prompts), do_classifier_free_guidance=False, max_sequence_length=48)
    ours = ZI.unpad(embeds, mask)
    assert [e.shape[0] for e in ours] == [e.shape[0] for e in stock] and ours[0].shape[0] != ours[1].shape[0]
    assert all(torch.equal(a, b) for a, b in zip(ours, stock))  # bit for bit
    assert float(embeds[0, ours[0].shape[0]:].abs().sum()) == 0.0  # padding is zeros, masked out


def test_loss_inputs_are_the_straight_path_through_the_reversed_time_transformer(tiny_z_image_path):
    from dreambooth_dora.training.data import Batch

    pipe = _pipe(tiny_z_image_path)
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(2, 16, 4, 4, generator=g), torch.randn(2, 16, 4, 4, generator=g)
    t = torch.tensor([250.0, 800.0])
    caps = [torch.randn(7, 16, generator=g), torch.randn(12, 16, generator=g)]
    cond, mask = torch.zeros(2, 12, 16), torch.zeros(2, 12)
    for i, c in enumerate(caps):
        cond[i, :len(c)], mask[i, :len(c)] = c, 1
    batch = Batch(x0, noise, t, ["a", "b"], None, torch.zeros(2, 6), 0)
    with torch.no_grad():
        pred, target, weights = ZI.loss_inputs(pipe.transformer, pipe.scheduler, batch, cond, mask, "sigma_sqrt")
        s = (t / 1000).reshape(-1, 1, 1, 1)
        noisy = (1 - s) * x0 + s * noise
        out = pipe.transformer([noisy[i][:, None] for i in range(2)], (1000 - t) / 1000, caps, return_dict=False)[0]
    assert torch.allclose(pred, -torch.stack([o[:, 0] for o in out]), atol=1e-6)
    assert torch.equal(target, noise - x0) and torch.allclose(weights, (t / 1000) ** -2.0)


def test_z_image_training_writes_the_diffusers_layout(z_runs):
    from safetensors import safe_open

    tensors = load_file(str(z_runs["dora"] / ADAPTER_FILE))
    modules = {k.rsplit(".lora_", 1)[0] for k in tensors}
    assert {m.rsplit(".", 1)[-1] for m in modules} == {"to_q", "to_k", "to_v", "0"}
    assert any(m.startswith("transformer.context_refiner.") for m in modules)
    with safe_open(str(z_runs["dora"] / ADAPTER_FILE), "pt") as f:
        assert '"architecture": "z_image"' in f.metadata()["dreambooth_dora"]
    assert (z_runs["dora"] / "validation" / "step-000004.png").is_file()
    assert "ZImagePipeline" in (z_runs["dora"] / "README.md").read_text()


@pytest.mark.parametrize("method", ["dora", "lora"])
def test_stock_z_image_loader_and_ours_are_exact(tiny_z_image_path, z_runs, method):
    from dreambooth_dora import load_adapter
    from dreambooth_dora.adapters.file import apply_to_models, read_adapter
    from dreambooth_dora.families import pipeline_models

    ref_pipe = _pipe(tiny_z_image_path)
    apply_to_models(read_adapter(z_runs[method]), pipeline_models(ref_pipe))
    ref, base = _transformer_out(ref_pipe), _transformer_out(_pipe(tiny_z_image_path))
    assert (ref - base).abs().max() > 1e-3
    stock = _pipe(tiny_z_image_path)
    stock.load_lora_weights(str(z_runs[method]))
    assert (_transformer_out(stock) - ref).abs().max() <= 1e-5
    ours = _pipe(tiny_z_image_path)
    load_adapter(ours, z_runs[method])
    assert (_transformer_out(ours) - ref).abs().max() <= 1e-5
    ours.disable_lora()
    assert (_transformer_out(ours) - base).abs().max() <= 1e-6


def test_z_image_resume_equals_uninterrupted_and_refusals(tiny_z_image_path, z_runs, tmp_path, monkeypatch, capsys):
    import dreambooth_dora.training.loop as train_module
    from conftest import interrupt_at
    from dreambooth_dora.cli import train_main

    out = tmp_path / "dora"
    common = ["--cache_latents", "--weighting_scheme", "logit_normal", "--validation_prompt", "a sks icon",
              "--validation_steps", "4", "--num_validation_images", "1", "--validation_inference_steps", "2"]
    interrupt_at(monkeypatch, train_module, 3)
    with pytest.raises(KeyboardInterrupt):
        train_now(_args(tiny_z_image_path, out, *common))
    monkeypatch.undo()
    train_now(_args(tiny_z_image_path, out, *common, "--resume_from_checkpoint", "latest"))
    a, b = load_file(str(z_runs["dora"] / ADAPTER_FILE)), load_file(str(out / ADAPTER_FILE))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    capsys.readouterr()
    for flags, words in [(["--train_text_encoder"], "Qwen3 language model, frozen"),
                         (["--guidance_scale", "3.5"], "guidance_scale is FLUX.1 dev's"),
                         (["--resolution", "40"], "multiple of 16")]:
        bad = tmp_path / "bad"
        assert train_main(["--pretrained_model_name_or_path", str(tiny_z_image_path), "--instance_data_dir",
                           str(REPO / "sample_data/3d_icon"), "--instance_prompt", "a sks icon", "--output_dir",
                           str(bad), *flags]) == 2
        lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
        assert len(lines) == 1 and words in lines[0] and not bad.exists(), (flags, lines)


@torch.no_grad()
def test_the_app_draws_z_image_columns_as_its_pipeline(tiny_z_image_path, z_runs):
    import numpy as np

    from app.core import Comparison
    from dreambooth_dora.evaluation.drawing import draw, seeded_latents

    pipe = _pipe(tiny_z_image_path)
    kw = dict(num_inference_steps=2, guidance_scale=5.0, width=32, height=32, max_sequence_length=48)
    stock = pipe(prompt="a sks icon", generator=torch.Generator().manual_seed(7), output_type="np", **kw).images
    latents, gens = seeded_latents(pipe, [7], 1, 32, 32)
    assert np.array_equal(np.asarray(draw(pipe, None, "a sks icon", latents, gens[0], output_type="np", **kw)), stock)
    comp = Comparison(str(tiny_z_image_path), adapters_root=z_runs["dora"].parent, device="cpu")
    comp.load("dora", z_runs["dora"])
    first = comp.generate("a sks icon", seed=7, steps=2, width=32, height=32, guidance=5.0)
    base, dora = (np.asarray(first[c][0][0], np.int16) for c in ("base", "dora"))
    assert np.abs(base - dora).max() > 0


@pytest.mark.parametrize("recipe", sorted(p.name for p in (REPO / "train_configs").glob("z_image_*_dora.yaml")))
def test_z_image_recipes_run_on_a_local_tiny_model_in_bf16(tiny_z_image_path, tmp_path, monkeypatch, recipe):
    from dreambooth_dora.training.config import load_config

    monkeypatch.chdir(REPO)
    argv = ["--config", f"train_configs/{recipe}", "--pretrained_model_name_or_path", str(tiny_z_image_path),
            "--resolution", "32", "--max_train_steps", "2", "--gradient_accumulation_steps", "1",
            "--max_sequence_length", "48", "--validation_steps", "2", "--num_validation_images", "1",
            "--validation_inference_steps", "2", "--output_dir", str(tmp_path / "out"), "--report_to", "none"]
    cfg = load_config(argv)
    assert cfg.mixed_precision == "bf16" and cfg.cache_latents and cfg.gradient_checkpointing
    tensors = load_file(str(train_now(argv)))
    assert {k.split(".", 1)[0] for k in tensors} == {"transformer"}
    assert any(k.endswith("lora_magnitude_vector") for k in tensors)
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in tensors.values())
    assert (tmp_path / "out" / "validation" / "step-000002.png").is_file()


def test_z_image_fused_export_is_exact_and_web_ui_files_are_refused_in_one_line(tiny_z_image_path, z_runs, tmp_path,
                                                                                capsys):
    from dreambooth_dora.adapters.file import apply_to_models, read_adapter
    from dreambooth_dora.cli import main
    from dreambooth_dora.families import pipeline_models

    assert main(["export", str(z_runs["dora"]), "--format", "fused", "--out", str(tmp_path / "fused")]) == 0
    ref = _pipe(tiny_z_image_path)
    apply_to_models(read_adapter(z_runs["dora"]), pipeline_models(ref))
    assert (_transformer_out(_pipe(tmp_path / "fused")) - _transformer_out(ref)).abs().max() <= 1e-5
    capsys.readouterr()
    assert main(["export", str(z_runs["dora"]), "--format", "kohya", "--out", str(tmp_path / "k.safetensors")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Z-Image" in err and "--format fused" in err

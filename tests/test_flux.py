"""FLUX.1: flow matching as diffusers' FLUX script defines it, DoRA/LoRA on the transformer,
files stock `FluxPipeline.load_lora_weights` loads exactly, resume = uninterrupted, the family's
refusals; all on a tiny FLUX.1-dev pipeline built from configs (tokenizers built locally)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dreambooth_dora.families import Flux1, family_of
from dreambooth_dora.families.flow import density_sample, loss_weighting
from conftest import train_now
from dreambooth_dora.outputs import ADAPTER_FILE

REPO = Path(__file__).resolve().parents[1]
FLUX = Flux1()


def _args(model, out, *extra) -> list[str]:
    return ["--pretrained_model_name_or_path", str(model), "--instance_data_dir",
            str(REPO / "sample_data/3d_icon"), "--instance_prompt", "a sks icon, 3d render",
            "--resolution", "64", "--learning_rate", "1e-2", "--max_train_steps", "4", "--rank", "4",
            "--lora_alpha", "8", "--output_dir", str(out), "--report_to", "none", "--seed", "3",
            "--max_sequence_length", "32", "--center_crop", *map(str, extra)]


def _train(model, out, *extra):
    return train_now(_args(model, out, *extra))


@pytest.fixture(scope="module")
def flux_runs(tiny_flux_path, tmp_path_factory):
    """DoRA (cached latents, logit-normal noise levels, a checkpoint at 2, a validation grid) and
    its LoRA twin, 4 steps each."""
    root = tmp_path_factory.mktemp("flux")
    common = ["--cache_latents", "--weighting_scheme", "logit_normal", "--checkpointing_steps", "2"]
    _train(tiny_flux_path, root / "dora", *common, "--validation_prompt", "a sks icon", "--validation_steps", "4",
           "--num_validation_images", "1", "--validation_inference_steps", "2")
    _train(tiny_flux_path, root / "lora", *common, "--use_dora", "false")
    return {"dora": root / "dora", "lora": root / "lora"}


def _pipe(path):
    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(str(path))
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def _transformer_out(pipe):
    """The transformer on fixed packed latents, text and ids (fp32)."""
    g = torch.Generator().manual_seed(0)
    x, text, pooled = torch.randn(2, 16, 64, generator=g), torch.randn(2, 8, 32, generator=g), torch.randn(2, 32, generator=g)
    return pipe.transformer(hidden_states=x, timestep=torch.tensor([0.3, 0.9]), guidance=torch.tensor([3.5, 3.5]),
                            pooled_projections=pooled, encoder_hidden_states=text, txt_ids=torch.zeros(8, 3),
                            img_ids=pipe._prepare_latent_image_ids(2, 4, 4, "cpu", torch.float32),
                            return_dict=False)[0]


def test_flux_is_its_own_family(tiny_flux_path):
    assert family_of(str(tiny_flux_path)).name == "flux1"
    pipe = _pipe(tiny_flux_path)
    assert list(FLUX.models(pipe)) == ["transformer", "text_encoder"]  # T5 is never adapted
    assert FLUX.native_size(pipe) == pipe.vae.config.sample_size == 64  # the VAE's size, not FluxPipeline's fixed 1024
    pipe.vae.register_to_config(sample_size=[64, 64])  # a size that is not one number: the pipeline's default
    assert FLUX.native_size(pipe) == pipe.default_sample_size * pipe.vae_scale_factor
    assert FLUX.draw_settings(pipe) == {"max_sequence_length": 32}  # T5 as trained (its tokenizer's), not 512


def test_flow_matching_draws_and_weights_as_diffusers_defines_them():
    from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3

    for scheme in ("logit_normal", "mode", "none", "sigma_sqrt", "cosmap"):
        torch.manual_seed(5)  # diffusers draws from the global generator, we from the example's own
        theirs = compute_density_for_timestep_sampling(scheme, 6, logit_mean=0.2, logit_std=0.7, mode_scale=1.29)
        ours = density_sample(scheme, 6, torch.Generator().manual_seed(5), 0.2, 0.7, 1.29)
        assert torch.allclose(ours, theirs), scheme
        sigmas = torch.rand(6, generator=torch.Generator().manual_seed(1)) * 0.9 + 0.05
        assert torch.allclose(loss_weighting(scheme, sigmas), compute_loss_weighting_for_sd3(scheme, sigmas)), scheme


@torch.no_grad()
def test_loss_inputs_are_the_straight_path_through_the_packed_transformer(tiny_flux_path):
    from dreambooth_dora.training.data import Batch

    pipe = _pipe(tiny_flux_path)
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(2, 16, 8, 8, generator=g), torch.randn(2, 16, 8, 8, generator=g)
    t = torch.tensor([250.0, 800.0])
    cond, pooled = torch.randn(2, 8, 32, generator=g), torch.randn(2, 32, generator=g)
    batch = Batch(x0, noise, t, ["a", "b"], None, torch.zeros(2, 6), 0)
    pred, target, weights = FLUX.loss_inputs(pipe.transformer, pipe.scheduler, batch, cond, pooled, "sigma_sqrt", 2.0)
    s = (t / 1000).reshape(-1, 1, 1, 1)
    packed = pipe._pack_latents((1 - s) * x0 + s * noise, 2, 16, 8, 8)  # by hand: the pipeline's own packing
    out = pipe.transformer(hidden_states=packed, timestep=t / 1000, guidance=torch.tensor([2.0, 2.0]),
                           pooled_projections=pooled, encoder_hidden_states=cond, txt_ids=torch.zeros(8, 3),
                           img_ids=pipe._prepare_latent_image_ids(2, 4, 4, "cpu", torch.float32), return_dict=False)[0]
    unpacked = pipe._unpack_latents(out, 8 * pipe.vae_scale_factor, 8 * pipe.vae_scale_factor, pipe.vae_scale_factor)
    assert torch.allclose(pred, unpacked, atol=1e-6) and torch.equal(target, noise - x0)
    assert torch.allclose(weights, (t / 1000) ** -2.0)


def test_flux_training_writes_the_diffusers_flux_layout(flux_runs):
    from safetensors import safe_open

    out = flux_runs["dora"]
    tensors = load_file(str(out / ADAPTER_FILE))
    assert tensors and all(k.startswith("transformer.") for k in tensors)
    assert any("single_transformer_blocks.0.attn.to_q" in k for k in tensors)  # diffusers' list reaches single blocks
    assert any(k.endswith("ff_context.net.2.lora_magnitude_vector") for k in tensors)
    with safe_open(str(out / ADAPTER_FILE), "pt") as f:
        assert '"architecture": "flux1"' in f.metadata()["dreambooth_dora"]
    assert (out / "validation" / "step-000004.png").is_file() and (out / "checkpoint-2").is_dir()
    assert "FluxPipeline" in (out / "README.md").read_text()


@pytest.mark.parametrize("method", ["dora", "lora"])
def test_stock_flux_loader_and_ours_are_exact(tiny_flux_path, flux_runs, method):
    from dreambooth_dora import load_adapter
    from dreambooth_dora.adapters.file import apply_to_models, read_adapter
    from dreambooth_dora.families import pipeline_models

    ref_pipe = _pipe(tiny_flux_path)
    apply_to_models(read_adapter(flux_runs[method]), pipeline_models(ref_pipe))  # our layers, as training left them
    ref, base = _transformer_out(ref_pipe), _transformer_out(_pipe(tiny_flux_path))
    assert (ref - base).abs().max() > 1e-3  # the adapter does something
    stock = _pipe(tiny_flux_path)
    stock.load_lora_weights(str(flux_runs[method]))
    assert (_transformer_out(stock) - ref).abs().max() <= 1e-5
    ours = _pipe(tiny_flux_path)
    assert load_adapter(ours, flux_runs[method])["restored"] == []
    assert (_transformer_out(ours) - ref).abs().max() <= 1e-5
    ours.disable_lora()
    assert (_transformer_out(ours) - base).abs().max() <= 1e-6


def test_named_flux_adapters_switch_and_scale_as_stock_peft(tiny_flux_path, flux_runs):
    """`load_adapter` under two names, then diffusers' own `set_adapters` (weights too) and
    `disable_lora`: the transformer as stock `load_lora_weights` + the same calls gives (PEFT's layers)."""
    from dreambooth_dora import load_adapter

    ours, stock = _pipe(tiny_flux_path), _pipe(tiny_flux_path)
    for name in ("dora", "lora"):
        load_adapter(ours, flux_runs[name], adapter_name=name)
        stock.load_lora_weights(str(flux_runs[name]), adapter_name=name)
    outs = {}
    for names, weights in ((["dora"], None), (["lora"], None), (["dora"], [0.5]), (["dora", "lora"], [0.5, 0.7])):
        ours.set_adapters(names, adapter_weights=weights)
        stock.set_adapters(names, adapter_weights=weights)
        outs[str((names, weights))] = got = _transformer_out(ours)
        assert (got - _transformer_out(stock)).abs().max() <= 1e-5, (names, weights)
    assert (outs["(['dora'], None)"] - outs["(['dora'], [0.5])"]).abs().max() > 1e-4  # the weight acts
    ours.disable_lora()
    assert (_transformer_out(ours) - _transformer_out(_pipe(tiny_flux_path))).abs().max() <= 1e-6


def test_flux_resume_equals_uninterrupted(tiny_flux_path, flux_runs, tmp_path, monkeypatch):
    import dreambooth_dora.training.loop as train_module
    from conftest import interrupt_at

    out = tmp_path / "dora"
    common = ["--cache_latents", "--weighting_scheme", "logit_normal", "--checkpointing_steps", "2"]
    interrupt_at(monkeypatch, train_module, 3)
    with pytest.raises(KeyboardInterrupt):
        _train(tiny_flux_path, out, *common)
    monkeypatch.undo()
    _train(tiny_flux_path, out, *common, "--resume_from_checkpoint", "latest")
    a, b = load_file(str(flux_runs["dora"] / ADAPTER_FILE)), load_file(str(out / ADAPTER_FILE))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_sigterm_stops_after_a_checkpoint_and_resume_equals_uninterrupted(tiny_flux_path, flux_runs, tmp_path,
                                                                          monkeypatch, capsys):
    """SIGTERM (a job queue's Stop, a cluster's pre-emption) mid-run: the step in progress ends, its
    checkpoint is written, the command exits with status 3 and one line; the progress file has every
    step and event; `--resume_from_checkpoint latest` ends where the uninterrupted run ends."""
    import os
    import signal

    from accelerate.state import AcceleratorState, GradientState

    import dreambooth_dora.training.loop as train_module
    from dreambooth_dora.cli import train_main
    from dreambooth_dora.training.control import PROGRESS_ENV, read_progress

    calls, real = {"n": 0}, train_module.diffusion_loss

    def terminated_during_third(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(*args, **kwargs)

    out = tmp_path / "dora"
    common = ["--cache_latents", "--weighting_scheme", "logit_normal", "--checkpointing_steps", "2"]
    monkeypatch.setattr(train_module, "diffusion_loss", terminated_during_third)
    monkeypatch.setenv(PROGRESS_ENV, str(tmp_path / "progress.jsonl"))
    try:
        assert train_main(_args(tiny_flux_path, out, *common)) == 3
    finally:
        AcceleratorState._reset_state(True)
        GradientState._reset_state()
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("stopped on request at step 3 of 4")
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler is the run's only
    assert (out / "checkpoint-3").is_dir() and not (out / ADAPTER_FILE).exists()
    records = read_progress(tmp_path / "progress.jsonl")
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3] and records[0]["max_steps"] == 4
    assert [(r["event"], r["step"]) for r in records if "event" in r] == [("checkpoint", 2), ("checkpoint", 3)]
    monkeypatch.undo()
    _train(tiny_flux_path, out, *common, "--resume_from_checkpoint", "latest")
    a, b = load_file(str(flux_runs["dora"] / ADAPTER_FILE)), load_file(str(out / ADAPTER_FILE))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_uncached_latents_train_the_same_adapter(tiny_flux_path, flux_runs, tmp_path):
    """The VAE's shift and scale are applied alike to cached and freshly encoded latents."""
    _train(tiny_flux_path, tmp_path / "uncached", "--weighting_scheme", "logit_normal", "--checkpointing_steps", "2",
           "--validation_prompt", "a sks icon", "--validation_steps", "4", "--num_validation_images", "1",
           "--validation_inference_steps", "2")
    a, b = load_file(str(flux_runs["dora"] / ADAPTER_FILE)), load_file(str(tmp_path / "uncached" / ADAPTER_FILE))
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-5


def _refusal(capsys, model, out, *flags) -> str:
    """The trainer's one-line refusal (in-process: the CLI's own entry point)."""
    from dreambooth_dora.cli import train_main

    assert train_main(["--pretrained_model_name_or_path", str(model), "--instance_data_dir", "sample_data/3d_icon",
                       "--instance_prompt", "a sks icon", "--output_dir", str(out), *flags]) == 2
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and not out.exists(), lines
    return lines[0]


def test_each_family_refuses_what_it_would_ignore_in_one_line_before_any_model_loads(
        tiny_flux_path, tiny_sd_path, tmp_path, capsys, monkeypatch):
    import dreambooth_dora.families.flux1 as flux_module

    monkeypatch.chdir(REPO)
    monkeypatch.setattr(flux_module.Flux1, "load_components", lambda *a, **k: pytest.fail("a model was loaded"))
    for flags, words in [(["--snr_gamma", "5"], "snr_gamma is a DDPM setting"),
                         (["--resolution", "56"], "multiple of 16"),
                         (["--unet_target_modules", "to_q"], "has no UNet; give its modules as lora_layers")]:
        assert words in _refusal(capsys, tiny_flux_path, tmp_path / "out", "--resolution", "64", *flags)
    assert "weighting_scheme is a flow-matching setting" in _refusal(capsys, tiny_sd_path, tmp_path / "out",
                                                                     "--weighting_scheme", "logit_normal")


@torch.no_grad()
def test_same_latents_helper_draws_what_the_flux_pipeline_draws(tiny_flux_path):
    import numpy as np

    from dreambooth_dora.evaluation.drawing import draw, seeded_latents

    pipe = _pipe(tiny_flux_path)
    kw = dict(num_inference_steps=2, guidance_scale=3.5, width=32, height=32, max_sequence_length=32)
    stock = pipe("a sks icon", generator=torch.Generator().manual_seed(7), output_type="np", **kw).images
    latents, gens = seeded_latents(pipe, [7], 1, 32, 32)
    assert np.array_equal(np.asarray(draw(pipe, None, "a sks icon", latents, gens[0], output_type="np", **kw)), stock)


def test_app_compares_flux_columns_from_the_same_latents(tiny_flux_path, flux_runs):
    import numpy as np

    from app.core import Comparison

    comp = Comparison(str(tiny_flux_path), adapters_root=flux_runs["dora"].parent, device="cpu")
    comp.load("dora", flux_runs["dora"])
    comp.load("lora", flux_runs["lora"])
    assert list(comp.schedulers) == ["Euler (flow matching)"] and comp.native_size() == 64
    first = comp.generate("a sks icon", seed=7, steps=2, width=32, height=32)
    again = comp.generate("a sks icon", seed=7, steps=2, width=32, height=32)
    base, lora, dora = (np.asarray(first[c][0][0], np.int16) for c in ("base", "lora", "dora"))
    assert np.array_equal(base, np.asarray(again["base"][0][0], np.int16))
    assert np.abs(base - dora).max() > 0 and np.abs(base - lora).max() > 0
    with pytest.raises(Exception, match="multiples of 16"):
        comp.generate("a sks icon", width=40, height=40)


def test_flux_exports_fused_and_info_names_the_web_ui_exports(tiny_flux_path, flux_runs, tmp_path):
    from dreambooth_dora.formats.info import file_info

    from dreambooth_dora.cli import main

    out = tmp_path / "fused"
    assert main(["export", str(flux_runs["dora"]), "--format", "fused", "--out", str(out)]) == 0
    fused, ref = _pipe(out), _pipe(tiny_flux_path)
    from dreambooth_dora.adapters.file import apply_to_models, read_adapter
    from dreambooth_dora.families import pipeline_models

    apply_to_models(read_adapter(flux_runs["dora"]), pipeline_models(ref))
    assert (_transformer_out(fused) - _transformer_out(ref)).abs().max() <= 1e-5  # merged weights = our layers
    info = file_info(flux_runs["dora"])
    assert set(info.parts) == {"transformer"} and "--format kohya" in " ".join(info.notes)
    assert "exact for the Transformer" in info.notes[0]
    assert main(["export", str(flux_runs["dora"]), "--format", "full", "--out", str(tmp_path / "f.safetensors")]) == 0
    kohya = file_info(tmp_path / "f.safetensors")
    assert set(kohya.parts) == {"transformer"} and kohya.parts["transformer"].modules == 9  # a double block 8, a single block 1 (linear1)
    assert "FLUX.1" in kohya.base_model or kohya.base_model == str(tiny_flux_path)


@pytest.mark.parametrize("recipe", sorted(p.name for p in (REPO / "train_configs").glob("flux1_*_dora.yaml")))
def test_flux_recipes_run_on_a_local_tiny_model_in_bf16(tiny_flux_path, tmp_path, monkeypatch, recipe):
    """Each shipped FLUX.1 recipe (the LoRA twins differ only in use_dora, tests/test_repo.py) pointed
    at a local folder in the hub layout: bf16, gradient checkpointing, cached latents, the recipe's
    guidance and weighting."""
    from dreambooth_dora.training.config import load_config

    monkeypatch.chdir(REPO)
    argv = ["--config", f"train_configs/{recipe}", "--pretrained_model_name_or_path", str(tiny_flux_path),
            "--resolution", "64", "--max_train_steps", "2", "--gradient_accumulation_steps", "1",
            "--max_sequence_length", "32", "--validation_steps", "2", "--num_validation_images", "1",
            "--validation_inference_steps", "2", "--output_dir", str(tmp_path / "out"), "--report_to", "none"]
    cfg = load_config(argv)
    assert cfg.mixed_precision == "bf16" and cfg.cache_latents and cfg.gradient_checkpointing
    path = train_now(argv)
    tensors = load_file(str(path))
    assert {k.split(".", 1)[0] for k in tensors} == {"transformer"}
    assert any(k.endswith("lora_magnitude_vector") for k in tensors)
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in tensors.values())
    assert (tmp_path / "out" / "validation" / "step-000002.png").is_file()


@pytest.mark.parametrize("method", ["dora", "lora"])
def test_flux_text_encoder_training_adapts_clip_only_and_loads_exactly(tiny_flux_path, tmp_path, method):
    """--train_text_encoder adapts CLIP-L (as diffusers' FLUX script); T5 never trains (its states are
    encoded once). Stock loading is exact for the transformer and for CLIP LoRA; `load_adapter` for
    CLIP DoRA too (the stock loader drops text-encoder magnitudes)."""
    from dreambooth_dora import load_adapter
    from dreambooth_dora.adapters.file import apply_to_models, read_adapter
    from dreambooth_dora.families import pipeline_models

    out = tmp_path / method
    _train(tiny_flux_path, out, "--train_text_encoder", "--use_dora", str(method == "dora"), "--max_train_steps", "3")
    tensors = load_file(str(out / ADAPTER_FILE))
    assert {k.split(".", 1)[0] for k in tensors} == {"transformer", "text_encoder"}

    def pooled(pipe):
        ids = pipe.tokenizer(["a sks icon", "a red ball"], padding="max_length", max_length=77,
                             return_tensors="pt").input_ids
        with torch.no_grad():
            return pipe.text_encoder(ids).pooler_output

    ref = _pipe(tiny_flux_path)
    apply_to_models(read_adapter(out), pipeline_models(ref))
    base = _pipe(tiny_flux_path)
    assert (pooled(ref) - pooled(base)).abs().max() > 1e-4  # CLIP did train
    ours = _pipe(tiny_flux_path)
    import logging

    import transformers.utils.logging as tlog

    said, level = [], tlog.get_verbosity()
    handler = logging.Handler()
    handler.emit = lambda record: said.append(record.getMessage())
    tlog.set_verbosity_warning()  # a user's script: transformers at its default verbosity
    logging.getLogger("transformers.integrations.peft").addHandler(handler)
    try:
        report = load_adapter(ours, out)
        stock = _pipe(tiny_flux_path)
        stock.load_lora_weights(str(out))  # what the stock loader alone says
    finally:
        tlog.set_verbosity(level)
        logging.getLogger("transformers.integrations.peft").removeHandler(handler)
    # transformers' "LOAD REPORT" ("MISSING ... newly initialized": the magnitudes it skips) comes
    # from the stock loader alone; load_adapter sets those and says so in its own note
    assert ["LOAD REPORT" in m for m in said] == ([True] if method == "dora" else []), said
    assert (pooled(ours) - pooled(ref)).abs().max() <= 1e-5
    assert (_transformer_out(ours) - _transformer_out(ref)).abs().max() <= 1e-5
    assert bool(report["restored"]) == (method == "dora")  # the magnitudes the stock loader dropped
    if method == "lora":
        assert (pooled(stock) - pooled(ref)).abs().max() <= 1e-5


def test_evaluate_takes_a_flux_base(tiny_flux_path, flux_runs, tmp_path):
    """`evaluate` on a FLUX.1 base: the same seeds and latents for every model (a zero adapter would
    reproduce the base), prior-drift pixels metrics, the weight analysis over the transformer's
    blocks, and FLUX.1's own guidance when none is given (dev's 3.5, not SD's 7.5)."""
    from conftest import evaluate_small

    out, result = evaluate_small(tiny_flux_path, f"{flux_runs['dora']},{flux_runs['lora']}", tmp_path / "report",
                                 seeds="0,1", guidance=None)
    assert "guidance 3.5." in (out / "report.md").read_text()
    m = result["metrics"]
    assert list(m) == ["base", "DoRA r4", "LoRA r4"]
    assert m["DoRA r4"]["class MSE"]["mean"] > 0 and m["base"].get("class MSE") is None
    assert (out / "report.md").is_file() and (out / "weight_analysis.png").is_file()


def test_dit_quick_start_has_the_quick_starts_shape(tmp_path, monkeypatch):
    """The FLUX quick start's recipes, cut to 2 steps: DoRA and its LoRA twin on the embedded
    FLUX.1-architecture model write validation grids, checkpoints, the adapter and a model card
    whose snippet draws at the model's size and T5 length; the app compares base / LoRA / DoRA."""
    import numpy as np

    from app.core import Comparison

    monkeypatch.chdir(REPO)
    short = ["--max_train_steps", "2", "--checkpointing_steps", "1", "--validation_steps", "2",
             "--validation_inference_steps", "1", "--report_to", "none"]
    for method in ("dora", "lora"):
        train_now(["--config", f"train_configs/quickstart_tiny_icon_flux_{method}.yaml", *short,
                   "--output_dir", str(tmp_path / method)])
        run = tmp_path / method
        assert (run / ADAPTER_FILE).is_file() and (run / "validation" / "step-000002.png").is_file()
        assert sorted(p.name for p in run.glob("checkpoint-*")) == ["checkpoint-1"]  # the last step is the adapter
        card = (run / "README.md").read_text()
        assert "FluxPipeline" in card and "height=32, width=32, max_sequence_length=32" in card
        keys = load_file(run / ADAPTER_FILE).keys()
        assert any(k.startswith("text_encoder.") for k in keys)  # CLIP-L adapted too
        assert any(".lora_magnitude_vector" in k for k in keys) == (method == "dora")
    comp = Comparison("embedded:toy-world-flux", adapters_root=tmp_path, device="cpu")
    comp.load("dora", tmp_path / "dora")
    comp.load("lora", tmp_path / "lora")
    assert comp.native_size() == 32
    pictures = comp.generate("a sks icon, 3d render", seed=0, steps=2, width=32, height=32)
    base, lora, dora = (np.asarray(pictures[c][0][0], np.int16) for c in ("base", "lora", "dora"))
    assert base.shape == (32, 32, 3) and np.abs(base - dora).max() > 0 and np.abs(base - lora).max() > 0

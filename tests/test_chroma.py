"""Chroma: its own family, prompts and masks as `ChromaPipeline.encode_prompt` gives them, flow
matching through the packed transformer with the pipeline's mask, files stock `load_lora_weights`
loads exactly, resume = uninterrupted, web UI files under ComfyUI's rules, the app, `evaluate` and
the family's refusals; on a tiny Chroma pipeline built from configs (T5 and its tokenizer local)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import train_now
from dreambooth_dora.families import Chroma, family_of
from dreambooth_dora.outputs import ADAPTER_FILE

REPO = Path(__file__).resolve().parents[1]
CHROMA = Chroma()


def _args(model, out, *extra) -> list[str]:
    return ["--pretrained_model_name_or_path", str(model), "--instance_data_dir", str(REPO / "sample_data/3d_icon"),
            "--instance_prompt", "a sks icon, 3d render", "--resolution", "32", "--learning_rate", "1e-2",
            "--max_train_steps", "4", "--rank", "4", "--lora_alpha", "8", "--output_dir", str(out),
            "--report_to", "none", "--seed", "3", "--max_sequence_length", "48", "--checkpointing_steps", "2",
            *map(str, extra)]


@pytest.fixture(scope="module")
def chroma_runs(tiny_chroma_path, tmp_path_factory):
    """DoRA (cached latents, logit-normal noise levels, a checkpoint at 2, a validation grid) with the
    default targets plus the single blocks' MLP and output and the guidance network's MLP (so every
    kind of web UI name is written), and its LoRA twin with the defaults, 4 steps each."""
    root = tmp_path_factory.mktemp("chroma")
    common = ["--cache_latents", "--weighting_scheme", "logit_normal"]
    layers = "attn.to_k,attn.to_q,attn.to_v,attn.to_out.0,attn.add_q_proj,ff.net.2,proj_mlp,proj_out,linear_1"
    train_now(_args(tiny_chroma_path, root / "dora", *common, "--lora_layers", layers, "--validation_prompt",
                    "a sks icon", "--validation_steps", "4", "--num_validation_images", "1",
                    "--validation_inference_steps", "2"))
    train_now(_args(tiny_chroma_path, root / "lora", *common, "--use_dora", "false"))
    return {"dora": root / "dora", "lora": root / "lora"}


def _pipe(path):
    from diffusers import ChromaPipeline

    pipe = ChromaPipeline.from_pretrained(str(path))
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def _transformer_out(pipe):
    """The transformer on fixed packed latents and text, with a text mask (fp32)."""
    g = torch.Generator().manual_seed(0)
    x, text = torch.randn(2, 16, 64, generator=g), torch.randn(2, 8, 32, generator=g)
    mask = torch.cat([torch.tensor([[1.0] * 5 + [0.0] * 3, [1.0] * 8]), torch.ones(2, 16)], dim=1)
    return pipe.transformer(hidden_states=x, timestep=torch.tensor([0.3, 0.9]), encoder_hidden_states=text,
                            attention_mask=mask, txt_ids=torch.zeros(8, 3),
                            img_ids=pipe._prepare_latent_image_ids(2, 4, 4, "cpu", torch.float32), return_dict=False)[0]


def test_chroma_is_its_own_family_and_encodes_prompts_and_masks_as_its_pipeline(tiny_chroma_path):
    assert isinstance(family_of(str(tiny_chroma_path)), Chroma)
    pipe = _pipe(tiny_chroma_path)
    prompts = ["a sks icon, 3d render", "a red cube"]
    with torch.no_grad():
        embeds, mask = CHROMA.encode_prompts([pipe.tokenizer], [pipe.text_encoder], prompts, max_sequence_length=48)
        stock, _, stock_mask, *_ = pipe.encode_prompt(prompts, do_classifier_free_guidance=False, max_sequence_length=48)
    assert embeds.shape == (2, 48, 32) and torch.equal(embeds, stock) and torch.equal(mask, stock_mask)  # bit for bit
    tokens = pipe.tokenizer(prompts, padding="max_length", max_length=48).attention_mask
    assert mask.sum(1).tolist() == [sum(t) + 1 for t in tokens]  # the prompt and the first padding token


def test_loss_inputs_are_the_straight_path_through_the_masked_transformer(tiny_chroma_path):
    from diffusers import ChromaPipeline

    from dreambooth_dora.training.data import Batch

    pipe = _pipe(tiny_chroma_path)
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(2, 16, 4, 4, generator=g), torch.randn(2, 16, 4, 4, generator=g)
    t = torch.tensor([250.0, 800.0])
    cond, mask = torch.randn(2, 8, 32, generator=g), torch.tensor([[1.0] * 5 + [0.0] * 3, [1.0] * 8])
    batch = Batch(x0, noise, t, ["a", "b"], None, torch.zeros(2, 6), 0)
    with torch.no_grad():
        pred, target, weights = CHROMA.loss_inputs(pipe.transformer, pipe.scheduler, batch, cond, mask, "sigma_sqrt")
        s = (t / 1000).reshape(-1, 1, 1, 1)
        packed = ChromaPipeline._pack_latents((1 - s) * x0 + s * noise, 2, 16, 4, 4)
        out = pipe.transformer(hidden_states=packed, timestep=t / 1000, encoder_hidden_states=cond,
                               attention_mask=torch.cat([mask, torch.ones(2, 4)], dim=1), txt_ids=torch.zeros(8, 3),
                               img_ids=ChromaPipeline._prepare_latent_image_ids(2, 2, 2, "cpu", torch.float32),
                               return_dict=False)[0]
        unmasked = CHROMA.loss_inputs(pipe.transformer, pipe.scheduler, batch, cond, torch.ones(2, 8), "none")[0]
    assert torch.allclose(pred, ChromaPipeline._unpack_latents(out, 4, 4, 1), atol=1e-6)
    assert (unmasked - pred).abs().max() > 1e-4  # the mask is used
    assert torch.equal(target, noise - x0) and torch.allclose(weights, (t / 1000) ** -2.0)


def test_chroma_training_writes_the_diffusers_layout_with_flux_default_targets(chroma_runs):
    from safetensors import safe_open

    lora = {k.rsplit(".lora_", 1)[0] for k in load_file(str(chroma_runs["lora"] / ADAPTER_FILE))}
    assert {m.split(".", 1)[1].split(".", 2)[-1] for m in lora} == {
        "attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj",
        "attn.add_v_proj", "attn.to_add_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2"}
    with safe_open(str(chroma_runs["dora"] / ADAPTER_FILE), "pt") as f:
        assert '"architecture": "chroma"' in f.metadata()["dreambooth_dora"]
        assert any(k.startswith("transformer.distilled_guidance_layer.layers.0.linear_1") for k in f.keys())
    assert (chroma_runs["dora"] / "validation" / "step-000004.png").is_file()
    assert "ChromaPipeline" in (chroma_runs["dora"] / "README.md").read_text()


@pytest.mark.parametrize("method", ["dora", "lora"])
def test_stock_chroma_loader_and_ours_are_exact(tiny_chroma_path, chroma_runs, method):
    from dreambooth_dora import load_adapter
    from dreambooth_dora.adapters.file import apply_to_models, read_adapter
    from dreambooth_dora.families import pipeline_models

    ref_pipe = _pipe(tiny_chroma_path)
    apply_to_models(read_adapter(chroma_runs[method]), pipeline_models(ref_pipe))
    ref, base = _transformer_out(ref_pipe), _transformer_out(_pipe(tiny_chroma_path))
    assert (ref - base).abs().max() > 1e-3
    stock = _pipe(tiny_chroma_path)
    stock.load_lora_weights(str(chroma_runs[method]))
    assert (_transformer_out(stock) - ref).abs().max() <= 1e-5
    ours = _pipe(tiny_chroma_path)
    load_adapter(ours, chroma_runs[method])
    assert (_transformer_out(ours) - ref).abs().max() <= 1e-5
    ours.disable_lora()
    assert (_transformer_out(ours) - base).abs().max() <= 1e-6


def test_chroma_resume_equals_uninterrupted_and_refusals(tiny_chroma_path, chroma_runs, tmp_path, monkeypatch, capsys):
    import dreambooth_dora.training.loop as train_module
    from conftest import interrupt_at
    from dreambooth_dora.cli import train_main

    out = tmp_path / "lora"
    common = ["--cache_latents", "--weighting_scheme", "logit_normal", "--use_dora", "false"]
    interrupt_at(monkeypatch, train_module, 3)
    with pytest.raises(KeyboardInterrupt):
        train_now(_args(tiny_chroma_path, out, *common))
    monkeypatch.undo()
    train_now(_args(tiny_chroma_path, out, *common, "--resume_from_checkpoint", "latest"))
    a, b = load_file(str(chroma_runs["lora"] / ADAPTER_FILE)), load_file(str(out / ADAPTER_FILE))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    capsys.readouterr()
    for flags, words in [(["--train_text_encoder"], "its text encoder is T5"),
                         (["--train_text_encoder_ti", "--token_abstraction", "sks"], "pivotal tuning needs a CLIP"),
                         (["--guidance_scale", "3.5"], "guidance_scale is FLUX.1 dev's"),
                         (["--snr_gamma", "5"], "snr_gamma is a DDPM setting"),
                         (["--resolution", "40"], "multiple of 16")]:
        bad = tmp_path / "bad"
        assert train_main(["--pretrained_model_name_or_path", str(tiny_chroma_path), "--instance_data_dir",
                           str(REPO / "sample_data/3d_icon"), "--instance_prompt", "a sks icon", "--output_dir",
                           str(bad), *flags]) == 2
        lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
        assert len(lines) == 1 and words in lines[0] and not bad.exists(), (flags, lines)


def test_the_app_and_the_same_latents_helper_draw_what_the_chroma_pipeline_draws(tiny_chroma_path, chroma_runs):
    import numpy as np

    from app.core import Comparison
    from dreambooth_dora.evaluation.drawing import draw, seeded_latents

    pipe = _pipe(tiny_chroma_path)
    kw = dict(num_inference_steps=2, guidance_scale=5.0, width=32, height=32, max_sequence_length=48)
    stock = pipe(prompt="a sks icon", generator=torch.Generator().manual_seed(7), output_type="np", **kw).images
    latents, gens = seeded_latents(pipe, [7], 1, 32, 32)
    drawn = np.asarray(draw(pipe, None, "a sks icon", latents, gens[0], output_type="np", **kw))
    assert np.array_equal(drawn, stock)
    comp = Comparison(str(tiny_chroma_path), adapters_root=chroma_runs["dora"].parent, device="cpu")
    comp.load("dora", chroma_runs["dora"])
    comp.load("lora", chroma_runs["lora"])
    assert list(comp.schedulers) == ["Euler (flow matching)"] and comp.native_size() == 64
    first = comp.generate("a sks icon", seed=7, steps=2, width=32, height=32, guidance=5.0)
    base, lora, dora = (np.asarray(first[c][0][0], np.int16) for c in ("base", "lora", "dora"))
    assert np.abs(base - dora).max() > 0 and np.abs(base - lora).max() > 0


def test_chroma_exports_fused_exactly(tiny_chroma_path, chroma_runs, tmp_path):
    from dreambooth_dora.adapters.file import apply_to_models, read_adapter
    from dreambooth_dora.cli import main
    from dreambooth_dora.families import pipeline_models
    from dreambooth_dora.formats.info import file_info

    assert main(["export", str(chroma_runs["dora"]), "--format", "fused", "--out", str(tmp_path / "fused")]) == 0
    ref = _pipe(tiny_chroma_path)
    apply_to_models(read_adapter(chroma_runs["dora"]), pipeline_models(ref))
    assert (_transformer_out(_pipe(tmp_path / "fused")) - _transformer_out(ref)).abs().max() <= 1e-5
    info = file_info(chroma_runs["dora"])
    assert set(info.parts) == {"transformer"} and "Chroma adapter" in info.notes[0]


def test_chroma_web_ui_names_are_what_diffusers_converter_reads():
    """The original checkpoint's names our web UI files use (ComfyUI's `lora_unet_` + name), read
    back by diffusers' own Chroma converter into the diffusers model: every name and row offset, at
    Chroma's real widths (24 heads of 128, T5-XXL's 4096, a 5-layer guidance network of 5120), two
    blocks of each kind."""
    from diffusers import ChromaTransformer2DModel
    from diffusers.loaders.single_file_utils import convert_chroma_transformer_checkpoint_to_diffusers
    from test_dit_webui import _native, _rows_only

    with torch.device("meta"):
        model = ChromaTransformer2DModel(num_layers=2, num_single_layers=2)
    state = _rows_only(model)
    native, refused = _native(CHROMA, model, state)
    assert not refused
    for i in range(2):  # the norms, written here from the converter's names
        for side, ours in (("img", ""), ("txt", "added_")):
            native[f"double_blocks.{i}.{side}_attn.norm.query_norm.scale"] = state[f"transformer_blocks.{i}.attn.norm_{ours}q.weight"]
            native[f"double_blocks.{i}.{side}_attn.norm.key_norm.scale"] = state[f"transformer_blocks.{i}.attn.norm_{ours}k.weight"]
        native[f"single_blocks.{i}.norm.query_norm.scale"] = state[f"single_transformer_blocks.{i}.attn.norm_q.weight"]
        native[f"single_blocks.{i}.norm.key_norm.scale"] = state[f"single_transformer_blocks.{i}.attn.norm_k.weight"]
    for i in range(5):
        native[f"distilled_guidance_layer.norms.{i}.scale"] = state[f"distilled_guidance_layer.norms.{i}.weight"]
    assert native["single_blocks.0.linear1.weight"].shape[0] == 3 * 3072 + 4 * 3072
    back = convert_chroma_transformer_checkpoint_to_diffusers(dict(native))
    assert set(back) == set(state), sorted(set(back) ^ set(state))[:6]
    assert all(torch.equal(back[k], state[k]) for k in state)
    assert CHROMA.webui_kind("transformer", "lora_unet_distilled_guidance_layer_layers_3_in_layer") == \
        "distilled_guidance_layer.layers.in_layer"
    assert CHROMA.webui_kind("transformer", "lora_unet_single_blocks_3_linear1") == "linear1"


def test_chroma_web_ui_files_are_exact_in_comfyui(chroma_runs, tmp_path, capsys):
    """kohya (LyCORIS's dora_scale), --comfyui (ComfyUI's own weight rule) and full files from a
    Chroma adapter, merged by each consumer's published rule (test_exports.py): exact where they claim."""
    from dreambooth_dora.cli import main
    from dreambooth_dora.formats.info import file_info
    from test_dit_webui import _modules, _truths, _worst

    truths = _truths(CHROMA, chroma_runs["dora"])
    assert {"lora_unet_double_blocks_0_img_attn_qkv", "lora_unet_double_blocks_0_txt_attn_qkv",
            "lora_unet_single_blocks_0_linear1", "lora_unet_single_blocks_0_linear2",
            "lora_unet_distilled_guidance_layer_layers_0_in_layer"} <= set(truths)
    files = {}
    for name, flags in (("kohya", ["--format", "kohya"]), ("comfyui", ["--format", "kohya", "--comfyui"]),
                        ("full", ["--format", "full"])):
        files[name] = tmp_path / f"{name}.safetensors"
        assert main(["export", str(chroma_runs["dora"]), *flags, "--out", str(files[name])]) == 0
    kohya, meta = _modules(files["kohya"])
    assert set(kohya) == set(truths) and meta["ss_base_model_version"] == "chroma"
    linear1 = kohya["lora_unet_single_blocks_0_linear1"]  # q, k, v, MLP adapted at rank 4: rank 16 over 32 * 3 + 128 rows
    assert linear1.down.shape == (16, 32) and linear1.up.shape == (224, 16)
    comfy, _ = _modules(files["comfyui"])
    full, _ = _modules(files["full"])
    assert _worst(truths, kohya, "lycoris") <= 1e-5 and _worst(truths, comfy, "comfyui") <= 1e-5
    assert _worst(truths, kohya, "comfyui") > 1e-3  # each file is rule-specific
    assert _worst(truths, full, "comfyui") <= 1e-5
    capsys.readouterr()
    assert main(["verify", str(files["full"]), "--against", str(chroma_runs["dora"])]) == 0
    verdict = next(ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("| **verdict**"))
    assert set(c.strip() for c in verdict.strip("|").split("|")[1:]) == {"exact"}
    info = file_info(files["comfyui"])
    assert "img_attn.qkv" in info.parts["transformer"].targets
    assert any("Chroma module names" in n for n in info.notes)


@pytest.mark.parametrize("recipe", sorted(p.name for p in (REPO / "train_configs").glob("chroma_*_dora.yaml")))
def test_chroma_recipes_run_on_a_local_tiny_model_in_bf16(tiny_chroma_path, tmp_path, monkeypatch, recipe):
    from dreambooth_dora.training.config import load_config

    monkeypatch.chdir(REPO)
    argv = ["--config", f"train_configs/{recipe}", "--pretrained_model_name_or_path", str(tiny_chroma_path),
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


def test_evaluate_takes_a_chroma_base(tiny_chroma_path, chroma_runs, tmp_path):
    """`evaluate` on a Chroma base: every model from the same latents, prior-drift metrics, and the
    pipeline's own guidance (5.0) when none is given."""
    from conftest import evaluate_small

    out, result = evaluate_small(tiny_chroma_path, f"{chroma_runs['dora']},{chroma_runs['lora']}", tmp_path / "report",
                                 seeds="0,1", guidance=None)
    assert "guidance 5." in (out / "report.md").read_text()
    m = result["metrics"]
    assert list(m) == ["base", "DoRA r4", "LoRA r4"] and m["DoRA r4"]["class MSE"]["mean"] > 0


def test_a_lora_on_stacked_layers_needs_the_stacked_rank_in_kohya_lora(chroma_runs, tmp_path):
    """A rank-4 LoRA on q, k and v is rank 12 on the checkpoint's fused `img_attn.qkv`: `kohya-lora
    --rank 4` approximates it, `--rank 12` is exact (the README's claim, measured)."""
    from safetensors import safe_open

    from dreambooth_dora.cli import main

    errors = {}
    for rank in (4, 12):
        out = tmp_path / f"r{rank}.safetensors"
        assert main(["export", str(chroma_runs["lora"]), "--format", "kohya-lora", "--rank", str(rank),
                     "--out", str(out)]) == 0
        with safe_open(str(out), "pt") as f:
            errors[rank] = float(f.metadata()["dreambooth_dora_svd_error"])
    assert errors[4] > 0.05 and errors[12] <= 1e-5, errors

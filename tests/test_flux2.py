"""FLUX.2 [klein]: its own family, prompts as `Flux2KleinPipeline.encode_prompt` gives them, latents
patchified and batch-normed as diffusers' klein script takes them, flow matching through the packed
transformer, files stock `load_lora_weights` loads exactly, resume = uninterrupted, the app and the
family's refusals; on a tiny klein pipeline built from configs (Qwen3 and its tokenizer built locally)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import train_now
from dreambooth_dora.families import Flux2Klein, family_of
from dreambooth_dora.outputs import ADAPTER_FILE

REPO = Path(__file__).resolve().parents[1]
KLEIN = Flux2Klein()


def _args(model, out, *extra) -> list[str]:
    return ["--pretrained_model_name_or_path", str(model), "--instance_data_dir", str(REPO / "sample_data/3d_icon"),
            "--instance_prompt", "a sks icon, 3d render", "--resolution", "32", "--learning_rate", "1e-2",
            "--max_train_steps", "4", "--rank", "4", "--lora_alpha", "8", "--output_dir", str(out),
            "--report_to", "none", "--seed", "3", "--max_sequence_length", "48", "--checkpointing_steps", "2",
            *map(str, extra)]


@pytest.fixture(scope="module")
def klein_runs(tiny_klein_path, tmp_path_factory):
    """DoRA (cached latents, logit-normal noise levels, a checkpoint at 2, a validation grid) and its
    LoRA twin, 4 steps each."""
    root = tmp_path_factory.mktemp("klein")
    common = ["--cache_latents", "--weighting_scheme", "logit_normal"]
    train_now(_args(tiny_klein_path, root / "dora", *common, "--validation_prompt", "a sks icon", "--validation_steps",
                    "4", "--num_validation_images", "1", "--validation_inference_steps", "2"))
    train_now(_args(tiny_klein_path, root / "lora", *common, "--use_dora", "false"))
    return {"dora": root / "dora", "lora": root / "lora"}


def _pipe(path):
    from diffusers import Flux2KleinPipeline

    pipe = Flux2KleinPipeline.from_pretrained(str(path))
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def _transformer_out(pipe):
    """The transformer on fixed packed latents, text and 4-D ids (fp32)."""
    g = torch.Generator().manual_seed(0)
    x, text = torch.randn(2, 16, 32, generator=g), torch.randn(2, 8, 48, generator=g)
    return pipe.transformer(hidden_states=x, timestep=torch.tensor([0.3, 0.9]), guidance=None,
                            encoder_hidden_states=text, txt_ids=pipe._prepare_text_ids(text),
                            img_ids=pipe._prepare_latent_ids(torch.zeros(2, 32, 4, 4)), return_dict=False)[0]


def test_klein_is_its_own_family_and_encodes_prompts_as_its_pipeline(tiny_klein_path):
    assert isinstance(family_of(str(tiny_klein_path)), Flux2Klein)
    assert KLEIN.matches({"_class_name": "OtherPipeline", "transformer": ["diffusers", "Flux2Transformer2DModel"],
                          "text_encoder": ["transformers", "Qwen3ForCausalLM"]})
    assert not KLEIN.matches({"_class_name": "Flux2Pipeline", "transformer": ["diffusers", "Flux2Transformer2DModel"],
                              "text_encoder": ["transformers", "Mistral3ForConditionalGeneration"]})  # FLUX.2 dev
    pipe = _pipe(tiny_klein_path)
    prompts = ["a sks icon, 3d render", "a red cube on a white background"]
    with torch.no_grad():
        ours, pooled = KLEIN.encode_prompts([pipe.tokenizer], [pipe.text_encoder], prompts, max_sequence_length=48)
        stock, text_ids = pipe.encode_prompt(prompts, max_sequence_length=48)
    assert pooled is None and ours.shape == (2, 48, 48) and torch.equal(ours, stock)  # bit for bit
    # the layers the pipeline reads (9, 18, 27 of the 28): stacked per token
    with torch.no_grad():
        text = pipe.tokenizer.apply_chat_template([{"role": "user", "content": prompts[0]}], tokenize=False,
                                                  add_generation_prompt=True, enable_thinking=False)
        ids = pipe.tokenizer(text, padding="max_length", max_length=48, truncation=True, return_tensors="pt")
        hidden = pipe.text_encoder(**ids, output_hidden_states=True).hidden_states
    assert torch.allclose(ours[0], torch.cat([hidden[k][0] for k in (9, 18, 27)], dim=-1), atol=1e-6)  # batch of 1
    assert text_ids.shape == (2, 48, 4) and torch.equal(text_ids[0, :, 3], torch.arange(48))


def test_latents_are_patchified_and_batch_normed_then_trained_along_the_straight_path(tiny_klein_path):
    """The VAE's latent (B, 8, h, w) -> 2x2 patches (B, 32, h/2, w/2) normalised by the VAE's
    batch-norm statistics (plain torch here); the loss inputs: x_s = (1 - s) x0 + s e packed one token
    per position, through the transformer, unpacked, against e - x0."""
    from dreambooth_dora.training.data import Batch

    pipe = _pipe(tiny_klein_path)
    g = torch.Generator().manual_seed(0)
    sample = torch.randn(2, 8, 8, 8, generator=g)
    patches = sample.reshape(2, 8, 4, 2, 4, 2).permute(0, 1, 3, 5, 2, 4).reshape(2, 32, 4, 4)
    bn = pipe.vae.bn
    expected = (patches - bn.running_mean[None, :, None, None]) / (bn.running_var[None, :, None, None]
                                                                   + pipe.vae.config.batch_norm_eps).sqrt()
    assert torch.allclose(KLEIN.vae_latents(pipe.vae, sample), expected, atol=1e-6)
    x0, noise = torch.randn(2, 32, 4, 4, generator=g), torch.randn(2, 32, 4, 4, generator=g)
    t = torch.tensor([250.0, 800.0])
    cond = torch.randn(2, 8, 48, generator=g)
    batch = Batch(x0, noise, t, ["a", "b"], None, torch.zeros(2, 6), 0)
    with torch.no_grad():
        pred, target, weights = KLEIN.loss_inputs(pipe.transformer, pipe.scheduler, batch, cond, None, "sigma_sqrt")
        s = (t / 1000).reshape(-1, 1, 1, 1)
        tokens = ((1 - s) * x0 + s * noise).flatten(2).transpose(1, 2)  # (B, h*w, C), row by row
        rows, cols = torch.meshgrid(torch.arange(4), torch.arange(4), indexing="ij")
        img_ids = torch.stack([torch.zeros(16), rows.flatten(), cols.flatten(), torch.zeros(16)], -1).long()
        txt_ids = torch.stack([torch.zeros(8), torch.zeros(8), torch.zeros(8), torch.arange(8)], -1).long()
        out = pipe.transformer(hidden_states=tokens, timestep=t / 1000, guidance=None, encoder_hidden_states=cond,
                               txt_ids=txt_ids.expand(2, -1, -1), img_ids=img_ids.expand(2, -1, -1),
                               return_dict=False)[0]
    assert torch.allclose(pred, out.transpose(1, 2).reshape(2, 32, 4, 4), atol=1e-6)
    assert torch.equal(target, noise - x0) and torch.allclose(weights, (t / 1000) ** -2.0)


def test_klein_training_writes_the_diffusers_layout_with_diffusers_default_targets(klein_runs):
    from safetensors import safe_open

    out = klein_runs["dora"]
    tensors = load_file(str(out / ADAPTER_FILE))
    modules = {k.rsplit(".lora_", 1)[0] for k in tensors}
    assert modules == {f"transformer.transformer_blocks.0.attn.{m}" for m in ("to_q", "to_k", "to_v", "to_out.0")} | {
        "transformer.single_transformer_blocks.0.attn.to_qkv_mlp_proj",
        "transformer.single_transformer_blocks.0.attn.to_out"}
    assert all(f"{m}.lora_magnitude_vector" in tensors for m in modules)
    with safe_open(str(out / ADAPTER_FILE), "pt") as f:
        assert '"architecture": "flux2_klein"' in f.metadata()["dreambooth_dora"]
    assert (out / "validation" / "step-000004.png").is_file() and (out / "checkpoint-2").is_dir()
    assert "Flux2KleinPipeline" in (out / "README.md").read_text()


@pytest.mark.parametrize("method", ["dora", "lora"])
def test_stock_klein_loader_and_ours_are_exact(tiny_klein_path, klein_runs, method):
    from dreambooth_dora import load_adapter
    from dreambooth_dora.adapters.file import apply_to_models, read_adapter
    from dreambooth_dora.families import pipeline_models

    ref_pipe = _pipe(tiny_klein_path)
    apply_to_models(read_adapter(klein_runs[method]), pipeline_models(ref_pipe))  # our layers, as training left them
    ref, base = _transformer_out(ref_pipe), _transformer_out(_pipe(tiny_klein_path))
    assert (ref - base).abs().max() > 1e-3  # the adapter does something
    stock = _pipe(tiny_klein_path)
    stock.load_lora_weights(str(klein_runs[method]))
    assert (_transformer_out(stock) - ref).abs().max() <= 1e-5
    ours = _pipe(tiny_klein_path)
    load_adapter(ours, klein_runs[method], adapter_name="mine")
    assert (_transformer_out(ours) - ref).abs().max() <= 1e-5
    stock.set_adapters(["default_0"], adapter_weights=[0.5])
    ours.set_adapters(["mine"], adapter_weights=[0.5])
    assert (_transformer_out(ours) - _transformer_out(stock)).abs().max() <= 1e-5
    ours.disable_lora()
    assert (_transformer_out(ours) - base).abs().max() <= 1e-6


def test_klein_resume_equals_uninterrupted(tiny_klein_path, klein_runs, tmp_path, monkeypatch):
    import dreambooth_dora.training.loop as train_module
    from conftest import interrupt_at

    out = tmp_path / "dora"
    common = ["--cache_latents", "--weighting_scheme", "logit_normal"]
    interrupt_at(monkeypatch, train_module, 3)
    with pytest.raises(KeyboardInterrupt):
        train_now(_args(tiny_klein_path, out, *common, "--validation_prompt", "a sks icon", "--validation_steps", "4",
                        "--num_validation_images", "1", "--validation_inference_steps", "2"))
    monkeypatch.undo()
    train_now(_args(tiny_klein_path, out, *common, "--validation_prompt", "a sks icon", "--validation_steps", "4",
                    "--num_validation_images", "1", "--validation_inference_steps", "2",
                    "--resume_from_checkpoint", "latest"))
    a, b = load_file(str(klein_runs["dora"] / ADAPTER_FILE)), load_file(str(out / ADAPTER_FILE))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_klein_refuses_what_it_cannot_honour_in_one_line_before_any_model_loads(tiny_klein_path, tmp_path, capsys,
                                                                                 monkeypatch):
    import dreambooth_dora.families.flux2 as klein_module
    from dreambooth_dora.cli import train_main

    monkeypatch.chdir(REPO)
    monkeypatch.setattr(klein_module.Flux2Klein, "load_components", lambda *a, **k: pytest.fail("a model was loaded"))
    for flags, words in [(["--train_text_encoder"], "Qwen3 language model, frozen"),
                         (["--guidance_scale", "3.5"], "guidance_scale is FLUX.1 dev's"),
                         (["--precondition_outputs", "true"], "precondition_outputs is an SD 3 setting"),
                         (["--snr_gamma", "5"], "snr_gamma is a DDPM setting"),
                         (["--resolution", "40"], "multiple of 16"),
                         (["--train_text_encoder_ti", "--token_abstraction", "sks"], "pivotal tuning needs a CLIP")]:
        out = tmp_path / "out"
        assert train_main(["--pretrained_model_name_or_path", str(tiny_klein_path), "--instance_data_dir",
                           "sample_data/3d_icon", "--instance_prompt", "a sks icon", "--output_dir", str(out),
                           *flags]) == 2
        lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
        assert len(lines) == 1 and words in lines[0] and not out.exists(), (flags, lines)


@torch.no_grad()
def test_same_latents_helper_and_the_app_draw_what_the_klein_pipeline_draws(tiny_klein_path, klein_runs):
    import numpy as np

    from app.core import Comparison
    from dreambooth_dora.evaluation.drawing import draw, seeded_latents

    pipe = _pipe(tiny_klein_path)
    kw = dict(num_inference_steps=2, guidance_scale=4.0, width=32, height=32, max_sequence_length=48)
    stock = pipe(prompt="a sks icon", generator=torch.Generator().manual_seed(7), output_type="np", **kw).images
    latents, gens = seeded_latents(pipe, [7], 1, 32, 32)
    drawn = np.asarray(draw(pipe, None, "a sks icon", latents, gens[0], output_type="np", **kw))
    assert np.array_equal(drawn, stock)
    comp = Comparison(str(tiny_klein_path), adapters_root=klein_runs["dora"].parent, device="cpu")
    comp.load("dora", klein_runs["dora"])
    comp.load("lora", klein_runs["lora"])
    assert list(comp.schedulers) == ["Euler (flow matching)"] and comp.native_size() == 64
    first = comp.generate("a sks icon", seed=7, steps=2, width=32, height=32, guidance=4.0)
    again = comp.generate("a sks icon", seed=7, steps=2, width=32, height=32, guidance=4.0)
    base, lora, dora = (np.asarray(first[c][0][0], np.int16) for c in ("base", "lora", "dora"))
    assert np.array_equal(base, np.asarray(again["base"][0][0], np.int16))
    assert np.abs(base - dora).max() > 0 and np.abs(base - lora).max() > 0


def test_klein_exports_fused_exactly(tiny_klein_path, klein_runs, tmp_path):
    from dreambooth_dora.adapters.file import apply_to_models, read_adapter
    from dreambooth_dora.cli import main
    from dreambooth_dora.families import pipeline_models
    from dreambooth_dora.formats.info import file_info

    assert main(["export", str(klein_runs["dora"]), "--format", "fused", "--out", str(tmp_path / "fused")]) == 0
    ref = _pipe(tiny_klein_path)
    apply_to_models(read_adapter(klein_runs["dora"]), pipeline_models(ref))
    assert (_transformer_out(_pipe(tmp_path / "fused")) - _transformer_out(ref)).abs().max() <= 1e-5
    info = file_info(klein_runs["dora"])
    assert set(info.parts) == {"transformer"} and "FLUX.2 [klein] adapter" in info.notes[0]


def test_klein_web_ui_names_are_what_diffusers_converter_reads():
    """The BFL checkpoint's names our web UI files use (ComfyUI's `lora_unet_` + name), read back
    by diffusers' own FLUX.2 converter into the diffusers model: every name and row offset, at
    klein 4B's widths (24 heads of 128, Qwen3-4B's 3 x 2560 text width), two blocks of each kind."""
    from diffusers import Flux2Transformer2DModel
    from diffusers.loaders.single_file_utils import convert_flux2_transformer_checkpoint_to_diffusers
    from test_dit_webui import _rows_only, swap

    with torch.device("meta"):
        model = Flux2Transformer2DModel(num_layers=2, num_single_layers=2, num_attention_heads=24,
                                        joint_attention_dim=7680, guidance_embeds=False)
    state = _rows_only(model)
    native, refused = {}, set()
    for name, module in model.named_modules():  # FLUX.2's layers have no biases
        if isinstance(module, torch.nn.Linear):
            try:
                checkpoint_name, members = KLEIN.native_module(name, model)
            except ValueError as err:
                assert "\n" not in str(err) and name in str(err)
                refused.add(name)
                continue
            native[f"{checkpoint_name}.weight"] = torch.cat([state[f"{m}.weight"] for m in members])
    assert refused == {"norm_out.linear"}  # stored with shift and scale swapped: refused, not mapped
    for i in range(2):  # the norms and the final modulation, written here from the converter's names
        for side, ours in (("img", ""), ("txt", "added_")):
            native[f"double_blocks.{i}.{side}_attn.norm.query_norm.scale"] = state[f"transformer_blocks.{i}.attn.norm_{ours}q.weight"]
            native[f"double_blocks.{i}.{side}_attn.norm.key_norm.scale"] = state[f"transformer_blocks.{i}.attn.norm_{ours}k.weight"]
        native[f"single_blocks.{i}.norm.query_norm.scale"] = state[f"single_transformer_blocks.{i}.attn.norm_q.weight"]
        native[f"single_blocks.{i}.norm.key_norm.scale"] = state[f"single_transformer_blocks.{i}.attn.norm_k.weight"]
    native["final_layer.adaLN_modulation.1.weight"] = swap(state["norm_out.linear.weight"])
    assert native["double_blocks.0.img_attn.qkv.weight"].shape[0] == 3 * 3072
    back = convert_flux2_transformer_checkpoint_to_diffusers(dict(native))
    assert set(back) == set(state)
    assert all(torch.equal(back[k], state[k]) for k in state)
    assert KLEIN.webui_kind("transformer", "lora_unet_double_stream_modulation_img_lin") == "double_stream_modulation_img.lin"


def test_klein_web_ui_files_are_exact_in_comfyui(klein_runs, tmp_path, capsys):
    """kohya (LyCORIS's dora_scale), --comfyui (ComfyUI's own weight rule) and full files from a klein
    adapter, merged by each consumer's published rule (test_exports.py): exact where they claim."""
    from dreambooth_dora.cli import main
    from dreambooth_dora.formats.info import file_info
    from test_dit_webui import _modules, _truths, _worst

    truths = _truths(KLEIN, klein_runs["dora"])
    assert {"lora_unet_double_blocks_0_img_attn_qkv", "lora_unet_double_blocks_0_img_attn_proj",
            "lora_unet_single_blocks_0_linear1", "lora_unet_single_blocks_0_linear2"} == set(truths)
    files = {}
    for name, flags in (("kohya", ["--format", "kohya"]), ("comfyui", ["--format", "kohya", "--comfyui"]),
                        ("full", ["--format", "full"])):
        files[name] = tmp_path / f"{name}.safetensors"
        assert main(["export", str(klein_runs["dora"]), *flags, "--out", str(files[name])]) == 0
    kohya, meta = _modules(files["kohya"])
    assert set(kohya) == set(truths) and meta["ss_base_model_version"] == "flux2_klein"
    qkv = kohya["lora_unet_double_blocks_0_img_attn_qkv"]  # q, k, v adapted at rank 4: rank 12 over 3 x 32 rows
    assert qkv.down.shape == (12, 32) and qkv.up.shape == (96, 12) and qkv.dora_scale.shape == (96, 1)
    comfy, _ = _modules(files["comfyui"])
    full, _ = _modules(files["full"])
    assert _worst(truths, kohya, "lycoris") <= 1e-5 and _worst(truths, comfy, "comfyui") <= 1e-5
    assert _worst(truths, kohya, "comfyui") > 1e-3  # each file is rule-specific
    assert _worst(truths, full, "comfyui") <= 1e-5
    capsys.readouterr()
    assert main(["verify", str(files["full"]), "--against", str(klein_runs["dora"])]) == 0
    verdict = next(ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("| **verdict**"))
    assert [c.strip() for c in verdict.strip("|").split("|")[1:]] == ["exact"] * 4
    info = file_info(files["comfyui"])
    assert info.exact_in == ["ComfyUI and Forge today"] and "img_attn.qkv" in info.parts["transformer"].targets
    assert any("FLUX.2 [klein] module names" in n for n in info.notes)


@pytest.mark.parametrize("recipe", sorted(p.name for p in (REPO / "train_configs").glob("flux2_klein_*_dora.yaml")))
def test_klein_recipes_run_on_a_local_tiny_model_in_bf16(tiny_klein_path, tmp_path, monkeypatch, recipe):
    from dreambooth_dora.training.config import load_config

    monkeypatch.chdir(REPO)
    argv = ["--config", f"train_configs/{recipe}", "--pretrained_model_name_or_path", str(tiny_klein_path),
            "--resolution", "32", "--max_train_steps", "2", "--gradient_accumulation_steps", "1",
            "--max_sequence_length", "48", "--validation_steps", "2", "--num_validation_images", "1",
            "--validation_inference_steps", "2", "--output_dir", str(tmp_path / "out"), "--report_to", "none"]
    cfg = load_config(argv)
    assert cfg.mixed_precision == "bf16" and cfg.cache_latents and cfg.gradient_checkpointing
    assert cfg.pretrained_model_name_or_path == str(tiny_klein_path)
    tensors = load_file(str(train_now(argv)))
    assert {k.split(".", 1)[0] for k in tensors} == {"transformer"}
    assert any(k.endswith("lora_magnitude_vector") for k in tensors)
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in tensors.values())
    assert (tmp_path / "out" / "validation" / "step-000002.png").is_file()


def test_evaluate_takes_a_klein_base(tiny_klein_path, klein_runs, tmp_path):
    """`evaluate` on a klein base: every model from the same latents, prior-drift metrics, the weight
    analysis over the transformer, and the pipeline's own guidance (4.0) when none is given."""
    from conftest import evaluate_small

    out, result = evaluate_small(tiny_klein_path, f"{klein_runs['dora']},{klein_runs['lora']}", tmp_path / "report",
                                 seeds="0,1", guidance=None)
    assert "guidance 4." in (out / "report.md").read_text()
    m = result["metrics"]
    assert list(m) == ["base", "DoRA r4", "LoRA r4"]
    assert m["DoRA r4"]["class MSE"]["mean"] > 0 and (out / "weight_analysis.png").is_file()


def test_klein_prior_preservation_draws_its_class_images_with_its_pipeline(tiny_klein_path, tmp_path):
    out, classes = tmp_path / "run", tmp_path / "class"
    train_now(_args(tiny_klein_path, out, "--max_train_steps", "2", "--with_prior_preservation", "--class_prompt",
                    "an icon", "--class_data_dir", classes, "--num_class_images", "2", "--sample_batch_size", "2"))
    assert len(list(classes.glob("class-*.png"))) == 2 and (out / ADAPTER_FILE).is_file()

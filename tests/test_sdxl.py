"""SDXL: conditioning as the pipeline computes it, training with both text encoders (cached and
not, resumed), the saved layout, exact loading, exports, the app and the evaluation, all on a
tiny SDXL pipeline built from configs."""

from __future__ import annotations

import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from conftest import train_now
from dreambooth_dora.families import StableDiffusionXL
from dreambooth_dora.training.data import time_ids
from dreambooth_dora.training.data import training_view
from dreambooth_dora.outputs import ADAPTER_FILE

REPO = Path(__file__).resolve().parents[1]
REPO_ICONS = "sample_data/3d_icon"


def _train(model, out, *extra):
    return train_now(["--pretrained_model_name_or_path", model, "--instance_data_dir", REPO / REPO_ICONS,
                      "--instance_prompt", "a sks icon", "--resolution", "64", "--learning_rate", "3e-2",
                      "--max_train_steps", "4", "--rank", "4", "--lora_alpha", "8", "--output_dir", out,
                      "--report_to", "none", "--seed", "3", "--center_crop", *extra])


@pytest.fixture(scope="module")
def sdxl_dora(tiny_sdxl_path, tmp_path_factory):
    """DoRA on the UNet and both text encoders, 4 steps, a checkpoint at step 2, validation on."""
    out = tmp_path_factory.mktemp("sdxl") / "dora"
    _train(tiny_sdxl_path, out, "--train_text_encoder", "--checkpointing_steps", "2", "--random_flip",
           "--validation_prompt", "a sks icon", "--validation_steps", "4", "--num_validation_images", "1",
           "--validation_inference_steps", "2")
    return out


def _pipe(path):
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _image(pipe, prompt="a sks icon", seed=0):
    return pipe(prompt, num_inference_steps=2, generator=torch.Generator().manual_seed(seed), output_type="np").images[0]


def test_conditioning_equals_the_pipelines(tiny_sdxl_path):
    pipe = _pipe(tiny_sdxl_path)
    embeds, pooled = StableDiffusionXL().encode_prompts([pipe.tokenizer, pipe.tokenizer_2], [pipe.text_encoder, pipe.text_encoder_2],
                                    ["a sks icon", "a red cube"])
    ref, _, ref_pooled, _ = pipe.encode_prompt(["a sks icon", "a red cube"], do_classifier_free_guidance=False)
    assert embeds.shape == (2, 77, 64) and torch.allclose(embeds, ref) and torch.allclose(pooled, ref_pooled)
    ids = pipe._get_add_time_ids((40, 80), (3, 16), (64, 64), dtype=torch.float32, text_encoder_projection_dim=32)
    assert torch.equal(time_ids((40, 80), (3, 16), (64, 64))[None], ids)


def test_training_view_reports_sdxl_size_conditioning():
    rng_image = np.random.default_rng(0).integers(0, 255, (40, 80, 3), dtype=np.uint8)
    im = Image.fromarray(rng_image)  # 80 wide, 40 high
    for flip in (False, True):
        for seed in range(5):
            pixels, (oh, ow, top, left) = training_view(im, 32, False, flip, random.Random(seed))
            assert (oh, ow) == (40, 80) and top == 0 and 0 <= left <= 64 - 32
            resized = im.resize((64, 32), Image.BICUBIC)
            if flip:  # the corner is in the mirrored picture, as if the mirror came first
                resized = resized.transpose(Image.FLIP_LEFT_RIGHT)
            ref = np.asarray(resized.crop((left, top, left + 32, top + 32)), np.float32) / 127.5 - 1
            assert np.allclose(pixels.permute(1, 2, 0).numpy(), ref, atol=1e-6)


def test_sdxl_training_writes_diffusers_sdxl_layout(sdxl_dora):
    tensors = load_file(str(sdxl_dora / ADAPTER_FILE))
    prefixes = {k.split(".", 1)[0] for k in tensors}
    assert prefixes == {"unet", "text_encoder", "text_encoder_2"}
    assert any(k.startswith("text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_magnitude_vector") for k in tensors)
    assert any(k.startswith("text_encoder_2.text_model.encoder.layers.1.self_attn.out_proj.lora_A") for k in tensors)
    assert (sdxl_dora / "checkpoint-2" / ADAPTER_FILE).is_file()
    assert sorted(p.name for p in (sdxl_dora / "validation").iterdir()) == ["step-000004.png"]
    card = (sdxl_dora / "README.md").read_text()
    assert "StableDiffusionXLPipeline.from_pretrained" in card and "load_adapter(pipe," in card
    from dreambooth_dora.adapters.file import describe

    d = describe(sdxl_dora).as_dict()
    assert d["method"] == "DoRA" and set(d["parts"]) == {"unet", "text_encoder", "text_encoder_2"}


def test_sdxl_resume_equals_uninterrupted(sdxl_dora, tiny_sdxl_path, tmp_path):
    out = tmp_path / "resumed"
    out.mkdir()
    shutil.copytree(sdxl_dora / "checkpoint-2", out / "checkpoint-2")
    _train(tiny_sdxl_path, out, "--train_text_encoder", "--checkpointing_steps", "2", "--random_flip",
           "--resume_from_checkpoint", "latest")
    a, b = load_file(str(sdxl_dora / ADAPTER_FILE)), load_file(str(out / ADAPTER_FILE))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6), k


def test_sdxl_cached_latents_and_embeddings_equal_uncached(tiny_sdxl_path, tmp_path):
    """Frozen text encoders (embeddings and pooled embeddings cached) and cached latents with
    their size conditioning give the adapter of the uncached run."""
    cached = _train(tiny_sdxl_path, tmp_path / "cached", "--use_dora", "false", "--cache_latents")
    plain = _train(tiny_sdxl_path, tmp_path / "plain", "--use_dora", "false")
    a, b = load_file(str(cached)), load_file(str(plain))
    assert {k.split(".", 1)[0] for k in a} == {"unet"}
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-5), k
    assert any(a[k].abs().max() > 0 for k in a if "lora_B" in k)


def test_sdxl_adapter_loads_exactly_and_exports(sdxl_dora, tiny_sdxl_path, tmp_path):
    from dreambooth_dora.adapters.file import apply_to_models, load_adapter, read_adapter
    from dreambooth_dora.formats.export import export_fused, export_kohya
    from dreambooth_dora.families import pipeline_models

    ref = _pipe(tiny_sdxl_path)  # our layers: the reference the trainer optimised
    apply_to_models(read_adapter(sdxl_dora), pipeline_models(ref))
    expected = _image(ref)
    base = _image(_pipe(tiny_sdxl_path))
    assert np.abs(expected - base).max() > 1e-3

    pipe = _pipe(tiny_sdxl_path)
    report = load_adapter(pipe, sdxl_dora)
    assert not any(k.startswith("unet.") for k in report["restored"])  # stock UNet path is exact
    assert np.abs(_image(pipe) - expected).max() < 1e-4
    pipe.disable_lora()
    assert np.abs(_image(pipe) - base).max() < 1e-5

    fused = export_fused(sdxl_dora, tmp_path / "fused")
    assert np.abs(_image(_pipe(fused)) - expected).max() < 1e-4

    kohya = load_file(str(export_kohya(sdxl_dora, tmp_path / "k.safetensors")))
    starts = {k.split("_", 2)[0] + "_" + k.split("_", 2)[1] for k in kohya}
    assert starts == {"lora_unet", "lora_te1", "lora_te2"}
    key = "lora_te2_text_model_encoder_layers_0_self_attn_q_proj"
    w0 = _pipe(tiny_sdxl_path).text_encoder_2.text_model.encoder.layers[0].self_attn.q_proj.weight.detach()
    v = w0 + kohya[f"{key}.alpha"] / 4 * kohya[f"{key}.lora_up.weight"] @ kohya[f"{key}.lora_down.weight"]
    merged = v * kohya[f"{key}.dora_scale"] / v.norm(dim=1, keepdim=True)  # LyCORIS' wd_on_out rule
    fused_w = _pipe(fused).text_encoder_2.text_model.encoder.layers[0].self_attn.q_proj.weight.detach()
    assert torch.allclose(merged, fused_w, atol=1e-5)
    from safetensors import safe_open

    with safe_open(str(tmp_path / "k.safetensors"), "pt") as f:
        assert f.metadata()["ss_base_model_version"] == "sdxl_base_v1-0"


def test_sdxl_app_and_evaluate(sdxl_dora, tiny_sdxl_path, tmp_path):
    from app.core import Comparison
    from dreambooth_dora.evaluation import evaluate, load_eval_config

    comp = Comparison(str(tiny_sdxl_path), device="cpu")
    comp.load("dora", sdxl_dora)
    out = comp.generate("a sks icon", steps=2, seed=1)
    assert set(out) == {"base", "dora"} and out["base"][0][0].size == (64, 64)
    assert np.abs(np.asarray(out["base"][0][0], np.int16) - np.asarray(out["dora"][0][0], np.int16)).max() > 0
    from app.ui import build_ui

    assert build_ui(comp) is not None  # the page builds for an SDXL base (sizes from its UNet and VAE)

    cfg = load_eval_config(["--base_model", str(tiny_sdxl_path), "--adapters", str(sdxl_dora), "--instance_data_dir",
                            str(REPO / REPO_ICONS), "--class_prompts", "a icon", "--seeds", "0", "--images_per_prompt",
                            "1", "--num_inference_steps", "2", "--dino_model", "none", "--clip_model", "none",
                            "--output_dir", str(tmp_path / "eval")])
    _, result = evaluate(cfg, progress=False)
    assert result["metrics"]["DoRA r4"]["class MSE"]["mean"] > 0
    import json

    points = json.loads((tmp_path / "eval" / "metrics.json").read_text())["points"]
    assert {p["module"].split(".")[0] for p in points} == {"unet", "text_encoder", "text_encoder_2"}


def test_pretrained_vae_path(tiny_sdxl_path, tmp_path):
    from dreambooth_dora.toy.tiny import build_tiny_sdxl_pipeline
    from dreambooth_dora.families import load_components
    from dreambooth_dora.families.models import ModelLoadError

    other = build_tiny_sdxl_pipeline(seed=7)
    other.vae.save_pretrained(tmp_path / "vae-only")
    for where in (tmp_path / "vae-only", tiny_sdxl_path):
        parts = load_components(str(tiny_sdxl_path), vae_path=str(where))
        encoders, vae = parts.text_encoders, parts.vae
        assert len(encoders) == 2
        expected = other.vae if where != tiny_sdxl_path else _pipe(tiny_sdxl_path).vae
        assert torch.equal(vae.encoder.conv_in.weight, expected.encoder.conv_in.weight)
    with pytest.raises(ModelLoadError, match="cannot load model .*nowhere"):
        load_components(str(tiny_sdxl_path), vae_path=str(tmp_path / "nowhere"))

    from dreambooth_dora.training.prior import ensure_class_images

    pictures = {}
    for name, vae_path in (("own", None), ("other", str(tmp_path / "vae-only"))):  # class images decode with it too
        ensure_class_images(tmp_path / name, "a icon", 1, str(tiny_sdxl_path), num_inference_steps=2,
                            show_progress=False, vae_path=vae_path)
        pictures[name] = np.asarray(Image.open(next((tmp_path / name).glob("*.png"))), np.int16)
    assert np.abs(pictures["own"] - pictures["other"]).max() > 0


def test_sdxl_recipe_runs_on_local_models_in_bf16_with_prior_preservation(tiny_sdxl_path, tmp_path, monkeypatch):
    """The shipped SDXL recipe pointed at local folders in the hub layout (base and VAE), with
    bf16 autocast and prior preservation (class images drawn by the SDXL pipeline)."""
    import json

    from dreambooth_dora.training.config import load_config

    monkeypatch.chdir(REPO)
    argv = ["--config", "train_configs/sdxl_lego_dora.yaml", "--pretrained_model_name_or_path", str(tiny_sdxl_path),
            "--pretrained_vae_model_name_or_path", str(tiny_sdxl_path), "--resolution", "64", "--max_train_steps", "2",
            "--mixed_precision", "bf16", "--with_prior_preservation", "--class_prompt", "a lego brick",
            "--num_class_images", "2", "--class_data_dir", str(tmp_path / "class"), "--output_dir",
            str(tmp_path / "out"), "--validation_steps", "2", "--num_validation_images", "1",
            "--validation_inference_steps", "2", "--gradient_accumulation_steps", "1", "--report_to", "none"]
    cfg = load_config(argv)
    assert cfg.cache_latents and cfg.gradient_checkpointing and cfg.train_text_encoder
    path = train_now(argv)
    tensors = load_file(str(path))
    assert {k.split(".", 1)[0] for k in tensors} == {"unet", "text_encoder", "text_encoder_2"}
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in tensors.values())
    assert len(list((tmp_path / "class").glob("*.png"))) == 2
    assert (tmp_path / "out" / "validation" / "step-000002.png").is_file()
    info = json.loads((tmp_path / "out" / "train_config.json").read_text())
    assert info["pretrained_vae_model_name_or_path"] == str(tiny_sdxl_path)


def test_verify_on_sdxl_with_text_encoders_judges_the_untrained_last_layer_fairly(sdxl_dora, tmp_path, capsys):
    """SDXL conditions on clip_l's penultimate layer, so its last layer's adapter gets no gradient
    and leaves the weight as it was: verify must not divide by that ~0 change (it printed 7e+23
    and WRONG for every UI)."""
    from dreambooth_dora.cli import main
    from dreambooth_dora.formats.export import export_full, export_kohya

    files = {"kohya": export_kohya(sdxl_dora, tmp_path / "k.safetensors"),
             "full": export_full(sdxl_dora, tmp_path / "f.safetensors")}
    want = {"kohya": ["exact", "WRONG", "exact", "WRONG"], "full": ["exact"] * 4}
    for name, path in files.items():
        assert main(["verify", str(path), "--against", str(sdxl_dora), "--summary"]) == 0
        out = capsys.readouterr().out
        row = next(r for r in out.splitlines() if "verdict" in r)
        assert [c.strip() for c in row.strip("|").split("|")][1:] == want[name], (name, out)
        assert "layers the adapter leaves unchanged, judged against ||W0|| instead:" in out
        assert "lora_te1_text_model_encoder_layers_" in out.split("instead:")[1]  # clip_l's, as expected
        top = [float(c) for c in next(r for r in out.splitlines() if "**max**" in r).strip("|").split("|")[1:]]
        assert max(top) < 10  # relative errors, not 1e23

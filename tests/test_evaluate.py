"""`dreambooth-dora evaluate`: metrics against independent references (scikit-image's SSIM,
CLIPModel's own logits, PEFT's fused weights, numpy), prior drift with identical latents, the
weight analysis over checkpoints, the report folder and the CLI's errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from dreambooth_dora import UNET_ATTENTION_TARGETS, add_adapters
from dreambooth_dora.evaluation.analysis import PALETTE, LayerPoint, analyse, fit_line, scatter_plot, snapshots, weight_change
from dreambooth_dora.evaluation import clip_text, evaluate, load_eval_config
from dreambooth_dora.families import pipeline_models
from dreambooth_dora.families.models import load_pipeline
from dreambooth_dora.evaluation.metrics import pixel_mse, ssim
from dreambooth_dora.adapters.file import apply_to_models, load_adapter, read_adapter, save_adapter
from dreambooth_dora.outputs import ADAPTER_FILE
from dreambooth_dora.toy.tiny import build_tiny_pipeline, save_tiny_clip, save_tiny_vit


def _random_images(n, size, seed):
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    return [Image.fromarray(a) for a in base]


def test_ssim_and_mse_match_independent_references():
    from skimage.metrics import structural_similarity

    a = _random_images(3, 40, 0)
    # b: a blurred, shifted, noisy version of a (SSIM well inside (0, 1))
    b = [Image.fromarray(np.clip(np.roll(np.asarray(im, np.int16), 2, axis=1) // 2 + 60, 0, 255).astype(np.uint8))
         for im in a]
    ours = ssim(a, b)
    for k in range(3):
        x, y = np.asarray(a[k], np.float64) / 255, np.asarray(b[k], np.float64) / 255
        ref = structural_similarity(x, y, gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
                                    data_range=1.0, channel_axis=2)
        assert float(ours[k]) == pytest.approx(ref, abs=1e-9)
        assert float(pixel_mse([a[k]], [b[k]])[0]) == pytest.approx(((x - y) ** 2).mean(), abs=1e-12)
    assert torch.allclose(ssim(a, a), torch.ones(3, dtype=torch.float64))
    with pytest.raises(ValueError, match="at least 11x11"):
        ssim(_random_images(1, 8, 1), _random_images(1, 8, 2))


def test_fit_line_matches_numpy():
    rng = np.random.default_rng(0)
    x = rng.normal(size=50)
    y = -0.7 * x + 0.1 * rng.normal(size=50) + 2
    slope, intercept, r = fit_line(x, y)
    ref_slope, ref_intercept = np.polyfit(x, y, 1)
    assert slope == pytest.approx(ref_slope) and intercept == pytest.approx(ref_intercept)
    assert r == pytest.approx(np.corrcoef(x, y)[0, 1]) and r < -0.9
    assert np.isnan(fit_line([1.0, 1.0], [2.0, 3.0])[0])  # no spread in x: no slope


def test_clip_text_removes_only_the_identifier():
    assert clip_text("a sks icon, 3d render", "sks") == "a icon, 3d render"
    assert clip_text("a photo of sks dog", "sks") == "a photo of dog"
    assert clip_text("a sksx dog", "sks") == "a sksx dog"


def _row_change(w0: np.ndarray, w: np.ndarray) -> tuple[float, float]:
    """The paper's dM and dD written out row by row (the independent reference)."""
    dms, dds = [], []
    for r0, r1 in zip(w0.reshape(len(w0), -1), w.reshape(len(w), -1)):
        n0, n1 = np.sqrt((r0 * r0).sum()), np.sqrt((r1 * r1).sum())
        dms.append(abs(n1 - n0))
        dds.append(1 - (r0 * r1).sum() / (n0 * n1))
    return float(np.mean(dms)), float(np.mean(dds))


@pytest.mark.parametrize("method", ["dora", "lora"])
def test_weight_analysis_matches_peft_fused_weights_and_reads_checkpoints(adapters, tiny_sd_path, method):
    from diffusers import StableDiffusionPipeline

    folder = adapters[method]
    assert snapshots(folder) == [(2, folder / "checkpoint-2" / ADAPTER_FILE), (4, folder / ADAPTER_FILE)]
    models = pipeline_models(load_pipeline(str(tiny_sd_path)))
    apply_to_models(read_adapter(folder), models)
    points = analyse(models, method, folder, ["to_q", "q_proj"])
    assert {p.module.split(".")[0] for p in points} == {"unet", "text_encoder"}
    assert all(p.module.endswith(("to_q", "q_proj")) for p in points)

    # final step: PEFT's own merge (diffusers load_lora_weights + fuse_lora, exact for the UNet)
    base = StableDiffusionPipeline.from_pretrained(tiny_sd_path)
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd_path)
    pipe.load_lora_weights(folder)
    pipe.fuse_lora(components=["unet"])
    fused = dict(pipe.unet.named_modules())
    final = {p.module[len("unet."):]: p for p in points if p.step == 4 and p.module.startswith("unet.")}
    assert final
    for name, p in final.items():
        w0 = base.unet.get_submodule(name).weight.detach().double().numpy()
        layer = fused[name]
        w = getattr(layer, "base_layer", layer).weight.detach().double().numpy()
        dm, dd = _row_change(w0, w)
        assert p.dm == pytest.approx(dm, rel=1e-3, abs=1e-7) and p.dd == pytest.approx(dd, rel=1e-3, abs=1e-7)
        assert p.dd > 0

    # the checkpoint at step 2: for DoRA the trained row norm is the file's magnitude vector
    early = [p for p in points if p.step == 2]
    assert len(early) == len(points) // 2
    if method == "dora":
        ckpt = read_adapter(folder / "checkpoint-2").part("unet")
        for p in early:
            if p.module.startswith("unet."):
                name = p.module[len("unet."):]
                w0 = base.unet.get_submodule(name).weight.detach().double()
                m = ckpt[f"{name}.lora_magnitude_vector"].double()
                assert p.dm == pytest.approx(float((m - w0.norm(dim=1)).abs().mean()), rel=1e-5, abs=1e-9)
    assert any(a.dm != b.dm for a, b in zip(early, [p for p in points if p.step == 4]))


def test_weight_change_of_an_unchanged_layer_is_zero():
    w = torch.randn(6, 5)
    assert weight_change(w, w) == (0.0, pytest.approx(0.0, abs=1e-12))
    dm, dd = weight_change(w, 2 * w)  # pure magnitude change: no direction change
    assert dm == pytest.approx(float(w.norm(dim=1).mean())) and dd == pytest.approx(0.0, abs=1e-12)


def test_scatter_plot_draws_each_adapter_in_its_panel():
    pts = [LayerPoint("a", s, f"m{i}", 0.1 * i + s, 0.01 * i) for i in range(5) for s in (1, 2)]
    img = scatter_plot([("a", pts), ("b", [LayerPoint("b", 1, "m", 1.0, 0.5), LayerPoint("b", 1, "n", 2.0, 0.7)])])
    assert img.size == (600, 276)
    arr = np.asarray(img)
    for g in range(2):
        panel = arr[40:, g * 300:(g + 1) * 300].reshape(-1, 3)
        assert (panel == np.array(PALETTE[g])).all(axis=1).sum() > 20  # last-snapshot points and the line


@pytest.fixture(scope="module")
def feature_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("feature-models")
    return save_tiny_vit(root / "vit"), save_tiny_clip(root / "clip")


@pytest.fixture(scope="module")
def zero_adapter(tiny_sd_path, tmp_path_factory):
    """A LoRA whose B is zero (as initialised): it must not move a single pixel."""
    folder = tmp_path_factory.mktemp("zero")
    models = pipeline_models(load_pipeline(str(tiny_sd_path)))
    add_adapters(models["unet"], UNET_ATTENTION_TARGETS, rank=4, use_dora=False)
    save_adapter(folder, {"unet": models["unet"]}, {"base_model": str(tiny_sd_path), "instance_prompt": "a sks icon"})
    return folder


def test_evaluate_end_to_end(adapters, zero_adapter, tiny_sd_path, feature_models, icon_dir, tmp_path):
    from diffusers import StableDiffusionPipeline
    from transformers import AutoTokenizer, CLIPImageProcessor, CLIPModel

    vit, clip = feature_models
    out_dir = tmp_path / "report"
    cfg = load_eval_config([
        "--base_model", str(tiny_sd_path), "--adapters", f"{adapters['dora']},{adapters['lora']},zero={zero_adapter}",
        "--instance_data_dir", str(icon_dir), "--class_prompts", "a icon", "--unrelated_prompts", "a red cube|a dog",
        "--seeds", "0,1", "--images_per_prompt", "1", "--num_inference_steps", "2", "--guidance_scale", "7.5",
        "--dino_model", str(vit), "--clip_model", str(clip), "--output_dir", str(out_dir)])
    out, result = evaluate(cfg, progress=False)
    m = result["metrics"]
    assert out == out_dir and list(m) == ["base", "DoRA r4", "LoRA r4", "zero"]
    assert set(m["base"]) >= {"DINO-I", "CLIP-I", "CLIP-T", "class CLIP-T"} and "class MSE" not in m["base"]

    # a zero adapter reproduces the base pictures exactly: same seeds, same latents
    for kind in ("class", "unrelated"):
        assert m["zero"][f"{kind} MSE"]["mean"] == 0.0 and m["zero"][f"{kind} SSIM"]["mean"] == pytest.approx(1.0)
        assert m["zero"][f"{kind} DINO dist"]["mean"] == pytest.approx(0.0, abs=1e-9)
        assert m["DoRA r4"][f"{kind} MSE"]["mean"] > 1e-5 and m["DoRA r4"][f"{kind} SSIM"]["mean"] < 1
    assert m["zero"]["DINO-I"]["per_seed"] == pytest.approx(m["base"]["DINO-I"]["per_seed"], abs=1e-6)
    assert len(m["DoRA r4"]["DINO-I"]["per_seed"]) == 2

    # CLIP-T of the base picture (subject prompt, seed 1) from CLIPModel's own forward pass
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd_path)
    pipe.set_progress_bar_config(disable=True)
    kw = {"num_inference_steps": 2, "guidance_scale": 7.5, "width": 64, "height": 64}
    base_img = pipe("a sks icon", generator=torch.Generator("cpu").manual_seed(1), **kw).images[0]
    model, tok, proc = CLIPModel.from_pretrained(clip), AutoTokenizer.from_pretrained(clip), CLIPImageProcessor.from_pretrained(clip)
    with torch.no_grad():
        o = model(**tok(["a icon"], return_tensors="pt", padding=True), pixel_values=proc(images=[base_img], return_tensors="pt").pixel_values)
    assert m["base"]["CLIP-T"]["per_seed"][1] == pytest.approx(float(o.logits_per_image[0, 0] / model.logit_scale.detach().exp()), abs=1e-5)

    # prior drift of the DoRA adapter on the class prompt, seed 0, from a pipeline holding only it
    ref_base = pipe("a icon", generator=torch.Generator("cpu").manual_seed(0), **kw).images[0]
    load_adapter(pipe, adapters["dora"])
    ref_dora = pipe("a icon", generator=torch.Generator("cpu").manual_seed(0), **kw).images[0]
    mse = ((np.asarray(ref_dora, np.float64) - np.asarray(ref_base, np.float64)) / 255) ** 2
    assert m["DoRA r4"]["class MSE"]["per_seed"][0] == pytest.approx(mse.mean(), abs=1e-6)

    # the report folder
    text = (out / "report.md").read_text()
    for label in ("base", "DoRA r4", "LoRA r4", "zero"):
        assert f"| {label} |" in text
    assert "| model | DINO-I ↑ | CLIP-I ↑ | CLIP-T ↑ |" in text and "class MSE ↓" in text
    assert "slope dM/dD" in text and "![weight analysis](weight_analysis.png)" in text
    grid = Image.open(out / "grids" / "subject_00.png")
    assert 20 <= grid.size[1] - 2 * 256 <= 80 and grid.size[0] >= 4 * 256  # base + 3 adapters, 2 seeds; 128 px cells x2 + captions
    assert sorted(p.name for p in (out / "grids").iterdir()) == [
        "class_01.png", "subject_00.png", "unrelated_02.png", "unrelated_03.png"]
    cell = np.asarray(grid)[14:14 + 128, -3 * 128:-2 * 128]  # DoRA column, seed 0, upscaled
    assert not np.array_equal(cell, np.asarray(grid)[14:14 + 128, -4 * 128:-3 * 128])
    summaries = result["weight_analysis"]
    assert summaries["DoRA r4"]["snapshots"] == [2, 4] and summaries["zero"]["mean_dm"] == 0.0
    assert not list(tmp_path.glob(".report.tmp-*"))


def _cli(capsys, *argv):
    from dreambooth_dora.cli import main

    code = main(["evaluate", *argv])
    return code, capsys.readouterr().err.strip()


def test_evaluate_cli_errors_are_one_line(adapters, tiny_sd_path, icon_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    common = ["--base_model", str(tiny_sd_path), "--adapters", str(adapters["dora"]), "--output_dir", str(tmp_path / "o")]
    code, err = _cli(capsys, *common, "--instance_data_dir", str(tmp_path / "missing"))
    assert code == 2 and err.startswith("error:") and "\n" not in err and "missing" in err
    code, err = _cli(capsys, *common, "--instance_data_dir", str(icon_dir), "--seed", "3")
    assert code == 2 and "unknown setting 'seed'; did you mean seeds" in err
    code, err = _cli(capsys, *common, "--instance_data_dir", str(icon_dir), "--seeds", "a,b")
    assert code == 2 and "seeds must be a list of int" in err
    code, err = _cli(capsys, *common, "--instance_data_dir", str(icon_dir), "--seeds", "1,99999999999999999999")
    assert code == 2 and err == "error: seeds must be in [0, 4294967295], got 99999999999999999999"
    code, err = _cli(capsys, *common, "--instance_data_dir", str(icon_dir), "--dino_model", "facebook/dino-vits16")
    assert code == 2 and "\n" not in err and "cannot load the DINO model 'facebook/dino-vits16'" in err
    other = tmp_path / "wide"
    build_tiny_pipeline(cross_attention_dim=48).save_pretrained(other)
    code, err = _cli(capsys, "--base_model", str(other), "--adapters", str(adapters["dora"]), "--instance_data_dir",
                     str(icon_dir), "--dino_model", "none", "--clip_model", "none", "--output_dir", str(tmp_path / "o"))
    assert code == 2 and "\n" not in err and "does not fit this base model" in err
    code, err = _cli(capsys, *common, "--instance_data_dir", str(icon_dir), "--adapters", str(tmp_path))
    assert code == 2 and "no adapter file" in err
    assert not (tmp_path / "o").exists()

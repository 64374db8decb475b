"""Model families: detected once from the pipeline folder, and each answer checked against an
independent reference (the stock pipeline's own encoding and drawing, the DDPM formulas, kohya's
and A1111's names). Also: nothing outside `families/` asks which model it has."""

from __future__ import annotations

import ast
import json
import shutil
from pathlib import Path

import pytest
import torch

from dreambooth_dora.families import (ADAPTER_PARTS, FAMILIES, FamilyError, StableDiffusion, StableDiffusionXL,
                                      family_named, family_of, family_of_parts, family_of_pipeline, load_components)
from dreambooth_dora.families.models import resolve_model

REPO = Path(__file__).resolve().parents[1]
SD, SDXL = StableDiffusion(), StableDiffusionXL()


def _pipe(path):
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(str(path))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_detected_from_the_pipeline_folder(tiny_sd_path, tiny_sd2_path, tiny_sdxl_path, tiny_flux_path, tmp_path):
    assert family_of(str(tiny_sd_path)).name == "sd" and family_of(str(tiny_sd2_path)).name == "sd"
    assert family_of(str(tiny_flux_path)).name == "flux1"
    assert family_of(str(tiny_sdxl_path)).name == "sdxl"
    assert family_of(resolve_model("embedded:toy-world")).name == "sd"
    # another pipeline class of the same family: told by its parts
    other = tmp_path / "inpaint"
    shutil.copytree(tiny_sdxl_path, other)
    index = json.loads((other / "model_index.json").read_text())
    (other / "model_index.json").write_text(json.dumps({**index, "_class_name": "StableDiffusionXLInpaintPipeline"}))
    assert family_of(str(other)).name == "sdxl"
    # a model of no family we train: one line naming what it is
    (other / "model_index.json").write_text(json.dumps({"_class_name": "WanPipeline",
                                                        "transformer": ["diffusers", "WanTransformer3DModel"],
                                                        "text_encoder": ["transformers", "UMT5EncoderModel"]}))
    with pytest.raises(FamilyError, match="WanPipeline is of no model family"):
        family_of(str(other))


def test_named_and_from_parts():
    assert family_named("sd") is FAMILIES[-1] and family_named("sdxl") is FAMILIES[-2]
    with pytest.raises(FamilyError, match="unknown model family 'flux'"):
        family_named("flux")
    # files from before `architecture` was recorded
    assert family_of_parts({"unet", "text_encoder"}).name == "sd"
    assert family_of_parts({"unet", "text_encoder", "text_encoder_2"}).name == "sdxl"
    assert set(ADAPTER_PARTS) == {"unet", "text_encoder", "text_encoder_2", "transformer"}


def test_loaded_pipelines_and_their_parts(tiny_sd_path, tiny_sdxl_path):
    sd, xl = _pipe(tiny_sd_path), _pipe(tiny_sdxl_path)
    assert family_of_pipeline(sd) is family_named("sd") and family_of_pipeline(xl) is family_named("sdxl")
    assert list(SD.models(sd)) == ["unet", "text_encoder"]
    assert list(SDXL.models(xl)) == ["unet", "text_encoder", "text_encoder_2"]
    tokenizers, encoders = SDXL.text_parts(xl)
    assert tokenizers == [xl.tokenizer, xl.tokenizer_2] and encoders == [xl.text_encoder, xl.text_encoder_2]
    assert SD.native_size(sd) == sd.unet.config.sample_size * sd.vae_scale_factor
    parts = load_components(str(tiny_sdxl_path))
    assert len(parts.text_encoders) == 2 and type(parts.denoiser).__name__ == "UNet2DConditionModel"
    assert load_components(str(tiny_sd_path), prediction_type="v_prediction"
                           ).scheduler.config.prediction_type == "v_prediction"


@torch.no_grad()
def test_sd_prompts_equal_the_pipelines_own(tiny_sd_path):
    pipe = _pipe(tiny_sd_path)
    ours, pooled = SD.encode_prompts([pipe.tokenizer], [pipe.text_encoder], ["a sks icon", "a red ball"])
    stock = pipe.encode_prompt(["a sks icon", "a red ball"], "cpu", 1, False)[0]
    assert pooled is None and torch.equal(ours, stock)


@torch.no_grad()
def test_loss_inputs_follow_the_ddpm_formulas(tiny_sd_path):
    from diffusers import DDPMScheduler

    from dreambooth_dora.training.data import Batch

    unet = _pipe(tiny_sd_path).unet
    gen = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 4, 4, 4, generator=gen)
    noise, t = zip(*(SD.draw_noise(latents[i:i + 1], gen, 0.0, DDPMScheduler()) for i in range(2)))
    noise, t = torch.cat(noise), torch.tensor(t)
    # the draw: the noise and then the timestep from the example's own generator
    g = torch.Generator().manual_seed(0)
    torch.randn(2, 4, 4, 4, generator=g)
    n0 = torch.randn(1, 4, 4, 4, generator=g)
    assert torch.equal(noise[0:1], n0) and int(t[0]) == int(torch.randint(0, 1000, (1,), generator=g))
    batch = Batch(latents, noise, t, ["a", "b"], None, torch.zeros(2, 6), 0)
    cond = torch.randn(2, 77, unet.config.cross_attention_dim, generator=gen)
    for kind in ("epsilon", "v_prediction"):
        sched = DDPMScheduler(prediction_type=kind)
        pred, target, weights = SD.loss_inputs(unet, sched, batch, cond, None, 5.0)
        a = sched.alphas_cumprod[t].reshape(-1, 1, 1, 1)
        noisy = a.sqrt() * latents + (1 - a).sqrt() * noise  # x_t, by hand
        assert torch.allclose(pred, unet(noisy, t, cond).sample, atol=1e-6)
        want = noise if kind == "epsilon" else a.sqrt() * noise - (1 - a).sqrt() * latents
        assert torch.allclose(target, want, atol=1e-6)
        snr = a.flatten() / (1 - a.flatten())
        assert torch.allclose(weights, snr.clamp(max=5.0) / (snr if kind == "epsilon" else snr + 1))


def test_file_names_and_web_ui_metadata(tiny_sd_path, tiny_sd2_path, tiny_sdxl_path):
    assert SD.kohya_key("text_encoder", "text_model.encoder.layers.0.q_proj") == \
        "lora_te_text_model_encoder_layers_0_q_proj"
    assert SDXL.kohya_key("text_encoder", "a.b") == "lora_te1_a_b" and SDXL.kohya_key("text_encoder_2", "a") == \
        "lora_te2_a" and SDXL.kohya_key("unet", "x.y") == "lora_unet_x_y"
    versions = [family_of_pipeline(p).webui_metadata(p)["ss_base_model_version"]
                for p in map(_pipe, (tiny_sd_path, tiny_sd2_path, tiny_sdxl_path))]
    assert versions == ["sd_v1", "sd_v2", "sdxl_base_v1-0"]  # kohya's names A1111 files LoRAs under
    assert SD.embedding_keys == ("clip_l",) and SDXL.embedding_keys == ("clip_l", "clip_g")


@torch.no_grad()
@pytest.mark.parametrize("per_seed", [1, 2])
def test_same_latents_helper_draws_what_the_pipeline_draws(tiny_sd_path, per_seed):
    """The pictures from `seeded_latents` + `draw` equal the stock pipeline's own from the seed."""
    import numpy as np

    from dreambooth_dora.evaluation.drawing import draw, seeded_latents

    pipe = _pipe(tiny_sd_path)
    kw = dict(num_inference_steps=3, guidance_scale=5.0, width=32, height=32)
    stock = pipe("a sks icon", num_images_per_prompt=per_seed, generator=torch.Generator().manual_seed(7),
                 output_type="np", **kw).images
    latents, gens = seeded_latents(pipe, [7], per_seed, 32, 32)
    ours = draw(pipe, None, "a sks icon", latents, gens[0], output_type="np", **kw)
    assert np.array_equal(np.asarray(ours), stock)
    # several seeds in one batch: each its own generator, as the pipeline draws with a list of them
    stock = pipe("a sks icon", num_images_per_prompt=2, output_type="np",
                 generator=[torch.Generator().manual_seed(s) for s in (3, 4)], **kw).images
    latents, gens = seeded_latents(pipe, [3, 4], 1, 32, 32)
    assert np.array_equal(np.asarray(draw(pipe, None, "a sks icon", latents, gens, output_type="np", **kw)), stock)


def test_unknown_family_is_one_line_before_training(tmp_path, capsys, monkeypatch):
    from dreambooth_dora.cli import train_main

    monkeypatch.chdir(REPO)
    folder = tmp_path / "wan"
    folder.mkdir()
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "WanPipeline",
                                                         "transformer": ["diffusers", "WanTransformer3DModel"]}))
    assert train_main(["--pretrained_model_name_or_path", str(folder), "--instance_data_dir", "sample_data/3d_icon",
                       "--instance_prompt", "a sks icon", "--output_dir", str(tmp_path / "out")]) == 2
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(lines) == 1 and "WanPipeline is of no model family" in lines[0], lines
    assert not (tmp_path / "out").exists()


# ---- the seam holds: which-model questions are asked of the family --------------------------------

FAMILY_WORDS = {"sdxl", "text_encoder_2", "tokenizer_2", "StableDiffusionPipeline", "StableDiffusionXLPipeline",
                "clip_g", "lora_te1_", "lora_te2_", "lora_te_", "lora_unet_", "sd_v1", "sd_v2", "unet"}
# the consumers' own published rules for embedding files (A1111 / ComfyUI read clip_l / clip_g keys),
# and kohya's names while parsing any file: formats, not a question about the model in hand
FORMAT_RULES = {("formats/consumers.py", "clip_g"), ("formats/info.py", "clip_g"), ("adapters/pivotal.py", "clip_g")}


def family_questions(path: Path) -> list[str]:
    """Code (not docstrings or comments) in `path` that names a family's parts or tests the parts' count."""
    tree = ast.parse(path.read_text())
    docstrings = {id(n.body[0].value) for n in ast.walk(tree)
                  if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and n.body
                  and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            found += [f"{node.lineno}: {node.value!r}" for w in FAMILY_WORDS if node.value == w]
        elif isinstance(node, ast.Attribute) and node.attr in FAMILY_WORDS:
            found.append(f"{node.lineno}: .{node.attr}")
        elif isinstance(node, ast.Compare) and "len(text_encoders)" in ast.unparse(node):
            found.append(f"{node.lineno}: {ast.unparse(node)}")
    return found


def test_nothing_outside_families_asks_which_model_it_has():
    package = REPO / "dreambooth_dora"
    offenders = {}
    for path in [*package.rglob("*.py"), *(REPO / "app").rglob("*.py")]:
        rel = path.relative_to(package).as_posix() if path.is_relative_to(package) else path.as_posix()
        if rel.startswith(("families/", "toy/")):
            continue
        hits = [h for h in family_questions(path) if (rel, h.split("'")[1] if "'" in h else "") not in FORMAT_RULES]
        if hits:
            offenders[rel] = hits
    assert not offenders, offenders


def test_the_check_finds_a_family_test(tmp_path):
    """The seam check is not blind: the old way of telling SDXL apart is found."""
    probe = tmp_path / "probe.py"
    probe.write_text('"""text_encoder_2 in a docstring is fine."""\n'
                     'def f(models, text_encoders):\n    sdxl = "text_encoder_2" in models\n'
                     '    return len(text_encoders) == 2, pipe.tokenizer_2\n')
    assert [h.split(":")[0] for h in family_questions(probe)] == ["3", "4", "4"]

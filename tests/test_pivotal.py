"""Pivotal tuning: new tokens learned as textual-inversion embeddings with the adapter, checked
against stock diffusers (`load_lora_weights` + `load_textual_inversion`), the web UIs' published
loading rules, and an uninterrupted run."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from dreambooth_dora.adapters.file import AdapterError, load_adapter
from dreambooth_dora.training.config import ConfigError, load_config
from dreambooth_dora.formats.consumers import a1111_embedding, comfyui_embedding
from dreambooth_dora.adapters.pivotal import NewTokenEmbedding, insert_tokens, new_token_names
from dreambooth_dora.training.loop import train
from conftest import interrupt_at

REPO = Path(__file__).resolve().parents[1]
ICONS = str(REPO / "sample_data" / "3d_icon")
PROMPT = "a TOK icon"

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


def run(model, out, *extra):
    return train(load_config(["--pretrained_model_name_or_path", str(model), "--instance_data_dir", ICONS,
                              "--instance_prompt", PROMPT, "--resolution", "32", "--learning_rate", "3e-2",
                              "--max_train_steps", "4", "--output_dir", str(out), "--report_to", "none", "--seed", "2",
                              "--train_text_encoder_ti", "--validation_prompt", PROMPT, "--validation_steps", "4",
                              "--num_validation_images", "2", "--validation_inference_steps", "2",
                              "--checkpointing_steps", "1", *extra]))


def test_token_names_and_prompts():
    tokens = new_token_names(["TOK", "DOG"], 2)
    assert tokens == {"TOK": ["<s0>", "<s1>"], "DOG": ["<s2>", "<s3>"]}  # diffusers' numbering
    assert insert_tokens("a TOK icon with DOG", tokens) == "a <s0><s1> icon with <s2><s3>"


def test_lookup_equals_a_resized_table_and_only_new_rows_learn():
    base = torch.nn.Embedding(10, 4)
    new = torch.randn(2, 4)
    table = NewTokenEmbedding(base, new)
    resized = torch.nn.Embedding(12, 4)
    with torch.no_grad():
        resized.weight.copy_(torch.cat([base.weight, new]))
    ids = torch.tensor([[0, 10, 3, 11, 9]])
    assert torch.equal(table(ids), resized(ids))
    base.weight.requires_grad_(False)
    table(ids).sum().backward()
    assert table.new.grad is not None and base.weight.grad is None
    assert torch.equal(table.new.grad, torch.ones(2, 4))  # one use of each new row


def test_settings_are_checked(tmp_path):
    flags = ["--instance_data_dir", ICONS, "--instance_prompt", PROMPT, "--train_text_encoder_ti"]
    for extra, message in [(["--train_text_encoder"], "give only one of train_text_encoder"),
                           (["--token_abstraction", "T K"], "letters, digits"),
                           (["--token_abstraction", "TOK,TO"], "distinct and not part of another"),
                           (["--train_text_encoder_ti_frac", "0"], r"in \(0, 1\]"),
                           (["--num_new_tokens_per_abstraction", "0"], ">= 1")]:
        with pytest.raises(ConfigError, match=message):
            load_config(flags + extra)
    cfg = load_config(flags + ["--token_abstraction", "DOG", "--output_dir", str(tmp_path / "x")])
    with pytest.raises(ConfigError, match="'DOG' is in no caption"):
        train(cfg)  # before any model loads
    assert not (tmp_path / "x").exists()


def _grid_cells(path: Path, count: int, size: int) -> list[np.ndarray]:
    """The images of the validation grid's first row (the label column is on the left; cells
    enlarged by a whole factor, nearest neighbour, so every k-th pixel is the original)."""
    from dreambooth_dora.training.validation import cell_scale

    k = cell_scale((size, size))
    grid = np.asarray(Image.open(path).convert("RGB")).astype(int)
    left = grid.shape[1] - count * size * k
    return [grid[:size * k:k, left + j * size * k:left + (j + 1) * size * k:k] for j in range(count)]


def _draw(pipe, prompt, count=2):
    from diffusers import DPMSolverMultistepScheduler

    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    gens = [torch.Generator("cpu").manual_seed(2 + j) for j in range(count)]
    images = pipe(prompt, num_images_per_prompt=count, num_inference_steps=2, generator=gens, height=32, width=32,
                  guidance_scale=7.5).images
    return [np.asarray(im).astype(int) for im in images]


@pytest.fixture(scope="module")
def ti_run(tiny_sd_path, tmp_path_factory):
    out = tmp_path_factory.mktemp("ti") / "run"
    run(tiny_sd_path, out, "--train_text_encoder_ti_frac", "0.5")
    return out


def test_stock_loading_reproduces_the_validation_images(ti_run, tiny_sd_path):
    from diffusers import StableDiffusionPipeline

    emb = load_file(str(ti_run / "embeddings.safetensors"))
    assert set(emb) == {"clip_l"} and emb["clip_l"].shape == (2, 32)
    stock = StableDiffusionPipeline.from_pretrained(tiny_sd_path)
    base_table = stock.text_encoder.get_input_embeddings().weight.detach().clone()
    stock.load_lora_weights(str(ti_run))
    stock.load_textual_inversion(emb["clip_l"], token=["<s0>", "<s1>"], text_encoder=stock.text_encoder,
                                 tokenizer=stock.tokenizer)
    # the base rows untouched, the new ones appended
    table = stock.text_encoder.get_input_embeddings().weight.detach()
    assert torch.equal(table[:len(base_table)], base_table) and torch.equal(table[len(base_table):], emb["clip_l"])
    stock_images = _draw(stock, "a <s0><s1> icon")
    cells = _grid_cells(ti_run / "validation" / "step-000004.png", 2, 32)
    assert max(np.abs(a - b).max() for a, b in zip(stock_images, cells)) <= 2  # uint8 rounding at most

    ours = StableDiffusionPipeline.from_pretrained(tiny_sd_path)
    report = load_adapter(ours, ti_run)
    assert report["tokens"] == {"TOK": ["<s0>", "<s1>"]}
    mine = _draw(ours, insert_tokens(PROMPT, report["tokens"]))
    assert all(np.array_equal(a, b) for a, b in zip(mine, stock_images))
    # a second adapter with the same token names gets its own (the names would collide)
    again = load_adapter(ours, ti_run, adapter_name="second")
    assert again["tokens"] == {"TOK": ["<second_s0>", "<second_s1>"]}
    without_tokens = _draw(StableDiffusionPipeline.from_pretrained(tiny_sd_path), PROMPT)
    assert max(np.abs(a - b).max() for a, b in zip(without_tokens, stock_images)) > 2  # the tokens matter


def test_rows_train_until_the_pivot_then_freeze(ti_run):
    # max_train_steps 4, frac 0.5: the rows change at steps 1 and 2, never after
    rows = {s: load_file(str(ti_run / f"checkpoint-{s}" / "embeddings.safetensors"))["clip_l"] for s in (1, 2, 3)}
    final = load_file(str(ti_run / "embeddings.safetensors"))["clip_l"]
    assert not torch.equal(rows[1], rows[2])
    assert torch.equal(rows[2], rows[3]) and torch.equal(rows[3], final)
    adapter = load_file(str(ti_run / "pytorch_lora_weights.safetensors"))
    assert not any(k.startswith("text_encoder") for k in adapter)  # the encoder itself carries no adapter


def test_webui_files_load_under_the_consumers_rules(ti_run):
    final = load_file(str(ti_run / "embeddings.safetensors"))["clip_l"]
    webui = load_file(str(ti_run / "webui_embeddings" / "TOK.safetensors"))
    assert set(webui) == {"emb_params"}
    assert torch.equal(a1111_embedding(webui)["clip_l"], final)
    assert torch.equal(comfyui_embedding(webui, "clip_l", 32), final)
    card = (ti_run / "README.md").read_text()
    assert "<s0><s1>" in card and "webui_embeddings/TOK.safetensors" in card and "| options | none |" in card
    from dreambooth_dora.formats.info import file_info

    assert "new tokens (pivotal tuning): TOK=<s0><s1>; vectors in embeddings.safetensors beside it" in \
        file_info(ti_run).notes


def test_missing_embeddings_file_is_one_line(ti_run, tiny_sd_path, tmp_path):
    import shutil

    from diffusers import StableDiffusionPipeline

    copy = tmp_path / "copy"
    copy.mkdir()
    shutil.copy(ti_run / "pytorch_lora_weights.safetensors", copy)
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd_path)
    with pytest.raises(AdapterError, match="embeddings.safetensors is missing"):
        load_adapter(pipe, copy)
    assert not getattr(pipe.unet, "peft_config", None)  # checked before anything loaded


def test_resume_equals_uninterrupted_with_pivotal_tuning(ti_run, tiny_sd_path, tmp_path, monkeypatch):
    import dreambooth_dora.training.loop as train_module

    interrupt_at(monkeypatch, train_module, 2)  # killed during step 2, before the pivot
    with pytest.raises(KeyboardInterrupt):
        run(tiny_sd_path, tmp_path / "resumed", "--train_text_encoder_ti_frac", "0.5")
    monkeypatch.undo()
    run(tiny_sd_path, tmp_path / "resumed", "--train_text_encoder_ti_frac", "0.5", "--resume_from_checkpoint", "latest")
    for name in ("pytorch_lora_weights.safetensors", "embeddings.safetensors"):
        full, resumed = load_file(str(ti_run / name)), load_file(str(tmp_path / "resumed" / name))
        assert full.keys() == resumed.keys() and all(torch.equal(full[k], resumed[k]) for k in full), name


def test_sdxl_pivotal_tuning_both_encoders(tiny_sdxl_path, tmp_path):
    from diffusers import StableDiffusionXLPipeline

    out = tmp_path / "xl"
    run(tiny_sdxl_path, out, "--initializer_concept", "icon", "--num_new_tokens_per_abstraction", "3",
        "--checkpointing_steps", "10")
    emb = load_file(str(out / "embeddings.safetensors"))
    stock = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_path)
    widths = [stock.text_encoder.get_input_embeddings().weight.shape[1],
              stock.text_encoder_2.get_input_embeddings().weight.shape[1]]
    assert emb["clip_l"].shape == (3, widths[0]) and emb["clip_g"].shape == (3, widths[1])
    webui = load_file(str(out / "webui_embeddings" / "TOK.safetensors"))
    assert a1111_embedding(webui) == {"clip_l": webui["clip_l"], "clip_g": webui["clip_g"]}
    assert torch.equal(comfyui_embedding(webui, "clip_g", widths[1]), emb["clip_g"])
    names = ["<s0>", "<s1>", "<s2>"]
    stock.load_lora_weights(str(out))
    stock.load_textual_inversion(emb["clip_l"], token=names, text_encoder=stock.text_encoder, tokenizer=stock.tokenizer)
    stock.load_textual_inversion(emb["clip_g"], token=names, text_encoder=stock.text_encoder_2,
                                 tokenizer=stock.tokenizer_2)
    stock_images = _draw(stock, "a <s0><s1><s2> icon")
    cells = _grid_cells(out / "validation" / "step-000004.png", 2, 32)
    assert max(np.abs(a - b).max() for a, b in zip(stock_images, cells)) <= 2
    ours = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_path)
    report = load_adapter(ours, out)
    assert all(np.array_equal(a, b) for a, b in zip(_draw(ours, insert_tokens(PROMPT, report["tokens"])),
                                                     stock_images))


def test_exports_carry_the_tokens(ti_run, tiny_sd_path, tmp_path):
    from diffusers import StableDiffusionPipeline

    from dreambooth_dora.formats.consumers import a1111_bundled_embeddings, read_kohya_modules
    from dreambooth_dora.formats.export import export_full, export_fused, export_kohya
    from dreambooth_dora.formats.info import file_info

    trained = load_file(str(ti_run / "embeddings.safetensors"))["clip_l"]
    fused = export_fused(ti_run, tmp_path / "fused")
    assert (fused / "tokens.json").read_text().count("<s0>") == 1
    pipe = StableDiffusionPipeline.from_pretrained(fused)  # the tokens are part of the saved pipeline
    table = pipe.text_encoder.get_input_embeddings().weight.detach()
    assert torch.equal(table[pipe.tokenizer.convert_tokens_to_ids(["<s0>", "<s1>"])], trained)
    stock = StableDiffusionPipeline.from_pretrained(tiny_sd_path)
    load_adapter(stock, ti_run)
    merged, exact = _draw(pipe, "a <s0><s1> icon"), _draw(stock, "a <s0><s1> icon")
    assert max(np.abs(a - b).max() for a, b in zip(merged, exact)) <= 2
    assert any("new tokens" in n for n in file_info(fused).notes)

    for export in (export_kohya, export_full):
        file = export(ti_run, tmp_path / f"{export.__name__}.safetensors")
        tensors = load_file(str(file))
        bundled = a1111_bundled_embeddings(tensors)  # A1111's reading of the LoRA file
        assert list(bundled) == ["TOK"] and torch.equal(a1111_embedding(bundled["TOK"])["clip_l"], trained)
        assert "bundle_emb" not in read_kohya_modules(tensors)  # not mistaken for a module
        info = file_info(file)
        assert "other" not in info.method and any("bundled embeddings" in n and "TOK (2 vectors)" in n
                                                  for n in info.notes)


def test_app_and_evaluate_write_the_tokens_into_prompts(ti_run, tiny_sd_path, tmp_path, monkeypatch):
    from diffusers import StableDiffusionPipeline

    from app.core import Comparison
    from dreambooth_dora.evaluation import evaluate, load_eval_config

    comp = Comparison(str(tiny_sd_path), device="cpu")
    comp.load("dora", ti_run)
    assert "tokens TOK=<s0><s1>" in comp.captions()["dora"]
    by_identifier = comp.generate(PROMPT, steps=2, seed=1, columns=("dora",))["dora"][0][0]
    by_tokens = comp.generate("a <s0><s1> icon", steps=2, seed=1, columns=("dora",))["dora"][0][0]
    assert np.array_equal(np.asarray(by_identifier), np.asarray(by_tokens))
    comp.load("dora", ti_run)  # loaded again: the names are taken, the column gets its own
    assert "<dora_2_s0>" in comp.captions()["dora"]
    again = comp.generate(PROMPT, steps=2, seed=1, columns=("dora",))["dora"][0][0]
    assert np.array_equal(np.asarray(again), np.asarray(by_identifier))
    labels = comp.add_run(ti_run, "ti")  # checkpoints bring the tokens they had at their step
    assert labels == ["ti step 1", "ti step 2", "ti step 3", "ti step 4"]
    assert all("tokens TOK=<" in comp.captions()[label] for label in labels)
    final = comp.generate(PROMPT, steps=2, seed=1, columns=("ti step 4",))["ti step 4"][0][0]
    assert np.array_equal(np.asarray(final), np.asarray(by_identifier))

    seen = []
    real = StableDiffusionPipeline.__call__

    def spy(self, prompt=None, *args, **kwargs):
        seen.append(prompt)
        return real(self, prompt, *args, **kwargs)

    monkeypatch.setattr(StableDiffusionPipeline, "__call__", spy)
    cfg = load_eval_config(["--base_model", str(tiny_sd_path), "--adapters", str(ti_run), "--instance_data_dir", ICONS,
                            "--class_prompts", "an icon", "--seeds", "0", "--images_per_prompt", "1",
                            "--num_inference_steps", "2", "--dino_model", "none", "--clip_model", "none",
                            "--output_dir", str(tmp_path / "eval")])
    evaluate(cfg, progress=False)
    assert seen.count(PROMPT) == 1 and seen.count("a <s0><s1> icon") == 1  # base as written, the adapter with tokens


def test_model_card_code_runs_with_the_tokens(ti_run):
    import re

    card = (ti_run / "README.md").read_text()
    code = re.search(r"```python\n(.*?)```", card, re.S).group(1)
    assert "insert_tokens('a TOK icon', report['tokens'])" in code
    namespace = {}
    exec(code, namespace)  # the card's own code, as a user pastes it
    assert namespace["report"]["tokens"] == {"TOK": ["<s0>", "<s1>"]} and namespace["image"].size == (64, 64)  # the model's own size


@pytest.mark.parametrize("recipe", ["sd15_3d_icon_pivotal_dora.yaml", "sdxl_3d_icon_pivotal_dora.yaml"])
def test_pivotal_recipes_run_on_local_models_in_bf16(recipe, tiny_sd_path, tiny_sdxl_path, tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    model = tiny_sdxl_path if recipe.startswith("sdxl") else tiny_sd_path
    cfg = load_config(["--config", f"train_configs/{recipe}", "--pretrained_model_name_or_path", str(model),
                       *(["--pretrained_vae_model_name_or_path", str(model)] if recipe.startswith("sdxl") else []),
                       "--resolution", "64", "--max_train_steps", "2", "--mixed_precision", "bf16",
                       "--num_class_images", "2", "--class_data_dir", str(tmp_path / "class"),
                       "--output_dir", str(tmp_path / "out"), "--validation_steps", "2", "--num_validation_images",
                       "1", "--validation_inference_steps", "2", "--gradient_accumulation_steps", "1",
                       "--report_to", "none"])
    assert cfg.train_text_encoder_ti and not cfg.train_text_encoder and cfg.initializer_concept
    train(cfg)
    emb = load_file(str(tmp_path / "out" / "embeddings.safetensors"))
    assert set(emb) == ({"clip_l", "clip_g"} if recipe.startswith("sdxl") else {"clip_l"})
    assert all(v.shape[0] == 2 and torch.isfinite(v).all() for v in emb.values())
    assert (tmp_path / "out" / "validation" / "step-000002.png").is_file()


@pytest.mark.parametrize("family, t5", [("flux1", False), ("flux1", True), ("sd3", True)])
def test_dit_pivotal_tuning_stock_loading_reproduces_validation(family, t5, tiny_flux_path, tiny_sd3_path, tiny_sd_path,
                                                                tmp_path, capsys):
    """FLUX.1 (CLIP-L rows) and SD 3 (CLIP-L + CLIP-G rows), with `--enable_t5_ti` T5's rows too
    (the tiny T5, like T5-XXL, has table rows past its tokenizer: the new ids follow the tokenizer's);
    without it T5 reads the new tokens as text, its states encoded once. Stock `load_lora_weights`
    plus the model card's embedding lines draw the validation grid's pictures; `load_adapter` the
    same; each encoder's rows matter."""
    from diffusers import FluxPipeline, StableDiffusion3Pipeline

    model, cls = (tiny_flux_path, FluxPipeline) if family == "flux1" else (tiny_sd3_path, StableDiffusion3Pipeline)
    out = tmp_path / family
    run(model, out, "--resolution", "32", "--max_sequence_length", "16", "--validation_inference_steps", "2",
        "--checkpointing_steps", "10", *(["--enable_t5_ti"] if t5 else []))
    emb = load_file(str(out / "embeddings.safetensors"))
    clips = {"clip_l"} if family == "flux1" else {"clip_l", "clip_g"}
    assert set(emb) == clips | ({"t5"} if t5 else set())
    lines = [line for line in (out / "README.md").read_text().split("`") if "emb[" in line]  # the card's code
    assert len(lines) == len(emb)

    def draw(pipe, prompt):
        pipe.set_progress_bar_config(disable=True)
        gens = [torch.Generator("cpu").manual_seed(2 + j) for j in range(2)]
        images = pipe(prompt, num_images_per_prompt=2, num_inference_steps=2, generator=gens, height=32, width=32,
                      max_sequence_length=16, guidance_scale=3.5 if family == "flux1" else 7.0).images  # validation's
        return [np.asarray(im).astype(int) for im in images]

    def stock(keys):
        pipe = cls.from_pretrained(model)
        pipe.load_lora_weights(str(out))
        for line in lines:
            if line.split('emb["')[1].split('"')[0] in keys:
                exec(line, {"pipe": pipe, "emb": emb})
        return draw(pipe, "a <s0><s1> icon")

    stock_images = stock(set(emb))
    cells = _grid_cells(out / "validation" / "step-000004.png", 2, 32)
    assert max(np.abs(a - b).max() for a, b in zip(stock_images, cells)) <= 2
    ours = cls.from_pretrained(model)
    report = load_adapter(ours, out)
    assert all(np.array_equal(a, b) for a, b in zip(draw(ours, insert_tokens(PROMPT, report["tokens"])), stock_images))
    assert max(np.abs(a - b).max() for a, b in zip(stock(clips - {"clip_l"}), stock_images)) > 2  # CLIP-L's rows matter
    if t5:
        assert max(np.abs(a - b).max() for a, b in zip(stock(clips), stock_images)) > 2  # and T5's
        t5_model = ours.text_encoder_2 if family == "flux1" else ours.text_encoder_3
        tokenizer = ours.tokenizer_2 if family == "flux1" else ours.tokenizer_3
        assert tokenizer.convert_tokens_to_ids(["<s0>"]) == [len(tokenizer) - 2] < [t5_model.config.vocab_size]
        return
    with pytest.raises(ConfigError, match="enable_t5_ti needs train_text_encoder_ti"):
        load_config(["--instance_data_dir", ICONS, "--instance_prompt", PROMPT, "--enable_t5_ti"])
    from dreambooth_dora.cli import train_main

    capsys.readouterr()
    assert train_main(["--pretrained_model_name_or_path", str(tiny_sd_path), "--instance_data_dir", ICONS,
                       "--instance_prompt", PROMPT, "--train_text_encoder_ti", "--enable_t5_ti", "--output_dir",
                       str(tmp_path / "t5")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "has no T5 text encoder" in err[0] and not (tmp_path / "t5").exists()

"""The trainer end to end on the tiny pipeline: features, resume, bad input, several processes."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from dreambooth_dora import add_adapters, load_adapter_state_dict
from dreambooth_dora.training.config import ConfigError, load_config
from dreambooth_dora.training.prior import count_images, ensure_class_images
from dreambooth_dora.families import load_components
from dreambooth_dora.training.loop import TrainingError, train

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """Each run builds its own Accelerator; forget the previous one's singletons."""
    from accelerate.state import AcceleratorState, GradientState

    yield
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def run(tmp_path, model, data, *flags, name="run"):
    cfg = load_config(["--pretrained_model_name_or_path", str(model), "--instance_data_dir", str(data),
                       "--instance_prompt", "a sks icon", "--resolution", "64", "--learning_rate", "1e-2",
                       "--output_dir", str(tmp_path / name), "--report_to", "none", "--seed", "3", *flags])
    return train(cfg)


def read_adapter(path):
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


def unet_output(model_path, tensors=None, rank=4, dora=True):
    unet = load_components(str(model_path)).denoiser
    if tensors is not None:
        add_adapters(unet, ["to_q", "to_k", "to_v", "to_out.0"], rank=rank, use_dora=dora)
        load_adapter_state_dict(unet, {k[5:]: v for k, v in tensors.items() if k.startswith("unet.")})
    g = torch.Generator().manual_seed(0)
    x, cond = torch.randn(1, 4, 32, 32, generator=g), torch.randn(1, 77, 32, generator=g)
    with torch.no_grad():
        return unet(x, torch.tensor([500]), cond).sample


@pytest.mark.parametrize("dora", [True, False], ids=["dora", "lora"])
def test_prior_preservation_and_text_encoder_training(tmp_path, tiny_sd_path, icon_dir, dora):
    class_dir = tmp_path / "class"
    path = run(tmp_path, tiny_sd_path, icon_dir, "--use_dora", str(dora).lower(), "--train_text_encoder",
               "--with_prior_preservation", "--class_data_dir", str(class_dir), "--class_prompt", "an icon",
               "--num_class_images", "3", "--sample_batch_size", "2", "--max_train_steps", "4",
               "--text_encoder_lr", "5e-3", "--validation_prompt", "a sks icon|a red cube, 3d",
               "--num_validation_images", "2", "--validation_steps", "2", "--validation_inference_steps", "2",
               "--report_to", "tensorboard", "--snr_gamma", "5", "--noise_offset", "0.05")
    assert count_images(class_dir) == 3
    tensors, meta = read_adapter(path)
    assert any(k.startswith("text_encoder.") and k.endswith("q_proj.lora_B.weight") for k in tensors)
    assert any(k.endswith("lora_magnitude_vector") for k in tensors) == dora
    info = json.loads(meta["dreambooth_dora"])
    assert info["steps"] == 4 and np.isfinite(info["final_loss"]) and info["method"] == ("dora" if dora else "lora")
    assert (unet_output(tiny_sd_path, tensors, dora=dora) - unet_output(tiny_sd_path)).abs().max() > 1e-4
    out = path.parent
    grids = sorted((out / "validation").glob("*.png"))
    assert [g.name for g in grids] == ["step-000002.png", "step-000004.png"]
    assert Image.open(grids[0]).size[1] == 2 * 64 * 4  # two prompts, one row each (64 px cells enlarged 4x)
    events = list((out / "logs").rglob("events.out.tfevents*"))
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(events[0].parent))
    acc.Reload()
    assert {"loss", "lr", "loss_prior"} <= set(acc.Tags()["scalars"]) and acc.Tags()["images"]
    card = (out / "README.md").read_text()
    assert ("DoRA" if dora else "LoRA") in card and "an icon" in card
    assert json.loads((out / "train_config.json").read_text())["use_dora"] is dora


def test_class_images_are_generated_once_and_topped_up(tmp_path, tiny_sd_path):
    folder = tmp_path / "class"
    assert ensure_class_images(folder, "a cube", 3, str(tiny_sd_path), sample_batch_size=2,
                               num_inference_steps=2, show_progress=False) == 3
    files = sorted(folder.iterdir())
    stamps = {p.name: p.stat().st_mtime_ns for p in files}
    assert ensure_class_images(folder, "a cube", 3, str(tiny_sd_path), num_inference_steps=2) == 0
    files[0].unlink()
    assert ensure_class_images(folder, "a cube", 3, str(tiny_sd_path), num_inference_steps=2,
                               show_progress=False) == 1
    assert all(p.stat().st_mtime_ns == stamps[p.name] for p in files[1:])  # kept, not rewritten
    assert not list(folder.glob("*.tmp"))


def test_resumed_run_ends_with_the_same_adapter(tmp_path, tiny_sd_path, icon_dir, monkeypatch):
    flags = ["--max_train_steps", "6", "--checkpointing_steps", "1", "--checkpoints_total_limit", "2",
             "--train_batch_size", "2", "--random_flip", "--lr_scheduler", "cosine", "--train_text_encoder"]
    full, _ = read_adapter(run(tmp_path, tiny_sd_path, icon_dir, *flags, name="full"))
    import dreambooth_dora.training.loop as train_module

    calls = {"n": 0}
    real_loss = train_module.diffusion_loss

    def interrupted(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:  # in step 5, after the step-4 checkpoint
            raise KeyboardInterrupt
        return real_loss(*args, **kwargs)

    monkeypatch.setattr(train_module, "diffusion_loss", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path, tiny_sd_path, icon_dir, *flags, name="resumed")
    monkeypatch.setattr(train_module, "diffusion_loss", real_loss)
    out = tmp_path / "resumed"
    # checkpoints 1..4 were written, the limit kept the newest two
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("checkpoint")) == ["checkpoint-3", "checkpoint-4"]
    assert not (out / "pytorch_lora_weights.safetensors").exists()  # nothing half-written
    resumed, _ = read_adapter(run(tmp_path, tiny_sd_path, icon_dir, *flags, "--resume_from_checkpoint", "latest",
                                  name="resumed"))
    assert full.keys() == resumed.keys()
    for k in full:
        assert torch.allclose(full[k], resumed[k], atol=1e-6), k


def test_cached_latents_stay_paired_with_their_images(tmp_path, tiny_sd_path):
    """Distinct images with distinct captions, shuffled batches: the cached run must train on the
    same (latent, caption) pairs as the uncached one, so the adapters agree."""
    data = tmp_path / "data"
    data.mkdir()
    rows = []
    for i, colour in enumerate(["red", "green", "blue", "yellow"]):
        Image.new("RGB", (64, 64), colour).save(data / f"{i}.png")
        rows.append({"file_name": f"{i}.png", "text": f"a {colour} sks cube"})
    (data / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    flags = ["--caption_column", "text", "--center_crop", "--random_flip", "--max_train_steps", "6",
             "--train_batch_size", "2"]
    plain, _ = read_adapter(run(tmp_path, tiny_sd_path, data, *flags, name="plain"))
    cached, _ = read_adapter(run(tmp_path, tiny_sd_path, data, *flags, "--cache_latents", name="cached"))
    for k in plain:
        assert torch.allclose(plain[k], cached[k], atol=1e-5), k
    swapped = tmp_path / "swapped"  # the same captions on other images: a different model
    swapped.mkdir()
    for i, colour in enumerate(["green", "red", "yellow", "blue"]):
        Image.new("RGB", (64, 64), colour).save(swapped / f"{i}.png")
    (swapped / "metadata.jsonl").write_text((data / "metadata.jsonl").read_text())
    other, _ = read_adapter(run(tmp_path, tiny_sd_path, swapped, *flags, "--cache_latents", name="other"))
    assert max((other[k] - plain[k]).abs().max() for k in plain) > 1e-4


def test_v_prediction_and_gradient_checkpointing(tmp_path, tiny_sd_path, icon_dir):
    flags = ["--prediction_type", "v_prediction", "--max_train_steps", "2"]
    a, meta = read_adapter(run(tmp_path, tiny_sd_path, icon_dir, *flags, name="a"))
    b, _ = read_adapter(run(tmp_path, tiny_sd_path, icon_dir, *flags, "--gradient_checkpointing", name="b"))
    assert np.isfinite(json.loads(meta["dreambooth_dora"])["final_loss"])
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6), k
    c, _ = read_adapter(run(tmp_path, tiny_sd_path, icon_dir, "--max_train_steps", "2", name="c"))
    assert max((a[k] - c[k]).abs().max() for k in a) > 1e-6  # epsilon and v targets train differently


def test_prodigy_and_missing_8bit_adam(tmp_path, tiny_sd_path, icon_dir):
    tensors, _ = read_adapter(run(tmp_path, tiny_sd_path, icon_dir, "--optimizer", "prodigy", "--learning_rate", "1",
                                  "--max_train_steps", "2", name="prodigy"))
    assert all(torch.isfinite(v).all() for v in tensors.values())
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        with pytest.raises(ConfigError, match="use_8bit_adam needs bitsandbytes"):
            run(tmp_path, tiny_sd_path, icon_dir, "--use_8bit_adam", "--max_train_steps", "1", name="bnb")


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, tiny_sd_path, icon_dir):
    # warm-up makes step 1 a no-op (lr 0); then lr 1e30 blows the adapter up
    with pytest.raises(TrainingError, match=r"NaN/inf at step \d+; stopped, the last good checkpoint is ") as err:
        run(tmp_path, tiny_sd_path, icon_dir, "--learning_rate", "1e30", "--lr_scheduler", "constant_with_warmup",
            "--lr_warmup_steps", "1", "--max_train_steps", "6", "--checkpointing_steps", "1",
            "--max_grad_norm", "0", name="nan")
    out = tmp_path / "nan"
    assert not (out / "pytorch_lora_weights.safetensors").exists()
    named = Path(str(err.value).split("checkpoint is ")[1].split(";")[0])
    assert named.parent == out and named.name.startswith("checkpoint-")
    good = load_file(str(named / "pytorch_lora_weights.safetensors"))
    assert all(torch.isfinite(v).all() for v in good.values())
    assert (out / "checkpoint-1").is_dir()  # earlier checkpoints are kept too


def test_text_encoder_dora_in_fp16_stays_finite(tiny_pipeline):
    te = tiny_pipeline.text_encoder.half()
    add_adapters(te, ["q_proj", "k_proj", "v_proj", "out_proj"], rank=4)
    ids = tiny_pipeline.tokenizer(["a photo of sks dog"], padding="max_length", max_length=77,
                                  return_tensors="pt").input_ids
    out = te(ids)[0]
    assert out.dtype == torch.float16 and torch.isfinite(out).all()
    out.float().square().mean().backward()
    grads = [p.grad for n, p in te.named_parameters() if p.requires_grad]
    assert grads and all(g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)


def cli(*args, cwd=None):
    return subprocess.run([sys.executable, str(REPO / "train_dreambooth_dora.py"), *map(str, args)],
                          capture_output=True, text=True, cwd=cwd, env={**os.environ, "PYTHONWARNINGS": "ignore"})


def test_cli_reports_bad_input_in_one_line(tmp_path, icon_dir, capsys, monkeypatch):
    empty = tmp_path / "empty"
    empty.mkdir()
    proc = cli("--instance_data_dir", empty, "--instance_prompt", "x", cwd=tmp_path)  # the script, as users run it
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1].startswith("error: image folder")
    assert "Traceback" not in proc.stderr
    from dreambooth_dora.cli import train_main  # the same entry point in-process (no new interpreter)

    assert train_main(["--rnak", "3"]) == 2
    assert capsys.readouterr().err.strip() == "error: unknown setting 'rnak'; did you mean rank?"
    monkeypatch.chdir(tmp_path)
    assert train_main(list(map(str, ["--instance_data_dir", icon_dir, "--instance_prompt", "x",
                                     "--pretrained_model_name_or_path", tmp_path / "no-model"]))) == 2
    said = capsys.readouterr().err.strip().splitlines()[-1]  # a path that is not there: said so, no hub look-up
    assert said.startswith("error: cannot load model") and "no such folder" in said, said
    assert train_main(list(map(str, ["--instance_data_dir", icon_dir, "--instance_prompt", "x",
                                     "--with_prior_preservation", "--class_data_dir", tmp_path / "c"]))) == 2
    assert "needs class_prompt" in capsys.readouterr().err


@pytest.mark.slow
def test_two_processes_train_like_one_with_the_same_global_batch(tmp_path, tiny_sd_path, icon_dir):
    """Pivotal tuning's new rows (averaged by hand) with aspect buckets on non-square pictures
    (each global batch one bucket). Text-encoder LoRA/DoRA under DDP (the same wrapping for every
    family): tests/test_dit_options.py's two-process test, CLIP adapters included."""
    text = ["--train_text_encoder_ti", "--token_abstraction", "sks", "--aspect_buckets", "--bucket_step", "16"]
    if "--aspect_buckets" in text:
        from PIL import Image

        folder = tmp_path / "mixed"
        folder.mkdir()
        for i, (p, size) in enumerate(zip(sorted(icon_dir.glob("*.png")), [(96, 64), (64, 96), (96, 64), (72, 72)])):
            Image.open(p).convert("RGB").resize(size).save(folder / f"{i}.png")
        icon_dir = folder
    common = ["--pretrained_model_name_or_path", tiny_sd_path, "--instance_data_dir", icon_dir,
              "--instance_prompt", "a sks icon", "--resolution", "64", "--random_flip", "--learning_rate", "1e-2",
              "--max_train_steps", "3", "--report_to", "none", *text, "--seed", "0"]
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29533",
              str(REPO / "train_dreambooth_dora.py")]
    two = subprocess.run([*launch, *map(str, common), "--train_batch_size", "1", "--output_dir", tmp_path / "two"],
                         capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-2000:]
    assert "processes: 2" in two.stdout + two.stderr
    from accelerate.state import AcceleratorState, GradientState

    try:  # one process, in this one (a second interpreter start would add nothing but seconds)
        train(load_config([*map(str, common), "--train_batch_size", "2", "--output_dir", str(tmp_path / "one")]))
    finally:
        AcceleratorState._reset_state(True)
        GradientState._reset_state()
    a = load_file(str(tmp_path / "one" / "pytorch_lora_weights.safetensors"))
    b = load_file(str(tmp_path / "two" / "pytorch_lora_weights.safetensors"))
    if "--train_text_encoder_ti" in text:
        ea, eb = (load_file(str(tmp_path / n / "embeddings.safetensors"))["clip_l"] for n in ("one", "two"))
        from transformers import CLIPTextModel

        table = CLIPTextModel.from_pretrained(tiny_sd_path, subfolder="text_encoder").get_input_embeddings().weight
        start = torch.randn(2, table.shape[1], generator=torch.Generator().manual_seed(0)) * table.detach().std()
        assert (ea - eb).abs().max() <= 2e-4 < (ea - start).abs().max()  # equal, and trained from the start
    assert a.keys() == b.keys()
    # the same gradients up to summation order (DDP averages two halves); Adam's first steps
    # (about lr x sign(g)) magnify that only for entries whose gradient is ~0
    worst = max((a[k] - b[k]).abs().max() for k in a)
    if "--aspect_buckets" in text:  # measured: 2 of 9,216 entries above 1e-4 (max 3e-4), B up to 3e-2
        assert worst <= 1e-3 and sum(int(((a[k] - b[k]).abs() > 1e-4).sum()) for k in a) <= 10
    else:
        assert worst <= 2e-4
    assert max(v.abs().max() for k, v in a.items() if "lora_B" in k) > 5e-3  # it did train


def test_sd15_recipe_runs_on_a_local_model_in_bf16(tmp_path, tiny_sd_path, monkeypatch):
    """The shipped SD 1.5 recipe, pointed at a local folder in the hub layout, with bf16 autocast."""
    monkeypatch.chdir(REPO)
    cfg = load_config(["--config", "train_configs/sd15_lego_dora.yaml", "--pretrained_model_name_or_path",
                       str(tiny_sd_path), "--resolution", "64", "--max_train_steps", "2", "--mixed_precision", "bf16",
                       "--num_class_images", "2", "--class_data_dir", str(tmp_path / "class"), "--output_dir",
                       str(tmp_path / "out"), "--validation_steps", "2", "--num_validation_images", "1",
                       "--validation_inference_steps", "2", "--report_to", "none"])
    assert cfg.cache_latents and cfg.gradient_checkpointing and cfg.with_prior_preservation
    tensors, meta = read_adapter(train(cfg))
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in tensors.values())
    assert np.isfinite(json.loads(meta["dreambooth_dora"])["final_loss"])
    assert (tmp_path / "out" / "validation" / "step-000002.png").is_file()


def test_unet_attention_uses_sdpa(tiny_pipeline):
    from diffusers.models.attention_processor import AttnProcessor2_0

    assert all(isinstance(p, AttnProcessor2_0) for p in tiny_pipeline.unet.attn_processors.values())


@pytest.mark.parametrize("layout", ["sd1", "sd2"])
def test_more_unet_targets_on_sd1_and_sd2_layouts(tmp_path, tiny_sd_path, tiny_sd2_path, icon_dir, layout):
    """proj_in/proj_out are 1x1 convs in SD 1.x and linears in SD 2.x; feed-forward too."""
    model = tiny_sd_path if layout == "sd1" else tiny_sd2_path
    path = run(tmp_path, model, icon_dir, "--unet_target_modules", "to_q,to_k,to_v,to_out.0,proj_in,proj_out,ff.net.2",
               "--max_train_steps", "2")
    tensors, _ = read_adapter(path)
    proj = next(v for k, v in tensors.items() if k.endswith("proj_in.lora_A.weight"))
    assert proj.dim() == (4 if layout == "sd1" else 2)
    mag = next(v for k, v in tensors.items() if k.endswith("proj_in.lora_magnitude_vector"))
    channels = proj.shape[1]  # proj_in keeps the channel count
    assert tuple(mag.shape) == ((1, channels, 1, 1) if layout == "sd1" else (channels,))  # PEFT's shapes
    assert any(k.endswith("ff.net.2.lora_B.weight") for k in tensors)
    if layout == "sd2":
        from diffusers import DDPMScheduler

        assert DDPMScheduler.from_pretrained(model, subfolder="scheduler").config.prediction_type == "v_prediction"


def test_gradient_accumulation_equals_the_larger_batch(tmp_path, tiny_sd_path, icon_dir):
    flags = ["--max_train_steps", "3", "--random_flip", "--train_text_encoder"]
    big, _ = read_adapter(run(tmp_path, tiny_sd_path, icon_dir, *flags, "--train_batch_size", "2", name="big"))
    acc, _ = read_adapter(run(tmp_path, tiny_sd_path, icon_dir, *flags, "--train_batch_size", "1",
                              "--gradient_accumulation_steps", "2", name="acc"))
    # the same gradients up to float summation order; Adam's first steps (about lr x sign(g))
    # magnify that order for entries whose gradient is ~0, hence the bound of 2e-4 at lr 1e-2
    assert max((big[k] - acc[k]).abs().max() for k in big) <= 2e-4
    one, _ = read_adapter(run(tmp_path, tiny_sd_path, icon_dir, *flags, "--train_batch_size", "1", name="one"))
    assert max((one[k] - big[k]).abs().max() for k in big) > 2e-3  # batch size does matter


def test_model_card_snippet_runs_as_written(tmp_path, icon_dir):
    """The card's code loads the adapter exactly and draws, `embedded:` base included."""
    import re

    from PIL import Image as PILImage

    out = tmp_path / "card"
    train(load_config(["--pretrained_model_name_or_path", "embedded:toy-world", "--instance_data_dir", str(icon_dir),
                       "--instance_prompt", "a sks icon", "--resolution", "32", "--max_train_steps", "1",
                       "--output_dir", str(out), "--report_to", "none"]))
    code = re.search(r"```python\n(.*?)```", (out / "README.md").read_text(), re.S).group(1)
    assert "resolve_model('embedded:toy-world')" in code
    namespace = {}
    exec(code, namespace)  # the card's own code, as a user pastes it
    assert isinstance(namespace["image"], PILImage.Image) and namespace["image"].size == (32, 32)


def test_the_first_run_equals_a_rerun(tmp_path, icon_dir, monkeypatch):
    """The first use of `embedded:tiny-random` builds the model (seeding the global generator) and
    prior preservation generates class images; the adapters' initial values must come from the
    seed alone, so the first run equals a rerun where both already exist."""
    monkeypatch.setenv("DREAMBOOTH_DORA_CACHE", str(tmp_path / "cache"))
    flags = ["--pretrained_model_name_or_path", "embedded:tiny-random", "--with_prior_preservation", "--class_data_dir",
             str(tmp_path / "class"), "--class_prompt", "an icon", "--num_class_images", "2", "--max_train_steps", "2"]
    first, _ = read_adapter(run(tmp_path, "unused", icon_dir, *flags, name="first"))
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    again, _ = read_adapter(run(tmp_path, "unused", icon_dir, *flags, name="again"))  # model and images exist now
    assert first.keys() == again.keys() and all(torch.equal(first[k], again[k]) for k in first)

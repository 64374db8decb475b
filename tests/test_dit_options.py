"""Every trainer option on the DiT families (SD 3 and FLUX.1, tiny pipelines): aspect buckets in
steps of 16 on non-square pictures, masked loss from the pictures' alpha, prior preservation with
class images drawn by the family's own pipeline, EMA, LoRA+ and a magnitude learning rate, caption
dropout, checkpoints; a run killed mid-way and resumed equals the uninterrupted one exactly."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from conftest import interrupt_at, rgba_pictures, train_now
from dreambooth_dora.outputs import ADAPTER_FILE


@pytest.mark.parametrize("family", ["flux1", "sd3"])
def test_every_option_trains_and_resumes_exactly(family, tiny_flux_path, tiny_sd3_path, tmp_path, monkeypatch):
    import dreambooth_dora.training.loop as train_module

    model = tiny_flux_path if family == "flux1" else tiny_sd3_path
    data = rgba_pictures(tmp_path / "rgba", [(96, 64), (64, 96), (96, 64), (80, 80)])

    def run(name, *extra):
        return train_now([
            "--pretrained_model_name_or_path", model, "--instance_data_dir", data, "--instance_prompt", "a sks icon",
            "--resolution", "64", "--aspect_buckets", "--bucket_step", "16", "--masked_loss",
            "--with_prior_preservation", "--class_prompt", "an icon", "--num_class_images", "2",
            "--class_data_dir", tmp_path / "class", "--sample_batch_size", "2",
            "--use_ema", "--ema_decay", "0.9", "--loraplus_lr_ratio", "4", "--magnitude_lr", "5e-3",
            "--caption_dropout_rate", "0.3", "--random_flip", "--train_batch_size", "2", "--learning_rate", "1e-2",
            "--max_train_steps", "4", "--checkpointing_steps", "2", "--max_sequence_length", "32",
            "--output_dir", tmp_path / name, "--report_to", "none", *extra])

    run("full")
    assert len(list((tmp_path / "class").glob("*.png"))) == 2  # drawn by the family's own pipeline
    interrupt_at(monkeypatch, train_module, 3)
    with pytest.raises(KeyboardInterrupt):
        run("resumed")
    monkeypatch.undo()
    run("resumed", "--resume_from_checkpoint", "latest")
    a, b = (load_file(str(tmp_path / n / ADAPTER_FILE)) for n in ("full", "resumed"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(k.endswith("lora_magnitude_vector") for k in a)
    assert all(torch.isfinite(v).all() for v in a.values())


@pytest.mark.parametrize("family", ["flux1", "sd3"])
def test_two_subjects_in_one_dit_run(family, tiny_flux_path, tiny_sd3_path, tmp_path):
    """Several subject sets (their own prompts, class images and repeats) in one run of a DiT family;
    the validation grid has a row per subject's prompt."""
    samples = Path(__file__).resolve().parents[1] / "sample_data"
    config = tmp_path / "sets.yaml"
    config.write_text(f"""datasets:
  - instance_data_dir: {samples / '3d_icon'}
    instance_prompt: a sks icon
    class_prompt: an icon
    class_data_dir: {tmp_path / 'class_icon'}
  - instance_data_dir: {samples / 'lego'}
    instance_prompt: a zwx brick
    repeats: 2
    class_prompt: a brick
    class_data_dir: {tmp_path / 'class_brick'}
""")
    model = tiny_flux_path if family == "flux1" else tiny_sd3_path
    path = train_now(["--config", config, "--pretrained_model_name_or_path", model, "--resolution", "64",
                      "--max_train_steps", "2", "--output_dir", tmp_path / "out", "--report_to", "none",
                      "--with_prior_preservation", "--num_class_images", "1", "--validation_prompt",
                      "a sks icon|a zwx brick", "--validation_steps", "2", "--validation_inference_steps", "1",
                      "--num_validation_images", "1", "--max_sequence_length", "32", "--center_crop"])
    assert path.is_file()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("class_")) == ["class_brick", "class_icon"]
    grid = Image.open(tmp_path / "out" / "validation" / "step-000002.png")
    assert grid.size[1] == 2 * 64 * 4  # a row per subject's prompt (64 px cells enlarged 4x)


@pytest.mark.slow
def test_two_processes_train_each_dit_family_like_one_with_the_same_global_batch(tiny_flux_path, tiny_sd3_path,
                                                                                 tiny_klein_path, tiny_z_image_path,
                                                                                 tmp_path):
    """DDP over 2 CPU processes (gloo) = one process with the doubled batch, per family: FLUX.1 with
    its CLIP adapters and aspect buckets in steps of 16 on non-square pictures; SD 3 with both CLIPs'
    adapters, logit-normal noise levels and preconditioned outputs; FLUX.2 [klein] with its cached
    Qwen3 prompts and batch-normed latents; Z-Image with prompts of their own lengths. The launches run side by side while this process trains
    the one-process twins."""
    import os
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[1]
    folder = tmp_path / "mixed"
    folder.mkdir()
    icons = sorted((repo / "sample_data/3d_icon").glob("*.png"))
    for i, (p, size) in enumerate(zip(icons, [(96, 64), (64, 96), (96, 64), (64, 64)])):
        Image.open(p).convert("RGB").resize(size).save(folder / f"{i}.png")
    common = ["--instance_prompt", "a sks icon", "--learning_rate", "1e-2", "--report_to", "none", "--seed", "0",
              "--checkpointing_steps", "100"]
    base = [*common, "--train_text_encoder"]  # klein's Qwen3 never trains
    runs = {"flux1": [*base, "--pretrained_model_name_or_path", tiny_flux_path, "--instance_data_dir", folder,
                      "--resolution", "64", "--random_flip", "--max_train_steps", "3", "--aspect_buckets",
                      "--bucket_step", "16", "--weighting_scheme", "logit_normal", "--max_sequence_length", "32"],
            "sd3": [*base, "--pretrained_model_name_or_path", tiny_sd3_path, "--instance_data_dir",
                    repo / "sample_data/3d_icon", "--resolution", "32", "--max_train_steps", "2",
                    "--max_sequence_length", "16"],
            "flux2_klein": [*common, "--pretrained_model_name_or_path", tiny_klein_path, "--instance_data_dir",
                            repo / "sample_data/3d_icon", "--resolution", "32", "--max_train_steps", "2",
                            "--max_sequence_length", "48"],
            "z_image": [*common, "--pretrained_model_name_or_path", tiny_z_image_path, "--instance_data_dir",
                        repo / "sample_data/3d_icon", "--resolution", "32", "--max_train_steps", "2",
                        "--max_sequence_length", "48"]}
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    procs = {}
    for port, (family, argv) in zip((29534, 29536, 29540, 29542), runs.items()):
        launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                  "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
                  str(port), str(repo / "train_dreambooth_dora.py")]
        procs[family] = subprocess.Popen([*launch, *map(str, argv), "--train_batch_size", "1", "--output_dir",
                                          str(tmp_path / f"{family}-two")], cwd=repo, env=env, text=True,
                                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    for family, argv in runs.items():  # one process, in this one, meanwhile
        train_now([*argv, "--train_batch_size", "2", "--output_dir", tmp_path / f"{family}-one"])
    parts = {"flux1": {"transformer", "text_encoder"}, "sd3": {"transformer", "text_encoder", "text_encoder_2"},
             "flux2_klein": {"transformer"}, "z_image": {"transformer"}}
    for family, proc in procs.items():
        output, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, output[-2000:]
        assert "processes: 2" in output
        a, b = (load_file(str(tmp_path / f"{family}-{n}" / ADAPTER_FILE)) for n in ("one", "two"))
        assert a.keys() == b.keys() and {k.split(".", 1)[0] for k in a} == parts[family]
        worst = max((a[k] - b[k]).abs().max().item() for k in a)
        assert worst <= 1e-5, (family, worst)  # summation order only (DDP averages two halves); FLUX measured 5.5e-7
        assert max(v.abs().max() for k, v in a.items() if "lora_B" in k) > 5e-3  # it did train


@pytest.mark.parametrize("env, flags, words", [
    ({"ACCELERATE_USE_DEEPSPEED": "true"}, [], "DeepSpeed is not supported"),
    ({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "1"}, [], "launch with --fsdp_version 2"),
    ({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"}, ["--train_text_encoder_ti", "--token_abstraction", "sks"],
     "pivotal tuning with FSDP is not supported yet"),
    ({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"}, ["--use_ema"], "EMA with FSDP"),
    ({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"}, ["--mixed_precision", "fp16"], "use bf16")])
def test_sharded_launches_refuse_what_they_cannot_do_in_one_line(env, flags, words, tiny_flux_path, tmp_path, capsys,
                                                                 monkeypatch):
    """What `accelerate launch` sets for DeepSpeed or FSDP: what this trainer cannot do stops in one
    line, exit 2, nothing written, before any model loads (never ignored)."""
    from dreambooth_dora.cli import train_main

    for key, value in env.items():
        monkeypatch.setenv(key, value)
    out = tmp_path / "out"
    assert train_main(["--pretrained_model_name_or_path", str(tiny_flux_path), "--instance_data_dir",
                       str(Path(__file__).resolve().parents[1] / "sample_data/3d_icon"), "--instance_prompt",
                       "a sks icon", "--output_dir", str(out), *flags]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and words in err[0] and not out.exists()


@pytest.mark.slow
def test_fsdp_over_two_processes_trains_like_one_and_resumes_exactly(tiny_flux_path, tmp_path):
    """`accelerate launch --use_fsdp --fsdp_version 2` on 2 CPU processes (gloo): the transformer and
    its DoRA adapters sharded (FSDP2), CLIP's adapters whole on each process (DDP), one gradient
    clip over both; the adapter equal to one process's with the doubled batch; the
    checkpoint holds the gathered adapter (the same layout, no base weights) and the whole optimizer
    state; a run killed after it and resumed under FSDP ends where the uninterrupted one did; the
    validation grid is drawn by both processes, written by one."""
    import os
    import shutil
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[1]
    argv = ["--pretrained_model_name_or_path", tiny_flux_path, "--instance_data_dir", repo / "sample_data/3d_icon",
            "--instance_prompt", "a sks icon", "--resolution", "32", "--learning_rate", "5e-3", "--report_to", "none",
            "--seed", "0", "--max_train_steps", "4", "--checkpointing_steps", "2", "--max_sequence_length", "16",
            "--validation_prompt", "a sks icon", "--validation_steps", "4", "--num_validation_images", "1",
            "--validation_inference_steps", "2", "--train_text_encoder", "--max_grad_norm", "0.01"]  # every step clips
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}

    def launch(out, *extra):
        return subprocess.Popen([sys.executable, "-m", "accelerate.commands.launch", "--use_fsdp", "--fsdp_version", "2",
                                 "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
                                 "--dynamo_backend", "no", "--main_process_port", "29538",
                                 str(repo / "train_dreambooth_dora.py"), *map(str, argv), "--train_batch_size", "1",
                                 "--output_dir", str(out), *extra], cwd=repo, env=env, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT)

    sharded = launch(tmp_path / "fsdp")
    train_now([*argv, "--train_batch_size", "2", "--output_dir", tmp_path / "one"])  # meanwhile, in this process
    output, _ = sharded.communicate(timeout=300)
    assert sharded.returncode == 0, output[-2000:]
    one, two = (load_file(str(tmp_path / n / ADAPTER_FILE)) for n in ("one", "fsdp"))
    assert one.keys() == two.keys() and any("lora_magnitude_vector" in k for k in one)
    assert {k.split(".", 1)[0] for k in one} == {"transformer", "text_encoder"}  # CLIP whole on each process
    assert max((one[k] - two[k]).abs().max().item() for k in one) <= 1e-5  # Adam's first steps magnify summation order
    checkpoint = tmp_path / "fsdp" / "checkpoint-2"
    assert load_file(str(checkpoint / ADAPTER_FILE)).keys() == one.keys()  # gathered, the one-process layout
    assert {p.name for p in checkpoint.iterdir()} <= {ADAPTER_FILE, "optimizer_full.pt", "scheduler.bin",
                                                      "random_states_0.pkl", "random_states_1.pkl", "checkpoint.json"}
    assert (tmp_path / "fsdp" / "validation" / "step-000004.png").is_file()
    # killed after the checkpoint: the folder as the kill leaves it, then resumed under FSDP
    shutil.copytree(tmp_path / "fsdp", tmp_path / "killed", ignore=shutil.ignore_patterns(
        ADAPTER_FILE, "README.md", "train_config.json", "validation"))
    shutil.copy(checkpoint / ADAPTER_FILE, tmp_path / "killed" / "checkpoint-2" / ADAPTER_FILE)
    resumed = launch(tmp_path / "killed", "--resume_from_checkpoint", "latest")
    output, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0 and "resumed from" in output, output[-2000:]
    again = load_file(str(tmp_path / "killed" / ADAPTER_FILE))
    assert max((again[k] - two[k]).abs().max().item() for k in two) <= 1e-6

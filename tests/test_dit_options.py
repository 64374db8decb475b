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

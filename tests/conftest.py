"""Test fixtures: tiny Stable Diffusion pipelines built from configs, saved and loaded back the
way a hub id loads, all offline and deterministic."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path

import pytest
import torch

from dreambooth_dora.toy.tiny import save_tiny_pipeline


REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tiny_sd_path(tmp_path_factory) -> Path:
    """A tiny SD 1.x pipeline in diffusers layout (`save_pretrained` output), like a hub snapshot."""
    return save_tiny_pipeline(tmp_path_factory.mktemp("models") / "tiny-sd")


@pytest.fixture(scope="session")
def tiny_sd_path_b(tmp_path_factory) -> Path:
    """A second tiny pipeline with other weights (a "different base model")."""
    return save_tiny_pipeline(tmp_path_factory.mktemp("models") / "tiny-sd-b", seed=1)


@pytest.fixture(scope="session")
def tiny_sd2_path(tmp_path_factory) -> Path:
    """A tiny SD 2.x-layout pipeline: linear proj_in/proj_out, v-prediction scheduler."""
    return save_tiny_pipeline(tmp_path_factory.mktemp("models") / "tiny-sd2", sd2=True)


@pytest.fixture(scope="session")
def tiny_sdxl_path(tmp_path_factory) -> Path:
    """A tiny SDXL pipeline: two text encoders, pooled embeddings and time ids."""
    return save_tiny_pipeline(tmp_path_factory.mktemp("models") / "tiny-sdxl", sdxl=True)


@pytest.fixture(scope="session")
def tiny_flux_path(tmp_path_factory) -> Path:
    """A tiny FLUX.1-dev pipeline: MM-DiT with a double and a single block, guidance embedding,
    CLIP-L + T5 built locally, a VAE with shift and scale."""
    return save_tiny_pipeline(tmp_path_factory.mktemp("models") / "tiny-flux", flux=True)


@pytest.fixture(scope="session")
def tiny_klein_path(tmp_path_factory) -> Path:
    """A tiny FLUX.2 [klein] pipeline: a double and a single block, a 28-layer Qwen3 with a local
    tokenizer and chat template, a Flux2 VAE with batch-norm statistics that are not the identity."""
    return save_tiny_pipeline(tmp_path_factory.mktemp("models") / "tiny-klein", flux2_klein=True)


@pytest.fixture(scope="session")
def tiny_z_image_path(tmp_path_factory) -> Path:
    """A tiny Z-Image pipeline: refiners and two single-stream blocks, a 2-layer Qwen3Model with a local
    tokenizer and chat template, FLUX.1's 16-channel VAE with shift and scale."""
    return save_tiny_pipeline(tmp_path_factory.mktemp("models") / "tiny-z-image", z_image=True)


@pytest.fixture(scope="session")
def tiny_chroma_path(tmp_path_factory) -> Path:
    """A tiny Chroma pipeline (T5 and its tokenizer built locally), built once per session."""
    return save_tiny_pipeline(tmp_path_factory.mktemp("models") / "tiny-chroma", chroma=True)


@pytest.fixture(scope="session")
def tiny_sd3_path(tmp_path_factory) -> Path:
    """A tiny SD 3 pipeline: two joint blocks, CLIP-L + CLIP-G with projections, T5, a 16-channel VAE."""
    return save_tiny_pipeline(tmp_path_factory.mktemp("models") / "tiny-sd3", sd3=True)


@pytest.fixture
def tiny_pipeline(tiny_sd_path):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd_path)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture
def icon_dir() -> Path:
    return REPO / "sample_data" / "3d_icon"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def adapters(tiny_sd_path, tmp_path_factory):
    """A DoRA and a LoRA adapter trained (UNet + text encoder, rank 4, alpha 8, 4 steps, a
    checkpoint every 2) on the tiny pipeline, in one folder: {"dora": root/dora, "lora": root/lora}."""
    from accelerate.state import AcceleratorState, GradientState

    from dreambooth_dora.training.config import load_config
    from dreambooth_dora.training.loop import train

    root = tmp_path_factory.mktemp("adapters")
    out = {}
    for method in ("dora", "lora"):
        folder = root / method
        cfg = load_config(["--pretrained_model_name_or_path", str(tiny_sd_path), "--instance_data_dir",
                           str(REPO / "sample_data" / "3d_icon"), "--instance_prompt", "a sks icon",
                           "--resolution", "64", "--learning_rate", "3e-2", "--max_train_steps", "4",
                           "--rank", "4", "--lora_alpha", "8", "--train_text_encoder",
                           "--use_dora", str(method == "dora").lower(), "--output_dir", str(folder),
                           "--report_to", "none", "--seed", "5", "--checkpointing_steps", "2"])
        train(cfg)
        AcceleratorState._reset_state(True)
        GradientState._reset_state()
        out[method] = folder
    return out


@pytest.fixture
def fresh_accelerate_state():
    """Each training run builds its own Accelerator; forget the previous one's singletons."""
    from accelerate.state import AcceleratorState, GradientState

    yield
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def interrupt_at(monkeypatch, module, call: int):
    """Make `module.diffusion_loss` raise KeyboardInterrupt at its `call`-th call (a kill mid-run)."""
    calls = {"n": 0}
    real = module.diffusion_loss

    def interrupted(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == call:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(module, "diffusion_loss", interrupted)



def ddpm_draw(noise_offset: float = 0.0):
    """A batch maker's noise and timestep draw as SD training binds it (1000 DDPM timesteps)."""
    from functools import partial

    from diffusers import DDPMScheduler

    from dreambooth_dora.families import StableDiffusion

    return partial(StableDiffusion().draw_noise, noise_offset=noise_offset, scheduler=DDPMScheduler())


def evaluate_small(base, adapters: str, out: Path, seeds: str = "0", guidance: str | None = "3.5"):
    """`evaluate` on the sample icons with one class and one unrelated prompt, 2 steps at 32 px, no
    DINO / CLIP models (guidance None: the model's default): (report folder, result)."""
    from dreambooth_dora.evaluation import evaluate, load_eval_config

    cfg = load_eval_config([
        "--base_model", str(base), "--adapters", adapters, "--instance_data_dir",
        str(Path(__file__).resolve().parents[1] / "sample_data/3d_icon"), "--class_prompts", "a icon",
        "--unrelated_prompts", "a red cube", "--seeds", seeds, "--images_per_prompt", "1", "--num_inference_steps", "2",
        *(["--guidance_scale", guidance] if guidance else []), "--resolution", "32", "--dino_model", "none", "--clip_model", "none",
        "--output_dir", str(out)])
    return evaluate(cfg, progress=False)


def train_now(argv) -> Path:
    """`train()` in this process with the settings `argv` gives, accelerate's singletons reset after
    (a later run in the same process must not inherit them); returns the adapter file."""
    from accelerate.state import AcceleratorState, GradientState

    from dreambooth_dora.training.config import load_config
    from dreambooth_dora.training.loop import train

    try:
        return train(load_config([str(a) for a in argv]))
    finally:
        AcceleratorState._reset_state(True)
        GradientState._reset_state()


def rgba_pictures(folder: Path, sizes) -> Path:
    """Pictures of the given sizes whose alpha marks a centred subject (masks for masked loss)."""
    from PIL import Image

    folder.mkdir()
    for i, size in enumerate(sizes):
        im = Image.new("RGBA", size, (200, 40 * i, 90, 0))
        im.paste((30, 160, 220, 255), (size[0] // 4, size[1] // 4, 3 * size[0] // 4, 3 * size[1] // 4))
        im.save(folder / f"{i}.png")
    return folder

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

from dreambooth_dora.tiny import save_tiny_pipeline

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

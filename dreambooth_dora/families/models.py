"""Base models, one home: resolve a name, load a pipeline or its training components.

A name is a hub id (`stable-diffusion-v1-5/stable-diffusion-v1-5`), a local diffusers folder
(`save_pretrained` layout) or `embedded:<name>` for a model shipped with the package
(`embedded:toy-world` and `embedded:toy-world-flux`, the project's own 32 px models (SD and FLUX.1
architectures) in `toy/models/`, and
`embedded:tiny-random`, built from configs into a local cache). Everything that loads a base
model goes through here: class images, exports, evaluation, the app (training loads its
components through its family, `families/`).
"""

from __future__ import annotations

import os
from pathlib import Path

EMBEDDED_PREFIX = "embedded:"
EMBEDDED_NAMES = ("toy-world", "toy-world-flux", "tiny-random")


class ModelLoadError(ValueError):
    """A base model (or VAE) that cannot be loaded; one line for the user."""


def check_embedded_name(name_or_path: str) -> None:
    """ValueError for an `embedded:` name the package does not ship (the message lists them)."""
    if name_or_path.startswith(EMBEDDED_PREFIX) and name_or_path[len(EMBEDDED_PREFIX):] not in EMBEDDED_NAMES:
        known = ", ".join(f"'{EMBEDDED_PREFIX}{n}'" for n in EMBEDDED_NAMES)
        raise ValueError(f"unknown embedded model {name_or_path[len(EMBEDDED_PREFIX):]!r}; known: {known}")


def resolve_model(name_or_path: str) -> str:
    """Turn `embedded:<name>` into a local diffusers folder; leave hub ids and paths untouched."""
    if not name_or_path.startswith(EMBEDDED_PREFIX):
        return name_or_path
    check_embedded_name(name_or_path)
    name = name_or_path[len(EMBEDDED_PREFIX):]
    if name.startswith("toy-world"):  # trained by `python -m dreambooth_dora.toy.embedded`, shipped in the package
        return str(Path(__file__).resolve().parents[1] / "toy" / "models" / name)
    from ..toy.tiny import save_tiny_pipeline

    cache = Path(os.environ.get("DREAMBOOTH_DORA_CACHE", Path.home() / ".cache" / "dreambooth_dora"))
    return str(save_tiny_pipeline(cache / name))


def without_safety_checker(model_path: str, revision: str | None = None) -> dict:
    """`from_pretrained` arguments that skip SD 1.x's safety checker; nothing for pipelines
    that have none (SD 2.x, SDXL), which would warn about unexpected arguments."""
    from diffusers import DiffusionPipeline

    if "safety_checker" in DiffusionPipeline.load_config(model_path, revision=revision):
        return {"safety_checker": None, "requires_safety_checker": False}
    return {}


def load_vae(path: str, dtype=None):
    """An AutoencoderKL from a hub id or folder holding the VAE itself, or a whole pipeline
    folder (its `vae/` subfolder); e.g. an fp16-safe SDXL VAE."""
    from diffusers import AutoencoderKL

    sub = "vae" if (Path(path) / "vae").is_dir() else None
    return AutoencoderKL.from_pretrained(path, subfolder=sub, **({"dtype": dtype} if dtype else {}))


def load_pipeline(name: str, revision: str | None = None, variant: str | None = None, torch_dtype=None,
                  vae_path: str | None = None, **kwargs):
    """A diffusers pipeline of `name` (any name `resolve_model` takes) without SD 1.x's safety
    checker and with its progress bar off; `vae_path` replaces the VAE (e.g. an fp16-safe one)."""
    import torch
    from diffusers import DiffusionPipeline

    path = resolve_model(name)
    dtype = torch.float32 if torch_dtype is None else torch_dtype
    extra = {"vae": load_vae(vae_path, dtype)} if vae_path else {}
    pipe = DiffusionPipeline.from_pretrained(path, revision=revision, variant=variant, dtype=dtype,
                                             **without_safety_checker(path, revision), **extra, **kwargs)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def quiet_libraries() -> None:
    """Our own progress bars and messages only: library load bars, info logs and deprecation
    notices would bury the one line a user needs."""
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    # a warning is one line for the user, not the source line that raised it
    warnings.formatwarning = lambda message, category, *_args, **_kw: f"warning: {message}\n"
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    try:
        import diffusers.utils.logging as dlog
        import transformers.utils.logging as tlog

        dlog.set_verbosity_error()
        tlog.set_verbosity_error()
        dlog.disable_progress_bar()
        tlog.disable_progress_bar()
    except ImportError:
        pass
    try:  # "Generating train split" bars of a local image folder
        import datasets

        datasets.disable_progress_bars()
        datasets.logging.set_verbosity_error()
    except ImportError:
        pass

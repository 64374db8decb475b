"""Model families: every difference between base models, one object per family.

    family.py  the interface (Family, Components, FamilyError) and what a family owns
    sd.py      Stable Diffusion 1.x / 2.x
    sdxl.py    Stable Diffusion XL
    sd3.py     Stable Diffusion 3 / 3.5 (flow matching, three text encoders)
    flux1.py   FLUX.1 dev / schnell (flow.py: flow matching's noise levels and weights)
    flux2.py   FLUX.2 [klein] 4B / 9B (Qwen3 text encoder, batch-normed 2x2-patch latents)
    z_image.py Z-Image (Qwen3 text encoder, per-prompt token lengths, a single-stream DiT)
    chroma.py  Chroma (FLUX.1 schnell's DiT pruned, T5 with its attention mask)
    dit.py     what the DiTs share (FlowTransformer): the last text encoder frozen, flow noise, refusals;
               the one-encoder families' base (OneEncoderTransformer)
    ddpm.py    the SD families' noise, targets and Min-SNR weights
    models.py  base models by name: hub ids, local folders, `embedded:` models; pipelines

A family is detected once, from the pipeline's `model_index.json` (a local folder or a hub id),
and recorded in the adapter's metadata (`architecture`); code elsewhere asks it. A new family is a
new module here, listed in FAMILIES (the detection order: the more specific first), and its tests.
"""

from __future__ import annotations

from pathlib import Path

from .family import Components, Family, FamilyError
from .sd import StableDiffusion
from .flux1 import Flux1
from .flux2 import Flux2Klein
from .z_image import ZImage
from .chroma import Chroma
from .sd3 import StableDiffusion3
from .sdxl import StableDiffusionXL

FAMILIES: tuple[Family, ...] = (Flux2Klein(), ZImage(), Chroma(), Flux1(), StableDiffusion3(), StableDiffusionXL(), StableDiffusion())
# what files of any family hold: the adapter file's part prefixes, and pivotal tuning's embedding
# keys with the text encoder each belongs to
ADAPTER_PARTS = tuple(dict.fromkeys(p for f in reversed(FAMILIES) for p in f.parts))
EMBEDDING_PARTS = {k: e for f in FAMILIES for k, e in zip(f.embedding_keys, f.encoder_parts)}
# kohya module-name prefixes of every family -> the part (longest first: `lora_te1_` before `lora_te_`)
KOHYA_PARTS = dict(sorted({prefix: part for f in FAMILIES for part, prefix in f.kohya_prefixes.items()}.items(),
                          key=lambda kv: -len(kv[0])))

__all__ = ["ADAPTER_PARTS", "EMBEDDING_PARTS", "FAMILIES", "KOHYA_PARTS", "Chroma", "Components", "Family", "FamilyError", "Flux1",
           "Flux2Klein", "ZImage", "StableDiffusion", "StableDiffusion3",
           "StableDiffusionXL", "family_named", "family_of", "family_of_index",
           "family_of_pipeline", "load_components", "pipeline_models"]


def family_named(architecture: str | None) -> Family:
    """The family an adapter's metadata names (`architecture`); files from before the field
    existed were SD 1.x / 2.x or SDXL, told apart by their parts: pass None and ask
    `family_of_parts`."""
    for family in FAMILIES:
        if family.name == architecture:
            return family
    known = ", ".join(f.name for f in FAMILIES)
    raise FamilyError(f"unknown model family {architecture!r}; known: {known}")


def family_of_parts(parts) -> Family:
    """The family whose adapter parts (file prefixes) cover `parts` most narrowly."""
    parts = set(parts)
    for family in reversed(FAMILIES):  # the least specific first: SD before SDXL
        if parts <= set(family.parts):
            return family
    return FAMILIES[0]


def family_of_index(index: dict) -> Family:
    """The family of a pipeline's `model_index.json` contents."""
    for family in FAMILIES:
        if family.matches(index):
            return family
    raise FamilyError(f"{index.get('_class_name') or 'this pipeline'} is of no model family dreambooth-dora "
                      f"trains; known: {', '.join(f.label for f in FAMILIES)}")


def family_of(path: str, revision: str | None = None) -> Family:
    """The family of a base model: a local diffusers folder or a hub id (its `model_index.json`)."""
    from diffusers import DiffusionPipeline

    from .models import ModelLoadError

    if str(path).startswith(("/", ".", "~")) and not Path(path).expanduser().is_dir():  # a path, never a hub id
        raise ModelLoadError(f"cannot load model {path!r}: no such folder (a local model is a diffusers folder "
                             "holding model_index.json; a hub id looks like org/name)")
    try:
        index = DiffusionPipeline.load_config(path, revision=revision)
    except (OSError, ValueError) as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise ModelLoadError(f"cannot load model {path!r}: {first}") from None
    return family_of_index(index)


def load_components(path: str, revision: str | None = None, variant: str | None = None,
                    vae_path: str | None = None, prediction_type: str | None = None) -> Components:
    """What training loads of the base model at `path`, by its family (`Family.load_components`)."""
    return family_of(path, revision).load_components(path, revision, variant, vae_path, prediction_type)


def family_of_pipeline(pipe) -> Family:
    """The family of a loaded pipeline (its class, or its parts for other pipeline classes)."""
    def entry(part):  # as model_index.json writes a part: [library, class name], or [null, null]
        return [None, None] if part is None else [type(part).__module__.split(".")[0], type(part).__name__]

    index = {"_class_name": type(pipe).__name__,
             **{name: entry(getattr(pipe, name, None))
                for name in ("unet", "transformer", "text_encoder", "text_encoder_2", "text_encoder_3")}}
    return family_of_index(index)


def pipeline_models(pipe) -> dict:
    """{part: model}: the parts of a pipeline adapters live in (the adapter file's prefixes)."""
    return family_of_pipeline(pipe).models(pipe)

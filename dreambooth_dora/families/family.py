"""What a model family is: the one place that answers "which model is this" questions.

A family object is stateless (one instance per family, in `families.FAMILIES`); code outside
`families/` holds one and asks it, never tests which model it has:

    detection      `matches(index)` on the pipeline's `model_index.json` (its class name first)
    loading        `load_components` -> Components (tokenizers, text encoders, VAE, denoiser,
                   the training noise scheduler)
    prompts        `encode_prompts` -> (embeddings, pooled or None); the negative for drawing;
                   the denoiser's extra conditioning (`denoiser_kwargs`)
    the loss       `draw_noise` (noise and timestep of one example, from its own generator) and
                   `loss_inputs` (the noisy latents through the denoiser, and its target)
    drawing        the inference pipeline class, built from parts for validation
    files          the adapter file's part prefixes, kohya / web UI names and metadata, the
                   pivotal-tuning embedding keys, the model card's words
    defaults       target modules, native picture size

Adding a family is adding a module here (a subclass) and its tests.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .models import ModelLoadError


class FamilyError(ModelLoadError):
    """A base model of no known family; one line for the user."""


@dataclass
class Components:
    """What training loads of a base model."""

    tokenizers: list
    text_encoders: list  # in the order of the family's `encoder_parts`
    vae: Any
    denoiser: Any  # the UNet (or transformer)
    scheduler: Any  # the training noise scheduler


class Family:
    """The interface; see `sd.StableDiffusion` for the methods' shared implementation."""

    name: str  # the adapter metadata's `architecture`
    label: str  # for people
    pipeline_class: str  # the diffusers pipeline class that draws with this family
    pipeline_classes: tuple[str, ...]  # `model_index.json` class names of this family
    tag: str  # the model card's tag
    denoiser_part: str = "unet"  # the pipeline attribute (and adapter file prefix) of the denoiser
    encoder_parts: tuple[str, ...] = ("text_encoder",)  # the text encoders' attributes / file prefixes
    tokenizer_parts: tuple[str, ...] = ("tokenizer",)
    embedding_keys: tuple[str, ...] = ("clip_l",)  # pivotal-tuning embeddings, one per encoder (the ecosystem's names)
    kohya_prefixes: dict[str, str] = {}
    webui_consumers: str = "A1111, Forge, ComfyUI"  # the web UIs that run this family's models
    webui_versions: tuple[str, ...] = ()  # `ss_base_model_version` values of its web UI files, where they tell it apart

    @property
    def parts(self) -> tuple[str, ...]:
        """The pipeline parts adapters live in: the adapter file's prefixes."""
        return (self.denoiser_part, *self.encoder_parts)

    def matches(self, index: dict) -> bool:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<family {self.name}: {self.label}>"

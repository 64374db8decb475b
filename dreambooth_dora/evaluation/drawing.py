"""The base model and each adapter drawn from the same initial latents: the app's columns,
`evaluate`'s models and the study's snapshots all draw through here.

A comparison is fair only when every model starts from the same noise: each seed's latents come
from its own CPU generator (so they do not depend on the device, the batch, or which other seeds
are drawn), and the generators, advanced past the latents, go with the call (a stochastic sampler
then draws the same later noise too).
"""

from __future__ import annotations

import torch

from ..adapters.pivotal import insert_tokens
from ..families import family_of_pipeline


def loaded_adapters(pipe) -> list[str]:
    """The names of the adapters loaded into the pipeline's denoiser."""
    try:
        return list(pipe.get_list_adapters().get(family_of_pipeline(pipe).denoiser_part, []))
    except (AttributeError, ValueError):
        return []


def use_adapter(pipe, name: str | None, scale: float = 1.0) -> None:
    """Adapter `name` alone at weight `scale`, or (None) the base model: every adapter off."""
    if name is None:
        if loaded_adapters(pipe):
            pipe.disable_lora()
        return
    pipe.enable_lora()
    pipe.set_adapters([name], adapter_weights=[float(scale)])


def seeded_latents(pipe, seeds: list[int], per_seed: int, width: int, height: int,
                   dtype: torch.dtype | None = None) -> tuple[torch.Tensor, list[torch.Generator]]:
    """(latents (len(seeds) * per_seed, C, h, w) on the CPU, one generator per seed): each seed's
    `per_seed` initial latents drawn as the pipeline draws them from that generator (diffusers'
    `randn_tensor`, in `dtype`, default the denoiser's)."""
    from diffusers.utils.torch_utils import randn_tensor

    family = family_of_pipeline(pipe)
    dtype = dtype or getattr(pipe, family.denoiser_part).dtype
    gens = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]
    shape = family.latent_shape(pipe, per_seed, width, height)
    return torch.cat([randn_tensor(shape, generator=g, device=torch.device("cpu"), dtype=dtype) for g in gens]), gens


def draw(pipe, adapter: str | None, prompt: str, latents: torch.Tensor, generator, *, tokens: dict | None = None,
         scale: float = 1.0, negative_prompt: str | None = None, **call) -> list:
    """Pictures of `prompt` (an adapter's new tokens written in) by the base model (`adapter`
    None) or adapter `adapter` alone at `scale`, from `latents` (one picture each); `call`: the
    pipeline's other arguments (steps, guidance, size, callbacks)."""
    use_adapter(pipe, adapter, scale)
    family = family_of_pipeline(pipe)
    denoiser = getattr(pipe, family.denoiser_part)
    negative = insert_tokens(negative_prompt, tokens or {}) if negative_prompt else None
    start = family.pack_latents(pipe, latents.to(denoiser.device, denoiser.dtype) * 1.0)
    return pipe(**family.prompt_call(pipe, insert_tokens(prompt, tokens or {}), negative), latents=start,
                num_images_per_prompt=latents.shape[0], generator=generator,
                **{**family.draw_settings(pipe), **call}).images

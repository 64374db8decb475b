"""The UNet's text (and size) conditioning for SD 1.x/2.x and SDXL.

SD 1.x/2.x: one CLIP text encoder; the UNet attends to its last hidden state (B, 77, D).

SDXL (Podell et al. 2023, section 2.2): two encoders; the UNet attends to the penultimate hidden
states of both, concatenated (B, 77, D1 + D2), and adds an embedding of the second encoder's
pooled, projected output (B, P) together with six size numbers per picture, the "time ids":
(original height, original width, crop top, crop left, target height, target width).
This is what `StableDiffusionXLPipeline.encode_prompt` and `_get_add_time_ids` compute
(without clip skip), so training and inference condition the UNet the same way.
"""

from __future__ import annotations

import torch


def _token_ids(tokenizer, prompts: list[str]) -> torch.Tensor:
    return tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids


def encode_prompts(tokenizers: list, text_encoders: list, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(prompt embeddings (B, 77, D), pooled embeddings (B, P) for SDXL, else None)."""
    if len(text_encoders) == 1:
        enc = text_encoders[0]
        return enc(_token_ids(tokenizers[0], prompts).to(enc.device))[0], None
    hidden, pooled = [], None
    for tok, enc in zip(tokenizers, text_encoders):
        out = enc(_token_ids(tok, prompts).to(enc.device), output_hidden_states=True)
        if out[0].ndim == 2:  # the projected, pooled output (CLIPTextModelWithProjection): the last one counts
            pooled = out[0]
        hidden.append(out.hidden_states[-2])
    return torch.cat(hidden, dim=-1), pooled


def time_ids(original_hw: tuple[int, int], crop_top_left: tuple[int, int], target_hw: tuple[int, int]) -> torch.Tensor:
    """SDXL's size conditioning for one picture: (6,)."""
    return torch.tensor([*original_hw, *crop_top_left, *target_hw], dtype=torch.float32)


def unet_kwargs(pooled: torch.Tensor | None, ids: torch.Tensor | None) -> dict:
    """Extra UNet arguments: SDXL's `added_cond_kwargs`, nothing for SD 1.x/2.x."""
    if pooled is None:
        return {}
    return {"added_cond_kwargs": {"text_embeds": pooled, "time_ids": ids.to(pooled.device, pooled.dtype)}}


class PromptEncoder:
    """Embeddings for captions: `(prompt embeddings (B, 77, D), pooled (B, P) for SDXL or None)`.

    Frozen text encoders: `freeze(texts)` encodes every text once and the encoders leave the
    device; later calls read the cache. Trained encoders: encoded live, with gradients."""

    def __init__(self, tokenizers: list, text_encoders: list):
        self.tokenizers, self.text_encoders = tokenizers, text_encoders
        self.cache: dict | None = None

    @torch.no_grad()
    def freeze(self, texts: list[str]) -> None:
        embeds, pooled = encode_prompts(self.tokenizers, self.text_encoders, texts)
        self.cache = {t: (embeds[i], None if pooled is None else pooled[i]) for i, t in enumerate(texts)}
        for te in self.text_encoders:
            te.to("cpu")  # not needed on the device any more
        self.text_encoders = []

    def __call__(self, texts: list[str], text_encoders: list | None = None):
        """`text_encoders`: the live encoders to use (e.g. unwrapped for validation)."""
        if self.cache is not None:
            pooled = [self.cache[t][1] for t in texts]
            return (torch.stack([self.cache[t][0] for t in texts]),
                    None if pooled[0] is None else torch.stack(pooled))
        return encode_prompts(self.tokenizers, self.text_encoders if text_encoders is None else text_encoders, texts)


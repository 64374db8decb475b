"""Captions to the denoiser's text conditioning, cached when the text encoders are frozen."""

from __future__ import annotations

import torch


class PromptEncoder:
    """Embeddings for captions: `(prompt embeddings (B, 77, D), pooled (B, P) or None)`, as the
    family encodes them (`Family.encode_prompts`).

    Frozen text encoders: `freeze(texts)` encodes every text once and the encoders leave the
    device; later calls read the cache. Trained encoders: encoded live, with gradients."""

    def __init__(self, family, tokenizers: list, text_encoders: list, **settings):
        """`settings`: the family's prompt settings (`Family.prompt_settings`)."""
        self.family, self.tokenizers, self.text_encoders = family, tokenizers, text_encoders
        self.settings = settings
        self.cache: dict | None = None

    @torch.no_grad()
    def freeze(self, texts: list[str]) -> None:
        embeds, pooled = self.family.encode_prompts(self.tokenizers, self.text_encoders, texts, **self.settings)
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
        return self.family.encode_prompts(self.tokenizers, self.text_encoders if text_encoders is None else text_encoders,
                                          texts, **self.settings)

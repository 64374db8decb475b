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
        self.fixed: dict | None = None  # text -> the never-trained encoders' part (`fix`)

    @torch.no_grad()
    def freeze(self, texts: list[str]) -> None:
        embeds, pooled = self.family.encode_prompts(self.tokenizers, self.text_encoders, texts, **self.settings)
        self.cache = {t: (embeds[i], None if pooled is None else pooled[i]) for i, t in enumerate(texts)}
        for te in self.text_encoders:
            te.to("cpu")  # not needed on the device any more
        self.text_encoders = []

    @torch.no_grad()
    def fix(self, texts: list[str]) -> None:
        """Trained text encoders: the family's never-trained ones (FLUX.1's T5) encode every text
        once and leave the device; the trained ones stay live."""
        n = self.family.fixed_encoders
        if not n:
            return
        fixed = self.family.encode_fixed(self.tokenizers, self.text_encoders, texts, **self.settings)
        self.fixed = {t: fixed[i] for i, t in enumerate(texts)}
        for te in self.text_encoders[-n:]:
            te.to("cpu")
        self.text_encoders = self.text_encoders[:-n]

    def __call__(self, texts: list[str], text_encoders: list | None = None):
        """`text_encoders`: the live encoders to use (e.g. unwrapped for validation)."""
        if self.cache is not None:
            pooled = [self.cache[t][1] for t in texts]
            return (torch.stack([self.cache[t][0] for t in texts]),
                    None if pooled[0] is None else torch.stack(pooled))
        fixed = {} if self.fixed is None else {"fixed": torch.stack([self.fixed[t] for t in texts])}
        return self.family.encode_prompts(self.tokenizers, self.text_encoders if text_encoders is None else text_encoders,
                                          texts, **self.settings, **fixed)

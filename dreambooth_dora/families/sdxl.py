"""Stable Diffusion XL (Podell et al. 2023): two CLIP text encoders, a UNet with extra conditioning.

Section 2.2: the UNet attends to the penultimate hidden states of both encoders, concatenated
(B, 77, D1 + D2), and adds an embedding of the second encoder's pooled, projected output (B, P)
together with six size numbers per picture, the "time ids": (original height, original width,
crop top, crop left, target height, target width). This is what
`StableDiffusionXLPipeline.encode_prompt` and `_get_add_time_ids` compute (without clip skip), so
training and inference condition the UNet the same way. Noise, timesteps and targets: as SD.
"""

from __future__ import annotations

from .sd import StableDiffusion, token_ids


class StableDiffusionXL(StableDiffusion):
    name = "sdxl"
    label = "Stable Diffusion XL"
    pipeline_class = "StableDiffusionXLPipeline"
    pipeline_classes = ("StableDiffusionXLPipeline",)
    tag = "stable-diffusion-xl"
    encoder_parts = ("text_encoder", "text_encoder_2")
    tokenizer_parts = ("tokenizer", "tokenizer_2")
    embedding_keys = ("clip_l", "clip_g")
    kohya_prefixes = {"unet": "lora_unet_", "text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}

    def matches(self, index: dict) -> bool:
        """The pipeline's class, or (another SDXL pipeline class) a second text encoder beside a UNet."""
        if index.get("_class_name") in self.pipeline_classes:
            return True
        return all((index.get(p) or [None])[0] is not None for p in ("unet", "text_encoder_2"))

    def _load_text_parts(self, path: str, revision, variant) -> tuple[list, list]:
        from transformers import CLIPTextModelWithProjection, CLIPTokenizer

        tokenizers, text_encoders = super()._load_text_parts(path, revision, variant)
        tokenizers.append(CLIPTokenizer.from_pretrained(path, subfolder="tokenizer_2", revision=revision))
        text_encoders.append(CLIPTextModelWithProjection.from_pretrained(
            path, subfolder="text_encoder_2", revision=revision, variant=variant))
        return tokenizers, text_encoders

    def encode_prompts(self, tokenizers: list, text_encoders: list, prompts: list[str]):
        """(prompt embeddings (B, 77, D1 + D2), pooled embeddings (B, P))."""
        import torch

        hidden, pooled = [], None
        for tok, enc in zip(tokenizers, text_encoders):
            out = enc(token_ids(tok, prompts).to(enc.device), output_hidden_states=True)
            if out[0].ndim == 2:  # the projected, pooled output (CLIPTextModelWithProjection): the last one counts
                pooled = out[0]
            hidden.append(out.hidden_states[-2])
        return torch.cat(hidden, dim=-1), pooled

    def negative_embeddings(self, encode, text_encoders: list, embeds, pooled):
        """SDXL pipelines use zeros for an empty negative prompt (force_zeros_for_empty_prompt)."""
        import torch

        return torch.zeros_like(embeds[:1]), torch.zeros_like(pooled[:1])

    def denoiser_kwargs(self, pooled, sizes) -> dict:
        """`added_cond_kwargs`: the pooled embedding (B, P) and the size numbers (B, 6)."""
        return {"added_cond_kwargs": {"text_embeds": pooled, "time_ids": sizes.to(pooled.device, pooled.dtype)}}

    def inference_pipeline(self, vae, denoiser, scheduler):
        from diffusers import StableDiffusionXLPipeline

        return StableDiffusionXLPipeline(vae=vae, text_encoder=None, text_encoder_2=None, tokenizer=None,
                                         tokenizer_2=None, unet=denoiser, scheduler=scheduler)

    def embedding_kwargs(self, embeds, negative, pooled, negative_pooled, index: int, count: int) -> dict:
        return {**super().embedding_kwargs(embeds, negative, pooled, negative_pooled, index, count),
                "pooled_prompt_embeds": pooled[index:index + 1].expand(count, -1),
                "negative_pooled_prompt_embeds": negative_pooled.expand(count, -1)}

    def webui_metadata(self, pipe) -> dict:
        return {"ss_base_model_version": "sdxl_base_v1-0", "ss_v2": "False"}

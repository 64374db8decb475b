"""Z-Image (Base and Turbo): one Qwen3 text encoder, a single-stream rectified-flow DiT.

Conditioning: Qwen3 reads the prompt through its chat template (thinking on, as the pipeline asks),
padded to max_sequence_length (512); the second-to-last hidden state of the real (unmasked) tokens
is the prompt: one (L_i, D) tensor per prompt, of its own length (`ZImagePipeline._encode_prompt`,
called here, so the embeddings are the pipeline's bit for bit). Cached as (B, L, D) with the token
mask beside it (the family's "pooled" slot) and cut back to the per-prompt tensors for the model.
Latents: FLUX.1's VAE (16 channels, shift and scale), the latent distribution's mode, given to the
transformer unpacked, one (C, 1, h, w) tensor per picture. Training (diffusers'
`train_dreambooth_lora_z_image.py`): s drawn per `weighting_scheme`, x_s = (1 - s) x0 + s e, the
transformer at (1000 - t) / 1000 predicts x0 - e, negated against the target e - x0. The base
model draws with classifier-free guidance 5.0 against the empty prompt (Turbo with 0).
"""

from __future__ import annotations

from types import SimpleNamespace

from .dit import OneEncoderTransformer
from .flow import loss_weighting

Z_IMAGE_TARGETS = ("to_k", "to_q", "to_v", "to_out.0")  # diffusers' script's default


class ZImage(OneEncoderTransformer):
    name = "z_image"
    label = "Z-Image"
    pipeline_class = "ZImagePipeline"
    pipeline_classes = ("ZImagePipeline",)
    transformer_class = "ZImageTransformer2DModel"
    tag = "z-image"
    default_targets = {"transformer": Z_IMAGE_TARGETS}
    default_guidance = 5.0  # ZImagePipeline's (Turbo is drawn with 0)
    native_blocks: dict = {}
    native_top: dict = {}

    # ---- loading ------------------------------------------------------------------------------

    def _load_parts(self, path: str, revision, variant) -> tuple[list, list, object, object]:
        """Qwen3 and its tokenizer, the transformer, the flow-matching scheduler."""
        from diffusers import FlowMatchEulerDiscreteScheduler, ZImageTransformer2DModel
        from transformers import AutoTokenizer, Qwen3Model

        kw = dict(revision=revision, variant=variant)
        return ([AutoTokenizer.from_pretrained(path, subfolder="tokenizer", revision=revision)],
                [Qwen3Model.from_pretrained(path, subfolder="text_encoder", **kw)],
                ZImageTransformer2DModel.from_pretrained(path, subfolder="transformer", **kw),
                FlowMatchEulerDiscreteScheduler.from_pretrained(path, subfolder="scheduler", revision=revision))

    def native_size(self, pipe) -> int:
        size = pipe.vae.config.sample_size
        return size if isinstance(size, int) else 1024

    def latent_shape(self, pipe, count: int, width: int, height: int) -> tuple[int, ...]:
        f = pipe.vae_scale_factor
        return (count, pipe.transformer.config.in_channels, 2 * (height // (f * 2)), 2 * (width // (f * 2)))

    # ---- prompts ------------------------------------------------------------------------------

    def encode_fixed(self, tokenizers: list, text_encoders: list, prompts: list[str], max_sequence_length=None):
        """(embeddings (B, L, D) zero past each prompt's tokens, token mask (B, L) as floats): the
        pipeline's per-prompt tensors, padded to stack (the mask rides in the pooled slot)."""
        import torch

        from diffusers import ZImagePipeline

        encoder = text_encoders[0]
        parts = SimpleNamespace(tokenizer=tokenizers[0], text_encoder=encoder)
        embeds = ZImagePipeline._encode_prompt(parts, list(prompts), device=encoder.device,
                                               max_sequence_length=max_sequence_length or 512)
        length = max_sequence_length or 512
        padded = torch.zeros(len(embeds), length, embeds[0].shape[-1], dtype=embeds[0].dtype, device=embeds[0].device)
        mask = torch.zeros(len(embeds), length, device=embeds[0].device)
        for i, e in enumerate(embeds):
            padded[i, :e.shape[0]], mask[i, :e.shape[0]] = e, 1.0
        return padded, mask

    def encode_prompts(self, tokenizers: list, text_encoders: list, prompts: list[str], max_sequence_length=None,
                       fixed=None):
        """(embeddings (B, L, D), token mask (B, L)): Qwen3's states as the pipeline keeps them."""
        if fixed is None:
            fixed = self.encode_fixed(tokenizers, text_encoders, prompts, max_sequence_length)
        return fixed

    @staticmethod
    def unpad(embeds, mask) -> list:
        """The per-prompt tensors (L_i, D) the transformer and the pipeline take."""
        return [e[m.bool()] for e, m in zip(embeds, mask)]

    def negative_embeddings(self, encode, text_encoders: list, embeds, pooled):
        """The empty prompt, as the pipeline's classifier-free guidance encodes it."""
        return encode([""], text_encoders)

    # ---- the training objective ---------------------------------------------------------------

    def loss_inputs(self, denoiser, scheduler, batch, cond, pooled, scheme: str = "none"):
        """(prediction, target e - x0, per-sample weights): the latents moved to noise level s = t / T
        along the straight path, one (C, 1, h, w) tensor each, through the transformer at
        (1000 - t) / 1000 with each prompt's own tokens; its output negated (it predicts x0 - e)."""
        import torch

        x0, noise = batch.latents, batch.noise
        sigmas, s = self.sigmas(batch, scheduler)
        noisy = (1.0 - s) * x0 + s * noise
        t = (1000 - batch.timesteps.to(x0.dtype)) / 1000
        out = denoiser(list(noisy.unsqueeze(2).unbind(0)), t, self.unpad(cond, pooled), return_dict=False)[0]
        pred = -torch.stack(out, dim=0).squeeze(2)
        return pred, noise - x0, loss_weighting(scheme, sigmas)

    # ---- drawing ------------------------------------------------------------------------------

    def inference_pipeline(self, vae, denoiser, scheduler):
        from diffusers import FlowMatchEulerDiscreteScheduler, ZImagePipeline

        return ZImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler.from_config(scheduler.config), vae=vae,
                              text_encoder=None, tokenizer=None, transformer=denoiser)

    def embedding_kwargs(self, embeds, negative, pooled, negative_pooled, index: int, count: int) -> dict:
        """`count` pictures of prompt `index`: the pipeline takes a list with one tensor per picture."""
        prompt = self.unpad(embeds[index:index + 1], pooled[index:index + 1])[0]
        empty = self.unpad(negative[:1], negative_pooled[:1])[0]
        return {"prompt_embeds": [prompt] * count, "negative_prompt_embeds": [empty] * count}

    # ---- files ---------------------------------------------------------------------------------

    def native_module(self, name: str, model=None) -> tuple[str, tuple[str, ...]]:
        raise ValueError(f"layer {name!r}: {self.label}'s web UI (ComfyUI) key names are not mapped here yet; "
                         "export --format fused (a merged pipeline) instead")

    def webui_metadata(self, pipe) -> dict:
        return {"ss_base_model_version": "z_image", "ss_v2": "False"}

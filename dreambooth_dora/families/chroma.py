"""Chroma (FLUX.1 [schnell]'s architecture, pruned): one T5 text encoder with an attention mask, a
rectified-flow MM-DiT whose modulations come from one small network (`distilled_guidance_layer`).

Conditioning: T5 reads the prompt with its attention mask, padded to max_sequence_length (512);
the transformer attends to its last hidden state (B, L, D) through a mask that keeps the prompt's
tokens and the first padding token (`ChromaPipeline._get_t5_prompt_embeds`, called here, so the
embeddings and the mask are the pipeline's bit for bit). Cached as (B, L, D) with that mask beside
it (the family's "pooled" slot). No CLIP, no pooled embedding, no guidance embedding: the model
draws with classifier-free guidance (5.0) against the empty prompt.
Latents: FLUX.1's VAE (16 channels, shift and scale, the distribution's mode), packed 2x2 into
tokens with FLUX.1's position ids. Training: diffusers has no Chroma script; the objective is
FLUX.1's script's (s drawn per `weighting_scheme`, x_s = (1 - s) x0 + s e, the transformer at
timestep s predicts e - x0), the inputs the pipeline's (text ids of zeros, the mask extended over the
image tokens as `ChromaPipeline._prepare_attention_mask` extends it). Default targets: FLUX.1's script's.
"""

from __future__ import annotations

import re
from types import SimpleNamespace

from .dit import OneEncoderTransformer
from .flow import loss_weighting
from .flux1 import FLUX_DOUBLE, FLUX_SINGLE, FLUX_TARGETS

# the original checkpoint's names (ComfyUI's and Forge's Chroma models, their LoRA keys `lora_unet_` +
# these with `_`), as diffusers' `convert_chroma_transformer_checkpoint_to_diffusers` splits them:
# FLUX.1's without the per-block modulations (Chroma's come from the distilled guidance layer)
CHROMA_DOUBLE = {k: v for k, v in FLUX_DOUBLE.items() if not k.endswith("_mod.lin")}
CHROMA_SINGLE = {k: v for k, v in FLUX_SINGLE.items() if k != "modulation.lin"}
CHROMA_TOP = {"img_in": ("x_embedder",), "txt_in": ("context_embedder",), "final_layer.linear": ("proj_out",),
              "distilled_guidance_layer.in_proj": ("distilled_guidance_layer.in_proj",),
              "distilled_guidance_layer.out_proj": ("distilled_guidance_layer.out_proj",)}
# the distilled guidance layer's MLPs: diffusers' linear_1 / linear_2 are the checkpoint's in_layer / out_layer
GUIDANCE_MLP = re.compile(r"distilled_guidance_layer\.layers\.(\d+)\.linear_([12])")
GUIDANCE_NAMES = {"1": "in_layer", "2": "out_layer"}


class Chroma(OneEncoderTransformer):
    name = "chroma"
    label = "Chroma"
    pipeline_class = "ChromaPipeline"
    pipeline_classes = ("ChromaPipeline",)
    transformer_class = "ChromaTransformer2DModel"
    tag = "chroma"
    default_targets = {"transformer": FLUX_TARGETS}
    default_guidance = 5.0  # ChromaPipeline's classifier-free guidance
    native_blocks = {("transformer_blocks", "double_blocks"): CHROMA_DOUBLE,
                     ("single_transformer_blocks", "single_blocks"): CHROMA_SINGLE}
    native_top = CHROMA_TOP
    webui_versions = ("chroma",)
    encoder_label = "T5 (as FLUX.1's T5)"

    # ---- loading ------------------------------------------------------------------------------

    def _load_parts(self, path: str, revision, variant) -> tuple[list, list, object, object]:
        """T5 and its tokenizer, the transformer, the flow-matching scheduler."""
        from diffusers import ChromaTransformer2DModel, FlowMatchEulerDiscreteScheduler
        from transformers import T5EncoderModel, T5TokenizerFast

        kw = dict(revision=revision, variant=variant)
        return ([T5TokenizerFast.from_pretrained(path, subfolder="tokenizer", revision=revision)],
                [T5EncoderModel.from_pretrained(path, subfolder="text_encoder", **kw)],
                ChromaTransformer2DModel.from_pretrained(path, subfolder="transformer", **kw),
                FlowMatchEulerDiscreteScheduler.from_pretrained(path, subfolder="scheduler", revision=revision))

    def latent_shape(self, pipe, count: int, width: int, height: int) -> tuple[int, ...]:
        f = pipe.vae_scale_factor
        return (count, pipe.transformer.config.in_channels // 4, 2 * (height // (f * 2)), 2 * (width // (f * 2)))

    def pack_latents(self, pipe, latents):
        b, c, h, w = latents.shape
        return pipe._pack_latents(latents, b, c, h, w)

    # ---- prompts ------------------------------------------------------------------------------

    def encode_fixed(self, tokenizers: list, text_encoders: list, prompts: list[str], max_sequence_length=None):
        """(T5's states (B, L, D), the transformer's text mask (B, L)), as `ChromaPipeline.encode_prompt`."""
        from diffusers import ChromaPipeline

        encoder = text_encoders[0]
        parts = SimpleNamespace(tokenizer=tokenizers[0], text_encoder=encoder)
        return ChromaPipeline._get_t5_prompt_embeds(parts, list(prompts), max_sequence_length=max_sequence_length or 512,
                                                    device=encoder.device, dtype=encoder.dtype)

    def encode_prompts(self, tokenizers: list, text_encoders: list, prompts: list[str], max_sequence_length=None,
                       fixed=None):
        """(T5's states (B, L, D), text mask (B, L)): T5 never trains, so they are what it encoded."""
        if fixed is None:
            fixed = self.encode_fixed(tokenizers, text_encoders, prompts, max_sequence_length)
        return fixed

    def negative_embeddings(self, encode, text_encoders: list, embeds, pooled):
        """The empty prompt, as the pipeline's classifier-free guidance encodes it."""
        return encode([""], text_encoders)

    # ---- the training objective ---------------------------------------------------------------

    def loss_inputs(self, denoiser, scheduler, batch, cond, pooled, scheme: str = "none"):
        """(prediction, target e - x0, per-sample weights): the latents moved to noise level s = t / T
        along the straight path, packed, through the transformer with the prompt's mask, unpacked."""
        import torch

        from diffusers import ChromaPipeline

        x0, noise = batch.latents, batch.noise
        b, c, h, w = x0.shape
        sigmas, s = self.sigmas(batch, scheduler)
        noisy = (1.0 - s) * x0 + s * noise
        packed = ChromaPipeline._pack_latents(noisy, b, c, h, w)
        mask = ChromaPipeline._prepare_attention_mask(None, b, packed.shape[1], x0.dtype, attention_mask=pooled.to(cond.dtype))
        pred = denoiser(hidden_states=packed, timestep=batch.timesteps.to(x0.dtype) / 1000,
                        encoder_hidden_states=cond, attention_mask=mask,
                        txt_ids=torch.zeros(cond.shape[1], 3, device=x0.device, dtype=cond.dtype),
                        img_ids=ChromaPipeline._prepare_latent_image_ids(b, h // 2, w // 2, x0.device, x0.dtype),
                        return_dict=False)[0]
        pred = ChromaPipeline._unpack_latents(pred, h, w, 1)  # (a VAE factor of 1: sizes in latent pixels)
        return pred, noise - x0, loss_weighting(scheme, sigmas)

    # ---- drawing ------------------------------------------------------------------------------

    def inference_pipeline(self, vae, denoiser, scheduler):
        from diffusers import ChromaPipeline, FlowMatchEulerDiscreteScheduler

        return ChromaPipeline(scheduler=FlowMatchEulerDiscreteScheduler.from_config(scheduler.config), vae=vae,
                              text_encoder=None, tokenizer=None, transformer=denoiser)

    def embedding_kwargs(self, embeds, negative, pooled, negative_pooled, index: int, count: int) -> dict:
        return {"prompt_embeds": embeds[index:index + 1].expand(count, -1, -1),
                "prompt_attention_mask": pooled[index:index + 1].expand(count, -1),
                "negative_prompt_embeds": negative[:1].expand(count, -1, -1),
                "negative_prompt_attention_mask": negative_pooled[:1].expand(count, -1)}

    # ---- files ---------------------------------------------------------------------------------

    def native_module(self, name: str, model=None) -> tuple[str, tuple[str, ...]]:
        """FLUX.1's block names, and the distilled guidance layer's MLPs (`layers.N.in_layer`)."""
        found = GUIDANCE_MLP.fullmatch(name)
        if found:
            return f"distilled_guidance_layer.layers.{found[1]}.{GUIDANCE_NAMES[found[2]]}", (name,)
        return super().native_module(name, model)

    def webui_kind(self, part: str, key: str) -> str | None:
        found = re.fullmatch(r"lora_unet_distilled_guidance_layer_layers_\d+_(in|out)_layer", key) if part == "transformer" else None
        return f"distilled_guidance_layer.layers.{found[1]}_layer" if found else super().webui_kind(part, key)

    def webui_metadata(self, pipe) -> dict:
        return {"ss_base_model_version": "chroma", "ss_v2": "False"}

"""FLUX.1 (dev and schnell): CLIP-L's pooled embedding + T5, a rectified-flow MM-DiT.

Conditioning: the transformer attends to T5's last hidden state (B, L, 4096; L =
max_sequence_length) with text position ids (L, 3) of zeros, and adds CLIP-L's pooled output
(B, 768) to its timestep embedding; dev also embeds a guidance value (guidance distillation).
Latents: the VAE's 16 channels, shifted and scaled, packed 2x2 into tokens: (B, 16, h, w) ->
(B, h/2 * w/2, 64) with image position ids (h/2 * w/2, 3). Training (diffusers'
`train_dreambooth_lora_flux.py`): s drawn per `weighting_scheme`, x_s = (1 - s) x0 + s e, the
transformer at timestep s predicts e - x0, the loss weighted per scheme (`flow.py`). CLIP is the
only text encoder adapters may train; T5 stays frozen.
"""

from __future__ import annotations

from .dit import FlowTransformer, t5_length
from .flow import loss_weighting
from .sd import token_ids

# diffusers' train_dreambooth_lora_flux.py default `--lora_layers` (single blocks' attn.to_q/k/v match too)
FLUX_TARGETS = ("attn.to_k", "attn.to_q", "attn.to_v", "attn.to_out.0", "attn.add_k_proj", "attn.add_q_proj",
                "attn.add_v_proj", "attn.to_add_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj",
                "ff_context.net.2")

# the BFL checkpoint's names (ComfyUI's and Forge's FLUX models, kohya sd-scripts' FLUX LoRAs), as
# diffusers' `convert_flux_transformer_checkpoint_to_diffusers` splits them
FLUX_DOUBLE = {"img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
               "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
               "img_attn.proj": ("attn.to_out.0",), "txt_attn.proj": ("attn.to_add_out",),
               "img_mlp.0": ("ff.net.0.proj",), "img_mlp.2": ("ff.net.2",),
               "txt_mlp.0": ("ff_context.net.0.proj",), "txt_mlp.2": ("ff_context.net.2",),
               "img_mod.lin": ("norm1.linear",), "txt_mod.lin": ("norm1_context.linear",)}
FLUX_SINGLE = {"linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"), "linear2": ("proj_out",),
               "modulation.lin": ("norm.linear",)}
FLUX_TOP = {"img_in": ("x_embedder",), "txt_in": ("context_embedder",), "final_layer.linear": ("proj_out",),
            "time_in.in_layer": ("time_text_embed.timestep_embedder.linear_1",),
            "time_in.out_layer": ("time_text_embed.timestep_embedder.linear_2",),
            "vector_in.in_layer": ("time_text_embed.text_embedder.linear_1",),
            "vector_in.out_layer": ("time_text_embed.text_embedder.linear_2",),
            "guidance_in.in_layer": ("time_text_embed.guidance_embedder.linear_1",),
            "guidance_in.out_layer": ("time_text_embed.guidance_embedder.linear_2",)}


class Flux1(FlowTransformer):
    name = "flux1"
    default_guidance = 3.5  # FluxPipeline's: dev's distilled guidance, one pass (schnell ignores it)
    distilled_guidance = True
    label = "FLUX.1"
    pipeline_class = "FluxPipeline"
    pipeline_classes = ("FluxPipeline",)
    transformer_class = "FluxTransformer2DModel"
    tag = "flux"
    encoder_parts = ("text_encoder",)  # CLIP-L; T5 (text_encoder_2) is never adapted
    tokenizer_parts = ("tokenizer",)
    t5_parts = ("tokenizer_2", "text_encoder_2")
    embedding_keys = ("clip_l",)
    default_targets = {"transformer": FLUX_TARGETS}
    webui_versions = ("flux1",)  # the `ss_base_model_version` its web UI files carry
    kohya_prefixes = {"transformer": "lora_unet_", "text_encoder": "lora_te1_"}  # sd-scripts' FLUX names
    native_blocks = {("transformer_blocks", "double_blocks"): FLUX_DOUBLE,
                     ("single_transformer_blocks", "single_blocks"): FLUX_SINGLE}
    native_top = FLUX_TOP
    # diffusers' defaults; T5 length None: the T5 tokenizer's own, at most 512 (FLUX.1's is 512; a toy's may be
    # shorter, and FLUX pads every prompt to it with no mask, so it is drawn at the length it was trained at)
    flow_defaults = {"weighting_scheme": "none", "guidance_scale": 3.5, "max_sequence_length": None}

    # ---- loading ------------------------------------------------------------------------------

    def _load_parts(self, path: str, revision, variant) -> tuple[list, list, object, object]:
        """CLIP-L and T5 with their tokenizers, the transformer, the flow-matching scheduler."""
        from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
        from transformers import CLIPTextModel, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

        kw = dict(revision=revision, variant=variant)
        return ([CLIPTokenizer.from_pretrained(path, subfolder="tokenizer", revision=revision),
                 T5TokenizerFast.from_pretrained(path, subfolder="tokenizer_2", revision=revision)],
                [CLIPTextModel.from_pretrained(path, subfolder="text_encoder", **kw),
                 T5EncoderModel.from_pretrained(path, subfolder="text_encoder_2", **kw)],
                FluxTransformer2DModel.from_pretrained(path, subfolder="transformer", **kw),
                FlowMatchEulerDiscreteScheduler.from_pretrained(path, subfolder="scheduler", revision=revision))

    def text_parts(self, pipe) -> tuple[list, list]:
        return [pipe.tokenizer], [pipe.text_encoder]

    def latent_shape(self, pipe, count: int, width: int, height: int) -> tuple[int, ...]:
        f = pipe.vae_scale_factor
        return (count, pipe.transformer.config.in_channels // 4, 2 * (height // (f * 2)), 2 * (width // (f * 2)))

    def pack_latents(self, pipe, latents):
        b, c, h, w = latents.shape
        return pipe._pack_latents(latents, b, c, h, w)

    # ---- prompts ------------------------------------------------------------------------------

    def encode_prompts(self, tokenizers: list, text_encoders: list, prompts: list[str], max_sequence_length=None,
                       fixed=None):
        """(T5 hidden states (B, L, D), CLIP-L pooled (B, P)), as `FluxPipeline.encode_prompt`;
        `fixed`: T5's states for these prompts, encoded before (T5 never trains)."""
        clip = text_encoders[0]
        pooled = clip(token_ids(tokenizers[0], prompts).to(clip.device), output_hidden_states=False).pooler_output
        if fixed is None:
            fixed = self.encode_fixed(tokenizers, text_encoders, prompts, max_sequence_length)
        return fixed, pooled

    def negative_embeddings(self, encode, text_encoders: list, embeds, pooled):
        """FLUX.1 draws without a negative branch (guidance is distilled): none."""
        return None, None

    # ---- the training objective ---------------------------------------------------------------

    def validation_guidance(self, cfg) -> float:
        return self.setting(cfg, "guidance_scale")

    def loss_settings(self, cfg) -> dict:
        return {"scheme": self.setting(cfg, "weighting_scheme"), "guidance_scale": self.setting(cfg, "guidance_scale")}

    def loss_inputs(self, denoiser, scheduler, batch, cond, pooled, scheme: str = "none", guidance_scale: float = 3.5):
        """(prediction, target e - x0, per-sample weights): the latents moved to noise level s = t / T
        along the straight path, packed, through the transformer, unpacked."""
        import torch

        from diffusers import FluxPipeline

        x0, noise = batch.latents, batch.noise
        b, c, h, w = x0.shape
        sigmas, s = self.sigmas(batch, scheduler)
        noisy = (1.0 - s) * x0 + s * noise
        model = getattr(denoiser, "module", denoiser)  # DDP wraps it; the config is the model's
        guidance = (torch.full((b,), guidance_scale, device=x0.device, dtype=torch.float32)
                    if model.config.guidance_embeds else None)
        pred = denoiser(hidden_states=FluxPipeline._pack_latents(noisy, b, c, h, w),
                        timestep=batch.timesteps.to(x0.dtype) / 1000, guidance=guidance,
                        pooled_projections=pooled, encoder_hidden_states=cond,
                        txt_ids=torch.zeros(cond.shape[1], 3, device=x0.device, dtype=cond.dtype),
                        img_ids=FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, x0.device, x0.dtype),
                        return_dict=False)[0]
        pred = FluxPipeline._unpack_latents(pred, h, w, 1)  # (a VAE factor of 1: sizes in latent pixels)
        return pred, noise - x0, loss_weighting(scheme, sigmas)

    # ---- drawing ------------------------------------------------------------------------------

    def inference_pipeline(self, vae, denoiser, scheduler):
        from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

        return FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler.from_config(scheduler.config), vae=vae,
                            text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None,
                            transformer=denoiser)

    def embedding_kwargs(self, embeds, negative, pooled, negative_pooled, index: int, count: int) -> dict:
        return {"prompt_embeds": embeds[index:index + 1].expand(count, -1, -1),
                "pooled_prompt_embeds": pooled[index:index + 1].expand(count, -1)}

    def card_call(self, cfg, tokenizers: list) -> dict:
        """Size and T5 length where they differ from FluxPipeline's fixed defaults (1024 px, 512)."""
        length = self.setting(cfg, "max_sequence_length") or t5_length(tokenizers[-1])
        return {**({"height": cfg.resolution, "width": cfg.resolution} if cfg.resolution != 1024 else {}),
                **({"max_sequence_length": length} if length != 512 else {})}

    def draw_settings(self, pipe) -> dict:
        """T5 at the length training used by default (the pipeline's own default is always 512)."""
        return {"max_sequence_length": t5_length(pipe.tokenizer_2)}

    # ---- files ---------------------------------------------------------------------------------

    def webui_metadata(self, pipe) -> dict:
        return {"ss_base_model_version": "flux1", "ss_v2": "False"}

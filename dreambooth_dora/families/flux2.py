"""FLUX.2 [klein] (4B and 9B, base and distilled): one Qwen3 text encoder, a rectified-flow DiT.

Conditioning: Qwen3 reads the prompt through its chat template (one user turn, the generation
prompt, thinking off), padded to max_sequence_length (512); the hidden states of layers 9, 18 and
27 are stacked per token into (B, L, 3 * D) (`Flux2KleinPipeline._get_qwen3_prompt_embeds`, called
here, so the embeddings are the pipeline's bit for bit), with 4-D text position ids (0, 0, 0, l).
No pooled embedding and no guidance embedding: the base models draw with classifier-free guidance
against the empty prompt (4.0), the distilled ones without.
Latents: the VAE's 32 channels (its latent distribution's mode, as diffusers' script), patchified
2x2 into 128 channels and normalised by the VAE's batch-norm statistics, packed one token per
position with 4-D image ids (0, h, w, 0). Training (diffusers' `train_dreambooth_lora_flux2_klein.py`):
s drawn per `weighting_scheme` (default none: uniform), x_s = (1 - s) x0 + s e, the transformer at
timestep s predicts e - x0, the loss weighted per scheme (`flow.py`). Qwen3 never trains: each
caption is encoded once and the encoder leaves the device.
"""

from __future__ import annotations

from .dit import OneEncoderTransformer
from .flow import loss_weighting

# diffusers' train_dreambooth_lora_flux2_klein.py default targets: the double blocks' attention, the
# single blocks' fused to_qkv_mlp_proj, and each single block's attention output (named one by one:
# `attn.to_out` alone would also name the double blocks' output list)
FLUX2_TARGETS = ("to_k", "to_q", "to_v", "to_out.0", "to_qkv_mlp_proj")
SINGLE_OUT = "single_transformer_blocks.{}.attn.to_out"
QWEN3_LAYERS = (9, 18, 27)  # Flux2KleinPipeline's text_encoder_out_layers

# the BFL checkpoint's names (ComfyUI's FLUX.2 models; its LoRA keys are `lora_unet_` + these with `_`),
# as diffusers' `convert_flux2_transformer_checkpoint_to_diffusers` renames them: one to one, except
# the double blocks' fused q, k, v (split into three) and the final modulation (shift and scale
# swapped: not mapped). The single blocks' linear1 is diffusers' fused to_qkv_mlp_proj already.
FLUX2_DOUBLE = {"img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
                "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
                "img_attn.proj": ("attn.to_out.0",), "txt_attn.proj": ("attn.to_add_out",),
                "img_mlp.0": ("ff.linear_in",), "img_mlp.2": ("ff.linear_out",),
                "txt_mlp.0": ("ff_context.linear_in",), "txt_mlp.2": ("ff_context.linear_out",)}
FLUX2_SINGLE = {"linear1": ("attn.to_qkv_mlp_proj",), "linear2": ("attn.to_out",)}
FLUX2_TOP = {"img_in": ("x_embedder",), "txt_in": ("context_embedder",), "final_layer.linear": ("proj_out",),
             "time_in.in_layer": ("time_guidance_embed.timestep_embedder.linear_1",),
             "time_in.out_layer": ("time_guidance_embed.timestep_embedder.linear_2",),
             "guidance_in.in_layer": ("time_guidance_embed.guidance_embedder.linear_1",),
             "guidance_in.out_layer": ("time_guidance_embed.guidance_embedder.linear_2",),
             "double_stream_modulation_img.lin": ("double_stream_modulation_img.linear",),
             "double_stream_modulation_txt.lin": ("double_stream_modulation_txt.linear",),
             "single_stream_modulation.lin": ("single_stream_modulation.linear",)}


class Flux2Klein(OneEncoderTransformer):
    name = "flux2_klein"
    label = "FLUX.2 [klein]"
    pipeline_class = "Flux2KleinPipeline"
    pipeline_classes = ("Flux2KleinPipeline",)
    transformer_class = "Flux2Transformer2DModel"
    tag = "flux2-klein"
    default_targets = {"transformer": FLUX2_TARGETS}
    default_guidance = 4.0  # Flux2KleinPipeline's: classifier-free guidance (the distilled models ignore it)
    native_blocks = {("transformer_blocks", "double_blocks"): FLUX2_DOUBLE,
                     ("single_transformer_blocks", "single_blocks"): FLUX2_SINGLE}
    native_top = FLUX2_TOP
    webui_versions = ("flux2_klein",)  # the `ss_base_model_version` its web UI files carry
    vae_class = "AutoencoderKLFlux2"
    refused = {**OneEncoderTransformer.refused,
               "masked_loss": "masked loss is not mapped onto its 2x2-patchified latents yet"}

    def denoiser_targets(self, cfg, model=None) -> list[str]:
        """`lora_layers`, else diffusers' defaults with every single block's output of `model` (without
        the model, as the model card writes them: `single_transformer_blocks.N.attn.to_out`)."""
        if cfg.lora_layers:
            return list(cfg.lora_layers)
        blocks = range(len(model.single_transformer_blocks)) if model is not None else ["N"]
        return [*FLUX2_TARGETS, *(SINGLE_OUT.format(i) for i in blocks)]

    def matches(self, index: dict) -> bool:
        """Flux2KleinPipeline, or another pipeline class with FLUX.2's transformer and a Qwen3 encoder
        (FLUX.2 dev's Mistral encoder is another family)."""
        if index.get("_class_name") in self.pipeline_classes:
            return True
        transformer, encoder = index.get("transformer") or [], index.get("text_encoder") or []
        return (len(transformer) > 1 and transformer[1] == self.transformer_class
                and len(encoder) > 1 and str(encoder[1]).startswith("Qwen3"))

    # ---- loading ------------------------------------------------------------------------------

    def _load_parts(self, path: str, revision, variant) -> tuple[list, list, object, object]:
        """Qwen3 and its tokenizer, the transformer, the flow-matching scheduler."""
        from diffusers import FlowMatchEulerDiscreteScheduler, Flux2Transformer2DModel
        from transformers import AutoTokenizer, Qwen3ForCausalLM

        kw = dict(revision=revision, variant=variant)
        return ([AutoTokenizer.from_pretrained(path, subfolder="tokenizer", revision=revision)],
                [Qwen3ForCausalLM.from_pretrained(path, subfolder="text_encoder", **kw)],
                Flux2Transformer2DModel.from_pretrained(path, subfolder="transformer", **kw),
                FlowMatchEulerDiscreteScheduler.from_pretrained(path, subfolder="scheduler", revision=revision))

    def latent_shape(self, pipe, count: int, width: int, height: int) -> tuple[int, ...]:
        """(count, 128, h/16, w/16): the pipeline's initial latents before packing."""
        f = pipe.vae_scale_factor * 2
        return (count, pipe.transformer.config.in_channels, height // f, width // f)

    def vae_latents(self, vae, sample):
        """A VAE latent (B, 32, h, w) in the transformer's space: 2x2 patches (B, 128, h/2, w/2),
        normalised by the VAE's batch-norm running statistics."""
        import torch

        from diffusers import Flux2KleinPipeline

        x = Flux2KleinPipeline._patchify_latents(sample)
        mean = vae.bn.running_mean.view(1, -1, 1, 1).to(x)
        std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps).to(x)
        return (x - mean) / std

    # ---- prompts ------------------------------------------------------------------------------

    def encode_fixed(self, tokenizers: list, text_encoders: list, prompts: list[str], max_sequence_length=None):
        """Qwen3's stacked hidden states (B, L, 3 D), as `Flux2KleinPipeline.encode_prompt`."""
        from diffusers import Flux2KleinPipeline

        return Flux2KleinPipeline._get_qwen3_prompt_embeds(
            text_encoders[0], tokenizers[0], list(prompts), max_sequence_length=max_sequence_length or 512,
            hidden_states_layers=QWEN3_LAYERS)

    def encode_prompts(self, tokenizers: list, text_encoders: list, prompts: list[str], max_sequence_length=None,
                       fixed=None):
        """(Qwen3's embeddings (B, L, 3 D), None): no pooled embedding."""
        if fixed is None:
            fixed = self.encode_fixed(tokenizers, text_encoders, prompts, max_sequence_length)
        return fixed, None

    def negative_embeddings(self, encode, text_encoders: list, embeds, pooled):
        """The empty prompt, as the pipeline's classifier-free guidance encodes it."""
        return encode([""], text_encoders)[0], None

    # ---- the training objective ---------------------------------------------------------------

    def loss_inputs(self, denoiser, scheduler, batch, cond, pooled, scheme: str = "none"):
        """(prediction, target e - x0, per-sample weights): the latents moved to noise level s = t / T
        along the straight path, packed with their position ids, through the transformer, unpacked."""
        import torch

        from diffusers import Flux2KleinPipeline

        x0, noise = batch.latents, batch.noise
        b, _, h, w = x0.shape
        sigmas, s = self.sigmas(batch, scheduler)
        noisy = (1.0 - s) * x0 + s * noise
        model = getattr(denoiser, "module", denoiser)  # DDP wraps it; the config is the model's
        guidance = (torch.full((b,), 1.0, device=x0.device, dtype=torch.float32)
                    if model.config.guidance_embeds else None)
        img_ids = Flux2KleinPipeline._prepare_latent_ids(noisy).to(x0.device)
        txt_ids = Flux2KleinPipeline._prepare_text_ids(cond).to(x0.device)
        pred = denoiser(hidden_states=Flux2KleinPipeline._pack_latents(noisy), timestep=batch.timesteps.to(x0.dtype) / 1000,
                        guidance=guidance, encoder_hidden_states=cond, txt_ids=txt_ids, img_ids=img_ids,
                        return_dict=False)[0]
        pred = Flux2KleinPipeline._unpack_latents_with_ids(pred, img_ids, h, w)
        return pred, noise - x0, loss_weighting(scheme, sigmas)

    # ---- drawing ------------------------------------------------------------------------------

    def inference_pipeline(self, vae, denoiser, scheduler):
        from diffusers import FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline

        return Flux2KleinPipeline(scheduler=FlowMatchEulerDiscreteScheduler.from_config(scheduler.config), vae=vae,
                                  text_encoder=None, tokenizer=None, transformer=denoiser)

    def embedding_kwargs(self, embeds, negative, pooled, negative_pooled, index: int, count: int) -> dict:
        return {"prompt_embeds": embeds[index:index + 1].expand(count, -1, -1),
                "negative_prompt_embeds": negative.expand(count, -1, -1)}

    def prompt_call(self, pipe, prompt: str, negative: str | None) -> dict:
        """Flux2KleinPipeline takes no negative prompt text (its guidance uses the empty prompt): a
        negative prompt is encoded here and passed as its embeddings."""
        if not negative:
            return {"prompt": prompt}
        return {"prompt": prompt, "negative_prompt_embeds": pipe.encode_prompt(negative)[0]}

    # ---- files ---------------------------------------------------------------------------------

    def webui_metadata(self, pipe) -> dict:
        return {"ss_base_model_version": "flux2_klein", "ss_v2": "False"}

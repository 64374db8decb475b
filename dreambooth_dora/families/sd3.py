"""Stable Diffusion 3 / 3.5 (medium, large): CLIP-L + CLIP-G + T5, a rectified-flow MM-DiT.

Conditioning (`StableDiffusion3Pipeline.encode_prompt`, no clip skip): both CLIPs' penultimate
hidden states concatenated (B, 77, 768 + 1280), zero-padded to T5's width and joined with T5's
last hidden state along the sequence (B, 77 + L, 4096); the pooled, projected outputs of both
CLIPs concatenated (B, 2048). Latents: the VAE's 16 channels shifted and scaled, not packed.
Training (diffusers' `train_dreambooth_lora_sd3.py`): s per `weighting_scheme` (default
logit_normal), x_s = (1 - s) x0 + s e, the transformer at timestep t = s T; with
`precondition_outputs` (its default) the prediction is turned into x0's estimate
x_s - s * pred and compared with x0, else pred is compared with e - x0. Adapters may train both
CLIPs; T5 never trains.
"""

from __future__ import annotations

from .dit import FlowTransformer
from .flow import loss_weighting
from .sd import token_ids

# diffusers' train_dreambooth_lora_sd3.py default `--lora_layers`: the joint attention's projections
SD3_TARGETS = ("attn.add_k_proj", "attn.add_q_proj", "attn.add_v_proj", "attn.to_add_out", "attn.to_k",
               "attn.to_out.0", "attn.to_q", "attn.to_v")

# the SAI checkpoint's names (ComfyUI's and Forge's SD 3 models, kohya sd-scripts' SD 3 LoRAs), as
# diffusers' `convert_sd3_transformer_checkpoint_to_diffusers` splits them (attn2: SD 3.5's MMDiT-X)
SD3_JOINT = {"x_block.attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
             "context_block.attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
             "x_block.attn.proj": ("attn.to_out.0",), "context_block.attn.proj": ("attn.to_add_out",),
             "x_block.attn2.qkv": ("attn2.to_q", "attn2.to_k", "attn2.to_v"), "x_block.attn2.proj": ("attn2.to_out.0",),
             "x_block.mlp.fc1": ("ff.net.0.proj",), "x_block.mlp.fc2": ("ff.net.2",),
             "context_block.mlp.fc1": ("ff_context.net.0.proj",), "context_block.mlp.fc2": ("ff_context.net.2",),
             "x_block.adaLN_modulation.1": ("norm1.linear",),
             "context_block.adaLN_modulation.1": ("norm1_context.linear",)}
SD3_TOP = {"x_embedder.proj": ("pos_embed.proj",), "context_embedder": ("context_embedder",),
           "t_embedder.mlp.0": ("time_text_embed.timestep_embedder.linear_1",),
           "t_embedder.mlp.2": ("time_text_embed.timestep_embedder.linear_2",),
           "y_embedder.mlp.0": ("time_text_embed.text_embedder.linear_1",),
           "y_embedder.mlp.2": ("time_text_embed.text_embedder.linear_2",), "final_layer.linear": ("proj_out",)}


class StableDiffusion3(FlowTransformer):
    name = "sd3"
    default_guidance = 7.0  # StableDiffusion3Pipeline's
    label = "Stable Diffusion 3 / 3.5"
    pipeline_class = "StableDiffusion3Pipeline"
    pipeline_classes = ("StableDiffusion3Pipeline",)
    transformer_class = "SD3Transformer2DModel"
    tag = "stable-diffusion-3"
    encoder_parts = ("text_encoder", "text_encoder_2")  # CLIP-L, CLIP-G; T5 (text_encoder_3) never trains
    tokenizer_parts = ("tokenizer", "tokenizer_2")
    t5_parts = ("tokenizer_3", "text_encoder_3")
    embedding_keys = ("clip_l", "clip_g")
    default_targets = {"transformer": SD3_TARGETS}
    webui_versions = ("sd3",)  # the `ss_base_model_version` its web UI files carry
    kohya_prefixes = {"transformer": "lora_unet_", "text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}
    native_blocks = {("transformer_blocks", "joint_blocks"): SD3_JOINT}
    native_top = SD3_TOP
    # diffusers' train_dreambooth_lora_sd3.py defaults
    flow_defaults = {"weighting_scheme": "logit_normal", "precondition_outputs": True, "max_sequence_length": 77}

    def _load_parts(self, path: str, revision, variant) -> tuple[list, list, object, object]:
        """Both CLIPs (with projection) and T5 with their tokenizers, the transformer, the
        flow-matching scheduler."""
        from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
        from transformers import CLIPTextModelWithProjection, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

        kw = dict(revision=revision, variant=variant)
        return ([CLIPTokenizer.from_pretrained(path, subfolder="tokenizer", revision=revision),
                 CLIPTokenizer.from_pretrained(path, subfolder="tokenizer_2", revision=revision),
                 T5TokenizerFast.from_pretrained(path, subfolder="tokenizer_3", revision=revision)],
                [CLIPTextModelWithProjection.from_pretrained(path, subfolder="text_encoder", **kw),
                 CLIPTextModelWithProjection.from_pretrained(path, subfolder="text_encoder_2", **kw),
                 T5EncoderModel.from_pretrained(path, subfolder="text_encoder_3", **kw)],
                SD3Transformer2DModel.from_pretrained(path, subfolder="transformer", **kw),
                FlowMatchEulerDiscreteScheduler.from_pretrained(path, subfolder="scheduler", revision=revision))

    def text_parts(self, pipe) -> tuple[list, list]:
        return [pipe.tokenizer, pipe.tokenizer_2], [pipe.text_encoder, pipe.text_encoder_2]

    def latent_shape(self, pipe, count: int, width: int, height: int) -> tuple[int, ...]:
        f = pipe.vae_scale_factor
        return (count, pipe.transformer.config.in_channels, height // f, width // f)

    # ---- prompts ------------------------------------------------------------------------------

    def encode_prompts(self, tokenizers: list, text_encoders: list, prompts: list[str], max_sequence_length=None,
                       fixed=None):
        """(joint prompt embeddings (B, 77 + L, D_T5), pooled (B, P_L + P_G)); `fixed`: T5's states."""
        import torch

        hidden, pooled = [], []
        for tok, enc in zip(tokenizers[:2], text_encoders[:2]):
            out = enc(token_ids(tok, prompts).to(enc.device), output_hidden_states=True)
            pooled.append(out[0])  # text_embeds: the projected, pooled output
            hidden.append(out.hidden_states[-2])
        if fixed is None:
            fixed = self.encode_fixed(tokenizers, text_encoders, prompts, max_sequence_length)
        clip = torch.cat(hidden, dim=-1)
        clip = torch.nn.functional.pad(clip, (0, fixed.shape[-1] - clip.shape[-1]))
        return torch.cat([clip, fixed.to(clip.dtype)], dim=-2), torch.cat(pooled, dim=-1)

    def negative_embeddings(self, encode, text_encoders: list, embeds, pooled):
        """The empty prompt, encoded (SD 3 draws with true classifier-free guidance)."""
        return encode([""], text_encoders)

    def validation_guidance(self, cfg) -> float:
        return 7.0

    # ---- the training objective ---------------------------------------------------------------

    def loss_settings(self, cfg) -> dict:
        return {"scheme": self.setting(cfg, "weighting_scheme"), "precondition": self.setting(cfg, "precondition_outputs")}

    def loss_inputs(self, denoiser, scheduler, batch, cond, pooled, scheme: str = "logit_normal",
                    precondition: bool = True):
        x0, noise = batch.latents, batch.noise
        sigmas, s = self.sigmas(batch, scheduler)
        noisy = (1.0 - s) * x0 + s * noise
        pred = denoiser(hidden_states=noisy, timestep=batch.timesteps.to(x0.device, x0.dtype),
                        encoder_hidden_states=cond, pooled_projections=pooled, return_dict=False)[0]
        if precondition:  # the prediction as an estimate of x0 (EDM-style preconditioning)
            return pred * (-s) + noisy, x0, loss_weighting(scheme, sigmas)
        return pred, noise - x0, loss_weighting(scheme, sigmas)

    # ---- drawing ------------------------------------------------------------------------------

    def inference_pipeline(self, vae, denoiser, scheduler):
        from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

        return StableDiffusion3Pipeline(transformer=denoiser, scheduler=FlowMatchEulerDiscreteScheduler.from_config(
            scheduler.config), vae=vae, text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None,
            text_encoder_3=None, tokenizer_3=None)

    def embedding_kwargs(self, embeds, negative, pooled, negative_pooled, index: int, count: int) -> dict:
        return {"prompt_embeds": embeds[index:index + 1].expand(count, -1, -1),
                "negative_prompt_embeds": negative.expand(count, -1, -1),
                "pooled_prompt_embeds": pooled[index:index + 1].expand(count, -1),
                "negative_pooled_prompt_embeds": negative_pooled.expand(count, -1)}

    def native_module(self, name: str, model=None) -> tuple[str, tuple[str, ...]]:
        """As FlowTransformer's; the last block's context modulation is stored with shift and scale
        swapped (a row permutation not mapped here): refused."""
        last = model.config.num_layers - 1 if model is not None else None
        if name == f"transformer_blocks.{last}.norm1_context.linear":
            raise ValueError(f"layer {name!r}: SD 3's checkpoints store the last block's context modulation with "
                             "shift and scale swapped (not mapped); adapt other layers, or export --format fused")
        return super().native_module(name, model)

    def textual_inversion_lines(self, names: list[str], keys=None) -> list[str]:
        """StableDiffusion3Pipeline has no `load_textual_inversion`: its three steps, per encoder."""
        return [f"pipe.{tok}.add_tokens({names!r}); pipe.{enc}.resize_token_embeddings(len(pipe.{tok})); "
                f"pipe.{enc}.get_input_embeddings().weight.data[pipe.{tok}.convert_tokens_to_ids({names!r})] = "
                f'emb["{key}"]' for key, tok, enc in self.embedding_parts(keys or self.embedding_keys)]

    def webui_metadata(self, pipe) -> dict:
        return {"ss_base_model_version": "sd3", "ss_v2": "False"}

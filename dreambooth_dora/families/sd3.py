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

from .family import Components
from .flow import draw_timestep, loss_weighting
from .sd import UNET_ATTENTION_TARGETS, StableDiffusion, token_ids

# diffusers' train_dreambooth_lora_sd3.py default `--lora_layers`: the joint attention's projections
SD3_TARGETS = ("attn.add_k_proj", "attn.add_q_proj", "attn.add_v_proj", "attn.to_add_out", "attn.to_k",
               "attn.to_out.0", "attn.to_q", "attn.to_v")
DDPM_ONLY = {"snr_gamma": None, "prediction_type": None, "noise_offset": 0.0}


class StableDiffusion3(StableDiffusion):
    name = "sd3"
    label = "Stable Diffusion 3 / 3.5"
    pipeline_class = "StableDiffusion3Pipeline"
    pipeline_classes = ("StableDiffusion3Pipeline",)
    tag = "stable-diffusion-3"
    denoiser_part = "transformer"
    denoiser_label = "Transformer"
    encoder_parts = ("text_encoder", "text_encoder_2")  # CLIP-L, CLIP-G; T5 (text_encoder_3) never trains
    tokenizer_parts = ("tokenizer", "tokenizer_2")
    fixed_encoders = 1
    embedding_keys = ("clip_l", "clip_g")
    kohya_prefixes: dict[str, str] = {}  # web UI files for SD3: not written yet (fused export only)
    default_targets = {"transformer": SD3_TARGETS}
    size_step = 16
    schedulers = {"Euler (flow matching)": "FlowMatchEulerDiscreteScheduler"}
    default_weighting = "logit_normal"

    def matches(self, index: dict) -> bool:
        if index.get("_class_name") in self.pipeline_classes:
            return True
        entry = index.get("transformer") or []
        return len(entry) > 1 and entry[1] == "SD3Transformer2DModel"

    def check_settings(self, cfg) -> None:
        for name, default in DDPM_ONLY.items():
            if getattr(cfg, name) != default:
                raise ValueError(f"{name} is a DDPM setting; {self.label} trains by flow matching (see "
                                 "weighting_scheme) and would ignore it")
        if list(cfg.unet_target_modules) != list(UNET_ATTENTION_TARGETS):
            raise ValueError(f"unet_target_modules: {self.label} has no UNet; give its modules as lora_layers")
        if cfg.guidance_scale is not None:
            raise ValueError(f"guidance_scale is FLUX.1 dev's distilled guidance; {self.label} has none and would "
                             "ignore it")
        if cfg.train_text_encoder_ti:
            raise ValueError(f"train_text_encoder_ti (pivotal tuning) is not supported for {self.label} yet")
        if cfg.resolution % 16:
            raise ValueError(f"resolution {cfg.resolution}: {self.label} needs a multiple of 16 (8x VAE, 2x2 patches)")
        if cfg.aspect_buckets and cfg.bucket_step % 16:
            raise ValueError(f"bucket_step {cfg.bucket_step}: {self.label}'s sizes are multiples of 16")

    def denoiser_targets(self, cfg) -> list[str]:
        return list(cfg.lora_layers or self.default_targets["transformer"])

    def load_components(self, path: str, revision: str | None = None, variant: str | None = None,
                        vae_path: str | None = None, prediction_type: str | None = None) -> Components:
        """Both CLIPs (with projection) and T5 with their tokenizers, the VAE, the transformer, the
        flow-matching scheduler."""
        from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
        from transformers import CLIPTextModelWithProjection, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

        from .models import ModelLoadError, load_vae

        where, kw = path, dict(revision=revision, variant=variant)
        try:
            tokenizers = [CLIPTokenizer.from_pretrained(path, subfolder="tokenizer", revision=revision),
                          CLIPTokenizer.from_pretrained(path, subfolder="tokenizer_2", revision=revision),
                          T5TokenizerFast.from_pretrained(path, subfolder="tokenizer_3", revision=revision)]
            text_encoders = [CLIPTextModelWithProjection.from_pretrained(path, subfolder="text_encoder", **kw),
                             CLIPTextModelWithProjection.from_pretrained(path, subfolder="text_encoder_2", **kw),
                             T5EncoderModel.from_pretrained(path, subfolder="text_encoder_3", **kw)]
            transformer = SD3Transformer2DModel.from_pretrained(path, subfolder="transformer", **kw)
            scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(path, subfolder="scheduler", revision=revision)
            if vae_path:
                where = vae_path
                vae = load_vae(vae_path)
            else:
                vae = AutoencoderKL.from_pretrained(path, subfolder="vae", **kw)
        except (OSError, ValueError) as err:
            first = (str(err).strip().splitlines() or [type(err).__name__])[0]
            raise ModelLoadError(f"cannot load model {where!r}: {first}") from None
        return Components(tokenizers, text_encoders, vae, transformer, scheduler)

    def text_parts(self, pipe) -> tuple[list, list]:
        return [pipe.tokenizer, pipe.tokenizer_2], [pipe.text_encoder, pipe.text_encoder_2]

    def native_size(self, pipe) -> int:
        return pipe.default_sample_size * pipe.vae_scale_factor

    def latent_shape(self, pipe, count: int, width: int, height: int) -> tuple[int, ...]:
        f = pipe.vae_scale_factor
        return (count, pipe.transformer.config.in_channels, height // f, width // f)

    def vae_latents(self, vae, sample):
        return (sample - vae.config.shift_factor) * vae.config.scaling_factor

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

    def encode_fixed(self, tokenizers: list, text_encoders: list, prompts: list[str], max_sequence_length=None):
        """T5's last hidden state (B, L, D) for the prompts."""
        t5 = text_encoders[2]
        length = max_sequence_length or tokenizers[2].model_max_length
        ids = tokenizers[2](prompts, padding="max_length", max_length=length, truncation=True,
                            add_special_tokens=True, return_tensors="pt").input_ids
        return t5(ids.to(t5.device))[0]

    def negative_embeddings(self, encode, text_encoders: list, embeds, pooled):
        """The empty prompt, encoded (SD 3 draws with true classifier-free guidance)."""
        return encode([""], text_encoders)

    def prompt_settings(self, cfg) -> dict:
        return {"max_sequence_length": cfg.max_sequence_length or 77}  # diffusers' SD 3 script's default

    def validation_guidance(self, cfg) -> float:
        return 7.0

    # ---- the training objective ---------------------------------------------------------------

    def noise_settings(self, cfg) -> dict:
        return {"scheme": cfg.weighting_scheme or self.default_weighting, "logit_mean": cfg.logit_mean,
                "logit_std": cfg.logit_std, "mode_scale": cfg.mode_scale}

    def loss_settings(self, cfg) -> dict:
        return {"scheme": cfg.weighting_scheme or self.default_weighting,
                "precondition": True if cfg.precondition_outputs is None else cfg.precondition_outputs}

    def draw_noise(self, latent, generator, scheduler, scheme: str = "logit_normal", logit_mean: float = 0.0,
                   logit_std: float = 1.0, mode_scale: float = 1.29):
        import torch

        noise = torch.randn(latent.shape, generator=generator, dtype=torch.float32).to(latent)
        return noise, draw_timestep(scheduler, generator, scheme, logit_mean, logit_std, mode_scale)

    def loss_inputs(self, denoiser, scheduler, batch, cond, pooled, scheme: str = "logit_normal",
                    precondition: bool = True):
        x0, noise = batch.latents, batch.noise
        sigmas = (batch.timesteps.float() / scheduler.config.num_train_timesteps).to(x0.device)
        s = sigmas.reshape(-1, 1, 1, 1).to(x0.dtype)
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

    def webui_metadata(self, pipe) -> dict:
        return {"ss_base_model_version": "sd3", "ss_v2": "False"}

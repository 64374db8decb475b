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

from .family import Components
from .flow import draw_timestep, loss_weighting
from .sd import UNET_ATTENTION_TARGETS, StableDiffusion, token_ids

# diffusers' train_dreambooth_lora_flux.py default `--lora_layers` (single blocks' attn.to_q/k/v match too)
FLUX_TARGETS = ("attn.to_k", "attn.to_q", "attn.to_v", "attn.to_out.0", "attn.add_k_proj", "attn.add_q_proj",
                "attn.add_v_proj", "attn.to_add_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj",
                "ff_context.net.2")
DDPM_ONLY = {"snr_gamma": None, "prediction_type": None, "noise_offset": 0.0}
DEFAULTS = {"weighting_scheme": "none", "guidance_scale": 3.5, "max_sequence_length": 512}  # diffusers' FLUX script


class Flux1(StableDiffusion):
    name = "flux1"
    label = "FLUX.1"
    pipeline_class = "FluxPipeline"
    pipeline_classes = ("FluxPipeline",)
    tag = "flux"
    denoiser_part = "transformer"
    denoiser_label = "Transformer"
    size_step = 16  # 8x VAE, 2x2 packing
    schedulers = {"Euler (flow matching)": "FlowMatchEulerDiscreteScheduler"}
    encoder_parts = ("text_encoder",)  # CLIP-L; T5 (text_encoder_2) is never adapted
    fixed_encoders = 1  # the last text encoder (T5) never trains: encoded once, then it leaves the device
    tokenizer_parts = ("tokenizer",)
    embedding_keys = ("clip_l",)
    kohya_prefixes: dict[str, str] = {}  # kohya / ComfyUI files for FLUX.1: not written yet (fused export only)
    default_targets = {"transformer": FLUX_TARGETS}

    def matches(self, index: dict) -> bool:
        if index.get("_class_name") in self.pipeline_classes:
            return True
        entry = index.get("transformer") or []
        return len(entry) > 1 and entry[1] == "FluxTransformer2DModel"

    def check_settings(self, cfg) -> None:
        for name, default in DDPM_ONLY.items():
            if getattr(cfg, name) != default:
                raise ValueError(f"{name} is a DDPM setting; {self.label} trains by flow matching (see "
                                 "weighting_scheme) and would ignore it")
        if cfg.precondition_outputs is not None:
            raise ValueError(f"precondition_outputs is an SD 3 setting; {self.label} would ignore it")
        if list(cfg.unet_target_modules) != list(UNET_ATTENTION_TARGETS):
            raise ValueError(f"unet_target_modules: {self.label} has no UNet; give its modules as lora_layers")
        if cfg.train_text_encoder_ti:
            raise ValueError(f"train_text_encoder_ti (pivotal tuning) is not supported for {self.label} yet")
        if cfg.resolution % 16:
            raise ValueError(f"resolution {cfg.resolution}: {self.label} needs a multiple of 16 (8x VAE, 2x2 packing)")
        if cfg.aspect_buckets and cfg.bucket_step % 16:
            raise ValueError(f"bucket_step {cfg.bucket_step}: {self.label}'s sizes are multiples of 16")

    def denoiser_targets(self, cfg) -> list[str]:
        return list(cfg.lora_layers or self.default_targets["transformer"])

    # ---- loading ------------------------------------------------------------------------------

    def load_components(self, path: str, revision: str | None = None, variant: str | None = None,
                        vae_path: str | None = None, prediction_type: str | None = None) -> Components:
        """CLIP-L and T5 with their tokenizers, the VAE, the transformer, the flow-matching scheduler."""
        from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
        from transformers import CLIPTextModel, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

        from .models import ModelLoadError, load_vae

        where = path
        kw = dict(revision=revision, variant=variant)
        try:
            tokenizers = [CLIPTokenizer.from_pretrained(path, subfolder="tokenizer", revision=revision),
                          T5TokenizerFast.from_pretrained(path, subfolder="tokenizer_2", revision=revision)]
            text_encoders = [CLIPTextModel.from_pretrained(path, subfolder="text_encoder", **kw),
                             T5EncoderModel.from_pretrained(path, subfolder="text_encoder_2", **kw)]
            transformer = FluxTransformer2DModel.from_pretrained(path, subfolder="transformer", **kw)
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
        return [pipe.tokenizer], [pipe.text_encoder]

    def native_size(self, pipe) -> int:
        return pipe.default_sample_size * pipe.vae_scale_factor

    def latent_shape(self, pipe, count: int, width: int, height: int) -> tuple[int, ...]:
        f = pipe.vae_scale_factor
        return (count, pipe.transformer.config.in_channels // 4, 2 * (height // (f * 2)), 2 * (width // (f * 2)))

    def pack_latents(self, pipe, latents):
        b, c, h, w = latents.shape
        return pipe._pack_latents(latents, b, c, h, w)

    def vae_latents(self, vae, sample):
        return (sample - vae.config.shift_factor) * vae.config.scaling_factor

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

    def encode_fixed(self, tokenizers: list, text_encoders: list, prompts: list[str], max_sequence_length=None):
        """T5's last hidden state (B, L, D) for the prompts: the part of the conditioning no adapter trains."""
        t5 = text_encoders[1]
        length = max_sequence_length or tokenizers[1].model_max_length
        ids = tokenizers[1](prompts, padding="max_length", max_length=length, truncation=True,
                            return_tensors="pt").input_ids
        return t5(ids.to(t5.device), output_hidden_states=False)[0]

    def negative_embeddings(self, encode, text_encoders: list, embeds, pooled):
        """FLUX.1 draws without a negative branch (guidance is distilled): none."""
        return None, None

    # ---- the training objective ---------------------------------------------------------------

    def setting(self, cfg, name: str):
        """A flow-matching setting, or the family's default when it is not given."""
        value = getattr(cfg, name)
        return DEFAULTS[name] if value is None else value

    def prompt_settings(self, cfg) -> dict:
        return {"max_sequence_length": self.setting(cfg, "max_sequence_length")}

    def validation_guidance(self, cfg) -> float:
        return self.setting(cfg, "guidance_scale")

    def noise_settings(self, cfg) -> dict:
        return {"scheme": self.setting(cfg, "weighting_scheme"), "logit_mean": cfg.logit_mean,
                "logit_std": cfg.logit_std, "mode_scale": cfg.mode_scale}

    def loss_settings(self, cfg) -> dict:
        return {"scheme": self.setting(cfg, "weighting_scheme"), "guidance_scale": self.setting(cfg, "guidance_scale")}

    def draw_noise(self, latent, generator, scheduler, scheme: str = "none", logit_mean: float = 0.0,
                   logit_std: float = 1.0, mode_scale: float = 1.29):
        """Gaussian noise like `latent`, then the timestep, both from the example's generator."""
        import torch

        noise = torch.randn(latent.shape, generator=generator, dtype=torch.float32).to(latent)
        return noise, draw_timestep(scheduler, generator, scheme, logit_mean, logit_std, mode_scale)

    def loss_inputs(self, denoiser, scheduler, batch, cond, pooled, scheme: str = "none", guidance_scale: float = 3.5):
        """(prediction, target e - x0, per-sample weights): the latents moved to noise level s = t / T
        along the straight path, packed, through the transformer, unpacked."""
        import torch

        x0, noise = batch.latents, batch.noise
        b, c, h, w = x0.shape
        sigmas = (batch.timesteps.float() / scheduler.config.num_train_timesteps).to(x0.device)
        s = sigmas.reshape(-1, 1, 1, 1).to(x0.dtype)
        noisy = (1.0 - s) * x0 + s * noise
        from diffusers import FluxPipeline

        model = getattr(denoiser, "module", denoiser)  # DDP wraps it; the config is the model's
        guidance = (torch.full((b,), guidance_scale, device=x0.device, dtype=torch.float32)
                    if model.config.guidance_embeds else None)
        pred = denoiser(hidden_states=FluxPipeline._pack_latents(noisy, b, c, h, w),
                        timestep=batch.timesteps.to(x0.dtype) / 1000, guidance=guidance,
                        pooled_projections=pooled, encoder_hidden_states=cond,
                        txt_ids=torch.zeros(cond.shape[1], 3, device=x0.device, dtype=cond.dtype),
                        img_ids=FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, x0.device, x0.dtype),
                        return_dict=False)[0]
        pred = pred.view(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)
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

    # ---- files ---------------------------------------------------------------------------------

    def webui_metadata(self, pipe) -> dict:
        return {"ss_base_model_version": "flux1", "ss_v2": "False"}

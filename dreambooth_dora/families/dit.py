"""What the rectified-flow DiT families (SD 3 / 3.5, FLUX.1, and the one-encoder ones) share: a transformer denoiser, T5 as
the last text encoder (never trained: encoded once, then it leaves the device), flow matching's
noise levels (`flow.py`) drawn from each example's generator, the VAE's shift and scale, sizes in
steps of 16, the flow-matching Euler sampler, and the settings they refuse. Each family module
says what differs: its parts, its prompt encoding, its loss inputs, its pipeline.
"""

from __future__ import annotations

from .flow import draw_timestep
from .sd import UNET_ATTENTION_TARGETS, StableDiffusion

DDPM_ONLY = {"snr_gamma": None, "prediction_type": None, "noise_offset": 0.0}
# the flow settings one DiT family has and another would ignore: {setting: why another refuses it}
FAMILY_ONLY = {"precondition_outputs": "precondition_outputs is an SD 3 setting; {label} would ignore it",
               "guidance_scale": "guidance_scale is FLUX.1 dev's distilled guidance; {label} has none and would "
                                 "ignore it"}


def t5_length(tokenizer) -> int:
    """T5 tokens per prompt when no length is set: the tokenizer's own, at most 512 (FLUX.1's limit)."""
    return min(512, int(tokenizer.model_max_length))


class FlowTransformer(StableDiffusion):
    denoiser_part = "transformer"
    denoiser_label = "Transformer"
    transformer_class: str  # the denoiser's class in model_index.json
    fixed_encoders = 1  # the last text encoder (T5) never trains
    # the web UIs' checkpoint layout (ComfyUI, Forge, kohya sd-scripts): per repeated block list,
    # (diffusers' list, the checkpoint's list) -> {checkpoint module: diffusers modules stacked along
    # its output rows}; then the modules outside blocks
    native_blocks: dict[tuple[str, str], dict[str, tuple[str, ...]]]
    native_top: dict[str, tuple[str, ...]]
    size_step = 16  # 8x VAE, 2x2 patches / packing
    webui_consumers = "ComfyUI, Forge"
    schedulers = {"Euler (flow matching)": "FlowMatchEulerDiscreteScheduler"}
    flow_defaults: dict  # the family's values of the flow settings left unset (None)

    def matches(self, index: dict) -> bool:
        """The pipeline's class, or (another pipeline class) the transformer's."""
        if index.get("_class_name") in self.pipeline_classes:
            return True
        entry = index.get("transformer") or []
        return len(entry) > 1 and entry[1] == self.transformer_class

    def check_settings(self, cfg) -> None:
        for name, default in DDPM_ONLY.items():
            if getattr(cfg, name) != default:
                raise ValueError(f"{name} is a DDPM setting; {self.label} trains by flow matching (see "
                                 "weighting_scheme) and would ignore it")
        for name, message in FAMILY_ONLY.items():
            if name not in self.flow_defaults and getattr(cfg, name) is not None:
                raise ValueError(message.format(label=self.label))
        if list(cfg.unet_target_modules) != list(UNET_ATTENTION_TARGETS):
            raise ValueError(f"unet_target_modules: {self.label} has no UNet; give its modules as lora_layers")
        if cfg.resolution % self.size_step:
            raise ValueError(f"resolution {cfg.resolution}: {self.label} needs a multiple of {self.size_step} "
                             "(8x VAE, 2x2 patches)")
        if cfg.aspect_buckets and cfg.bucket_step % self.size_step:
            raise ValueError(f"bucket_step {cfg.bucket_step}: {self.label}'s sizes are multiples of {self.size_step}")

    def setting(self, cfg, name: str):
        """A flow setting, or the family's default when it is not given."""
        value = getattr(cfg, name)
        return self.flow_defaults[name] if value is None else value

    def denoiser_targets(self, cfg, model=None) -> list[str]:
        return list(cfg.lora_layers or self.default_targets["transformer"])

    def webui_stack(self, part: str, module_name: str, model=None) -> tuple[str, tuple[str, ...]]:
        """Text encoders as the UNet families; the transformer in the original checkpoint's names
        (`native_blocks`, `native_top`), where FLUX's and SD 3's q, k, v (and FLUX's single
        blocks' MLP input) are one fused weight."""
        if part != self.denoiser_part:
            return super().webui_stack(part, module_name, model)
        native, members = self.native_module(module_name, model)
        return self.kohya_key(part, native), members

    def native_module(self, name: str, model=None) -> tuple[str, tuple[str, ...]]:
        """(the checkpoint's module, the diffusers modules it stacks) for diffusers module `name`."""
        parts = name.split(".", 2)
        for (ours, theirs), table in self.native_blocks.items():
            if len(parts) == 3 and parts[0] == ours and parts[1].isdigit():
                head = f"{ours}.{parts[1]}."
                for native, members in table.items():
                    if parts[2] in members:
                        return f"{theirs}.{parts[1]}.{native}", tuple(head + m for m in members)
        for native, members in self.native_top.items():
            if name in members:
                return native, members
        raise ValueError(f"layer {name!r}: {self.label}'s web UI checkpoints store it another way (not mapped); "
                         "adapt other layers, or export --format fused")

    def webui_kind(self, part: str, key: str) -> str | None:
        """The checkpoint's own module name, block number left out, of a transformer key in the web
        UIs' files ('lora_unet_single_blocks_3_modulation_lin' -> 'modulation.lin', 'lora_unet_img_in'
        -> 'img_in'): kohya's underscores cannot be read back by splitting ('lin', 'in')."""
        prefix = self.kohya_prefixes.get(self.denoiser_part, "")
        if part != self.denoiser_part or not key.startswith(prefix):
            return None
        rest = key[len(prefix):]
        for (_, theirs), table in self.native_blocks.items():
            if rest.startswith(theirs + "_"):
                number, _, tail = rest[len(theirs) + 1:].partition("_")
                if number.isdigit():
                    return next((n for n in table if n.replace(".", "_") == tail), None)
        return next((n for n in self.native_top if n.replace(".", "_") == rest), None)

    def native_size(self, pipe) -> int:
        """The VAE's picture size (1024 for FLUX.1 and SD 3; the pipelines' default size is fixed at
        1024 whatever the model, so a toy model says its own size here)."""
        size = pipe.vae.config.sample_size
        return size if isinstance(size, int) else pipe.default_sample_size * pipe.vae_scale_factor

    def vae_latents(self, vae, sample):
        return (sample - vae.config.shift_factor) * vae.config.scaling_factor

    # ---- prompts: T5, the last encoder, encodes once -------------------------------------------

    def prompt_settings(self, cfg) -> dict:
        return {"max_sequence_length": self.setting(cfg, "max_sequence_length")}

    def encode_fixed(self, tokenizers: list, text_encoders: list, prompts: list[str], max_sequence_length=None):
        """T5's last hidden state (B, L, D) for the prompts: the part of the conditioning no adapter trains."""
        t5 = text_encoders[-1]
        length = max_sequence_length or t5_length(tokenizers[-1])
        ids = tokenizers[-1](prompts, padding="max_length", max_length=length, truncation=True,
                             return_tensors="pt").input_ids
        return t5(ids.to(t5.device))[0]

    # ---- noise ---------------------------------------------------------------------------------

    def noise_settings(self, cfg) -> dict:
        return {"scheme": self.setting(cfg, "weighting_scheme"), "logit_mean": cfg.logit_mean,
                "logit_std": cfg.logit_std, "mode_scale": cfg.mode_scale}

    def draw_noise(self, latent, generator, scheduler, scheme: str, logit_mean: float = 0.0, logit_std: float = 1.0,
                   mode_scale: float = 1.29):
        """Gaussian noise like `latent`, then the timestep, both from the example's generator."""
        import torch

        noise = torch.randn(latent.shape, generator=generator, dtype=torch.float32).to(latent)
        return noise, draw_timestep(scheduler, generator, scheme, logit_mean, logit_std, mode_scale)

    def sigmas(self, batch, scheduler):
        """The batch's noise levels s = t / T (B,) and, shaped for the latents, (B, 1, 1, 1)."""
        x0 = batch.latents
        sigmas = (batch.timesteps.float() / scheduler.config.num_train_timesteps).to(x0.device)
        return sigmas, sigmas.reshape(-1, 1, 1, 1).to(x0.dtype)


class OneEncoderTransformer(FlowTransformer):
    """What the DiT families with one frozen text encoder share (FLUX.2 [klein] and Z-Image with Qwen3,
    Chroma with T5): the encoder never trains (encoded once, then it leaves the device), no pivotal
    tuning, no pooled embedding; the VAE latents' mode as diffusers' scripts take it; classifier-free
    guidance against the empty prompt at the pipeline's default scale; 512 prompt tokens."""

    encoder_parts = ("text_encoder",)
    tokenizer_parts = ("tokenizer",)
    embedding_keys = ()
    distilled_guidance = False
    webui_consumers = "ComfyUI"
    kohya_prefixes = {"transformer": "lora_unet_"}
    vae_mode = True  # the latent distribution's mode, not a sample (diffusers' scripts)
    flow_defaults = {"weighting_scheme": "none", "max_sequence_length": 512}
    encoder_label = "a Qwen3 language model"  # what its text encoder is, for the refusals
    refused: dict[str, str] = {"train_text_encoder": "its text encoder is {encoder}, frozen and encoded once",
                               "train_text_encoder_ti": "pivotal tuning needs a CLIP text encoder; it has {encoder}"}

    def check_settings(self, cfg) -> None:
        super().check_settings(cfg)
        for name, why in self.refused.items():
            if getattr(cfg, name):
                raise ValueError(f"{name}: {self.label} " + why.format(encoder=self.encoder_label))

    def prompt_settings(self, cfg) -> dict:
        return {"max_sequence_length": self.setting(cfg, "max_sequence_length")}

    def validation_guidance(self, cfg) -> float:
        return self.default_guidance

    def loss_settings(self, cfg) -> dict:
        return {"scheme": self.setting(cfg, "weighting_scheme")}

    def card_call(self, cfg, tokenizers: list) -> dict:
        """Size and prompt length where they differ from the pipelines' defaults (1024 px, 512)."""
        length = self.setting(cfg, "max_sequence_length")
        return {**({"height": cfg.resolution, "width": cfg.resolution} if cfg.resolution != 1024 else {}),
                **({"max_sequence_length": length} if length != 512 else {})}

    def draw_settings(self, pipe) -> dict:
        return {}

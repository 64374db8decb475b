"""Stable Diffusion 1.x / 2.x: one CLIP text encoder, a UNet, DDPM noise.

Conditioning: the UNet attends to the text encoder's last hidden state (B, 77, D); D = 768 (SD 1.x,
CLIP ViT-L) or 1024 (SD 2.x, OpenCLIP-H). Training: latents x0, noise e ~ N(0, I) (plus offset
noise), an integer timestep t ~ U{0, T-1}; x_t = sqrt(a_t) x0 + sqrt(1 - a_t) e (the scheduler's
`add_noise`); the UNet predicts e (epsilon) or v = sqrt(a_t) e - sqrt(1 - a_t) x0 (v-prediction,
SD 2.x 768 px), optionally Min-SNR weighted.
"""

from __future__ import annotations

from .family import Components, Family

UNET_ATTENTION_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")  # the UNet's attention projections
TEXT_ENCODER_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")  # CLIP's attention projections


def token_ids(tokenizer, prompts: list[str]):
    return tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids


class StableDiffusion(Family):
    name = "sd"
    label = "Stable Diffusion 1.x / 2.x"
    pipeline_class = "StableDiffusionPipeline"
    pipeline_classes = ("StableDiffusionPipeline",)
    tag = "stable-diffusion"
    kohya_prefixes = {"unet": "lora_unet_", "text_encoder": "lora_te_"}
    default_targets = {"unet": UNET_ATTENTION_TARGETS, "text_encoder": TEXT_ENCODER_TARGETS}

    def matches(self, index: dict) -> bool:
        """The pipeline's class, or (another SD pipeline class) its parts: a UNet and one text encoder."""
        if index.get("_class_name") in self.pipeline_classes:
            return True
        present = {k for k, v in index.items() if isinstance(v, (list, tuple)) and v and v[0] is not None}
        return {"unet", *self.encoder_parts} <= present and not ({"text_encoder_2", "transformer"} & present)

    # ---- loading ------------------------------------------------------------------------------

    def _load_text_parts(self, path: str, revision, variant) -> tuple[list, list]:
        from transformers import CLIPTextModel, CLIPTokenizer

        return ([CLIPTokenizer.from_pretrained(path, subfolder="tokenizer", revision=revision)],
                [CLIPTextModel.from_pretrained(path, subfolder="text_encoder", revision=revision, variant=variant)])

    def _load_parts(self, path: str, revision, variant) -> tuple[list, list, object, object]:
        """(tokenizers, text encoders, denoiser, training noise scheduler) of the pipeline folder."""
        from diffusers import DDPMScheduler, UNet2DConditionModel

        tokenizers, text_encoders = self._load_text_parts(path, revision, variant)
        unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", revision=revision, variant=variant)
        return tokenizers, text_encoders, unet, DDPMScheduler.from_pretrained(path, subfolder="scheduler",
                                                                              revision=revision)

    def load_components(self, path: str, revision: str | None = None, variant: str | None = None,
                        vae_path: str | None = None, prediction_type: str | None = None) -> Components:
        """Tokenizers and text encoders, the VAE (or the one at `vae_path`), the denoiser and the
        training noise scheduler (its prediction type overridden when given). A part that cannot
        be loaded raises ModelLoadError naming the model (or the VAE)."""
        import diffusers

        from .models import ModelLoadError, load_vae

        where = path
        try:
            tokenizers, text_encoders, unet, scheduler = self._load_parts(path, revision, variant)
            if vae_path:
                where = vae_path  # last, so that an error names the VAE only when the VAE failed
                vae = load_vae(vae_path)
            else:
                vae = getattr(diffusers, self.vae_class).from_pretrained(path, subfolder="vae", revision=revision,
                                                                         variant=variant)
        except (OSError, ValueError) as err:
            first = (str(err).strip().splitlines() or [type(err).__name__])[0]
            raise ModelLoadError(f"cannot load model {where!r}: {first}") from None
        if prediction_type:
            scheduler.register_to_config(prediction_type=prediction_type)
        return Components(tokenizers, text_encoders, vae, unet, scheduler)

    # ---- a pipeline's parts -------------------------------------------------------------------

    def models(self, pipe) -> dict:
        """{part: model} of the parts adapters live in that the pipeline has."""
        return {p: getattr(pipe, p) for p in self.parts if getattr(pipe, p, None) is not None}

    def text_parts(self, pipe) -> tuple[list, list]:
        """(tokenizers, text encoders) of a pipeline, in the family's order."""
        return ([getattr(pipe, t) for t in self.tokenizer_parts if getattr(pipe, t, None) is not None],
                [getattr(pipe, e) for e in self.encoder_parts if getattr(pipe, e, None) is not None])

    def native_size(self, pipe) -> int:
        """The picture size (px) the base model was trained at."""
        return pipe.unet.config.sample_size * pipe.vae_scale_factor

    def card_call(self, cfg, tokenizers: list) -> dict:
        """The arguments the model card's snippet passes to the pipeline call (none: its defaults)."""
        return {}

    def prompt_call(self, pipe, prompt: str, negative: str | None) -> dict:
        """The pipeline call's prompt arguments for `prompt` and a negative prompt (None: none)."""
        return {"prompt": prompt, "negative_prompt": negative}

    def draw_settings(self, pipe) -> dict:
        """The pipeline call's arguments the family sets when a picture is drawn from a prompt."""
        return {}

    def latent_shape(self, pipe, count: int, width: int, height: int) -> tuple[int, ...]:
        """The shape of `count` pictures' initial latents, as the pipeline draws them."""
        f = pipe.vae_scale_factor
        return (count, pipe.unet.config.in_channels, height // f, width // f)

    def knows_word(self, tokenizers: list, word: str) -> bool:
        """`word` is one whole token of the (first) vocabulary: a word prompts use as it is."""
        return word == word.lower() and f"{word}</w>" in tokenizers[0].get_vocab()

    # ---- prompts and the denoiser's conditioning -----------------------------------------------

    def encode_prompts(self, tokenizers: list, text_encoders: list, prompts: list[str]):
        """(prompt embeddings (B, 77, D), None): the encoder's last hidden state."""
        enc = text_encoders[0]
        return enc(token_ids(tokenizers[0], prompts).to(enc.device))[0], None

    def negative_embeddings(self, encode, text_encoders: list, embeds, pooled):
        """The unconditional branch of classifier-free guidance: the empty prompt, encoded."""
        return encode([""], text_encoders)[0], None

    def denoiser_kwargs(self, pooled, sizes) -> dict:
        """The denoiser's extra arguments beyond (latents, timesteps, prompt embeddings)."""
        return {}

    # ---- the training objective ---------------------------------------------------------------

    denoiser_label = "UNet"
    vae_class = "AutoencoderKL"  # diffusers' class of the pipeline's VAE
    vae_mode = False  # train on the latent distribution's mode (True) or a sample of it
    fixed_encoders = 0  # trailing text encoders no adapter trains (encoded once when the others train)
    t5_parts: tuple[str, str] | None = None  # (tokenizer, text encoder) of T5, where the family has one
    size_step = 8  # picture sizes: multiples of the VAE's factor
    # the samplers the app offers: {label: diffusers class}, the first the default
    schedulers = {"DPM++ 2M": "DPMSolverMultistepScheduler", "DDIM": "DDIMScheduler", "Euler": "EulerDiscreteScheduler",
                  "Euler a": "EulerAncestralDiscreteScheduler", "PNDM": "PNDMScheduler"}
    default_guidance = 7.5  # the pipeline call's guidance_scale by default (the app's starting value)
    distilled_guidance = False  # guidance_scale is classifier-free guidance (True: an input of the model)

    def check_settings(self, cfg) -> None:
        """ValueError (one line) for a setting this family would ignore or cannot honour; asked
        before any model loads."""
        flow = {"weighting_scheme": None, "logit_mean": 0.0, "logit_std": 1.0, "mode_scale": 1.29,
                "guidance_scale": None, "max_sequence_length": None, "precondition_outputs": None, "lora_layers": None}
        for name, default in flow.items():
            if getattr(cfg, name) != default:
                raise ValueError(f"{name} is a flow-matching setting (FLUX.1); {self.label} trains with DDPM noise "
                                 f"and would ignore it")
        if cfg.enable_t5_ti:
            raise ValueError(f"enable_t5_ti: {self.label} has no T5 text encoder")

    def denoiser_targets(self, cfg, model=None) -> list[str]:
        """The denoiser's modules to adapt (`model`: the denoiser, where a default depends on its size)."""
        return list(cfg.unet_target_modules)

    def prompt_settings(self, cfg) -> dict:
        """The settings `encode_prompts` takes (bound once per run)."""
        return {}

    def validation_guidance(self, cfg) -> float:
        """The guidance scale validation grids are drawn with."""
        return 7.5

    def noise_settings(self, cfg) -> dict:
        """The settings `draw_noise` takes (bound once per run)."""
        return {"noise_offset": cfg.noise_offset}

    def loss_settings(self, cfg) -> dict:
        """The settings `loss_inputs` takes (bound once per run)."""
        return {"snr_gamma": cfg.snr_gamma}

    def vae_latents(self, vae, sample):
        """A VAE sample in the denoiser's latent space: scaled (SD's VAEs have no shift)."""
        return sample * vae.config.scaling_factor

    def pack_latents(self, pipe, latents):
        """Initial latents (B, C, h, w) as the pipeline takes them."""
        return latents

    def draw_noise(self, latent, generator, noise_offset: float, scheduler):
        """One example's noise (like `latent` (1, C, h, w)) and timestep, from its own generator."""
        import torch

        from .ddpm import sample_noise

        noise = sample_noise(latent, generator, noise_offset)
        return noise, int(torch.randint(0, scheduler.config.num_train_timesteps, (1,), generator=generator))

    def loss_inputs(self, denoiser, scheduler, batch, cond, pooled, snr_gamma: float | None):
        """(prediction, target, per-sample weights or None): the batch's latents noised to its
        timesteps, through the denoiser, and what it should predict (per the scheduler's
        prediction type), Min-SNR weights with `snr_gamma`."""
        from .ddpm import diffusion_target, snr_weights

        kind = scheduler.config.prediction_type
        noisy = scheduler.add_noise(batch.latents, batch.noise, batch.timesteps)
        pred = denoiser(noisy, batch.timesteps, cond, **self.denoiser_kwargs(pooled, batch.sizes)).sample
        target = diffusion_target(batch.noise, batch.latents, batch.timesteps, scheduler, kind)
        weights = snr_weights(batch.timesteps, scheduler.alphas_cumprod, snr_gamma, kind) if snr_gamma else None
        return pred, target, weights

    # ---- drawing ------------------------------------------------------------------------------

    def inference_pipeline(self, vae, denoiser, scheduler):
        """A pipeline of the given parts that draws from prompt embeddings (no text encoders)."""
        from diffusers import StableDiffusionPipeline

        return StableDiffusionPipeline(vae=vae, text_encoder=None, tokenizer=None, unet=denoiser, scheduler=scheduler,
                                       safety_checker=None, feature_extractor=None, requires_safety_checker=False)

    def embedding_kwargs(self, embeds, negative, pooled, negative_pooled, index: int, count: int) -> dict:
        """The pipeline call's embedding arguments for prompt `index`, `count` pictures."""
        return {"prompt_embeds": embeds[index:index + 1].expand(count, -1, -1),
                "negative_prompt_embeds": negative.expand(count, -1, -1)}

    # ---- files ---------------------------------------------------------------------------------

    def kohya_key(self, part: str, module_name: str) -> str:
        """kohya's name of a module: the part's prefix, then the diffusers path with `_` for `.`."""
        return self.kohya_prefixes[part] + module_name.replace(".", "_")

    def webui_stack(self, part: str, module_name: str, model=None) -> tuple[str, tuple[str, ...]]:
        """The web UIs' module that holds this layer's weight: (its kohya key, the layers of `part`
        whose weights it stacks along its output rows, in order). The UNet families' web UI
        checkpoints keep diffusers' layers one by one; a name that has no web UI module raises
        ValueError (one line)."""
        return self.kohya_key(part, module_name), (module_name,)

    def webui_kind(self, part: str, key: str) -> str | None:
        """The kind of module a web UI key names, as `info` lists it ('to_q' of
        'lora_unet_..._attn1_to_q'); None: not one this family names (the caller falls back)."""
        return None

    def webui_metadata(self, pipe) -> dict:
        """What A1111 / Forge read to file a LoRA under a base model (`ss_v2` makes SD 2.x files
        show while an SD 2.x checkpoint is loaded)."""
        # SD 2.x: OpenCLIP-H's 1024-wide embeddings and linear proj_in/proj_out (SD 1.x has neither)
        sd2 = pipe.unet.config.cross_attention_dim == 1024 or bool(pipe.unet.config.use_linear_projection)
        return {"ss_base_model_version": "sd_v2" if sd2 else "sd_v1", "ss_v2": str(sd2)}

    def pivotal_keys(self, cfg) -> tuple[str, ...]:
        """The embeddings file's keys a pivotal-tuning run trains, one per text encoder in order."""
        return self.embedding_keys + (("t5",) if getattr(cfg, "enable_t5_ti", False) else ())

    def embedding_parts(self, keys) -> list[tuple[str, str, str]]:
        """(key, tokenizer part, text encoder part) for the embeddings file's `keys`."""
        parts = list(zip(self.embedding_keys, self.tokenizer_parts, self.encoder_parts))
        return [p for p in parts + ([("t5", *self.t5_parts)] if self.t5_parts else []) if p[0] in keys]

    def textual_inversion_lines(self, names: list[str], keys=None) -> list[str]:
        """diffusers calls that load pivotal tuning's vectors `emb` into a pipeline, stock."""
        return [f'pipe.load_textual_inversion(emb["{key}"], token={names!r}, text_encoder=pipe.{enc}, '
                f'tokenizer=pipe.{tok})' for key, tok, enc in self.embedding_parts(keys or self.embedding_keys)]


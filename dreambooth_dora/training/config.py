"""The training config: one dataclass, loaded from YAML and overridden by flags of the same names.

Field names are diffusers' DreamBooth flag names where the concept exists there, so a diffusers
command line works unchanged. Validation lives in `TrainConfig.validate`, with one clear message
per problem.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml



class ConfigError(ValueError):
    """A bad setting; the CLI prints its message on one line and exits with status 2."""


# the default adapter targets (the SD families'; `dreambooth_dora` exports them): attention projections
from ..families.flow import WEIGHTING_SCHEMES
from ..families.sd import TEXT_ENCODER_TARGETS, UNET_ATTENTION_TARGETS  # the defaults: SD's and SDXL's
LR_SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")
OPTIMIZERS = ("adamw", "prodigy")
PROMPT_LISTS = {"validation_prompt", "subject_prompts", "class_prompts", "unrelated_prompts"}
SEED_MAX = 2**32 - 1  # every seed a command takes (numpy's range: accelerate's set_seed seeds numpy too)
MAX_T5_TOKENS = 512  # the longest T5 prompt FLUX.1's and SD 3's pipelines take

# Every setting that names a file, a folder, a model or a dataset, with what it names. The app's
# Train tab checks each one by its kind (app/train_tab.py, one rule per kind); a test fails when a
# setting that looks like a path is missing here, so a new path setting cannot go unchecked.
PATH_SETTINGS = {
    "pretrained_model_name_or_path": "model",
    "pretrained_vae_model_name_or_path": "model",
    "instance_data_dir": "read folder",
    "mask_data_dir": "read folder",
    "dataset_name": "dataset",
    "class_data_dir": "written folder",  # missing class images are generated into it
    "output_dir": "run folder",
    "resume_from_checkpoint": "checkpoint",
    "logging_dir": "inside the run folder",
    "datasets": "subject sets",  # each entry's instance_data_dir / dataset_name / class_data_dir, as above
}


SUBJECT_SET_KEYS = ("instance_data_dir", "dataset_name", "instance_prompt", "repeats", "caption_column",
                    "class_prompt", "class_data_dir", "num_class_images")


@dataclass(frozen=True)
class SubjectSet:
    """One subject (or image set) of a run: its images, prompt, repeats and class images."""

    instance_data_dir: str | None
    dataset_name: str | None
    instance_prompt: str
    repeats: int
    caption_column: str | None
    class_prompt: str | None
    class_data_dir: str | None
    num_class_images: int


@dataclass
class TrainConfig:
    """Every field is a YAML key and a `--flag` of the same name (diffusers' names where they exist)."""

    # ---- model
    pretrained_model_name_or_path: str = "embedded:tiny-random"
    """Hub id, local diffusers folder, or `embedded:<name>` for a model shipped with the package."""
    revision: str | None = None
    variant: str | None = None
    """Weight file variant, e.g. 'fp16'."""
    pretrained_vae_model_name_or_path: str | None = None
    """Another VAE (hub id or folder), e.g. an fp16-safe SDXL VAE such as madebyollin/sdxl-vae-fp16-fix;
    with it the VAE runs in the mixed-precision dtype (without it, fp16 training keeps the VAE in fp32)."""
    prediction_type: str | None = None
    """Override the scheduler's prediction type ('epsilon' or 'v_prediction'); default: the model's."""
    gradient_checkpointing: bool = False
    mixed_precision: str = "no"
    """'no', 'fp16' or 'bf16': frozen weights in that dtype, adapter parameters stay fp32."""
    allow_tf32: bool = False
    # ---- data
    instance_data_dir: str | None = None
    """Folder of subject images; captions from its metadata.jsonl when `caption_column` is set."""
    dataset_name: str | None = None
    """A `datasets` hub id or local dataset folder, instead of `instance_data_dir`."""
    image_column: str = "image"
    caption_column: str | None = None
    """Per-image captions from this column (metadata.jsonl's `text`, say); default: instance_prompt."""
    instance_prompt: str | None = None
    """Prompt with the identifier, e.g. 'a photo of sks dog'."""
    repeats: int = 1
    """How many times each instance image appears per epoch."""
    datasets: list[dict] | None = None
    """Several subjects or sets in one run (YAML only): a list of mappings with instance_data_dir
    (or dataset_name), instance_prompt and optionally repeats, caption_column, class_prompt,
    class_data_dir, num_class_images (the top-level values are the defaults). Batches draw across
    the sets in proportion to images x repeats."""
    resolution: int = 512
    center_crop: bool = False
    random_flip: bool = False
    aspect_buckets: bool = False
    """Train each picture at the shape nearest its aspect ratio (buckets of about resolution² pixels)
    instead of a square crop; every batch from one bucket."""
    bucket_sizes: list[str] | None = None
    """The buckets, 'WIDTHxHEIGHT' (e.g. 512x768,768x512,640x640); default: from resolution at equal
    area in steps of bucket_step, sides within resolution/2 .. 2 x resolution."""
    bucket_step: int = 64
    """Bucket sides are multiples of this (64 for SD/SDXL UNets)."""
    bucket_max_upscale: float | None = None
    """Enlarge a picture at most this much (e.g. 1.0: never); a smaller one gets a bucket of its own."""
    # ---- prior preservation
    with_prior_preservation: bool = False
    class_data_dir: str | None = None
    class_prompt: str | None = None
    num_class_images: int = 100
    """Missing class images are generated with the base model, up to this many."""
    sample_batch_size: int = 4
    prior_generation_precision: str | None = None
    """'fp32', 'fp16' or 'bf16' for generating class images; default fp32 on CPU, fp16 on GPU."""
    prior_loss_weight: float = 1.0
    # ---- adapters
    rank: int = 4
    lora_alpha: float | None = None
    """Defaults to `rank` (scale 1); resolved here, once."""
    lora_dropout: float = 0.0
    use_dora: bool = True
    use_rslora: bool = False
    unet_target_modules: list[str] = field(default_factory=lambda: list(UNET_ATTENTION_TARGETS))
    """UNet modules to adapt; add 'proj_in', 'proj_out', 'ff.net.0.proj', 'ff.net.2' for more."""
    train_text_encoder: bool = False
    text_encoder_target_modules: list[str] = field(default_factory=lambda: list(TEXT_ENCODER_TARGETS))
    # ---- pivotal tuning (diffusers' advanced scripts' names and meanings)
    train_text_encoder_ti: bool = False
    """Pivotal tuning: learn new tokens (textual inversion) for each token_abstraction together with
    the adapter; only their embedding rows train (not with train_text_encoder)."""
    token_abstraction: str = "TOK"
    """The identifier(s) in the prompts, comma-separated ('TOK' or 'TOK,DOG'), each replaced by its
    new tokens <s0><s1>...; also the web UIs' trigger word (the webui embedding's file name)."""
    num_new_tokens_per_abstraction: int = 2
    train_text_encoder_ti_frac: float = 0.5
    """Share of the steps during which the new tokens train (then they freeze: the pivot)."""
    initializer_concept: str | None = None
    """Start the new tokens from this text's token embeddings (default: random, the table's std)."""
    enable_t5_ti: bool = False
    """FLUX.1 / SD 3: learn the new tokens' T5 rows too (diffusers' advanced FLUX script's flag)."""
    # ---- optimisation
    train_batch_size: int = 1
    max_train_steps: int | None = None
    """Optimiser steps; default: num_train_epochs over the data."""
    num_train_epochs: int = 1
    gradient_accumulation_steps: int = 1
    learning_rate: float = 1e-4
    text_encoder_lr: float | None = None
    """Defaults to `learning_rate`."""
    scale_lr: bool = False
    """Multiply the learning rates by batch size x accumulation x processes."""
    lr_scheduler: str = "constant"
    lr_warmup_steps: int = 0
    lr_num_cycles: int = 1
    lr_power: float = 1.0
    optimizer: str = "adamw"
    """'adamw' or 'prodigy' (use learning_rate 1.0 with Prodigy)."""
    use_8bit_adam: bool = False
    """AdamW from bitsandbytes (must be installed)."""
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_weight_decay: float = 1e-2
    adam_weight_decay_text_encoder: float | None = None
    magnitude_lr: float | None = None
    """DoRA: the learning rate of the magnitude vectors (DoRA's authors and LyCORIS advise a lower
    one than the direction's); default: the adapter's (learning_rate / text_encoder_lr)."""
    magnitude_weight_decay: float | None = None
    """DoRA: weight decay of the magnitude vectors; default: the adapter's."""
    loraplus_lr_ratio: float | None = None
    """LoRA+: B's learning rate = the adapter's x this ratio (16 is LoRA+'s usual value); A and the
    DoRA magnitude keep the adapter's (the magnitude is not B)."""
    dora_train: str = "both"
    """DoRA ablations: 'both', 'magnitude' (only the magnitudes train; A, B stay at init) or
    'direction' (the magnitudes stay at the base weight's norms)."""
    caption_dropout_rate: float = 0.0
    """Share of subject examples trained with the empty caption (class images keep theirs)."""
    masked_loss: bool = False
    """Weight the loss per pixel by a mask (white = the subject): from mask_data_dir, else the
    images' alpha channel. Class images are not masked."""
    mask_data_dir: str | None = None
    """Masks with the images' file names (any image suffix) for masked_loss."""
    use_ema: bool = False
    """Keep an exponential moving average of the adapter; the saved adapter and validation use it."""
    ema_decay: float = 0.999
    """The average's decay, reached after a warm-up (min(ema_decay, k / (9 + k)) at step k)."""
    adam_epsilon: float = 1e-8
    prodigy_beta3: float | None = None
    prodigy_decouple: bool = True
    prodigy_use_bias_correction: bool = True
    prodigy_safeguard_warmup: bool = True
    max_grad_norm: float = 1.0
    snr_gamma: float | None = None
    """Min-SNR-gamma loss weighting (5.0 is the usual value)."""
    noise_offset: float = 0.0
    # ---- flow matching (SD 3 / 3.5, FLUX.1; diffusers' train_dreambooth_lora_sd3.py / _flux.py names)
    weighting_scheme: str | None = None
    """How training noise levels are drawn and weighted: sigma_sqrt, logit_normal, mode, cosmap, none;
    default the family's (SD 3: logit_normal, FLUX.1: none)."""
    logit_mean: float = 0.0
    """logit_normal: the mean of the normal whose sigmoid is the noise level."""
    logit_std: float = 1.0
    """logit_normal: its standard deviation."""
    mode_scale: float = 1.29
    """mode: how far the draw is pushed toward the middle noise levels."""
    guidance_scale: float | None = None
    """FLUX.1 dev: the guidance its distilled guidance embedding is told while training (default 3.5)."""
    max_sequence_length: int | None = None
    """T5 tokens per prompt; default the family's (SD 3: 77; FLUX.1: its T5 tokenizer's length, at most
    512 (512 for FLUX.1 dev and schnell), as the app and `evaluate` draw it; schnell takes at most 256)."""
    precondition_outputs: bool | None = None
    """SD 3: compare the prediction turned into an estimate of the clean latents with them (diffusers'
    default, on); off: the prediction against noise - latents."""
    lora_layers: list[str] | None = None
    """The transformer's modules to adapt (comma-separated, or a YAML list); default: the family's,
    diffusers' list (attention to_q/to_k/to_v/to_out.0, add_q/k/v_proj, to_add_out, the feed-forwards)."""
    cache_latents: bool = False
    """Encode the images once (the VAE is frozen). Random crops become center crops; flips are
    cached as a second latent per image."""
    seed: int = 0
    # ---- checkpoints, validation, output
    output_dir: str = "outputs/run"
    """One run per folder: new or empty, or this same run with resume_from_checkpoint."""
    overwrite_output_dir: bool = False
    """Start afresh in an output_dir that holds another training run: that run's files are removed
    first (only if everything there belongs to a training run)."""
    checkpointing_steps: int = 500
    checkpoints_total_limit: int | None = None
    resume_from_checkpoint: str | None = None
    """'latest' or a checkpoint folder: continue this run (its settings must match, except those
    the README lists as changeable); a damaged newest checkpoint falls back to an earlier one."""
    validation_prompt: list[str] | None = None
    """One or more prompts (a YAML list, or separated by '|' on the command line)."""
    num_validation_images: int = 4
    validation_steps: int = 100
    validation_inference_steps: int = 25
    report_to: str = "tensorboard"
    """'tensorboard' or 'none'."""
    logging_dir: str = "logs"
    """TensorBoard's folder inside output_dir (a relative path without '..')."""

    def subject_sets(self) -> list[SubjectSet]:
        """The run's subject sets: the `datasets` entries, or the single set of the top-level keys."""
        entries = self.datasets or [{}]
        top = {k: getattr(self, k) for k in SUBJECT_SET_KEYS}
        if self.datasets:  # a set's data never falls back to the top level's
            top.update(instance_data_dir=None, dataset_name=None)
        return [SubjectSet(**{**top, **entry}) for entry in entries]

    def _validate_datasets(self) -> None:
        if self.instance_data_dir is not None or self.dataset_name is not None:
            raise ConfigError("give either datasets (a list of sets) or instance_data_dir / dataset_name, not both")
        if not self.datasets:
            raise ConfigError("datasets is empty; list at least one set (instance_data_dir: ..., instance_prompt: ...), "
                              "or leave datasets out and give instance_data_dir")
        for i, entry in enumerate(self.datasets):
            if not isinstance(entry, dict):
                raise ConfigError(f"datasets[{i}] must be a mapping (instance_data_dir: ..., instance_prompt: ...)")
            unknown = sorted(set(entry) - set(SUBJECT_SET_KEYS))
            if unknown:
                raise ConfigError(f"datasets[{i}] has unknown key(s) {', '.join(unknown)}; "
                                  f"known: {', '.join(SUBJECT_SET_KEYS)}")
            types_ = _field_types()
            for key, value in list(entry.items()):
                entry[key] = _convert(f"datasets[{i}].{key}", value, types_[key])
        if not self.instance_prompt:
            self.instance_prompt = self.datasets[0].get("instance_prompt")
        for i, s in enumerate(self.subject_sets()):
            where = f"datasets[{i}]"
            if (s.instance_data_dir is None) == (s.dataset_name is None):
                raise ConfigError(f"{where}: give exactly one of instance_data_dir or dataset_name")
            if s.instance_data_dir is not None and not Path(s.instance_data_dir).is_dir():
                raise ConfigError(f"{where}: instance_data_dir {s.instance_data_dir!r} is not a folder")
            if not s.instance_prompt:
                raise ConfigError(f"{where}: instance_prompt is not set")
            if s.repeats < 1 or s.num_class_images < 1:
                raise ConfigError(f"{where}: repeats and num_class_images must be >= 1")
            if self.with_prior_preservation and not (s.class_prompt and s.class_data_dir):
                raise ConfigError(f"{where}: with_prior_preservation needs class_prompt and class_data_dir")
        seen = {}
        for i, s in enumerate(self.subject_sets()):
            source = (("folder", str(Path(s.instance_data_dir).resolve())) if s.instance_data_dir is not None
                      else ("dataset", s.dataset_name))
            if source in seen:
                raise ConfigError(f"datasets[{i}] uses the same {source[0]} as datasets[{seen[source]}] "
                                  f"({s.instance_data_dir or s.dataset_name!r}); give it once, with repeats for more "
                                  "weight")
            seen[source] = i

    def buckets(self) -> list[tuple[int, int]]:
        """The aspect buckets (w, h) of the run ([] without aspect_buckets)."""
        from .buckets import default_buckets, parse_buckets

        if not self.aspect_buckets:
            return []
        if self.bucket_sizes:
            return parse_buckets(self.bucket_sizes, self.bucket_step)
        return default_buckets(self.resolution, self.bucket_step)

    def _validate_buckets(self) -> None:
        if not self.aspect_buckets:
            used = [n for n in ("bucket_sizes", "bucket_max_upscale") if getattr(self, n) is not None]
            if used:
                raise ConfigError(f"{used[0]} applies with aspect_buckets only")
            return
        if self.bucket_step < 8 or self.bucket_step % 8:
            raise ConfigError(f"bucket_step must be a positive multiple of 8 (the VAE's factor), got {self.bucket_step}")
        if self.bucket_max_upscale is not None and self.bucket_max_upscale < 1:
            raise ConfigError(f"bucket_max_upscale must be >= 1 (1: never enlarge), got {self.bucket_max_upscale}")
        try:
            found = self.buckets()
        except ValueError as err:
            raise ConfigError(f"bucket_sizes: {err}") from None
        if not found:
            raise ConfigError(f"resolution {self.resolution} gives no buckets in steps of {self.bucket_step}; "
                              "lower bucket_step or give bucket_sizes")

    def token_abstractions(self) -> list[str]:
        return [a.strip() for a in self.token_abstraction.split(",") if a.strip()]

    def _validate_pivotal(self) -> None:
        from ..adapters.pivotal import ABSTRACTION

        if self.train_text_encoder:
            raise ConfigError("give only one of train_text_encoder (adapters on the text encoder) or "
                              "train_text_encoder_ti (new tokens, pivotal tuning)")
        if not 0 < self.train_text_encoder_ti_frac <= 1:
            raise ConfigError(f"train_text_encoder_ti_frac must be in (0, 1], got {self.train_text_encoder_ti_frac}")
        names = self.token_abstractions()
        if not names:
            raise ConfigError("token_abstraction is empty; give the identifier used in the prompts, e.g. TOK")
        for name in names:
            if not ABSTRACTION.fullmatch(name):
                raise ConfigError(f"token_abstraction {name!r} must be letters, digits, '_' or '-' (it also names "
                                  "the web UI embedding file)")
        if len(set(names)) != len(names) or any(a != b and a in b for a in names for b in names):
            raise ConfigError(f"token_abstraction {self.token_abstraction!r}: each identifier must be distinct and "
                              "not part of another")
        class_prompts = {s.class_prompt for s in self.subject_sets() if s.class_prompt}
        for name in names:
            for prompt in sorted(class_prompts):
                if re.search(rf"(?<![\w-]){re.escape(name)}(?![\w-])", prompt):
                    raise ConfigError(f"token_abstraction {name!r} is also a word of class_prompt {prompt!r}: every "
                                      f"prompt saying {name!r} would get the new tokens, the class's too; use a made-up "
                                      "identifier such as TOK")

    def validate(self) -> "TrainConfig":
        """One clear ConfigError per problem, before anything heavy happens."""
        if self.datasets is not None:
            self._validate_datasets()
        elif (self.instance_data_dir is None) == (self.dataset_name is None):
            raise ConfigError("give exactly one of instance_data_dir (a folder of images) or dataset_name")
        if self.instance_data_dir is not None and not Path(self.instance_data_dir).is_dir():
            raise ConfigError(f"instance_data_dir {self.instance_data_dir!r} is not a folder")
        if not self.instance_prompt:
            raise ConfigError("instance_prompt is not set, e.g. 'a photo of sks dog'")
        if self.with_prior_preservation and self.datasets is None:
            if not self.class_data_dir:
                raise ConfigError("with_prior_preservation needs class_data_dir (where class images are kept)")
            if not self.class_prompt:
                raise ConfigError("with_prior_preservation needs class_prompt, e.g. 'a photo of a dog'")
            if self.num_class_images < 1:
                raise ConfigError("num_class_images must be >= 1")
        for name in ("rank", "resolution", "train_batch_size", "gradient_accumulation_steps", "num_train_epochs",
                     "repeats", "sample_batch_size", "checkpointing_steps", "validation_steps",
                     "num_validation_images", "validation_inference_steps"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_train_steps is not None and self.max_train_steps < 1:
            raise ConfigError(f"max_train_steps must be >= 1, got {self.max_train_steps}")
        if self.checkpoints_total_limit is not None and self.checkpoints_total_limit < 1:
            raise ConfigError("checkpoints_total_limit must be >= 1")
        if self.resolution % 8:
            raise ConfigError(f"resolution must be a multiple of 8, got {self.resolution}")
        check_seeds("seed", [self.seed])
        if self.max_sequence_length is not None and self.max_sequence_length > MAX_T5_TOKENS:
            raise ConfigError(f"max_sequence_length must be <= {MAX_T5_TOKENS} (the longest T5 prompt FLUX.1's and "
                              f"SD 3's pipelines take), got {self.max_sequence_length}")
        logs = Path(self.logging_dir or "")
        if not logs.parts or logs.is_absolute() or ".." in logs.parts or logs.parts[0].startswith("~"):
            raise ConfigError(f"logging_dir {self.logging_dir!r} must be a folder inside output_dir: a relative path "
                              "without '..' (e.g. logs)")
        if self.lora_alpha is None:
            self.lora_alpha = float(self.rank)
        check_ranges(self, {
            "lr_warmup_steps": (">=", 0), "num_class_images": (">=", 0),
            "lr_num_cycles": (">=", 1), "learning_rate": (">", 0), "text_encoder_lr": (">", 0),
            "lora_alpha": (">", 0), "lora_dropout": ("[0,1)", None), "adam_beta1": ("[0,1)", None),
            "adam_beta2": ("[0,1)", None), "prodigy_beta3": ("[0,1)", None), "adam_epsilon": (">", 0),
            "adam_weight_decay": (">=", 0), "adam_weight_decay_text_encoder": (">=", 0),
            "prior_loss_weight": (">=", 0), "max_grad_norm": (">=", 0), "snr_gamma": (">", 0),
            "noise_offset": (">=", 0), "logit_std": (">", 0), "mode_scale": (">=", 0), "guidance_scale": (">=", 0),
            "max_sequence_length": (">=", 1), "lr_power": (">", 0), "magnitude_lr": (">", 0),
            "magnitude_weight_decay": (">=", 0), "loraplus_lr_ratio": (">", 0), "caption_dropout_rate": ("[0,1]", None),
            "bucket_step": (">=", 8),
            "ema_decay": ("[0,1)", None), "num_new_tokens_per_abstraction": (">=", 1),
        })
        if self.train_text_encoder_ti:
            self._validate_pivotal()
        elif self.enable_t5_ti:
            raise ConfigError("enable_t5_ti needs train_text_encoder_ti (it adds T5 rows to pivotal tuning)")
        self._validate_buckets()
        if self.mask_data_dir is not None and not self.masked_loss:
            raise ConfigError("mask_data_dir is set but masked_loss is off")
        if self.mask_data_dir is not None and not Path(self.mask_data_dir).is_dir():
            raise ConfigError(f"mask_data_dir {self.mask_data_dir!r} is not a folder")
        if self.dora_train not in ("both", "magnitude", "direction"):
            raise ConfigError(f"dora_train must be one of 'both', 'magnitude', 'direction'; got {self.dora_train!r}")
        dora_only = [n for n in ("magnitude_lr", "magnitude_weight_decay") if getattr(self, n) is not None]
        if not self.use_dora and (dora_only or self.dora_train != "both"):
            raise ConfigError(f"{(dora_only or ['dora_train'])[0]} applies to DoRA (use_dora true) only")
        from ..families.models import check_embedded_name

        for name in ("pretrained_model_name_or_path", "pretrained_vae_model_name_or_path"):
            try:
                check_embedded_name(getattr(self, name) or "")
            except ValueError as err:
                raise ConfigError(f"{name}: {err}") from None
        choices = {"mixed_precision": ("no", "fp16", "bf16"), "lr_scheduler": LR_SCHEDULERS,
                   "optimizer": OPTIMIZERS, "report_to": ("tensorboard", "none"),
                   "prediction_type": (None, "epsilon", "v_prediction"), "weighting_scheme": (None, *WEIGHTING_SCHEMES),
                   "prior_generation_precision": (None, "fp32", "fp16", "bf16")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                shown = ", ".join(repr(a) for a in allowed if a is not None)
                raise ConfigError(f"{name} must be one of {shown}; got {getattr(self, name)!r}")
        if self.use_8bit_adam and self.optimizer != "adamw":
            raise ConfigError("use_8bit_adam applies to optimizer 'adamw' only")
        return self


def check_seeds(name: str, seeds) -> None:
    """Every seed of setting `name` in [0, SEED_MAX], else one ConfigError naming the first that is not."""
    bad = [seed for seed in seeds if not 0 <= seed <= SEED_MAX]
    if bad:
        raise ConfigError(f"{name} must be in [0, {SEED_MAX}], got {bad[0]}")


def check_ranges(cfg, rules: dict) -> None:
    """Every float setting finite; then each rule: ('>', x), ('>=', x) or ('[0,1)', None), for
    values that are set (None means 'not used' / 'the default')."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{f.name} must be a finite number, got {value}")
    for name, (op, bound) in rules.items():
        value = getattr(cfg, name)
        if value is None:
            continue
        ok = {">": lambda: value > bound, ">=": lambda: value >= bound, "[0,1)": lambda: 0 <= value < 1,
              "[0,1]": lambda: 0 <= value <= 1}[op]()
        if not ok:
            wanted = f"in [0, {op[3:]}" if op.startswith("[0,1") else f"{op} {bound}"
            raise ConfigError(f"{name} must be {wanted}, got {value}")


def _field_types(cls=None) -> dict[str, type]:
    cls = cls or TrainConfig
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _unknown(key: str, known) -> ConfigError:
    close = difflib.get_close_matches(key, list(known), n=3, cutoff=0.6)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    return ConfigError(f"unknown setting {key!r}{hint}")


def _convert(key: str, value, typ):
    """Coerce a YAML value or a flag string to the field's type."""
    args = typing.get_args(typ)
    if typing.get_origin(typ) in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            return None
        typ = next(a for a in args if a is not type(None))
    if typ is bool:
        if isinstance(value, bool):
            return value
        text = str(value).lower()
        if text in ("true", "yes", "1", "on"):
            return True
        if text in ("false", "no", "0", "off"):
            return False
        raise ConfigError(f"{key} must be true or false, got {value!r}")
    if typing.get_origin(typ) is list:
        # prompts contain commas ("a sks dog, in a bucket"): several prompts are split on "|"
        sep = "|" if key in PROMPT_LISTS else ","
        if isinstance(value, (dict, bool)) or (elem_is_dict(typ) and not isinstance(value, list)):
            raise ConfigError(f"{key} must be a list{' of mappings (YAML)' if elem_is_dict(typ) else ''}, got {value!r}")
        items = value if isinstance(value, list) else [v for v in str(value).split(sep) if v.strip()]
        elem = (typing.get_args(typ) or (str,))[0]
        try:
            return [_scalar(key, v.strip() if isinstance(v, str) else v, elem) for v in items]
        except ConfigError:
            raise ConfigError(f"{key} must be a list of {elem.__name__}, got {value!r}") from None
    return _scalar(key, value, typ)


def elem_is_dict(list_type) -> bool:
    return (typing.get_args(list_type) or (str,))[0] is dict


def _scalar(key: str, value, typ):
    """int, float or str, strictly: 4.7 is not an int, true is not a number, a list is not a string."""
    if typ is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str) and re.fullmatch(r"\s*[+-]?\d+\s*", value):
            return int(value)
        raise ConfigError(f"{key} must be a whole number, got {value!r}")
    if typ is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key} must be a number, got {value!r}")
    if typ is dict:
        if isinstance(value, dict):
            return dict(value)
        raise ConfigError(f"{key} must be a mapping, got {value!r}")
    if typ is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)  # a revision or a prompt that YAML read as a number
        raise ConfigError(f"{key} must be a text value, got {value!r}")
    try:
        return typ(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{key} must be a {typ.__name__}, got {value!r}") from None


def parse_flags(argv: list[str], cls=None) -> dict:
    """`--key value`, `--key=value`, and bare `--flag` for booleans (as in diffusers)."""
    types_ = _field_types(cls)
    out, i = {}, 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--"):
            raise ConfigError(f"unexpected argument {arg!r}; settings are given as --name value")
        key, eq, value = arg[2:].partition("=")
        key = key.replace("-", "_")
        if key not in types_ and key != "config":
            raise _unknown(key, types_)
        if not eq:
            nxt = argv[i + 1] if i + 1 < len(argv) else None
            is_bool = types_.get(key) in (bool, bool | None)
            if is_bool and (nxt is None or nxt.startswith("--")):
                value = "true"
            elif nxt is None:
                raise ConfigError(f"--{key} needs a value")
            else:
                value, i = nxt, i + 1
        out[key] = value
        i += 1
    return out


def load_config(argv: list[str], cls=None):
    """Defaults <- YAML file of `--config` <- the other flags; then validated. `cls`: the config
    dataclass (default TrainConfig); it must have a `validate()` that returns the config."""
    return build_config(given_values(argv, cls), cls)


def build_config(values: dict, cls=None):
    """The config of `values` (YAML / flag text or typed values, each checked for its field's
    type), the rest defaults; validated."""
    cls = cls or TrainConfig
    types_ = _field_types(cls)
    for key in values:
        if key not in types_:
            raise _unknown(key, types_)
    return cls(**{k: _convert(k, v, types_[k]) for k, v in values.items()}).validate()


def given_values(argv: list[str], cls=None) -> dict:
    """The settings `argv` gives, unconverted: the YAML file of `--config`, then the other flags."""
    cls = cls or TrainConfig
    flags = parse_flags(argv, cls)
    values: dict = {}
    if "config" in flags:
        path = Path(flags.pop("config"))
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} not found")
        try:
            values = yaml.safe_load(path.read_bytes().decode("utf-8")) or {}
        except UnicodeDecodeError as err:
            raise ConfigError(f"config file {str(path)!r} is not UTF-8 text (byte {err.start})") from None
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            problem = getattr(err, "problem", None) or str(err).splitlines()[0]
            raise ConfigError(f"config file {str(path)!r} is not valid YAML{where}: {problem}") from None
        if not isinstance(values, dict):
            raise ConfigError(f"config file {str(path)!r} must hold a mapping of settings")
    values.update(flags)
    return values


def describe_fields(cls=None) -> list[tuple[str, str, str, str]]:
    """(name, type, default, help) per setting, help taken from the docstring under each field."""
    import ast
    import inspect

    cls = cls or TrainConfig
    tree = ast.parse(inspect.getsource(cls))
    body = tree.body[0].body
    docs = {}
    for node, nxt in zip(body, body[1:] + [None]):
        if isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant):
            docs[node.target.id] = " ".join(str(nxt.value.value).split())
    out = []
    for f in dataclasses.fields(cls):
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        typ = str(_field_types(cls)[f.name]).replace("typing.", "").replace("<class '", "").replace("'>", "")
        out.append((f.name, typ, repr(default), docs.get(f.name, "")))
    return out


def help_text(cls=None, usage: str = "usage: train_dreambooth_dora.py [--config FILE.yaml] [--name value ...]") -> str:
    lines = [usage, "Every setting is a YAML key and a flag; flags override the file; booleans work bare.", ""]
    for name, typ, default, doc in describe_fields(cls):
        lines.append(f"  --{name} ({typ}, default {default})" + (f"\n      {doc}" if doc else ""))
    return "\n".join(lines)

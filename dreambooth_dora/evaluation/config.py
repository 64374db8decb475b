"""The evaluation's settings: one dataclass, YAML + flags through the training config's machinery."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..training.config import ConfigError

USAGE = "usage: dreambooth-dora evaluate [--config FILE.yaml] [--name value ...]"


@dataclass
class EvalConfig:
    """Every field is a YAML key and a `--flag` of the same name."""

    base_model: str = "embedded:toy-world"
    """The model the adapters were trained on: hub id, local diffusers folder or `embedded:<name>`."""
    adapters: list[str] = field(default_factory=list)
    """Adapter folders or files, each optionally `label=path`; a training output folder also gives
    its checkpoints to the weight analysis. Separated by ',' on the command line."""
    instance_data_dir: str | None = None
    """The subject's images (the training set) that DINO and CLIP-I compare against."""
    subject_prompts: list[str] | None = None
    """Prompts with the identifier; default: the instance prompts the adapters recorded."""
    class_prompts: list[str] = field(default_factory=list)
    """Prompts of the subject's class without the identifier (prior drift)."""
    unrelated_prompts: list[str] = field(default_factory=list)
    """Prompts of other things (prior drift: the base model's "long-term memory")."""
    identifier: str = "sks"
    """The subject's token, removed from subject prompts for CLIP-T (CLIP does not know it)."""
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    images_per_prompt: int = 2
    num_inference_steps: int = 25
    guidance_scale: float | None = None
    """Default: the base model's own (SD 7.5, SD 3 7.0, FLUX.1 3.5: dev's distilled guidance)."""
    resolution: int | None = None
    """Image size; default: the model's native size."""
    dino_model: str | None = "facebook/dino-vits16"
    """DINO ViT (hub id or local folder); 'none' skips DINO."""
    clip_model: str | None = "openai/clip-vit-base-patch32"
    """CLIP (hub id or local folder); 'none' skips CLIP-I and CLIP-T."""
    analysis_modules: list[str] | None = field(default_factory=lambda: ["to_q", "q_proj"])
    """Layers in the weight analysis (name or name suffix); the paper plots the query projections.
    'none': every adapted layer."""
    output_dir: str = "outputs/evaluation"
    """The report folder: new or empty, or an earlier report (with `overwrite`)."""
    overwrite: bool = False
    """Replace an earlier evaluation report at output_dir (never anything else)."""
    device: str | None = None
    """'cuda', 'cpu', ...; default: cuda when available."""

    def validate(self) -> "EvalConfig":
        if not self.adapters:
            raise ConfigError("adapters is empty: give adapter folders, e.g. --adapters outputs/run_dora,outputs/run_lora")
        if not self.instance_data_dir:
            raise ConfigError("instance_data_dir is not set: the subject's images are needed for DINO / CLIP-I")
        if not self.seeds:
            raise ConfigError("seeds is empty")
        for name in ("images_per_prompt", "num_inference_steps"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1")
        if self.resolution is not None and (self.resolution < 16 or self.resolution % 8):
            raise ConfigError("resolution must be a multiple of 8, at least 16 (SSIM's window is 11 pixels)")
        if not self.identifier.strip():
            raise ConfigError("identifier is empty")
        from ..training.config import check_ranges, check_seeds

        check_seeds("seeds", self.seeds)
        from ..families.models import check_embedded_name

        check_ranges(self, {"guidance_scale": (">=", 0)})
        try:
            check_embedded_name(self.base_model)
        except ValueError as err:
            raise ConfigError(f"base_model: {err}") from None
        return self


def load_eval_config(argv: list[str]) -> EvalConfig:
    from ..training.config import load_config

    return load_config(argv, EvalConfig)

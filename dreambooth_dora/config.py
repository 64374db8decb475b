"""The training config: one dataclass, loaded from YAML and overridden by flags of the same names.

Field names are diffusers' DreamBooth flag names where the concept exists there, so a diffusers
command line works unchanged. Validation lives in `TrainConfig.validate`, with one clear message
per problem.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .adapters import TEXT_ENCODER_TARGETS, UNET_ATTENTION_TARGETS


class ConfigError(ValueError):
    """A bad setting; the CLI prints its message on one line and exits with status 2."""


@dataclass
class TrainConfig:
    # model
    pretrained_model_name_or_path: str = "embedded:tiny-random"
    """Hub id, local diffusers folder, or `embedded:<name>` for a model shipped with the package."""
    revision: str | None = None
    variant: str | None = None
    # data
    instance_data_dir: str | None = None
    """Folder of subject images (png/jpg/webp/bmp)."""
    instance_prompt: str | None = None
    """Prompt with the identifier, e.g. 'a photo of sks dog'."""
    resolution: int = 512
    center_crop: bool = False
    random_flip: bool = False
    # adapters
    rank: int = 4
    lora_alpha: float | None = None
    """Defaults to `rank` (scale 1)."""
    lora_dropout: float = 0.0
    use_dora: bool = True
    use_rslora: bool = False
    unet_target_modules: list[str] = field(default_factory=lambda: list(UNET_ATTENTION_TARGETS))
    train_text_encoder: bool = False
    text_encoder_target_modules: list[str] = field(default_factory=lambda: list(TEXT_ENCODER_TARGETS))
    # optimisation
    train_batch_size: int = 1
    max_train_steps: int = 400
    gradient_accumulation_steps: int = 1
    learning_rate: float = 1e-4
    text_encoder_lr: float | None = None
    """Defaults to `learning_rate`."""
    lr_scheduler: str = "constant"
    lr_warmup_steps: int = 0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_weight_decay: float = 1e-2
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0
    mixed_precision: str = "no"
    seed: int = 0
    # output
    output_dir: str = "outputs/run"
    report_to: str = "tensorboard"
    logging_dir: str = "logs"

    def validate(self) -> "TrainConfig":
        if self.instance_data_dir is None:
            raise ConfigError("instance_data_dir is not set: give the folder of subject images")
        folder = Path(self.instance_data_dir)
        if not folder.is_dir():
            raise ConfigError(f"instance_data_dir {str(folder)!r} is not a folder")
        if not self.instance_prompt:
            raise ConfigError("instance_prompt is not set, e.g. 'a photo of sks dog'")
        for name in ("rank", "resolution", "train_batch_size", "max_train_steps", "gradient_accumulation_steps"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.resolution % 8:
            raise ConfigError(f"resolution must be a multiple of 8, got {self.resolution}")
        if not 0 <= self.lora_dropout < 1:
            raise ConfigError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if self.mixed_precision not in ("no", "fp16", "bf16"):
            raise ConfigError(f"mixed_precision must be 'no', 'fp16' or 'bf16', got {self.mixed_precision!r}")
        return self


def _field_types() -> dict[str, type]:
    hints = typing.get_type_hints(TrainConfig)
    return {f.name: hints[f.name] for f in dataclasses.fields(TrainConfig)}


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
        items = value if isinstance(value, list) else [v for v in str(value).split(",") if v]
        return [str(v).strip() for v in items]
    try:
        return typ(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{key} must be a {typ.__name__}, got {value!r}") from None


def parse_flags(argv: list[str]) -> dict:
    """`--key value`, `--key=value`, and bare `--flag` for booleans (as in diffusers)."""
    types_ = _field_types()
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
            is_bool = types_.get(key) is bool
            if is_bool and (nxt is None or nxt.startswith("--")):
                value = "true"
            elif nxt is None:
                raise ConfigError(f"--{key} needs a value")
            else:
                value, i = nxt, i + 1
        out[key] = value
        i += 1
    return out


def load_config(argv: list[str]) -> TrainConfig:
    """Defaults <- YAML file of `--config` <- the other flags; then validated."""
    flags = parse_flags(argv)
    values: dict = {}
    if "config" in flags:
        path = Path(flags.pop("config"))
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} not found")
        try:
            values = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"config file {str(path)!r} is not valid YAML: {err}".splitlines()[0]) from None
        if not isinstance(values, dict):
            raise ConfigError(f"config file {str(path)!r} must hold a mapping of settings")
    values.update(flags)
    types_ = _field_types()
    for key in values:
        if key not in types_:
            raise _unknown(key, types_)
    return TrainConfig(**{k: _convert(k, v, types_[k]) for k, v in values.items()}).validate()

"""The comparison's logic, apart from the UI: pipelines, columns, generation, difference maps.

Fairness: every column of one click gets the same initial latents (drawn once from the seed),
a fresh scheduler of the same kind and config, the same prompt embeddings path and the same
settings. The base column runs with every adapter disabled (for DoRA, scale 0 is not the base
model: its learned magnitudes still apply).
"""

from __future__ import annotations

import itertools
import json
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from dreambooth_dora.models import load_pipeline, resolve_model
from dreambooth_dora.outputs import ADAPTER_FILE
from dreambooth_dora.adapter_file import AdapterError, describe, load_adapter, read_adapter
from dreambooth_dora.pivotal import insert_tokens

SLOTS = ("base", "lora", "dora")
SCHEDULERS = {
    "DPM++ 2M": "DPMSolverMultistepScheduler",
    "DDIM": "DDIMScheduler",
    "Euler": "EulerDiscreteScheduler",
    "Euler a": "EulerAncestralDiscreteScheduler",
    "PNDM": "PNDMScheduler",
}


# The most work one request may ask for: width x height x steps x images x columns. On 2 CPU
# cores an SD 1.5-size UNet step with guidance costs 39 us per pixel and the VAE decode 17 s per
# 512 px image (`python benchmarks/app_work.py`): a minute buys about 1.4 M units (512 x 512 x
# 5 steps, one image, one column). A GPU gets 200x (an estimate: no GPU measured it yet).
DEFAULT_MAX_WORK = {"cpu": 1_400_000, "gpu": 280_000_000}


class AppError(ValueError):
    """Shown to the user as a message; the app keeps running."""


class Stopped(Exception):
    """Raised inside a generation when Stop was pressed."""


def request_work(width: int, height: int, steps: int, images: int, columns: int) -> int:
    return int(width) * int(height) * int(steps) * int(images) * int(columns)


def resolve_under_root(root: Path | None, user_path: str) -> Path:
    """A folder the UI may open: relative, inside `root`, no `..` escapes (symlinks resolved)."""
    if root is None:
        raise AppError("opening folders from the UI is off: start the app with --adapters-root DIR")
    text = (user_path or "").strip()
    if not text:
        raise AppError("give a folder under the adapters root")
    p = Path(text)
    if p.is_absolute() or ".." in p.parts:
        raise AppError(f"{text!r} is outside the adapters root: give a path relative to it, without '..'")
    full = (root / p).resolve()
    if not full.is_relative_to(root.resolve()):
        raise AppError(f"{text!r} leads outside the adapters root")
    if not full.is_dir():
        raise AppError(f"{text!r} is not a folder under the adapters root")
    return full


def find_adapters(root: Path | None) -> list[str]:
    """Adapter and merged-pipeline folders under `root`, relative to it."""
    if root is None or not root.is_dir():
        return []
    found = set()
    for f in list(root.rglob(ADAPTER_FILE)) + list(root.rglob("model_index.json")):
        if "checkpoint-" not in str(f.parent.relative_to(root)):
            found.add(str(f.parent.relative_to(root)))
    return sorted(found)


@dataclass
class Source:
    path: Path
    merged: bool
    caption: str


class Comparison:
    """One pipeline with the adapters loaded under the names 'lora' and 'dora', plus separate
    pipelines for merged (fused) folders."""

    def __init__(self, base: str, adapters_root: str | Path | None = None, device: str | None = None,
                 max_work: int | None = None):
        self.base_name = base
        self.base_path = resolve_model(base)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.dtype = torch.float16 if self.device.type == "cuda" else torch.float32
        self.pipe = load_pipeline(base, torch_dtype=self.dtype).to(self.device)
        self.root = Path(adapters_root).resolve() if adapters_root else None
        self.max_work = int(max_work or DEFAULT_MAX_WORK["cpu" if self.device.type == "cpu" else "gpu"])
        self.sources: dict[str, Source] = {}
        self.merged: dict[str, object] = {}
        self.names: dict[str, str] = {}  # column -> the PEFT adapter name it uses now
        self.tokens: dict[str, dict] = {}  # column -> pivotal tuning's {identifier: new tokens} for its prompts
        self._serial = itertools.count(1)
        self.lock = threading.Lock()  # one generation at a time: columns never mix
        self.stop = threading.Event()  # set by the Stop button; checked after every sampling step

    # ---- loading ------------------------------------------------------------------------

    def load(self, slot: str, path: str | Path, from_ui: bool = False) -> str:
        """Load an adapter folder or a merged pipeline folder into column `slot`."""
        if slot not in ("lora", "dora"):
            raise AppError(f"unknown column {slot!r}")
        folder = resolve_under_root(self.root, str(path)) if from_ui else Path(path)
        with self.lock:
            if (folder / "model_index.json").is_file():
                return self._load_merged(slot, folder)
            if not folder.is_dir() and folder.suffix != ".safetensors":
                raise AppError(f"{str(path)!r} is not an adapter folder")
            return self._load_adapter(slot, folder)

    def _load_adapter(self, slot: str, folder: Path) -> str:
        try:
            adapter = read_adapter(folder)
            info = describe(adapter)
        except AdapterError as err:
            raise AppError(str(err)) from None
        # under a new name: the column keeps its adapter until the new one has loaded completely
        name = f"{slot}_{next(self._serial)}"
        try:
            report = load_adapter(self.pipe, folder, adapter_name=name)
        except Exception as err:
            self._drop(name)
            if isinstance(err, AdapterError):
                raise AppError(str(err)) from None
            raise AppError(f"could not load {folder.name!r}: {type(err).__name__}: "
                           f"{(str(err).splitlines() or [''])[0]}") from None
        self._drop(self.names.get(slot))
        self.names[slot] = name
        part = info.parts.get("unet") or next(iter(info.parts.values()))
        warn = ""
        recorded = adapter.info.base_model
        if recorded and recorded != self.base_name and resolve_model(recorded) != self.base_path:
            warn = f" (trained on {recorded})"
        caption = (f"{info.method} · rank {part.rank} · {info.steps or '?'} steps · "
                   f"{folder.name}/{adapter.path.name}{warn}{token_note(report['tokens'])}")
        self.tokens[slot] = report["tokens"]
        self.sources[slot] = Source(folder, False, caption)
        self.merged.pop(slot, None)
        return f"loaded {caption} as {slot}"

    def _load_merged(self, slot: str, folder: Path) -> str:
        try:
            pipe = load_pipeline(str(folder), torch_dtype=self.dtype, use_safetensors=True)
        except (OSError, ValueError) as err:
            raise AppError(f"cannot load merged pipeline {folder.name!r}: {str(err).splitlines()[0]}") from None
        # the shared pipeline may hold PEFT-wrapped layers: compare under the plain names
        base_shapes = {k.replace(".base_layer", ""): v.shape for k, v in self.pipe.unet.state_dict().items()
                       if "lora_" not in k}
        for k, v in pipe.unet.state_dict().items():
            shape = base_shapes.get(k)
            if shape is not None:
                if tuple(shape) != tuple(v.shape):
                    raise AppError(f"merged pipeline {folder.name!r} is for another base model: unet {k} "
                                   f"is {tuple(v.shape)}, here {tuple(shape)}")
        self.merged[slot] = pipe.to(self.device)
        tokens_file = folder / "tokens.json"  # a fused export of a pivotal-tuning adapter
        self.tokens[slot] = json.loads(tokens_file.read_text(encoding="utf-8")) if tokens_file.is_file() else {}
        self.sources[slot] = Source(folder, True, f"merged pipeline · {folder.name}{token_note(self.tokens[slot])}")
        self._drop(self.names.pop(slot, None))
        return f"loaded merged pipeline {folder.name} as {slot}"

    def _drop(self, name: str | None) -> None:
        if name in self._loaded_adapters():
            with warnings.catch_warnings():  # "adapter ... was active which is now deleted": as intended
                warnings.simplefilter("ignore", UserWarning)
                self.pipe.delete_adapters(name)

    def _loaded_adapters(self) -> list[str]:
        try:
            return list(self.pipe.get_list_adapters().get("unet", []))
        except (AttributeError, ValueError):
            return []

    def request_stop(self) -> bool:
        """Stop the running generation after its current sampling step (the queue moves on);
        False when none is running (a request that starts later is not affected)."""
        if not self.lock.locked():
            return False
        self.stop.set()
        return True

    def captions(self) -> dict[str, str]:
        out = {"base": f"base · {self.base_name}"}
        for slot in ("lora", "dora"):
            out[slot] = self.sources[slot].caption if slot in self.sources else f"{slot}: nothing loaded"
        return out

    # ---- generation ---------------------------------------------------------------------

    @torch.no_grad()
    def generate(self, prompt: str, negative_prompt: str = "", seed: int = 0, steps: int = 20,
                 guidance: float = 7.5, width: int | None = None, height: int | None = None,
                 scheduler: str = "DPM++ 2M", scale: float = 1.0, num_images: int = 1,
                 columns=SLOTS) -> dict[str, list[tuple[Image.Image, float]]]:
        """{column: [(image, seconds), ...]} for every requested column that has a source."""
        if not prompt or not prompt.strip():
            raise AppError("type a prompt first")
        if scheduler not in SCHEDULERS:
            raise AppError(f"unknown scheduler {scheduler!r}; one of {', '.join(SCHEDULERS)}")
        size = self.pipe.unet.config.sample_size * self.pipe.vae_scale_factor
        width, height = int(width or size), int(height or size)
        if width % 8 or height % 8:
            raise AppError("width and height must be multiples of 8")
        shown = [c for c in columns if c == "base" or c in self.sources]
        work = request_work(width, height, steps, num_images, len(shown))
        if work > self.max_work:
            raise AppError(f"this request is too large: {width}x{height} px x {int(steps)} steps x {int(num_images)} "
                           f"image(s) x {len(shown)} column(s) = {work:,} > the limit {self.max_work:,}; use fewer "
                           "pixels, steps, images or columns (the server's --max-work raises the limit)")
        import diffusers

        def check_stop(pipe, step, timestep, kwargs):  # diffusers' callback_on_step_end
            if self.stop.is_set():
                raise Stopped(step + 1)
            return kwargs

        with self.lock:
            self.stop.clear()
            gen = torch.Generator("cpu").manual_seed(int(seed))
            latents = torch.randn((int(num_images), self.pipe.unet.config.in_channels, height // self.pipe.vae_scale_factor,
                                   width // self.pipe.vae_scale_factor), generator=gen, dtype=torch.float32)
            out = {}
            for col in shown:
                pipe = self.merged.get(col, self.pipe)
                if pipe is self.pipe:
                    if col == "base":
                        if self._loaded_adapters():
                            self.pipe.disable_lora()
                    else:
                        self.pipe.enable_lora()
                        self.pipe.set_adapters([self.names[col]], adapter_weights=[float(scale)])
                pipe.scheduler = getattr(diffusers, SCHEDULERS[scheduler]).from_config(pipe.scheduler.config)
                t0 = time.perf_counter()
                try:
                    tokens = self.tokens.get(col, {})  # the column's own new tokens where the prompt names them
                    images = pipe(insert_tokens(prompt, tokens),
                                  negative_prompt=insert_tokens(negative_prompt, tokens) or None, num_inference_steps=int(steps),
                                  guidance_scale=float(guidance), width=width, height=height,
                                  latents=latents.to(self.device, pipe.unet.dtype) * 1.0,
                                  num_images_per_prompt=int(num_images), callback_on_step_end=check_stop,
                                  generator=torch.Generator("cpu").manual_seed(int(seed))).images
                except Stopped as stopped:
                    if self._loaded_adapters():
                        self.pipe.enable_lora()
                    raise AppError(f"stopped after step {stopped.args[0]} of {int(steps)} of the {col} column; "
                                   "nothing was kept from this request") from None
                seconds = (time.perf_counter() - t0) / max(len(images), 1)
                out[col] = [(im, seconds) for im in images]
            if self._loaded_adapters():
                self.pipe.enable_lora()
        return out


def token_note(tokens: dict) -> str:
    return (" · tokens " + ", ".join(f"{a}={''.join(t)}" for a, t in tokens.items())) if tokens else ""


def difference_map(a: Image.Image, b: Image.Image) -> Image.Image:
    """Per-pixel |a - b| (mean over channels) as a heat map: black = equal, yellow = most different.
    The maximum is printed in the caption by the UI; the map is normalised to it."""
    x = np.asarray(a.convert("RGB"), dtype=np.float32)
    y = np.asarray(b.convert("RGB"), dtype=np.float32)
    d = np.abs(x - y).mean(axis=2) / 255.0
    top = float(d.max())
    t = d / top if top > 0 else d
    # black -> red -> yellow -> white
    rgb = np.stack([np.clip(3 * t, 0, 1), np.clip(3 * t - 1, 0, 1), np.clip(3 * t - 2, 0, 1)], axis=2)
    return Image.fromarray((rgb * 255).round().astype(np.uint8), "RGB")

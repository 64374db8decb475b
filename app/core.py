"""The comparison's logic, apart from the UI: pipelines, columns, generation, difference maps.

Fairness: every column of one click gets the same initial latents (drawn once from the seed),
a fresh scheduler of the same kind and config, the same prompt embeddings path and the same
settings. The base column runs with every adapter disabled (for DoRA, scale 0 is not the base
model: its learned magnitudes still apply).
"""

from __future__ import annotations

import itertools
import json
import os
import math
import re
import threading
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from dreambooth_dora.families.models import load_pipeline, resolve_model
from dreambooth_dora.training.checkpoints import checkpoint_step
from dreambooth_dora.training.config import SEED_MAX
from dreambooth_dora.outputs import ADAPTER_FILE, atomic_path
from dreambooth_dora.adapters.file import AdapterError, describe, load_adapter, read_adapter, read_finite_adapter
from dreambooth_dora.evaluation.drawing import draw, loaded_adapters, seeded_latents
from dreambooth_dora.families import family_of_pipeline

from .limits import DEFAULT_MAX_WORK  # the work bound of one request



class AppError(ValueError):
    """Shown to the user as a message; the app keeps running."""


class StoppedError(AppError):
    """A request or grid stopped by the user: not an error, said calmly where its result goes."""

    def __init__(self, step: int, steps: int, label: str):
        self.step, self.steps, self.label = step, steps, label
        super().__init__(f"stopped after step {step} of {steps} (the {label} column)")


class Stopped(Exception):
    """Raised inside a generation when Stop was pressed."""


MAX_STEPS, MAX_IMAGES = 1000, 64  # sampling steps and images per request the page takes (the work bound applies too)


def whole(value, what: str, low: int, high: int) -> int:
    """A whole number from the page within [low, high]: 2.5 steps is not 2, a seed of 2**70 is no
    seed; anything else is one AppError."""
    if isinstance(value, int) and not isinstance(value, bool):
        number = value
    elif isinstance(value, float) and math.isfinite(value) and value.is_integer():
        number = int(value)
    elif isinstance(value, str) and re.fullmatch(r"\s*[+-]?\d{1,30}\s*", value):
        number = int(value)
    else:
        raise AppError(f"{what} must be a whole number, got {value!r}")
    if not low <= number <= high:
        raise AppError(f"{what} must be in [{low}, {high}], got {number}")
    return number


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


LABEL = re.compile(r"[A-Za-z0-9][A-Za-z0-9 _.+@=#-]{0,47}")
RULES = {"comfyui": "ComfyUI", "a1111": "A1111"}  # the consumers' views of a DoRA column (formats/consumers.py)


def find_runs(root: Path | None) -> list[str]:
    """Training run folders under `root` that hold checkpoints, relative to it."""
    from dreambooth_dora.outputs import CHECKPOINT

    if root is None or not root.is_dir():
        return []
    return sorted({str(p.parent.relative_to(root)) for p in root.rglob("checkpoint-*")
                   if p.is_dir() and CHECKPOINT.match(p.name) and (p / ADAPTER_FILE).is_file()})


@dataclass
class Column:
    """One column of the comparison: the base, an adapter in the shared pipeline (PEFT name
    `name`), a merged pipeline folder, or a consumer's view of an adapter column (own pipeline)."""

    label: str
    kind: str  # "base", "adapter", "merged" or "view"
    caption: str
    path: Path | None = None
    name: str | None = None
    pipe: object | None = None
    tokens: dict = field(default_factory=dict)  # pivotal tuning's {identifier: tokens} for this column's prompts
    step: int | None = None
    source: str | None = None  # a view: the column it shows
    rule: str | None = None  # a view: the consumer's rule

    def record(self) -> dict:
        """What the saved grid's JSON says about this column (enough to rebuild it); the path
        absolute, whatever folder the app was started from."""
        return {k: v for k, v in {"kind": self.kind, "path": str(Path(self.path).resolve()) if self.path else None,
                                  "step": self.step, "source": self.source, "rule": self.rule,
                                  "caption": self.caption}.items() if v is not None}


class Comparison:
    """One pipeline with every adapter column loaded under its own PEFT name, plus separate
    pipelines for merged folders and consumers' views. Columns are kept in the order added; the
    base column is always there and first."""

    def __init__(self, base: str, adapters_root: str | Path | None = None, device: str | None = None,
                 max_work: int | None = None, grids_dir: str | Path | None = None):
        self.base_name = base
        self.base_path = resolve_model(base)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.dtype = torch.float16 if self.device.type == "cuda" else torch.float32
        self.pipe = load_pipeline(base, torch_dtype=self.dtype).to(self.device)
        self.root = Path(adapters_root).resolve() if adapters_root else None
        self.grids_dir = Path(grids_dir) if grids_dir else (self.root / "grids" if self.root else None)
        self.max_work = int(max_work or DEFAULT_MAX_WORK["cpu" if self.device.type == "cpu" else "gpu"])
        self.columns: dict[str, Column] = {"base": Column("base", "base", f"base · {base}")}
        self._serial = itertools.count(1)
        self.seconds_per_unit: float | None = None  # measured: seconds per pixel-step of one image
        self.lock = threading.Lock()  # one generation at a time: columns never mix
        self.stop = threading.Event()  # set by the Stop button; checked after every sampling step

    # ---- columns ------------------------------------------------------------------------

    def _path(self, path: str | Path, from_ui: bool) -> Path:
        return resolve_under_root(self.root, str(path)) if from_ui else Path(path)

    @staticmethod
    def _label(label: str) -> str:
        label = (label or "").strip()
        if label == "base":
            raise AppError("'base' is the base model's column; give the new column another label")
        if not LABEL.fullmatch(label):
            raise AppError(f"label {label!r}: 1-48 letters, digits, spaces or _ . + @ = # -, starting with a "
                           "letter or digit")
        return label

    def load(self, label: str, path: str | Path, from_ui: bool = False, step: int | None = None) -> str:
        """Load an adapter folder (or file) or a merged pipeline folder as column `label` (new, or
        replacing that column once the new source has loaded completely); `step`: the training
        step an adapter snapshot stands for (a checkpoint's), for its caption."""
        label = self._label(label)
        folder = self._path(path, from_ui)
        with self.lock:
            if (folder / "model_index.json").is_file():
                return self._load_merged(label, folder)
            if not folder.is_dir() and folder.suffix != ".safetensors":
                raise AppError(f"{str(path)!r} is not an adapter folder")
            return self._load_adapter(label, folder, step=step)

    def _load_adapter(self, label: str, folder: Path, step: int | None = None) -> str:
        try:
            adapter = read_finite_adapter(folder, f"column {label!r}")
            info = describe(adapter)
        except AdapterError as err:
            raise AppError(str(err)) from None
        # under a new name: the column keeps its adapter until the new one has loaded completely
        name = f"{re.sub(r'[^A-Za-z0-9]', '_', label)[:24]}_{next(self._serial)}"
        try:
            report = load_adapter(self.pipe, folder, adapter_name=name)
        except Exception as err:
            self._drop(name)
            if isinstance(err, AdapterError):
                raise AppError(str(err)) from None
            raise AppError(f"could not load {folder.name!r}: {type(err).__name__}: "
                           f"{(str(err).splitlines() or [''])[0]}") from None
        old = self.columns.get(label)
        if old is not None:
            self._drop(old.name)
        part = info.parts.get(adapter.main_prefix) or next(iter(info.parts.values()))
        warn = ""
        recorded = adapter.info.base_model
        if recorded and recorded != self.base_name and resolve_model(recorded) != self.base_path:
            warn = f" (trained on {recorded})"
        steps = step if step is not None else info.steps
        where = adapter.path.relative_to(self.root) if self.root and adapter.path.is_relative_to(self.root) else \
            Path(folder.name) / adapter.path.name
        caption = (f"{info.method} · rank {part.rank} · {steps or '?'} steps · {where}{warn}"
                   f"{token_note(report['tokens'])}")
        self.columns[label] = Column(label, "adapter", caption, folder, name, tokens=report["tokens"], step=steps)
        return f"loaded {caption} as {label}"

    def _load_merged(self, label: str, folder: Path) -> str:
        try:
            pipe = load_pipeline(str(folder), torch_dtype=self.dtype, use_safetensors=True)
        except (OSError, ValueError) as err:
            raise AppError(f"cannot load merged pipeline {folder.name!r}: {str(err).splitlines()[0]}") from None
        # the shared pipeline may hold PEFT-wrapped layers: compare under the plain names
        denoiser = family_of_pipeline(self.pipe).denoiser_part
        base_shapes = {k.replace(".base_layer", ""): v.shape
                       for k, v in getattr(self.pipe, denoiser).state_dict().items() if "lora_" not in k}
        for k, v in getattr(pipe, denoiser).state_dict().items():
            shape = base_shapes.get(k)
            if shape is not None and tuple(shape) != tuple(v.shape):
                raise AppError(f"merged pipeline {folder.name!r} is for another base model: {denoiser} {k} "
                               f"is {tuple(v.shape)}, here {tuple(shape)}")
        tokens_file = folder / "tokens.json"  # a fused export of a pivotal-tuning adapter
        tokens = json.loads(tokens_file.read_text(encoding="utf-8")) if tokens_file.is_file() else {}
        old = self.columns.get(label)
        if old is not None:
            self._drop(old.name)
        self.columns[label] = Column(label, "merged", f"merged pipeline · {folder.name}{token_note(tokens)}", folder,
                                     pipe=pipe.to(self.device), tokens=tokens)
        return f"loaded merged pipeline {folder.name} as {label}"

    def add_run(self, path: str | Path, prefix: str | None = None, from_ui: bool = False) -> list[str]:
        """A training run's checkpoints and final adapter as columns, in step order, labelled
        '<prefix> step <N>' (prefix: the run folder's name). Returns the labels."""
        folder = self._path(path, from_ui)
        found = run_snapshots(folder)
        if not found:
            raise AppError(f"{str(path)!r} holds no checkpoint-<step> folders with an adapter and no final adapter")
        prefix = self._label(prefix or folder.name)
        labels = []
        with self.lock:
            for step, snapshot in found:
                label = self._label(f"{prefix} step {step}")
                self._load_adapter(label, snapshot, step=step)
                labels.append(label)
        return labels

    def add_view(self, source: str, rule: str, label: str | None = None) -> str:
        """Column `source` (an adapter) as a consumer draws its exported kohya file: 'comfyui'
        (ComfyUI and Forge today: output-axis DoRA over the base weight's norm) or 'a1111' (the
        built-in Lora extension: per input column). Built from the file's own tensors and the
        consumer's published rule (consumers.merge); compare it with the exact column."""
        from dreambooth_dora.formats.export import consumer_view

        col = self.columns.get(source)
        if col is None or col.kind != "adapter":
            raise AppError(f"{source!r} is not an adapter column; a view shows how a UI draws an adapter's export")
        if rule not in RULES:
            raise AppError(f"unknown UI {rule!r}; one of {', '.join(RULES)}")
        label = self._label(label or f"{source} as {RULES[rule]}")
        with self.lock:
            try:
                pipe = consumer_view(col.path, rule, base=str(self.base_path))
            except AdapterError as err:
                raise AppError(str(err)) from None
            old = self.columns.get(label)
            if old is not None:
                self._drop(old.name)
            caption = f"{source} as {RULES[rule]} draws the exported file (--format kohya)"
            self.columns[label] = Column(label, "view", caption, col.path, pipe=pipe.to(self.device, self.dtype),
                                         tokens=col.tokens, step=col.step, source=source, rule=rule)
        return f"added {label}: {caption}"

    def remove(self, label: str) -> str:
        if label == "base":
            raise AppError("the base column stays")
        with self.lock:
            col = self.columns.pop(label, None)
            if col is None:
                raise AppError(f"no column {label!r}")
            self._drop(col.name)
        return f"removed {label}"

    def _drop(self, name: str | None) -> None:
        if name in self._loaded_adapters():
            with warnings.catch_warnings():  # "adapter ... was active which is now deleted": as intended
                warnings.simplefilter("ignore", UserWarning)
                self.pipe.delete_adapters(name)

    def _loaded_adapters(self) -> list[str]:
        return loaded_adapters(self.pipe)

    def request_stop(self) -> bool:
        """Stop the running generation after its current sampling step (the queue moves on);
        False when none is running (a request that starts later is not affected)."""
        if not self.lock.locked():
            return False
        self.stop.set()
        return True

    def captions(self) -> dict[str, str]:
        return {label: col.caption for label, col in self.columns.items()}

    # ---- generation ---------------------------------------------------------------------

    @property
    def schedulers(self) -> dict[str, str]:
        """{label: diffusers scheduler class} the base model's family samples with (the first: default)."""
        return family_of_pipeline(self.pipe).schedulers

    def _check(self, prompt: str, scheduler: str | None, width, height) -> tuple[int, int, str]:
        if not prompt or not prompt.strip():
            raise AppError("type a prompt first")
        scheduler = scheduler or next(iter(self.schedulers))
        if scheduler not in self.schedulers:
            raise AppError(f"unknown scheduler {scheduler!r}; one of {', '.join(self.schedulers)}")
        size, step = self.native_size(), family_of_pipeline(self.pipe).size_step
        width, height = (whole(v or size, name, step, 8192) for v, name in ((width, "width"), (height, "height")))
        if width % step or height % step:
            raise AppError(f"width and height must be multiples of {step}")
        return width, height, scheduler

    def native_size(self) -> int:
        """The base model's picture size (px): the default width and height."""
        return family_of_pipeline(self.pipe).native_size(self.pipe)

    def _latents(self, seed: int, num_images: int, width: int, height: int) -> torch.Tensor:
        """fp32 whatever each column's precision: every column starts from the same numbers."""
        return seeded_latents(self.pipe, [seed], int(num_images), width, height, dtype=torch.float32)[0]

    def _draw(self, label: str, prompt: str, negative: str, latents: torch.Tensor, seed: int, steps: int,
              guidance: float, width: int, height: int, scheduler: str, scale: float) -> list[Image.Image]:
        """Column `label`'s pictures from `latents` (the caller holds the lock)."""
        import diffusers

        col = self.columns[label]
        pipe = col.pipe or self.pipe  # a checkpoint column has a pipeline of its own

        def check_stop(pipe, step, timestep, kwargs):  # diffusers' callback_on_step_end
            if self.stop.is_set():
                raise Stopped(step + 1)
            return kwargs

        pipe.scheduler = getattr(diffusers, self.schedulers[scheduler]).from_config(pipe.scheduler.config)
        try:
            return draw(pipe, col.name if pipe is self.pipe and col.kind != "base" else None, prompt, latents,
                        torch.Generator("cpu").manual_seed(int(seed)), tokens=col.tokens, scale=scale,
                        negative_prompt=negative, num_inference_steps=int(steps), guidance_scale=float(guidance),
                        width=width, height=height, callback_on_step_end=check_stop)
        except Stopped as stopped:
            raise StoppedError(stopped.args[0], int(steps), label) from None
        finally:
            if self._loaded_adapters():
                self.pipe.enable_lora()

    def _bound(self, width: int, height: int, steps: int, images: int, columns: int, what: str) -> int:
        work = request_work(width, height, steps, images, columns)
        if work > self.max_work:
            raise AppError(f"this {what} is too large: {width}x{height} px x {int(steps)} steps x {int(images)} "
                           f"image(s) x {columns} column(s) = {work:,} > the limit {self.max_work:,}; use fewer "
                           "pixels, steps, images or columns (the server's --max-work raises the limit)")
        return work

    @torch.no_grad()
    def generate(self, prompt: str, negative_prompt: str = "", seed: int = 0, steps: int = 20,
                 guidance: float = 7.5, width: int | None = None, height: int | None = None,
                 scheduler: str | None = None, scale: float = 1.0, num_images: int = 1,
                 columns=None) -> dict[str, list[tuple[Image.Image, float]]]:
        """{column: [(image, seconds), ...]} for every requested column (default: all) that exists."""
        width, height, scheduler = self._check(prompt, scheduler, width, height)
        scale = check_scale(scale)
        seed, steps = whole(seed, "seed", 0, SEED_MAX), whole(steps, "steps", 1, MAX_STEPS)
        num_images = whole(num_images, "images", 1, MAX_IMAGES)
        shown = [c for c in (self.columns if columns is None else columns) if c in self.columns]
        self._bound(width, height, steps, num_images, len(shown), "request")
        with self.lock:
            self.stop.clear()
            latents = self._latents(seed, num_images, width, height)
            out = {}
            for col in shown:
                t0 = time.perf_counter()
                images = self._draw(col, prompt, negative_prompt, latents, seed, steps, guidance, width, height,
                                    scheduler, scale)
                seconds = (time.perf_counter() - t0) / max(len(images), 1)
                self.seconds_per_unit = seconds / (width * height * int(steps))
                out[col] = [(im, seconds) for im in images]
        return out

    def view_differences(self, result: dict) -> dict[str, tuple[Image.Image, int]]:
        """For every view column in `result` whose source is there too: (|view - exact| heat map,
        the largest per-pixel difference of 255), first image."""
        out = {}
        for label, images in result.items():
            col = self.columns.get(label)
            if col is not None and col.kind == "view" and col.source in result and images:
                a, b = images[0][0], result[col.source][0][0]
                top = int(np.abs(np.asarray(a, np.int16) - np.asarray(b, np.int16)).max())
                out[label] = (difference_map(a, b), top)
        return out

    # ---- X/Y grids -------------------------------------------------------------------------

    def plan_grid(self, spec: "GridSpec") -> list["Cell"]:
        """The grid's cells, row by row, checked (columns exist, scales apply, the work bound)."""
        spec.width, spec.height, spec.scheduler = self._check(spec.prompt, spec.scheduler, spec.width, spec.height)
        spec.seed, spec.steps = whole(spec.seed, "seed", 0, SEED_MAX), whole(spec.steps, "steps", 1, MAX_STEPS)
        if spec.rows == "seeds":
            spec.row_values = [whole(v, "seed", 0, SEED_MAX) for v in spec.row_values]
        if spec.rows not in ROW_AXES or spec.cols not in COL_AXES:
            raise AppError(f"rows are one of {', '.join(ROW_AXES)}; columns one of {', '.join(COL_AXES)}")
        if spec.rows == "scales" and spec.cols == "scales":
            raise AppError("scales can be the rows or the columns, not both")
        if not spec.row_values or not spec.col_values:
            raise AppError("give at least one row value and one column value")
        if spec.cols == "columns":
            missing = [c for c in spec.col_values if c not in self.columns]
            if missing:
                raise AppError(f"no column {missing[0]!r}; the columns are {', '.join(self.columns)}")
        scaled = spec.cols == "scales" or spec.rows == "scales"
        target = spec.column if spec.cols == "scales" else None
        if spec.cols == "scales" and (target not in self.columns or self.columns[target].kind != "adapter"):
            raise AppError("scales as columns need one adapter column to draw (the grid's 'column')")
        if scaled and spec.cols == "columns":
            fixed = [c for c in spec.col_values if self.columns[c].kind != "adapter"]
            if fixed:
                raise AppError(f"{fixed[0]!r} has no adapter scale (base, merged and view columns are fixed); "
                               "leave it out of a scale grid")
        for value in ([*spec.row_values] if spec.rows == "scales" else []) + \
                ([*spec.col_values] if spec.cols == "scales" else []) + [spec.scale]:
            check_scale(value)
        cells = []
        for r, rv in enumerate(spec.row_values):
            for c, cv in enumerate(spec.col_values):
                cells.append(Cell(r, c, label=target if spec.cols == "scales" else cv,
                                  prompt=rv if spec.rows == "prompts" else spec.prompt,
                                  seed=int(rv) if spec.rows == "seeds" else int(spec.seed),
                                  scale=float(cv) if spec.cols == "scales" else
                                  float(rv) if spec.rows == "scales" else float(spec.scale)))
        self._bound(spec.width, spec.height, spec.steps, 1, len(cells), "grid")
        return cells

    def grid_cost(self, spec: "GridSpec") -> str:
        """What the grid will cost, before it starts (or why it cannot run)."""
        try:
            cells = self.plan_grid(spec)
        except AppError as err:
            return f"Cannot draw: {err}"
        work = request_work(spec.width, spec.height, spec.steps, 1, len(cells))
        guess = (f", about {work * self.seconds_per_unit:.0f} s at this server's last measured speed"
                 if self.seconds_per_unit else "")
        return (f"{len(spec.row_values)} x {len(spec.col_values)} = {len(cells)} cells, {work:,} units of work "
                f"(limit {self.max_work:,}){guess}")

    @torch.no_grad()
    def draw_grid(self, spec: "GridSpec"):
        """Draw the grid cell by cell: yields (cells done, total, the captioned grid so far);
        every cell of a row starts from the same initial latents (its row's seed)."""
        cells = self.plan_grid(spec)
        pictures: dict[tuple[int, int], Image.Image] = {}
        yield 0, len(cells), grid_picture(spec, pictures)
        with self.lock:
            self.stop.clear()
            latents = {}
            for n, cell in enumerate(cells, 1):
                if cell.r not in latents:
                    latents[cell.r] = self._latents(cell.seed, 1, spec.width, spec.height)
                t0 = time.perf_counter()
                pictures[(cell.r, cell.c)] = self._draw(cell.label, cell.prompt, spec.negative, latents[cell.r],
                                                        cell.seed, spec.steps, spec.guidance, spec.width,
                                                        spec.height, spec.scheduler, cell.scale)[0]
                self.seconds_per_unit = (time.perf_counter() - t0) / (spec.width * spec.height * spec.steps)
                yield n, len(cells), grid_picture(spec, pictures)
        self.last_grid = (spec, pictures)

    def save_grid(self, spec: "GridSpec", pictures: dict, folder: str | Path | None = None) -> tuple[Path, Path]:
        """The grid as one captioned PNG and a JSON of the settings that reproduce it, under new
        names in `folder` (default: the server's grids folder); nothing is replaced."""
        folder = Path(folder) if folder else self.grids_dir
        if folder is None:
            raise AppError("no folder for grids: start the app with --adapters-root or --grids-dir")
        folder.mkdir(parents=True, exist_ok=True)
        when = time.strftime("grid-%Y%m%d-%H%M%S")
        for n in itertools.count():  # a name neither file has yet
            stem = f"{when}-{n}" if n else when
            png, js = folder / f"{stem}.png", folder / f"{stem}.json"
            if not png.exists() and not js.exists():
                break
        labels = [spec.column] if spec.cols == "scales" else list(spec.col_values)
        labels += [self.columns[lbl].source for lbl in labels if lbl in self.columns and self.columns[lbl].source]
        labels = list(dict.fromkeys(lbl for lbl in labels if lbl != "base"))  # views need their source column
        columns = {lbl: self.columns[lbl].record() for lbl in labels if lbl in self.columns}
        for col in columns.values():  # also relative to the JSON: found again when moved together with it
            if col.get("path"):
                col["relative_path"] = os.path.relpath(col["path"], folder.resolve())
        settings = {"grid": asdict(spec), "base_model": self.base_name, "columns": columns,
                    "cell_size": [spec.width, spec.height],
                    "cells": [[r, c] for (r, c) in sorted(pictures)],
                    "reproduce": "python -m app.grid THIS.json --out NEW.png (the same base model and files)"}
        with atomic_path(png) as tmp:
            grid_picture(spec, pictures).save(tmp, format="PNG")
        with atomic_path(js) as tmp:
            tmp.write_text(json.dumps(settings, indent=1) + "\n", encoding="utf-8")
        return png, js


SCALE_LIMIT = 8.0  # |adapter scale| a grid draws: beyond it a picture is noise, and 1e9 or inf is a typo


def check_scale(value) -> float:
    """An adapter scale: a finite number within ±SCALE_LIMIT, else one AppError."""
    try:
        scale = float(value)
    except (TypeError, ValueError):
        raise AppError(f"scale {value!r} is not a number") from None
    if not math.isfinite(scale) or abs(scale) > SCALE_LIMIT:
        raise AppError(f"scale {value!r} is outside -{SCALE_LIMIT:g}..{SCALE_LIMIT:g} (1 is the adapter as trained, "
                       "0 the base model)")
    return scale


ROW_AXES = ("seeds", "prompts", "scales")
COL_AXES = ("columns", "scales")


@dataclass
class GridSpec:
    """An X/Y grid: rows are seeds, prompts or adapter scales; columns are columns of the
    comparison (adapters, checkpoints, views, base) or scales of one adapter column."""

    prompt: str
    rows: str = "seeds"
    row_values: list = field(default_factory=lambda: [0])
    cols: str = "columns"
    col_values: list = field(default_factory=list)
    column: str | None = None  # the adapter column drawn at each scale when the columns are scales
    negative: str = ""
    seed: int = 0
    steps: int = 20
    guidance: float = 7.5
    width: int | None = None
    height: int | None = None
    scheduler: str | None = None  # None: the family's first
    scale: float = 1.0


@dataclass
class Cell:
    r: int
    c: int
    label: str
    prompt: str
    seed: int
    scale: float


def axis_names(spec: GridSpec) -> tuple[list[str], list[str]]:
    rows = [f"seed {v}" if spec.rows == "seeds" else f"scale {float(v):g}" if spec.rows == "scales" else str(v)
            for v in spec.row_values]
    cols = ([f"{spec.column} · scale {float(v):g}" for v in spec.col_values] if spec.cols == "scales"
            else [str(v) for v in spec.col_values])
    return rows, cols


def grid_picture(spec: GridSpec, pictures: dict) -> Image.Image:
    """The grid as drawn so far: captioned rows and columns, cells not drawn yet in grey."""
    from dreambooth_dora.training.validation import image_grid

    w, h = int(spec.width), int(spec.height)
    blank = Image.new("RGB", (w, h), (225, 225, 225))
    rows, cols = axis_names(spec)
    cells = [[pictures.get((r, c), blank) for c in range(len(cols))] for r in range(len(rows))]
    return image_grid(cells, rows, column_labels=cols)


def run_snapshots(folder: Path) -> list[tuple[int, Path]]:
    """(step, folder) of a run's checkpoints holding an adapter, and its final adapter, by step."""
    from dreambooth_dora.training.checkpoints import list_checkpoints

    found = [(checkpoint_step(p), p) for p in list_checkpoints(folder) if (p / ADAPTER_FILE).is_file()]
    if (folder / ADAPTER_FILE).is_file():
        try:
            steps = read_adapter(folder).info.steps
        except AdapterError:
            steps = None
        found.append((steps if steps is not None else (found[-1][0] + 1 if found else 0), folder))
    return sorted(found, key=lambda x: x[0])


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

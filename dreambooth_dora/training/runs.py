"""A training run folder holds one run: its record, checkpoints, logs, grids and final adapter.

    output_dir/run.json                     the run's id, settings and data fingerprint (written
                                            when training starts, updated when it is resumed)
    output_dir/checkpoint-<step>/           adapter, optimiser, schedule, RNG + checkpoint.json
                                            (run id, step, settings, size and SHA-256 of each file)
    output_dir/pytorch_lora_weights.safetensors, train_config.json, README.md   at the end
    output_dir/logs/, validation/

`plan_run` decides, reading only, before any model loads: a new run in an empty folder; the same
run continued (`--resume_from_checkpoint`, settings checked against the record); or another run
replaced (`--overwrite_output_dir`, only when everything in the folder belongs to a run).
Anything else stops with one line. `start_run` then carries the plan out on the main process.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import uuid
import warnings
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from ..adapters.pivotal import EMBEDDINGS_FILE, WEBUI_FOLDER
from .checkpoints import CHECKPOINT, checkpoint_owner, checkpoint_problem, checkpoint_step, list_checkpoints, read_manifest
from .config import ConfigError
from ..outputs import (ADAPTER_FILE, RUN_FILE, TRAIN_CONFIG, OutputError, atomic_path, check_not_degenerate,
                      check_not_inside_outputs, check_writable_place, hold, resolve)

# any temp file in a run folder (atomic_path's .<name>.<pid>-<random>.tmp, and earlier versions'
# .<name>.<random>.tmp): nothing else writes in a run folder while its lock is held
TEMP_FILE = re.compile(r"^\..+\.tmp$")

# Settings that may change when a run is resumed: how long it runs, how often it saves and
# validates, where it logs, and memory/speed switches that do not change the arithmetic.
# Everything else (data, base model, method, rank, targets, seed, learning rates, ...) must match.
RESUMABLE = frozenset({
    "max_train_steps", "num_train_epochs", "checkpointing_steps", "checkpoints_total_limit",
    "resume_from_checkpoint", "overwrite_output_dir", "output_dir", "instance_data_dir",
    "validation_prompt", "num_validation_images", "validation_steps", "validation_inference_steps",
    "report_to", "logging_dir", "gradient_checkpointing", "allow_tf32", "sample_batch_size",
})


def fingerprint_examples(examples) -> str:
    """SHA-256 of the training examples as decoded (pixels, size, caption), in order: the same
    data wherever the folder now lives, and any changed, added or removed image is noticed."""
    h = hashlib.sha256()
    for ex in examples:
        h.update(f"{ex.image.size}|{ex.caption}|".encode())
        h.update(ex.image.tobytes())
        if ex.mask is not None:  # masked loss: the masks are training data too
            h.update(ex.mask.tobytes())
    return h.hexdigest()


@dataclass
class RunPlan:
    out_dir: Path
    run_id: str
    record: dict  # what run.json will hold
    resume: list[Path] = field(default_factory=list)  # checkpoints to try, newest first (the first verified)
    replace_old: bool = False  # --overwrite_output_dir: the old run goes before the new one comes
    messages: list[str] = field(default_factory=list)
    foreign: dict[int, Path] = field(default_factory=dict)  # step -> a checkpoint another run wrote here

    def clashes(self, start: int, max_steps: int, every: int) -> list[Path]:
        """Other runs' checkpoints at steps this run would save (start, max_steps): never replaced."""
        return [p for s, p in sorted(self.foreign.items()) if start < s < max_steps and s % every == 0]


def _settings(cfg) -> dict:
    return json.loads(json.dumps(asdict(cfg)))  # JSON types, as recorded


def _differences(recorded: dict, current: dict) -> list[str]:
    out = []
    for key in sorted(set(recorded) | set(current)):
        if key in RESUMABLE or recorded.get(key) == current.get(key):
            continue
        if key not in recorded:  # a setting newer than the record, left at its default: no change
            continue
        out.append(f"{key} {recorded.get(key)!r} -> {current.get(key)!r}")
    return out


def _known_entry(name: str, logging_dirs: set[str]) -> bool:
    """Whether a name in a run folder is something training writes there."""
    return (name in {RUN_FILE, TRAIN_CONFIG, ADAPTER_FILE, "README.md", "validation", EMBEDDINGS_FILE,
                     WEBUI_FOLDER} | logging_dirs
            or bool(CHECKPOINT.match(name.removesuffix(".tmp"))) or bool(TEMP_FILE.match(name))
            or name.startswith(".dreambooth-dora-probe.")
            or bool(re.fullmatch(rf"\.{WEBUI_FOLDER}\.(tmp|old)-\d+", name)))  # atomic_dir's leftovers


def _read_record(out: Path) -> dict | None:
    """run.json; else (checkpoints copied into a new folder) the newest checkpoint's manifest;
    else (a folder from before run records) the settings in train_config.json."""
    try:
        return json.loads((out / RUN_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        pass
    for ckpt in reversed(list_checkpoints(out)):
        manifest = read_manifest(ckpt)
        if manifest and "settings" in manifest:
            return {"run_id": manifest.get("run_id"), "settings": manifest["settings"], "data": None}
    try:
        return {"run_id": None, "settings": json.loads((out / TRAIN_CONFIG).read_text(encoding="utf-8")),
                "data": None}
    except (OSError, ValueError):
        return None


def check_output_dir(cfg) -> Path:
    """Where the run goes is a folder we may write, apart from the data it trains on."""
    raw = str(cfg.output_dir)
    try:
        out = resolve(raw, "output_dir")
        check_not_degenerate(out, raw, "output_dir")
        if out.exists() and not out.is_dir():
            raise OutputError(f"output_dir {raw!r} is a file; give a folder")
        check_writable_place(out / "x", "output_dir")
        check_not_inside_outputs(out, raw, "output_dir")  # a run inside another run or export would blend
    except OutputError as err:
        raise ConfigError(str(err)) from None
    for s in cfg.subject_sets():
        for name in ("instance_data_dir", "class_data_dir"):
            given = getattr(s, name)
            if not given:
                continue
            try:
                data = resolve(given, name)
            except OutputError as err:
                raise ConfigError(str(err)) from None
            if out == data or out.is_relative_to(data) or data.is_relative_to(out):
                raise ConfigError(f"output_dir {raw!r} and {name} {str(given)!r} overlap; "
                                  "keep the run's outputs apart from its images")
    return out


def plan_run(cfg, data_fingerprint: str) -> RunPlan:
    """Decide what this training run does with its output folder; raises ConfigError (one line)
    for every case that would mix two runs or lose one. Reads only."""
    out = check_output_dir(cfg)
    raw = str(cfg.output_dir)
    settings = _settings(cfg)
    now = datetime.now(timezone.utc).isoformat(timespec="seconds")
    entries = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    record = _read_record(out) if entries else None
    logging_dirs = {Path(cfg.logging_dir).parts[0]} if cfg.logging_dir else set()
    if record:
        logging_dirs.add(Path(record["settings"].get("logging_dir") or "logs").parts[0])
    foreign = [n for n in entries if not _known_entry(n, logging_dirs)]
    ours = [n for n in entries if _known_entry(n, logging_dirs) and not TEMP_FILE.match(n)
            and not n.endswith(".tmp")]
    fresh = {"run_id": uuid.uuid4().hex, "created": now, "settings": settings, "data": data_fingerprint,
             "sessions": [now]}

    if cfg.overwrite_output_dir and cfg.resume_from_checkpoint:
        raise ConfigError("give either resume_from_checkpoint (continue the run) or overwrite_output_dir "
                          "(start afresh), not both")
    if foreign and (ours or cfg.overwrite_output_dir or cfg.resume_from_checkpoint):
        shown = ", ".join(repr(n) for n in foreign[:3]) + (" ..." if len(foreign) > 3 else "")
        raise ConfigError(f"output_dir {raw!r} holds {shown}, which training did not write; move it away or "
                          "choose another output_dir (nothing there is replaced or deleted)")
    if foreign:
        raise ConfigError(f"output_dir {raw!r} is not empty and is not a training run folder; "
                          "choose a new or empty folder")
    if cfg.overwrite_output_dir:
        plan = RunPlan(out, fresh["run_id"], fresh, replace_old=bool(ours))
        if ours:
            plan.messages.append(f"--overwrite_output_dir: the previous run in {raw} is removed before this one starts")
        return plan
    if not cfg.resume_from_checkpoint:
        if ours:
            what = _describe(out, ours)
            raise ConfigError(f"output_dir {raw!r} already holds a training run ({what}); continue it with "
                              "--resume_from_checkpoint latest, start afresh with --overwrite_output_dir "
                              "(removes that run), or choose another output_dir")
        return RunPlan(out, fresh["run_id"], fresh)

    # ---- resume: the same run, or nothing to resume yet
    plan = RunPlan(out, fresh["run_id"], fresh)
    if record is not None:
        plan.run_id = record.get("run_id") or fresh["run_id"]
        _check_compatible(raw, record, settings, data_fingerprint)
        plan.record = {**fresh, **{k: v for k, v in record.items() if k in ("created", "sessions")},
                       "run_id": plan.run_id, "sessions": [*record.get("sessions", []), now]}
    elif ours:  # checkpoints without any record of their settings
        raise ConfigError(f"output_dir {raw!r} holds checkpoints but no record of their settings ({RUN_FILE}); "
                          "cannot tell whether they belong to this run: use --overwrite_output_dir or another folder")
    if cfg.resume_from_checkpoint == "latest":
        every = list_checkpoints(out)
        own = record.get("run_id") if record else None
        candidates = list(reversed(list_checkpoints(out, run_id=own) if own else every))
        others = [p for p in every if own and p not in candidates]
        plan.foreign = {checkpoint_step(p): p for p in others}
        if others:
            plan.messages.append(f"not resuming from {', '.join(p.name for p in others)}: written by another run "
                                 "(left as they are; this run never replaces them)")
        damaged = []
        for i, ckpt in enumerate(candidates):  # newest first; hashing stops at the first whole one
            problem = checkpoint_problem(ckpt)
            if not problem:
                plan.resume = candidates[i:]  # the older ones are fallbacks, verified if ever needed
                break
            damaged.append((ckpt, problem))
        if damaged and not plan.resume:
            raise ConfigError(f"no checkpoint in {raw!r} loads completely ({', '.join(p.name for p, _ in damaged)}: "
                              "damaged); use --overwrite_output_dir to start afresh")
        for ckpt, problem in damaged:
            warnings.warn(f"checkpoint {ckpt} is damaged ({problem}); resuming from {plan.resume[0].name}",
                          stacklevel=2)
        if not candidates:
            plan.messages.append(f"no checkpoint in {raw} yet: starting from scratch")
        return plan
    path = Path(cfg.resume_from_checkpoint).expanduser()
    if not path.is_dir():
        path = out / cfg.resume_from_checkpoint
    if not CHECKPOINT.match(path.name) or not (path / ADAPTER_FILE).is_file():
        raise ConfigError(f"resume_from_checkpoint {cfg.resume_from_checkpoint!r} is not a finished checkpoint "
                          f"folder (checkpoint-<step> holding {ADAPTER_FILE})")
    problem = checkpoint_problem(path)
    if problem:
        raise ConfigError(f"checkpoint {str(path)!r} is damaged: {problem}")
    manifest = read_manifest(path)
    owner = (manifest or {}).get("run_id")
    if record is not None and record.get("run_id") and owner != record["run_id"]:
        # foreign weights would continue this run under its name (latest refuses them too)
        own = list_checkpoints(out, run_id=record["run_id"])
        advice = (f"continue this run from its own checkpoints (--resume_from_checkpoint latest: {own[-1].name})"
                  if own else "start afresh with --overwrite_output_dir (removes this run)")
        raise ConfigError(f"checkpoint {str(path)!r} was written by {'another run' if owner else 'no known run'}, "
                          f"not the run in {raw!r}; {advice}, or continue that run in its own folder")
    plan.foreign = {checkpoint_step(p): p for p in list_checkpoints(out) if checkpoint_owner(p) != plan.run_id}
    if record is None and manifest is not None:  # a checkpoint from elsewhere seeds this new folder
        _check_compatible(str(path), {"settings": manifest["settings"], "data": None}, settings, data_fingerprint)
    plan.resume = [path]
    return plan


def _describe(out: Path, names: list[str]) -> str:
    parts = []
    if ADAPTER_FILE in names:
        parts.append("a finished adapter")
    n = sum(1 for name in names if CHECKPOINT.match(name))
    if n:
        parts.append(f"{n} checkpoint{'s' if n > 1 else ''}")
    return ", ".join(parts) or ", ".join(names[:3])


def _check_compatible(where: str, record: dict, settings: dict, data_fingerprint: str) -> None:
    diffs = _differences(record.get("settings") or {}, settings)
    if record.get("data") and record["data"] != data_fingerprint:
        diffs.insert(0, "the training images or captions")
    if diffs:
        raise ConfigError(f"cannot resume the run in {where!r}: it was made with other settings "
                          f"({'; '.join(diffs)}); use the same ones, or start afresh with --overwrite_output_dir "
                          "or another output_dir")


def clean_leftovers(out: Path) -> list[str]:
    """Remove what a killed run left half-written: checkpoint-<step>.tmp folders and temp files
    (they are never picked up, but they take space). Returns their names."""
    removed = []
    for p in [*out.iterdir(), *((out / "validation").iterdir() if (out / "validation").is_dir() else [])]:
        if p.is_dir() and p.name.endswith(".tmp") and CHECKPOINT.match(p.name[:-4]):
            shutil.rmtree(p, ignore_errors=True)
        elif p.is_file() and (TEMP_FILE.match(p.name) or p.name.startswith(".dreambooth-dora-probe.")):
            p.unlink(missing_ok=True)
        else:
            continue
        removed.append(str(p.relative_to(out)))
    for p in out.parent.glob(f".{out.name}.replaced-*"):  # an interrupted --overwrite_output_dir
        shutil.rmtree(p, ignore_errors=True)
        removed.append(p.name)
    return removed


@contextmanager
def run_folder_lock(accelerator, out: Path):
    """The run folder's lock (outputs.DestinationLock), held by the main process for the whole run;
    every process learns whether it was had, so all stop with the same one line if not."""
    lock, problem = None, None
    if accelerator.is_main_process:
        try:
            lock = hold(out, "output_dir", "train").acquire()
        except OutputError as err:
            problem = str(err)
    if accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        box = [problem]
        broadcast_object_list(box, from_process=0)
        problem = box[0]
    if problem:
        raise ConfigError(problem)
    try:
        if lock is not None and lock.taken_over:
            accelerator.print(f"output_dir: took over the lock file left by {lock.taken_over}, which is no longer "
                              "running")
        yield
    finally:
        if lock is not None:
            lock.release()


def start_run(plan: RunPlan) -> None:
    """Main process, after the models loaded: replace the old run if asked (moved aside in one
    rename, then deleted), clear a killed run's leftovers, and record this run."""
    out = plan.out_dir
    if plan.replace_old and out.exists():
        aside = out.with_name(f".{out.name}.replaced-{os.getpid()}")
        os.replace(out, aside)
        shutil.rmtree(aside)
    out.mkdir(parents=True, exist_ok=True)
    removed = clean_leftovers(out)
    if removed:
        plan.messages.append(f"removed what an interrupted run left half-written: {', '.join(removed)}")
    with atomic_path(out / RUN_FILE) as tmp:
        tmp.write_text(json.dumps(plan.record, indent=2), encoding="utf-8")

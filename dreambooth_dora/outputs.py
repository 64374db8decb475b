"""Everything the project writes goes through here: atomic files and folders, readable modes, and
the checks that keep a destination from replacing what the project did not write."""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

ADAPTER_FILE = "pytorch_lora_weights.safetensors"  # the adapter in a run folder (see adapter_file.py)


class OutputError(ValueError):
    """A destination that would lose or mix something; the CLI prints it on one line (exit 2)."""


OUTPUT_MARKER = ".dreambooth-dora-output.json"  # in folders the project wrote (fused export, report)
EXPORT_KEY = "dreambooth_dora_export"  # safetensors metadata of single-file exports ("kohya")
RUN_FILE = "run.json"  # a training run folder's record (see runs.py)
TRAIN_CONFIG = "train_config.json"  # the settings beside a finished adapter
CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")  # a finished checkpoint folder (see checkpoints.py)


def umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def make_readable(path: str | os.PathLike) -> None:
    """Give a file (or every file and folder of a tree) the permissions a file the user saves
    gets: 0666 / 0777 minus the umask. safetensors and mkstemp leave files 0600, which another
    user's UI or a container could not read."""
    mask = umask()
    path = Path(path)
    if path.is_dir():
        os.chmod(path, 0o777 & ~mask)
        for root, dirs, files in os.walk(path):
            for d in dirs:
                os.chmod(os.path.join(root, d), 0o777 & ~mask)
            for f in files:
                os.chmod(os.path.join(root, f), 0o666 & ~mask)
    else:
        os.chmod(path, 0o666 & ~mask)


@contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temporary path beside `path`; rename it onto `path` only if the block succeeds
    (an interrupted or failed write leaves the previous file, and no temp file behind)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        make_readable(tmp)  # after the write: safetensors' save_file resets the mode to 0600
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale_siblings(path: Path) -> None:
    """Undo what an interrupted `atomic_dir` on `path` left: its temp folder goes; a previous
    version moved aside (`.name.old-PID`) comes back if `path` itself is missing, else goes."""
    for leftover in sorted(path.parent.glob(f".{path.name}.*-*")):
        kind, _, pid = leftover.name.rpartition("-")
        if not pid.isdigit() or _pid_alive(int(pid)):  # a live process (or this one) owns it
            continue
        if kind == f".{path.name}.old" and not path.exists():
            os.replace(leftover, path)
        elif kind in (f".{path.name}.tmp", f".{path.name}.old"):
            shutil.rmtree(leftover, ignore_errors=True)


@contextmanager
def atomic_dir(path: str | os.PathLike, kind: str):
    """Yield a temporary folder beside `path`; when the block succeeds it gets the output marker
    of `kind` and takes `path`'s place (a previous folder there, already vetted by
    `check_output_target`, is moved aside first and removed after); otherwise it is deleted:
    the folder appears complete or not at all."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_siblings(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    old = path.with_name(f".{path.name}.old-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        yield tmp
        (tmp / OUTPUT_MARKER).write_text(json.dumps({"kind": kind, "written_by": "dreambooth-dora"}) + "\n")
        make_readable(tmp)
        if path.exists():
            os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if old.exists() and not path.exists():  # the swap failed half-way: put the old one back
            os.replace(old, path)


def output_kind(path: Path) -> str | None:
    """The kind of output the project wrote at `path` ('fused-pipeline', 'evaluation-report',
    'kohya'), or None for anything it did not write."""
    try:
        if path.is_dir():
            return json.loads((path / OUTPUT_MARKER).read_text()).get("kind")
        if path.is_file() and path.suffix.lower() == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), "pt") as f:
                meta = f.metadata() or {}
            # files from before the explicit marker carry the dora_scale note
            return meta.get(EXPORT_KEY) or ("kohya" if "dreambooth_dora_dora_scale" in meta else None)
    except Exception:  # unreadable or not JSON: not recognisably ours
        return None
    return None


def holds_training_run(path: Path) -> bool:
    """A folder that holds a training run or an adapter (run record, settings, adapter file or
    checkpoints): exports and reports never write into or over one."""
    if not path.is_dir():
        return False
    if any((path / name).exists() for name in (RUN_FILE, TRAIN_CONFIG, ADAPTER_FILE)):
        return True
    return any(p.is_dir() and CHECKPOINT.match(p.name) for p in path.iterdir())


def check_not_inside_outputs(path: Path, raw: str, what: str) -> None:
    """No folder above `path` holds a training run or an output of the project: writing there would
    blend with it (and a later --overwrite of that output would take this along)."""
    for place in path.parents:
        if holds_training_run(place):
            raise OutputError(f"{what} {raw!r} is inside the training run / adapter folder {str(place)!r}; "
                              "choose a folder outside it")
        if (place / OUTPUT_MARKER).is_file():
            raise OutputError(f"{what} {raw!r} is inside {str(place)!r}, an output of its own "
                              f"({output_kind(place)}); write beside it, not into it")


def check_writable_place(path: Path, what: str) -> None:
    """`path` (not necessarily existing) can be created: its nearest existing ancestor is a folder
    we may write in (probed by creating and removing a temp file, which also catches read-only
    file systems that `os.access` misses for root)."""
    parent = path.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise OutputError(f"{what} {str(path)!r} cannot be created: {str(parent)!r} is a file")
    try:
        fd, probe = tempfile.mkstemp(prefix=".dreambooth-dora-probe.", dir=parent)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise OutputError(f"{what} {str(path)!r} cannot be written: {str(parent)!r}: "
                          f"{err.strerror or type(err).__name__}") from None


def check_not_degenerate(path: Path, raw: str, what: str) -> None:
    """Refuse the file-system root, the home folder, and the current folder or one holding it."""
    cwd = Path.cwd().resolve()
    if path == Path(path.anchor) or path == Path.home().resolve():
        raise OutputError(f"{what} {raw!r} is {'the file-system root' if path == Path(path.anchor) else 'your home folder'}; "
                          "name a new folder for it")
    if cwd == path or cwd.is_relative_to(path):
        raise OutputError(f"{what} {raw!r} is the current folder{' or holds it' if cwd != path else ''}; "
                          "name a new folder for it, e.g. outputs/my_export")


def check_output_target(target: str | os.PathLike, kind: str, *, overwrite: bool = False, is_file: bool = False,
                        sources: tuple = (), what: str = "--out", flag: str = "--overwrite") -> Path:
    """Vet a destination before any model loads; returns it resolved, or raises OutputError.

    - never the root, home or current folder; never into or over a source or a training run folder;
    - an existing file / non-empty folder only with `flag`, and only if the project wrote it as
      this same `kind` (the marker file, or the kohya file's metadata)."""
    raw = str(target).strip()
    if not raw:
        raise OutputError(f"{what} is empty: name a {'file' if is_file else 'folder'} to write")
    path = Path(raw).expanduser().resolve()
    check_not_degenerate(path, raw, what)
    for source in sources:
        source = Path(source).resolve()
        folder = source if source.is_dir() else source.parent
        if path == source or path == folder or path.is_relative_to(folder) or folder.is_relative_to(path):
            how = "into" if path != folder and path.is_relative_to(folder) else "over"
            raise OutputError(f"{what} {raw!r} would write {how} "
                              f"the source {str(folder)!r}; write it somewhere else")
    if holds_training_run(path):
        raise OutputError(f"{what} {raw!r} is the training run / adapter folder {str(path)!r}; "
                          "exports and reports go somewhere else")
    check_not_inside_outputs(path, raw, what)
    if path.exists():
        if is_file and path.is_dir():
            raise OutputError(f"{what} {raw!r} is a folder; give a .safetensors file path")
        if not is_file and not path.is_dir():
            raise OutputError(f"{what} {raw!r} is a file; give a folder")
        if path.is_file() or any(path.iterdir()):
            if not overwrite:
                raise OutputError(f"{what} {raw!r} already exists{'' if is_file else ' and is not empty'}; "
                                  f"pass {flag} to replace it")
            found = output_kind(path)
            if found != kind:
                written = f"holds a {found}" if found else "was not written by dreambooth-dora"
                raise OutputError(f"{what} {raw!r} {written}, not a {kind}: refusing to replace it even with {flag}")
    check_writable_place(path, what)
    return path


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")

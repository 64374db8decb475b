"""Everything the project writes goes through here: atomic files and folders, readable modes, and
the checks that keep a destination from replacing what the project did not write."""

from __future__ import annotations

import fcntl
import glob
import json
import os
import re
import shutil
import socket
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

ADAPTER_FILE = "pytorch_lora_weights.safetensors"  # the adapter in a run folder (see adapters/file.py)


class OutputError(ValueError):
    """A destination that would lose or mix something; the CLI prints it on one line (exit 2)."""


class WriteError(OutputError):
    """A write that failed (a full disk, a read-only or lost mount): one line naming the file, why,
    and what is free there. The atomic writers raise it after removing their half-written files."""

    def __init__(self, path: str | os.PathLike, reason: str):
        self.path, self.reason, self.free = str(path), reason, free_space(path)
        super().__init__(f"could not write {self.path}: {reason} ({self.free} free there)")


def free_space(path: str | os.PathLike) -> str:
    """The free space of the disk holding `path` (or its nearest existing folder), for messages."""
    place = Path(path)
    while not place.exists() and place != place.parent:
        place = place.parent
    try:
        free = shutil.disk_usage(place).free
    except OSError:
        return "unknown space"
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if free >= size:
            return f"{free / size:.1f} {unit}"
    return f"{free} bytes"


def write_failure(err: BaseException) -> str | None:
    """Why a write failed, in words, when `err` is one (OSError, safetensors' SafetensorError,
    torch's serialisation RuntimeError); None for anything else (a bug stays a traceback)."""
    if isinstance(err, OSError):
        return err.strerror or str(err) or type(err).__name__
    text = str(err)
    if type(err).__name__ == "SafetensorError" or (isinstance(err, RuntimeError) and any(
            s in text for s in ("inline_container", "PytorchStreamWriter", "file write failed"))):
        if "os error 28" in text or "No space left" in text:
            return "No space left on device"
        if "unexpected pos" in text or "file write failed" in text:  # torch's zip writer on a full disk
            return "the write stopped short (a full disk?)"
        return text.strip().splitlines()[0][:200] if text.strip() else type(err).__name__
    return None


@contextmanager
def named_write_errors(path: str | os.PathLike):
    """Inside the block, a failed write (`write_failure`) becomes one WriteError naming `path`;
    anything else, and a WriteError already raised deeper, passes unchanged."""
    try:
        yield
    except Exception as err:
        reason = write_failure(err)
        if reason is None or isinstance(err, WriteError):
            raise
        raise WriteError(path, reason) from None


def resolve(raw: str | os.PathLike, what: str) -> Path:
    """`raw` made absolute with links followed; a symbolic link loop is one OutputError (Python
    raises RuntimeError or OSError for it depending on the version)."""
    try:
        return Path(raw).expanduser().resolve()
    except (RuntimeError, OSError) as err:
        if isinstance(err, RuntimeError) and "loop" not in str(err).lower():
            raise
        raise OutputError(f"{what} {str(raw)!r} is a symbolic link loop (a link that leads back to itself); "
                          "give a real folder or file") from None


OUTPUT_MARKER = ".dreambooth-dora-output.json"  # in folders the project wrote (fused export, report)
EXPORT_KEY = "dreambooth_dora_export"  # safetensors metadata of single-file exports ("kohya")
RUN_FILE = "run.json"  # a training run folder's record (see training/runs.py)
TRAIN_CONFIG = "train_config.json"  # the settings beside a finished adapter
CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")  # a finished checkpoint folder (see training/checkpoints.py)


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


TEMP_FILE = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)-[^.]+\.tmp$")  # atomic_path's: .<name>.<pid>-<random>.tmp


def clean_stale_temp_files(folder: Path, name: str) -> None:
    """Remove the temp files of `name` that `atomic_path` left in `folder` when its process was
    killed (their names carry the writer's pid; a live writer's are kept)."""
    for p in folder.glob(f".{glob.escape(name)}.*.tmp"):
        m = TEMP_FILE.match(p.name)
        if m and m["name"] == name and not _pid_alive(int(m["pid"])):
            p.unlink(missing_ok=True)


@contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temporary path beside `path`; rename it onto `path` only if the block succeeds
    (an interrupted or failed write leaves the previous file, and no temp file behind). The temp
    name carries the pid, so one left by a killed process is recognised and removed next time.
    A failed write is a WriteError naming `path`."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        clean_stale_temp_files(path.parent, path.name)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}-", suffix=".tmp", dir=path.parent)
        os.close(fd)
    except OSError as err:
        raise WriteError(path, write_failure(err)) from None
    try:
        with named_write_errors(path):
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
        with named_write_errors(path):
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


def check_not_degenerate(path: Path, raw: str, what: str, file: bool = False) -> None:
    """Refuse the file-system root, the home folder, and the current folder or one holding it;
    with `file`, `path` is the folder a file would go into, and the same places are refused for it
    (an export scattered into /, home or the working folder is what the README promises never to do)."""
    cwd = Path.cwd().resolve()
    is_root, is_home = path == Path(path.anchor), path == Path.home().resolve()
    place = "the file-system root" if is_root else "your home folder" if is_home else "the current folder"
    if file and (is_root or is_home or cwd == path):
        raise OutputError(f"{what} {raw!r} would write into {place}; put it in a folder of its own, "
                          "e.g. outputs/exports/NAME.safetensors or your UI's loras folder")
    if file:
        return
    if is_root or is_home:
        raise OutputError(f"{what} {raw!r} is {place}; name a new folder for it")
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
    path = resolve(raw, what)
    check_not_degenerate(path.parent if is_file else path, raw, what, file=is_file)
    for source in sources:
        source = resolve(source, "the source")
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


# ---- one writer per destination ------------------------------------------------------------------
#
# A lock file beside the destination (`.<name>.lock`, so it exists before the folder does and a
# file destination can have one too), held with flock(2) for as long as the command writes there.
# The kernel releases the lock when its process dies, however it dies: a lock file left by a
# killed process is recognised (the lock is free) and taken over. The file records who holds it,
# for the message the second writer gets.

def lock_file_of(path: Path) -> Path:
    return path.with_name(f".{path.name}.lock")


def _holder(text: str) -> str:
    try:
        who = json.loads(text)
        return f"process {who['pid']} ({who['command']}, since {who['since']}" + \
            (f", on {who['host']}" if who.get("host") != socket.gethostname() else "") + ")"
    except (ValueError, KeyError, TypeError):
        return "another process"


class DestinationLock:
    """An exclusive lock on a destination (a run folder, an export); see above.

    `DestinationLock(path, what, command).acquire()` raises OutputError (one line naming the holder)
    when another process holds it; `release()` removes the lock file. `taken_over` names the dead
    process whose lock file was found, if any."""

    def __init__(self, path: str | os.PathLike, what: str, command: str):
        self.path, self.what, self.command = Path(path), what, command
        self.file = lock_file_of(self.path)
        self.fd: int | None = None
        self.taken_over: str | None = None
        self.created: list[Path] = []  # folders made to hold the lock file (removed again if left empty)

    def acquire(self) -> "DestinationLock":
        parent = self.file.parent
        missing = []
        while not parent.exists():
            missing.append(parent)
            parent = parent.parent
        try:
            for folder in reversed(missing):
                folder.mkdir()
                self.created.append(folder)
            while True:
                fd = os.open(self.file, os.O_RDWR | os.O_CREAT, 0o666 & ~umask())
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    text = os.pread(fd, 4096, 0).decode("utf-8", "replace")
                    os.close(fd)
                    self._remove_created()
                    raise OutputError(f"{self.what} {str(self.path)!r} is in use by {_holder(text)}; wait for it to "
                                      f"finish or choose another {self.what} (lock {self.file.name})") from None
                try:  # the releaser unlinks the file: make sure we hold the one that is still there
                    same = os.path.samestat(os.fstat(fd), os.stat(self.file))
                except FileNotFoundError:
                    same = False
                if same:
                    break
                os.close(fd)
            old = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip()
            if old:
                self.taken_over = _holder(old)
            record = json.dumps({"pid": os.getpid(), "command": self.command, "host": socket.gethostname(),
                                 "since": time.strftime("%Y-%m-%d %H:%M:%S")})
            os.ftruncate(fd, 0)
            os.pwrite(fd, record.encode(), 0)
        except OSError as err:
            self._remove_created()
            raise OutputError(f"{self.what} {str(self.path)!r}: cannot create its lock file "
                              f"{str(self.file)!r}: {err.strerror or err}") from None
        self.fd = fd
        return self

    def _remove_created(self) -> None:
        for folder in reversed(self.created):
            try:
                folder.rmdir()  # only if still empty
            except OSError:
                break
        self.created = []

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            os.unlink(self.file)  # while still holding it: a waiter then finds a new file, not this one
        except OSError:
            pass
        os.close(self.fd)
        self.fd = None
        if not self.path.exists():
            self._remove_created()

    def __enter__(self) -> "DestinationLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def hold(path: str | os.PathLike, what: str, command: str) -> DestinationLock:
    """`with hold(path, "--out", "export"):` one writer at a time for `path` (see DestinationLock)."""
    return DestinationLock(path, what, command)


@contextmanager
def claim_output(target: str | os.PathLike, kind: str, *, what: str = "--out", command: str = "export", **kw):
    """`check_output_target` under the destination's lock, held while the block writes: a second
    command (a trainer, another export) aimed at the same place stops with one line, and the
    check cannot go stale between the look and the write. Yields the vetted path."""
    path = check_output_target(target, kind, what=what, **kw)  # refused at once when it is plainly wrong
    with hold(path, what, command):
        yield check_output_target(target, kind, what=what, **kw)  # again, now that nobody else writes there

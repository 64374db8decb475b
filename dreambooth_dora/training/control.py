"""Control of a running trainer from outside: a stop request, and a progress file to watch.

Stop: SIGTERM (what `kill`, a job queue or a cluster's pre-emption sends) no longer kills the run
mid-step: the step in progress ends, a checkpoint of it is written, and the trainer stops with
`TrainingStopped` (exit status 3). `--resume_from_checkpoint latest` then continues exactly
(= uninterrupted). Ctrl-C (SIGINT) is unchanged: it stops at once, losing the steps since the last
checkpoint.

Progress: when `DREAMBOOTH_DORA_PROGRESS` names a file, the main process appends one JSON line per
optimiser step (`step`, `max_steps`, `loss`, `lr`, `time`) and one per written file (`event`:
`checkpoint` / `validation` / `adapter`, `path`): what the app's Train tab shows.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

PROGRESS_ENV = "DREAMBOOTH_DORA_PROGRESS"
STOPPED_STATUS = 3  # the exit status of a run stopped on request (resumable)


class TrainingStopped(Exception):
    """The run stopped on request after writing the checkpoint of its last step (one line)."""

    def __init__(self, step: int, max_steps: int, checkpoint: Path | None):
        self.step, self.max_steps, self.checkpoint = step, max_steps, checkpoint
        where = f"{checkpoint} saved" if checkpoint else "no checkpoint"
        super().__init__(f"stopped on request at step {step} of {max_steps} ({where}); continue with "
                         "--resume_from_checkpoint latest")


class StopRequest:
    """While entered: SIGTERM sets a flag instead of ending the process (main thread only; elsewhere
    the handler is left alone). `requested(accelerator)`: any process asked (all agree)."""

    def __init__(self):
        self.flag = False
        self._previous = None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._on_signal)
        return self

    def _on_signal(self, signum, frame):
        self.flag = True

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
        return False

    def requested(self, accelerator) -> bool:
        if accelerator.num_processes == 1:
            return self.flag
        import torch

        flag = torch.tensor([float(self.flag)], device=accelerator.device)
        return bool(accelerator.reduce(flag, reduction="sum").item() > 0)


class Progress:
    """Appends JSON lines to the file `DREAMBOOTH_DORA_PROGRESS` names (nothing when unset, or on
    other processes than the main one)."""

    def __init__(self, main_process: bool):
        name = os.environ.get(PROGRESS_ENV)
        self.path = Path(name) if name and main_process else None

    def _write(self, record: dict) -> None:
        if self.path is None:
            return
        with open(self.path, "a", encoding="utf-8") as f:  # one short line per call: whole or absent
            f.write(json.dumps({**record, "time": round(time.time(), 3)}) + "\n")

    def step(self, step: int, max_steps: int, logs: dict) -> None:
        self._write({"step": step, "max_steps": max_steps,
                     **{k: round(float(v), 6) for k, v in logs.items() if k in ("loss", "lr")}})

    def event(self, kind: str, path: Path, step: int) -> None:
        self._write({"event": kind, "path": str(path), "step": step})


def read_progress(path: str | Path) -> list[dict]:
    """The records of a progress file (a line still being written is skipped)."""
    out = []
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        return out
    for line in text.splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out

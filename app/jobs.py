"""Training jobs for the app's Train tab: a queue on disk, one job at a time, the real trainer.

A job is a folder `ROOT/jobs/<id>/` (a new one per job, never reused): `job.json` (its state),
one YAML config per run (`dora.yaml`, `lora.yaml`: the twins differ only in `use_dora`), and per
run its log, progress file, exit status and output folder (`dora/`, `lora/`). Each run is the
trainer itself in a process of its own (`dreambooth-dora train --config RUN.yaml`,
started in a new session), so closing the page, reloading it or restarting the app loses
nothing: a restarted app finds the job's process by its pid and command line and follows it on.

Stop sends SIGTERM: the trainer ends the step in progress, writes its checkpoint and exits with
status 3; Resume queues the job again and its current run continues with
`--resume_from_checkpoint latest` (the trainer's own resume: = uninterrupted). Cancel drops a
queued job. A failed run's one-line error (the trainer's `error:` line) is the job's error.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from dreambooth_dora.outputs import ADAPTER_FILE, write_text
from dreambooth_dora.training.control import PROGRESS_ENV, STOPPED_STATUS, read_progress

STATES = ("queued", "running", "stopping", "stopped", "failed", "done", "cancelled")
JOB_FILE = "job.json"


@dataclass
class RunState:
    """One trainer run of a job (a twin)."""

    method: str  # "dora" / "lora"
    status: str = "queued"  # queued / running / stopped / failed / done
    exit: int | None = None
    resume: bool = False  # the next start continues from the latest checkpoint


@dataclass
class Job:
    id: str
    folder: str
    created: float
    runs: list[RunState]
    status: str = "queued"
    error: str | None = None
    pid: int | None = None
    settings: dict = field(default_factory=dict)  # the page's summary: base, steps, methods

    @property
    def path(self) -> Path:
        return Path(self.folder)

    def run_folder(self, method: str) -> Path:
        return self.path / method

    def current(self) -> RunState | None:
        """The run that is running, or the first one not done."""
        return next((r for r in self.runs if r.status == "running"),
                    next((r for r in self.runs if r.status != "done"), None))

    def save(self) -> None:
        data = asdict(self)
        write_text(self.path / JOB_FILE, json.dumps(data, indent=2))

    @classmethod
    def load(cls, folder: Path) -> "Job":
        data = json.loads((folder / JOB_FILE).read_text(encoding="utf-8"))
        data["runs"] = [RunState(**r) for r in data["runs"]]
        return cls(**data)


def train_command(config: Path, resume: bool) -> list[str]:
    """The trainer as the command line runs it (one process)."""
    return [sys.executable, "-c", "import sys; from dreambooth_dora.cli import main; sys.exit(main())", "train",
            "--config", str(config), *(["--resume_from_checkpoint", "latest"] if resume else [])]


def _alive(pid: int | None, marker: str) -> bool:
    """The process `pid` exists and is this job's trainer (its command line names `marker`)."""
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    try:
        return marker in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except OSError:  # no /proc (not Linux): trust the pid
        return True


def last_error(log: Path) -> str | None:
    """The trainer's one-line error in its log (`error: ...`), else its last line."""
    try:
        lines = [ln.strip() for ln in log.read_text(encoding="utf-8", errors="replace").replace("\r", "\n").splitlines()
                 if ln.strip()]
    except FileNotFoundError:
        return None
    errors = [ln for ln in lines if ln.startswith("error:")]
    return errors[-1] if errors else (lines[-1] if lines else None)


def log_tail(log: Path, lines: int = 15) -> str:
    """The log's last lines, a progress bar's redraws (carriage returns) folded to the newest."""
    try:
        text = log.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return ""
    rows = [row.rsplit("\r", 1)[-1] for row in text.split("\n")]
    return "\n".join([r for r in rows if r.strip()][-lines:])


class JobQueue:
    """The jobs under `root/jobs`, run one at a time by a background thread (`start()`)."""

    def __init__(self, root: str | Path, poll: float = 0.5):
        self.root = Path(root)
        self.folder = self.root / "jobs"
        self.poll = poll
        self.lock = threading.RLock()
        self.procs: dict[str, subprocess.Popen] = {}  # job id -> the trainer this app started
        self._thread: threading.Thread | None = None
        self._closing = threading.Event()

    # ---- the jobs ------------------------------------------------------------------------------

    def jobs(self) -> list[Job]:
        """Every job, oldest first (a folder without a readable job.json is not a job)."""
        out = []
        if self.folder.is_dir():
            for sub in self.folder.iterdir():
                try:
                    out.append(Job.load(sub))
                except (OSError, ValueError, TypeError, KeyError):
                    continue
        return sorted(out, key=lambda j: (j.created, j.id))

    def get(self, job_id: str) -> Job:
        folder = self.folder / job_id
        if not job_id or "/" in job_id or job_id.startswith(".") or not (folder / JOB_FILE).is_file():
            raise ValueError(f"no job {job_id!r}")
        return Job.load(folder)

    def submit(self, configs: dict[str, dict], settings: dict | None = None) -> Job:
        """A new job folder holding one YAML per run ({method: settings}); each run's output_dir is
        set to its folder inside the job's. Queued."""
        import yaml

        with self.lock:
            self.folder.mkdir(parents=True, exist_ok=True)
            job_id = time.strftime("%Y%m%d-%H%M%S") + "-" + secrets.token_hex(2)
            folder = self.folder / job_id
            folder.mkdir()  # never an existing one
            job = Job(id=job_id, folder=str(folder), created=time.time(),
                      runs=[RunState(method=m) for m in configs], settings=dict(settings or {}))
            for method, values in configs.items():
                values = {**values, "output_dir": str(job.run_folder(method))}
                write_text(folder / f"{method}.yaml", yaml.safe_dump(values, sort_keys=False))
            job.save()
            return job

    def _change(self, job_id: str, allowed: tuple[str, ...], refusal: str, change) -> Job:
        """Apply `change(job)` to a job whose status is one of `allowed` (else ValueError: the
        status, then `refusal`) and save it."""
        with self.lock:
            job = self.get(job_id)
            if job.status not in allowed:
                raise ValueError(f"job {job_id} is {job.status}{refusal}")
            change(job)
            job.save()
            return job

    def stop(self, job_id: str) -> Job:
        """Ask a running job's trainer to checkpoint and end (SIGTERM)."""
        job = self._change(job_id, ("running",), ", not running", lambda j: setattr(j, "status", "stopping"))
        if job.pid:
            try:
                os.kill(job.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        return job

    def resume(self, job_id: str) -> Job:
        """Queue a stopped or failed job again; its current run continues from its latest checkpoint."""
        def requeue(job):
            run = job.current()
            if run is not None:
                run.status, run.resume = "queued", True
            job.status, job.error = "queued", None

        return self._change(job_id, ("stopped", "failed"), "; only a stopped or failed job resumes", requeue)

    def cancel(self, job_id: str) -> Job:
        return self._change(job_id, ("queued",), "; only a queued job can be cancelled (stop a running one)",
                            lambda j: setattr(j, "status", "cancelled"))

    # ---- what a job shows -------------------------------------------------------------------------

    def progress(self, job: Job, method: str | None = None) -> list[dict]:
        run = method or (job.current().method if job.current() else job.runs[-1].method)
        return read_progress(job.path / f"{run}.progress.jsonl")

    # ---- running ---------------------------------------------------------------------------------

    def start(self) -> "JobQueue":
        """Follow running jobs and start queued ones, in a background thread, until `close()`."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="train-jobs", daemon=True)
            self._thread.start()
        return self

    def close(self) -> None:
        """Stop following (the trainers keep running; a restarted app picks them up)."""
        self._closing.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _loop(self) -> None:
        while not self._closing.is_set():
            try:
                self.tick()
            except Exception as err:  # a bad job folder must not end the queue
                print(f"train jobs: {type(err).__name__}: {err}", file=sys.stderr)
            self._closing.wait(self.poll)

    def tick(self) -> None:
        """One pass: follow the running job; when none runs, start the oldest queued one."""
        with self.lock:
            jobs = self.jobs()
            active = [j for j in jobs if j.status in ("running", "stopping")]
            for job in active:
                self._follow(job)  # updates `job` in place (and on disk)
            if any(j.status in ("running", "stopping") for j in active):
                return
            queued = [j for j in jobs if j.status == "queued"]
            if queued:
                self._launch(queued[0])

    def _launch(self, job: Job) -> None:
        run = job.current()
        if run is None:
            job.status = "done"
            job.save()
            return
        config, log = job.path / f"{run.method}.yaml", job.path / f"{run.method}.log"
        env = {**os.environ, PROGRESS_ENV: str(job.path / f"{run.method}.progress.jsonl")}
        with open(log, "a", encoding="utf-8") as out:
            proc = subprocess.Popen(train_command(config, run.resume), stdout=out, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, env=env, start_new_session=True)
        self.procs[job.id] = proc
        run.status, run.exit = "running", None
        job.status, job.pid, job.error = "running", proc.pid, None
        job.save()

    def _follow(self, job: Job) -> None:
        """Update a running job whose trainer has ended (this app's child, or one it found again)."""
        run = job.current()
        proc = self.procs.get(job.id)
        if proc is not None:
            code = proc.poll()
            if code is None:
                return
            del self.procs[job.id]
        elif _alive(job.pid, str(job.path)):
            return  # started by an earlier app: still training
        else:
            code = None  # ended while no app watched: judge by what it left
        if run is None:
            job.status = "done"
            job.save()
            return
        adapter = job.run_folder(run.method) / ADAPTER_FILE
        log = job.path / f"{run.method}.log"
        if code is None:
            code = 0 if adapter.is_file() else (STOPPED_STATUS if job.status == "stopping" else 1)
        run.exit = code
        if code == 0 and adapter.is_file():
            run.status, run.resume = "done", False
            nxt = job.current()
            if nxt is None:
                job.status, job.pid = "done", None
            elif job.status == "stopping":
                job.status, job.pid = "stopped", None
            else:
                job.save()
                self._launch(job)
                return
        elif code == STOPPED_STATUS or (job.status == "stopping" and code in (-signal.SIGTERM, 128 + signal.SIGTERM)):
            run.status, job.status, job.pid = "stopped", "stopped", None
        else:
            run.status, job.status, job.pid = "failed", "failed", None
            job.error = last_error(log) or f"the trainer ended with status {code}"
        job.save()

"""The Train tab's job queue: one job at a time, each run a process of its own, Stop = SIGTERM
(the trainer checkpoints and exits 3; tests/test_flux.py checks that of the real trainer), Resume
= the run again with --resume_from_checkpoint latest, Cancel for queued jobs, a failed run's
one-line error, and state on disk that a restarted app follows on. Here the trainer is a stand-in
script that behaves as the trainer does at its edges (progress lines, SIGTERM, exit status, the
adapter file), so the queue's logic runs in seconds; the page's browser test runs the real one."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

import app.jobs
from app.jobs import JobQueue, last_error, log_tail

STAND_IN = r'''
import json, os, signal, sys, time
from pathlib import Path
import yaml
cfg = yaml.safe_load(Path(sys.argv[1]).read_text())
out = Path(cfg["output_dir"]); out.mkdir(exist_ok=True)
if cfg.get("fail"):
    print("error: image folder 'missing' does not exist", file=sys.stderr); sys.exit(2)
stop = []
signal.signal(signal.SIGTERM, lambda *a: stop.append(1))
start = int((out / "checkpoint").read_text()) if "--resume_from_checkpoint" in sys.argv and (out / "checkpoint").exists() else 0
print("resumed at", start) if start else None
for step in range(start + 1, cfg["max_train_steps"] + 1):
    time.sleep(cfg.get("pause", 0.02))
    with open(os.environ["DREAMBOOTH_DORA_PROGRESS"], "a") as f:
        f.write(json.dumps({"step": step, "max_steps": cfg["max_train_steps"], "loss": 1 / step, "time": time.time()}) + "\n")
    if stop:
        (out / "checkpoint").write_text(str(step))
        print(f"stopped on request at step {step} of {cfg['max_train_steps']}", file=sys.stderr, flush=True); sys.exit(3)
(out / "pytorch_lora_weights.safetensors").write_bytes(b"")
'''


@pytest.fixture
def stand_in(tmp_path, monkeypatch):
    script = tmp_path / "trainer.py"
    script.write_text(STAND_IN)
    monkeypatch.setattr(app.jobs, "train_command", lambda config, resume: [
        sys.executable, str(script), str(config), *(["--resume_from_checkpoint", "latest"] if resume else [])])
    return tmp_path / "root"


def wait_for(queue: JobQueue, job_id: str, check, timeout: float = 60.0):
    end = time.time() + timeout
    while time.time() < end:
        queue.tick()
        job = queue.get(job_id)
        if check(job):
            return job
        time.sleep(0.05)
    raise AssertionError(f"job {job_id}: still {queue.get(job_id).status}")


def test_jobs_run_one_at_a_time_stop_resume_cancel_and_survive_a_restart(stand_in):
    queue = JobQueue(stand_in)
    job = queue.submit({"dora": {"max_train_steps": 400, "pause": 0.01}, "lora": {"max_train_steps": 5}})
    second = queue.submit({"lora": {"max_train_steps": 5}})
    third = queue.submit({"dora": {"max_train_steps": 5}})
    assert [j.status for j in queue.jobs()] == ["queued"] * 3
    assert queue.cancel(third.id).status == "cancelled"
    job = wait_for(queue, job.id, lambda j: len(queue.progress(j)) >= 3)
    assert job.status == "running" and [r.status for r in job.runs] == ["running", "queued"]
    assert queue.get(second.id).status == "queued"  # one at a time
    with pytest.raises(ValueError, match="only a queued job"):
        queue.cancel(job.id)
    with pytest.raises(ValueError, match="only a stopped or failed job"):
        queue.resume(job.id)
    restarted = JobQueue(stand_in)  # the app restarts: it finds the trainer by pid and command line
    assert restarted.get(job.id).status == "running" and not restarted.procs
    restarted.tick()
    assert restarted.get(job.id).status == "running"
    restarted.stop(job.id)
    job = wait_for(queue, job.id, lambda j: j.status == "stopped")  # the queue that started it sees it end
    stopped_at = int((Path(job.folder) / "dora" / "checkpoint").read_text())
    assert 3 <= stopped_at < 400 and "stopped on request" in log_tail(Path(job.folder) / "dora.log")
    job = queue.resume(job.id)
    assert job.status == "queued" and job.runs[0].resume
    second = wait_for(queue, second.id, lambda j: j.status == "done")  # the queue's order: second first now
    job = wait_for(queue, job.id, lambda j: j.status == "done")
    assert [(r.status, r.exit) for r in job.runs] == [("done", 0), ("done", 0)]
    steps = [r["step"] for r in queue.progress(job, "dora")]
    assert steps == list(range(1, 401)) and "resumed at" in log_tail(Path(job.folder) / "dora.log")
    assert all((Path(job.folder) / m / "pytorch_lora_weights.safetensors").is_file() for m in ("dora", "lora"))
    assert sorted(p.name for p in Path(job.folder).iterdir()) == [
        "dora", "dora.log", "dora.progress.jsonl", "dora.yaml", "job.json", "lora", "lora.log", "lora.progress.jsonl",
        "lora.yaml"]


def test_a_failed_job_shows_the_trainers_one_line_error_and_a_stopped_job_found_after_a_restart(stand_in):
    queue = JobQueue(stand_in)
    job = queue.submit({"lora": {"max_train_steps": 2, "fail": True}})
    job = wait_for(queue, job.id, lambda j: j.status in ("done", "failed"))
    assert job.status == "failed" and job.error == "error: image folder 'missing' does not exist"
    assert last_error(Path(job.folder) / "lora.log") == job.error and job.runs[0].exit == 2
    with pytest.raises(ValueError, match="no job"):
        queue.get("../outside")
    # stopped while no app watched: a new app judges the run by what it left (no adapter: stopped)
    job = queue.submit({"dora": {"max_train_steps": 400}})
    job = wait_for(queue, job.id, lambda j: len(queue.progress(j)) >= 2)
    queue.stop(job.id)
    queue.procs[job.id].wait(timeout=30)
    job = wait_for(JobQueue(stand_in), job.id, lambda j: j.status != "stopping")
    assert job.status == "stopped"


def test_a_queue_thread_runs_jobs_by_itself(stand_in):
    queue = JobQueue(stand_in, poll=0.05).start()
    try:
        job = queue.submit({"lora": {"max_train_steps": 3}})
        end = time.time() + 30
        while queue.get(job.id).status != "done" and time.time() < end:
            time.sleep(0.05)
        assert queue.get(job.id).status == "done"
    finally:
        queue.close()

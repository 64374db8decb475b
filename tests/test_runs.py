"""A training run folder holds one run: refusals before any model loads, --overwrite_output_dir,
resume compatibility, this run's checkpoints only, damaged checkpoints, a full disk, leftovers."""

import errno
import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import dreambooth_dora.training.loop as train_module
from dreambooth_dora.cli import train_main
from dreambooth_dora.training.config import ConfigError, load_config
from dreambooth_dora.training.loop import train

ADAPTER = "pytorch_lora_weights.safetensors"


pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


def flags(model, data, out, *extra):
    return ["--pretrained_model_name_or_path", str(model), "--instance_data_dir", str(data),
            "--instance_prompt", "a sks icon", "--resolution", "64", "--learning_rate", "1e-2",
            "--output_dir", str(out), "--report_to", "none", "--seed", "3", "--max_train_steps", "4",
            "--checkpointing_steps", "1", *map(str, extra)]


def run(*argv):
    return train(load_config(list(argv)))


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under `folder` and its SHA-256: what must survive a refused command."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def no_model_loads(monkeypatch):
    """Any model load fails the test: refusals must come before."""
    def boom(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(train_module, "family_of", boom)
    monkeypatch.setattr(train_module, "ensure_class_images", boom)


@pytest.fixture(scope="module")
def finished(tmp_path_factory, tiny_sd_path):
    """A finished 4-step run with checkpoints 1..3; copied per test that changes it."""
    from accelerate.state import AcceleratorState, GradientState

    out = tmp_path_factory.mktemp("runs") / "finished"
    run(*flags(tiny_sd_path, Path(__file__).resolve().parents[1] / "sample_data" / "3d_icon", out))
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    return out


def one_line_error(capsys, argv) -> str:
    assert train_main(list(map(str, argv))) == 2
    text = capsys.readouterr().err
    # the progress bar of a run that stopped part-way may stand above the error, nothing else
    lines = [ln for ln in text.replace("\r", "\n").splitlines() if ln.strip() and not ln.startswith("train:")]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in text, text
    return lines[0]


def test_a_second_run_in_a_run_folder_stops_before_any_model_loads(finished, tiny_sd_path, icon_dir, capsys,
                                                                   no_model_loads):
    before = snapshot(finished)
    err = one_line_error(capsys, flags(tiny_sd_path, icon_dir, finished, "--seed", "9"))
    assert "already holds a training run (a finished adapter, 3 checkpoints)" in err
    assert "--resume_from_checkpoint latest" in err and "--overwrite_output_dir" in err
    # resuming with other settings names them; nothing in the folder changes
    err = one_line_error(capsys, flags(tiny_sd_path, icon_dir, finished, "--seed", "9", "--learning_rate", "2e-2",
                                       "--rank", "8", "--resume_from_checkpoint", "latest"))
    assert "cannot resume" in err and "seed 3 -> 9" in err and "learning_rate 0.01 -> 0.02" in err and "rank 4 -> 8" in err
    assert snapshot(finished) == before


def test_resume_notices_other_data(finished, tiny_sd_path, icon_dir, tmp_path, capsys, no_model_loads):
    data = tmp_path / "data"
    shutil.copytree(icon_dir, data)
    from PIL import Image

    Image.new("RGB", (64, 64), (200, 10, 10)).save(data / "icon_00.png")  # one image replaced
    err = one_line_error(capsys, flags(tiny_sd_path, data, finished, "--resume_from_checkpoint", "latest"))
    assert "the training images or captions" in err


def test_a_folder_with_other_files_is_never_used_or_cleared(tiny_sd_path, icon_dir, tmp_path, capsys, no_model_loads):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    for extra in ([], ["--overwrite_output_dir"], ["--resume_from_checkpoint", "latest"]):
        err = one_line_error(capsys, flags(tiny_sd_path, icon_dir, mine, *extra))
        assert "not empty and is not a training run folder" in err or "which training did not write" in err
    assert (mine / "notes.txt").read_text() == "keep me" and len(list(mine.iterdir())) == 1
    # outputs and data never overlap (an overwrite would delete the images)
    err = one_line_error(capsys, flags(tiny_sd_path, icon_dir, icon_dir / "out"))
    assert "overlap" in err
    err = one_line_error(capsys, flags(tiny_sd_path, icon_dir, "."))
    assert "is the current folder" in err


def test_overwrite_output_dir_replaces_only_a_run(finished, tiny_sd_path, icon_dir, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    (out / "stray.txt").write_text("mine")
    err = one_line_error(capsys, flags(tiny_sd_path, icon_dir, out, "--overwrite_output_dir"))
    assert "'stray.txt'" in err and "which training did not write" in err
    assert (out / ADAPTER).is_file() and (out / "checkpoint-3").is_dir()
    (out / "stray.txt").unlink()
    old_id = json.loads((out / "run.json").read_text())["run_id"]
    run(*flags(tiny_sd_path, icon_dir, out, "--overwrite_output_dir", "--seed", "4", "--max_train_steps", "2"))
    record = json.loads((out / "run.json").read_text())
    assert record["run_id"] != old_id and record["settings"]["seed"] == 4
    # the old run's checkpoints are gone, so none of them can be mistaken for this run's
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1"]
    assert json.loads((out / "train_config.json").read_text())["seed"] == 4
    assert not list(tmp_path.glob(".run.replaced-*"))


def test_resume_may_change_length_and_keeps_this_runs_checkpoints_only(finished, tiny_sd_path, icon_dir, tmp_path):
    """Another run's checkpoint-10 dropped into the folder is neither resumed from nor rotated away."""
    out = tmp_path / "run"
    run(*flags(tiny_sd_path, icon_dir, out, "--max_train_steps", "2"))  # checkpoint-1 and the adapter
    foreign = out / "checkpoint-10"
    shutil.copytree(finished / "checkpoint-3", foreign)
    manifest = json.loads((foreign / "checkpoint.json").read_text())
    assert manifest["run_id"] != json.loads((out / "run.json").read_text())["run_id"]
    run(*flags(tiny_sd_path, icon_dir, out, "--resume_from_checkpoint", "latest", "--max_train_steps", "4",
               "--checkpoints_total_limit", "1"))
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-10", "checkpoint-3"]
    assert (foreign / "checkpoint.json").read_text() == json.dumps(manifest, indent=1)
    a, b = load_file(str(finished / ADAPTER)), load_file(str(out / ADAPTER))
    for k in a:  # resumed from its own checkpoint-1, so it ends where the uninterrupted run ended
        assert torch.allclose(a[k], b[k], atol=1e-6), k
    assert len(json.loads((out / "run.json").read_text())["sessions"]) == 2


def test_latest_without_a_checkpoint_says_it_starts_from_scratch(tiny_sd_path, icon_dir, tmp_path, capsys):
    out = tmp_path / "new"
    run(*flags(tiny_sd_path, icon_dir, out, "--max_train_steps", "1", "--resume_from_checkpoint", "latest"))
    assert "no checkpoint in" in capsys.readouterr().out and (out / ADAPTER).is_file()


def test_a_damaged_checkpoint_falls_back_to_an_earlier_one(finished, tiny_sd_path, icon_dir, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    optimizer = out / "checkpoint-3" / "optimizer.bin"
    optimizer.write_bytes(optimizer.read_bytes()[: optimizer.stat().st_size // 2])  # truncated
    adapter = out / "checkpoint-2" / ADAPTER
    adapter.write_bytes(adapter.read_bytes()[:-100])
    leftovers = [out / "checkpoint-4.tmp", out / f".{ADAPTER}.x1y2.tmp"]
    leftovers[0].mkdir()
    leftovers[1].write_bytes(b"half")
    with pytest.warns(UserWarning) as caught:
        run(*flags(tiny_sd_path, icon_dir, out, "--resume_from_checkpoint", "latest"))
    said = " ".join(str(w.message) for w in caught)
    assert "checkpoint-3 is damaged (optimizer.bin is" in said and "resuming from checkpoint-1" in said
    assert "checkpoint-2 is damaged" in said
    assert "resumed from" in capsys.readouterr().out
    assert not any(p.exists() for p in leftovers)  # a killed run's half-written files are cleared
    a, b = load_file(str(finished / ADAPTER)), load_file(str(out / ADAPTER))
    for k in a:  # from checkpoint-1, deterministically to the same adapter
        assert torch.allclose(a[k], b[k], atol=1e-6), k

    # every checkpoint damaged: one line, before any model loads
    for ckpt in out.glob("checkpoint-*"):
        (ckpt / ADAPTER).write_bytes(b"")
    before = snapshot(out)
    train_module.family_of, real = None, train_module.family_of
    try:
        err = one_line_error(capsys, flags(tiny_sd_path, icon_dir, out, "--resume_from_checkpoint", "latest"))
    finally:
        train_module.family_of = real
    assert "no checkpoint in" in err and "loads completely" in err and snapshot(out) == before


def fail_half_way(real):
    """A writer that puts half the bytes on disk, then fails the way a full disk does."""
    def write(*args, **kwargs):
        real(*args, **kwargs)
        path = Path(kwargs.get("filename") or kwargs.get("f") or args[1])
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
        raise OSError(errno.ENOSPC, "No space left on device", str(path))
    return write


def test_a_full_disk_leaves_no_half_written_checkpoint_or_adapter(tiny_sd_path, icon_dir, tmp_path, monkeypatch,
                                                                   capsys):
    import dreambooth_dora.adapters.file as adapter_file

    out = tmp_path / "run"
    real_save = torch.save
    calls = {"n": 0}

    def torch_save(obj, f, *args, **kwargs):  # the second checkpoint's optimiser state hits a full disk
        calls["n"] += 1
        if "checkpoint-2" in str(f) and str(f).endswith("optimizer.bin"):
            return fail_half_way(real_save)(obj, f, *args, **kwargs)
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", torch_save)
    err = one_line_error(capsys, flags(tiny_sd_path, icon_dir, out))
    assert "could not write checkpoint-2: No space left on device" in err and "checkpoint-1" in err
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-1", "run.json"]  # no .tmp, no adapter
    monkeypatch.setattr(torch, "save", real_save)

    # the final adapter: the previous adapter file stays whole
    out2 = tmp_path / "run2"
    run(*flags(tiny_sd_path, icon_dir, out2, "--max_train_steps", "1"))
    before = (out2 / ADAPTER).read_bytes()
    monkeypatch.setattr(adapter_file, "save_file", fail_half_way(adapter_file.save_file))
    err = one_line_error(capsys, flags(tiny_sd_path, icon_dir, out2, "--max_train_steps", "2",
                                       "--checkpointing_steps", "5", "--resume_from_checkpoint", "latest"))
    assert "could not write the adapter" in err and "No space left on device" in err
    assert (out2 / ADAPTER).read_bytes() == before and not list(out2.glob(".*.tmp"))


def test_settings_beside_an_adapter_are_the_ones_that_made_it(tiny_sd_path, icon_dir, tmp_path, monkeypatch):
    """A kill between the adapter and train_config.json leaves no train_config.json, never an old
    one; the adapter file carries its own settings."""
    out = tmp_path / "run"
    run(*flags(tiny_sd_path, icon_dir, out, "--max_train_steps", "1"))
    assert json.loads((out / "train_config.json").read_text())["max_train_steps"] == 1

    def killed(path, text):
        raise KeyboardInterrupt

    monkeypatch.setattr(train_module, "write_text", killed)
    with pytest.raises(KeyboardInterrupt):
        run(*flags(tiny_sd_path, icon_dir, out, "--max_train_steps", "2", "--resume_from_checkpoint", "latest"))
    assert not (out / "train_config.json").exists()
    from safetensors import safe_open

    with safe_open(str(out / ADAPTER), "pt") as f:
        info = json.loads(f.metadata()["dreambooth_dora"])
    assert info["steps"] == 2 and info["settings"]["max_train_steps"] == 2


def test_files_are_readable_by_others(finished, tiny_sd_path, icon_dir, tmp_path):
    import os

    modes = {p.relative_to(finished): p.stat().st_mode & 0o777 for p in finished.rglob("*") if p.is_file()}
    assert modes and set(modes.values()) == {0o644}, modes  # umask 022 (safetensors alone leaves 0600)
    old = os.umask(0o027)
    try:
        run(*flags(tiny_sd_path, icon_dir, tmp_path / "strict", "--max_train_steps", "2"))
    finally:
        os.umask(old)
    files = [p for p in (tmp_path / "strict").rglob("*") if p.is_file()]
    assert {p.stat().st_mode & 0o777 for p in files} == {0o640}  # the user's umask is respected


def test_explicit_damaged_checkpoint_and_bad_paths_are_one_line(finished, tiny_sd_path, icon_dir, tmp_path, capsys,
                                                                no_model_loads):
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    (out / "checkpoint-2" / "scheduler.bin").unlink()
    err = one_line_error(capsys, flags(tiny_sd_path, icon_dir, out, "--resume_from_checkpoint", "checkpoint-2"))
    assert "checkpoint" in err and "damaged: scheduler.bin is missing" in err
    err = one_line_error(capsys, flags(tiny_sd_path, icon_dir, out, "--resume_from_checkpoint", "nowhere"))
    assert "is not a finished checkpoint" in err
    with pytest.raises(ConfigError, match="either resume_from_checkpoint"):
        run(*flags(tiny_sd_path, icon_dir, out, "--resume_from_checkpoint", "latest", "--overwrite_output_dir"))
    assert "is inside" in one_line_error(capsys, flags(tiny_sd_path, icon_dir, out / "nested"))
    assert not (out / "nested").exists()
    a_file = tmp_path / "file"
    a_file.write_text("x")
    assert "is a file" in one_line_error(capsys, flags(tiny_sd_path, icon_dir, a_file))
    assert "cannot be created" in one_line_error(capsys, flags(tiny_sd_path, icon_dir, a_file / "sub"))


def test_an_explicit_checkpoint_of_another_run_is_refused(finished, tiny_sd_path, icon_dir, tmp_path, capsys,
                                                          no_model_loads):
    """`latest` skips another run's checkpoints; an explicit path to one (copied into the folder, or
    in another folder) is refused the same way, with advice that names this run's own checkpoint."""
    out, elsewhere = tmp_path / "run", tmp_path / "other"
    shutil.copytree(finished, out)
    for copy in (out / "checkpoint-10", elsewhere / "checkpoint-5"):
        shutil.copytree(finished / "checkpoint-3", copy)
        manifest = json.loads((copy / "checkpoint.json").read_text())
        (copy / "checkpoint.json").write_text(json.dumps({**manifest, "run_id": "another-run"}))
    before = snapshot(out)
    for given in ("checkpoint-10", str(elsewhere / "checkpoint-5")):
        err = one_line_error(capsys, flags(tiny_sd_path, icon_dir, out, "--resume_from_checkpoint", given))
        assert "was written by another run" in err and "--resume_from_checkpoint latest: checkpoint-3" in err, err
        assert "overwrite_output_dir" not in err
    assert snapshot(out) == before
    # the run's own checkpoint, named explicitly, is taken (the plan only: no model loads here)
    from dreambooth_dora.training.runs import plan_run

    cfg = load_config(flags(tiny_sd_path, icon_dir, out, "--resume_from_checkpoint", "checkpoint-2"))
    assert plan_run(cfg, json.loads((out / "run.json").read_text())["data"]).resume == [out / "checkpoint-2"]


def test_a_checkpoint_that_fails_to_load_points_at_the_runs_own_others(finished, tmp_path):
    """When the checkpoints tried do not load, the advice is this run's other checkpoint if one is
    there (not --overwrite_output_dir, which would remove it), else to start afresh."""
    from dreambooth_dora.training.loop import TrainingError, resume
    from dreambooth_dora.training.runs import RunPlan

    class Refusing:  # accelerate's load_state on a checkpoint it cannot read
        def load_state(self, folder):
            raise RuntimeError("size mismatch")

    out = tmp_path / "run"
    shutil.copytree(finished, out)
    run_id = json.loads((out / "run.json").read_text())["run_id"]
    with pytest.warns(UserWarning, match="does not load"), pytest.raises(TrainingError) as err:
        resume(Refusing(), RunPlan(out, run_id, {}, resume=[out / "checkpoint-3"]))
    assert "(checkpoint-3)" in str(err.value) and "--resume_from_checkpoint checkpoint-2" in str(err.value)
    assert "overwrite" not in str(err.value)
    every = [out / f"checkpoint-{n}" for n in (3, 2, 1)]
    with pytest.warns(UserWarning), pytest.raises(TrainingError, match="use --overwrite_output_dir to start afresh"):
        resume(Refusing(), RunPlan(out, run_id, {}, resume=every))

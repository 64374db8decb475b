"""Exports and evaluation reports never replace what they did not write: refusals (one line, exit
2, every file surviving), `--overwrite` of their own earlier output only, atomic swaps, modes."""

import hashlib
import json
import os
from pathlib import Path

import pytest
from safetensors import safe_open

from dreambooth_dora.cli import main
from dreambooth_dora.outputs import OUTPUT_MARKER, OutputError, atomic_dir, check_output_target

ADAPTER = "pytorch_lora_weights.safetensors"


def snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def refused(capsys, *argv) -> str:
    assert main([str(a) for a in argv]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and "Traceback" not in err, err
    return err


@pytest.fixture
def run_copy(adapters, tmp_path):
    """The DoRA training run folder (adapter, checkpoints, settings), copied so it may be abused."""
    import shutil

    out = tmp_path / "outputs" / "dora"
    shutil.copytree(adapters["dora"], out)
    return out


def test_exports_refuse_the_source_a_run_and_foreign_files(run_copy, tmp_path, capsys):
    run = run_copy
    before = snapshot(run)
    for extra in ([], ["--overwrite"]):
        err = refused(capsys, "export", run, "--format", "fused", "--out", run, *extra)
        assert "would write over the source" in err
        err = refused(capsys, "export", run, "--format", "kohya", "--out", run / ADAPTER, *extra)
        assert "would write into the source" in err
        err = refused(capsys, "export", run, "--format", "fused", "--out", run / "checkpoint-2" / "x", *extra)
        assert "source" in err
        err = refused(capsys, "export", run, "--format", "fused", "--out", run.parent, *extra)
        assert "over the source" in err
    assert snapshot(run) == before

    other = tmp_path / "other_run"  # another training run is never an export target either
    other.mkdir()
    (other / "run.json").write_text("{}")
    err = refused(capsys, "export", run, "--format", "fused", "--out", other / "fused", "--overwrite")
    assert "is inside the training run / adapter folder" in err

    link = tmp_path / "link"  # a symlink to the run is the run
    link.symlink_to(run, target_is_directory=True)
    assert "over the source" in refused(capsys, "export", run, "--format", "fused", "--out", link, "--overwrite")
    assert run.is_dir() and link.is_symlink()

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "photo.png").write_bytes(b"precious")
    err = refused(capsys, "export", run, "--format", "fused", "--out", mine)
    assert f"{str(mine)!r} already exists and is not empty; pass --overwrite" in err
    err = refused(capsys, "export", run, "--format", "fused", "--out", mine, "--overwrite")
    assert "was not written by dreambooth-dora" in err and "refusing to replace it even with --overwrite" in err
    assert (mine / "photo.png").read_bytes() == b"precious"
    theirs = tmp_path / "theirs.safetensors"
    theirs.write_bytes(b"someone's lora")
    for extra in ([], ["--overwrite"]):
        refused(capsys, "export", run, "--format", "kohya", "--out", theirs, *extra)
    assert theirs.read_bytes() == b"someone's lora"
    (tmp_path / "dir.safetensors").mkdir()
    assert "is a folder" in refused(capsys, "export", run, "--format", "kohya", "--out", tmp_path / "dir.safetensors")
    assert "is a file" in refused(capsys, "export", run, "--format", "fused", "--out", theirs)


@pytest.mark.parametrize("out", [".", "/", "", "~"])
def test_degenerate_destinations_are_one_line(run_copy, capsys, out, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    err = refused(capsys, "export", run_copy, "--format", "fused", "--out", out, "--overwrite")
    assert any(s in err for s in ("current folder", "file-system root", "home folder", "is empty")), err


def test_overwrite_replaces_only_its_own_kind_atomically(run_copy, tmp_path, capsys):
    umask = os.umask(0o022)
    try:
        fused, kohya = tmp_path / "fused", tmp_path / "lora.safetensors"
        assert main(["export", str(run_copy), "--format", "fused", "--out", str(fused)]) == 0
        assert json.loads((fused / OUTPUT_MARKER).read_text())["kind"] == "fused-pipeline"
        assert main(["export", str(run_copy), "--format", "kohya", "--out", str(kohya)]) == 0
        with safe_open(str(kohya), "pt") as f:
            assert f.metadata()["dreambooth_dora_export"] == "kohya"
        capsys.readouterr()
        refused(capsys, "export", run_copy, "--format", "fused", "--out", fused)  # no flag: refused
        (fused / "stale.txt").write_text("from the previous export")
        assert main(["export", str(run_copy), "--format", "fused", "--out", str(fused), "--overwrite"]) == 0
        assert not (fused / "stale.txt").exists() and (fused / "model_index.json").is_file()
        assert main(["export", str(run_copy), "--format", "kohya", "--out", str(kohya), "--comfyui", "--overwrite"]) == 0
        with safe_open(str(kohya), "pt") as f:
            assert f.metadata()["dreambooth_dora_dora_scale"] == "comfyui-compensated"
        # a fused export is not a report, a report not an export
        err = refused(capsys, "export", run_copy, "--format", "kohya", "--out", fused / "x.safetensors", "--overwrite")
        assert "x.safetensors" not in os.listdir(fused) and "an output of its own (fused-pipeline)" in err
        modes = {p.stat().st_mode & 0o777 for p in [kohya, *fused.rglob("*")] if p.is_file()}
        assert modes == {0o644}, modes  # readable by others (safetensors alone leaves 0600)
        assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folders left
    finally:
        os.umask(umask)


def test_interrupted_swaps_leave_the_previous_output(tmp_path):
    target = tmp_path / "report"
    with atomic_dir(target, "evaluation-report") as tmp:
        (tmp / "report.md").write_text("first")
    with pytest.raises(RuntimeError):
        with atomic_dir(target, "evaluation-report") as tmp:
            (tmp / "report.md").write_text("half")
            raise RuntimeError("killed while writing")
    assert (target / "report.md").read_text() == "first" and sorted(os.listdir(tmp_path)) == ["report"]
    # killed between moving the old one aside and renaming the new one in (a dead process's pid)
    dead = 2 ** 22 + 12345
    os.replace(target, tmp_path / f".report.old-{dead}")
    (tmp_path / f".report.tmp-{dead}").mkdir()
    with atomic_dir(target, "evaluation-report") as tmp:
        assert (target / "report.md").read_text() == "first"  # put back before anything else
        (tmp / "report.md").write_text("second")
    assert (target / "report.md").read_text() == "second" and sorted(os.listdir(tmp_path)) == ["report"]
    with pytest.raises(OutputError, match="not a fused-pipeline"):
        check_output_target(target, "fused-pipeline", overwrite=True)
    assert check_output_target(target, "evaluation-report", overwrite=True) == target.resolve()


def test_evaluate_refuses_before_any_model_loads(run_copy, tmp_path, icon_dir, capsys, monkeypatch):
    import dreambooth_dora.evaluation as ev

    monkeypatch.setattr(ev, "load_pipeline", lambda *a, **k: pytest.fail("a model was loaded"))
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.md").write_text("mine")
    common = ["evaluate", "--adapters", str(run_copy), "--instance_data_dir", str(icon_dir),
              "--dino_model", "none", "--clip_model", "none"]
    assert "pass --overwrite" in refused(capsys, *common, "--output_dir", mine)
    assert "not written by dreambooth-dora" in refused(capsys, *common, "--output_dir", mine, "--overwrite")
    assert "source" in refused(capsys, *common, "--output_dir", run_copy, "--overwrite")
    assert "source" in refused(capsys, *common, "--output_dir", icon_dir / "report")
    assert (mine / "notes.md").read_text() == "mine"

"""Nothing lost, round two: one writer per run folder or export (a lock, real processes started
together), another run's checkpoint never replaced, every write error and symlink loop one line,
damaged metadata named, temp files of killed exports removed, silently wrong inputs refused."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

import dreambooth_dora.training.loop as train_module
from dreambooth_dora.training.checkpoints import save_checkpoint
from dreambooth_dora.cli import main, train_main
from dreambooth_dora.training.config import ConfigError, load_config
from dreambooth_dora.outputs import DestinationLock, OutputError, lock_file_of
from dreambooth_dora.training.loop import train

REPO = Path(__file__).resolve().parents[1]
ADAPTER = "pytorch_lora_weights.safetensors"
ICONS = REPO / "sample_data" / "3d_icon"

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


def flags(model, out, *extra, data=ICONS):
    return ["--pretrained_model_name_or_path", str(model), "--instance_data_dir", str(data),
            "--instance_prompt", "a sks icon", "--resolution", "64", "--learning_rate", "1e-2",
            "--output_dir", str(out), "--report_to", "none", "--seed", "3", "--max_train_steps", "4",
            "--checkpointing_steps", "1", *map(str, extra)]


def one_line(capsys, code) -> str:
    assert code == 2
    text = capsys.readouterr().err
    lines = [ln for ln in text.replace("\r", "\n").splitlines() if ln.strip() and not ln.startswith("train:")]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in text, text
    return lines[0]


def run_id_of(adapter_file: Path) -> str:
    with safe_open(str(adapter_file), "pt") as f:
        return json.loads(f.metadata()["dreambooth_dora"])["run_id"]


def one_run_only(out: Path) -> str:
    """The folder holds exactly one run: run.json, the adapter and every checkpoint agree."""
    record = json.loads((out / "run.json").read_text())
    assert run_id_of(out / ADAPTER) == record["run_id"]
    for ckpt in out.glob("checkpoint-*"):
        assert json.loads((ckpt / "checkpoint.json").read_text())["run_id"] == record["run_id"], ckpt
    assert json.loads((out / "train_config.json").read_text())["seed"] == record["settings"]["seed"]
    return record["run_id"]


def spawn(*argv) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, "-m", "dreambooth_dora.cli", *map(str, argv)], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc) -> tuple[int, str]:
    out, err = proc.communicate(timeout=300)
    return proc.returncode, out + err


# ---- the lock -------------------------------------------------------------------------------------

def test_the_lock_names_its_holder_is_released_and_a_dead_holders_lock_is_taken_over(tmp_path):
    dest = tmp_path / "run"
    first = DestinationLock(dest, "output_dir", "train").acquire()
    with pytest.raises(OutputError, match=rf"output_dir .* is in use by process {os.getpid()} \(train, since"):
        DestinationLock(dest, "output_dir", "export").acquire()  # another open file: refused, even in-process
    first.release()
    assert not lock_file_of(dest).exists() and not dest.exists()  # nothing left behind
    # a killed holder leaves its lock file, but the kernel has freed the lock: it is taken over
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    lock_file_of(dest).write_text(json.dumps({"pid": int(dead.stdout), "command": "train", "since": "earlier",
                                              "host": os.uname().nodename}))
    again = DestinationLock(dest, "output_dir", "train").acquire()
    assert again.taken_over.startswith(f"process {int(dead.stdout)} (train")
    again.release()
    # the folders made to hold the lock go again when nothing was written
    deep = tmp_path / "a" / "b" / "run"
    DestinationLock(deep, "output_dir", "train").acquire().release()
    assert not (tmp_path / "a").exists()


def test_two_trainers_and_an_export_started_together_into_one_folder(tiny_sd_path, adapters, tmp_path):
    """Three real processes started within milliseconds, all aimed at one empty folder: exactly
    one proceeds, the others stop with one line, and the folder holds that one's output only."""
    out = tmp_path / "shared"
    procs = [spawn("train", *flags(tiny_sd_path, out, "--seed", "1", "--max_train_steps", "6")),
             spawn("train", *flags(tiny_sd_path, out, "--seed", "2", "--max_train_steps", "6")),
             spawn("export", adapters["dora"], "--format", "fused", "--out", out)]
    results = [finish(p) for p in procs]
    codes = [code for code, _ in results]
    assert sorted(codes) == [0, 2, 2], results
    for code, text in results:
        if code == 2:
            errors = [ln for ln in text.splitlines() if ln.startswith("error: ")]
            assert len(errors) == 1 and "Traceback" not in text, text
            assert ("is in use by process" in errors[0] or "already holds a training run" in errors[0]
                    or "holds a training run" in errors[0] or "is not empty" in errors[0]
                    or "already exists" in errors[0]), errors[0]
    winner = codes.index(0)
    if winner < 2:  # a trainer: one run, its seed
        one_run_only(out)
        assert json.loads((out / "run.json").read_text())["settings"]["seed"] == winner + 1
    else:  # the export: a fused pipeline and nothing of a run
        assert (out / "model_index.json").is_file() and not (out / "run.json").exists()
    assert not lock_file_of(out).exists()


def test_a_study_cell_or_an_export_into_a_running_trainers_folder_stops(tiny_sd_path, adapters, tmp_path, capsys):
    from dreambooth_dora import study

    argv = [
        "--base_model", str(tiny_sd_path), "--instance_data_dir", str(ICONS), "--methods", "dora", "--ranks", "2",
        "--learning_rates", "1e-3", "--training_seeds", "0", "--max_train_steps", "2", "--checkpointing_steps", "1",
        "--train_args", "--resolution,64", "--long_steps", "none", "--subject_prompts", "a sks icon",
        "--class_prompts", "a icon", "--unrelated_prompts", "a red ball", "--selection_seeds", "0",
        "--report_seeds", "1", "--num_inference_steps", "2", "--output_dir", str(tmp_path / "study")]
    cfg = study.load_study_config(argv)
    study.open_study(cfg)  # a study that was started (its record written), to be continued with --resume
    cell = study.plan(cfg)[0]
    run = tmp_path / "study" / "runs" / cell.id
    trainer = spawn("train", *flags(tiny_sd_path, run, "--max_train_steps", "40", "--checkpointing_steps", "100"))
    deadline = time.time() + 120
    while not (run / "run.json").exists() and trainer.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert lock_file_of(run).exists(), finish(trainer)
    holder = f"is in use by process {trainer.pid} (train"
    with pytest.raises(ConfigError, match=rf"{holder.replace('(', '[(]')}"):
        study.run_study(study.load_study_config(argv + ["--resume"]), progress=False)
    err = one_line(capsys, main(["export", str(adapters["dora"]), "--format", "fused", "--out", str(run)]))
    assert holder in err or "is the training run / adapter folder" in err
    code, text = finish(trainer)
    assert code == 0, text
    one_run_only(run)
    assert json.loads((run / "run.json").read_text())["settings"]["max_train_steps"] == 40  # the trainer's run
    assert not lock_file_of(run).exists()


def test_a_stale_lock_file_is_taken_over_by_training(tiny_sd_path, tmp_path, capsys):
    out = tmp_path / "run"
    lock_file_of(out).write_text(json.dumps({"pid": 2 ** 22 + 7, "command": "train", "since": "yesterday",
                                             "host": os.uname().nodename}))
    assert train_main(flags(tiny_sd_path, out, "--max_train_steps", "1")) == 0
    assert f"took over the lock file left by process {2 ** 22 + 7} (train, since yesterday)" in capsys.readouterr().out
    assert (out / ADAPTER).is_file() and not lock_file_of(out).exists()


# ---- another run's checkpoint ----------------------------------------------------------------------

def test_another_runs_checkpoint_is_never_replaced(tiny_sd_path, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    train(load_config(flags(tiny_sd_path, out, "--max_train_steps", "2")))
    foreign = tmp_path / "foreign"
    train(load_config(flags(tiny_sd_path, foreign, "--max_train_steps", "4", "--seed", "8")))
    os.rename(foreign / "checkpoint-3", out / "checkpoint-3")  # another run's checkpoint moved in
    before = {p.name: p.read_bytes() for p in (out / "checkpoint-3").iterdir()}
    monkeypatch.setattr(train_module, "family_of", lambda *a, **k: pytest.fail("a model was loaded"))
    err = one_line(capsys, train_main(flags(tiny_sd_path, out, "--max_train_steps", "5", "--resume_from_checkpoint",
                                            "latest")))
    assert "checkpoint-3 was written by another run" in err and "never replaced" in err  # before any model loads
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in (out / "checkpoint-3").iterdir()} == before
    # a run that would not save at that step goes on, beside it
    assert train_main(flags(tiny_sd_path, out, "--max_train_steps", "3", "--resume_from_checkpoint", "latest")) == 0
    assert "not resuming from checkpoint-3: written by another run" in capsys.readouterr().out
    assert {p.name: p.read_bytes() for p in (out / "checkpoint-3").iterdir()} == before
    # the last guard, in the checkpoint writer itself (before anything is written)
    own = json.loads((out / "run.json").read_text())["run_id"]
    with pytest.raises(OutputError, match="written by another run; not replacing it"):
        save_checkpoint(None, out, 3, None, own, {})
    assert {p.name: p.read_bytes() for p in (out / "checkpoint-3").iterdir()} == before


# ---- write errors ----------------------------------------------------------------------------------

def test_write_errors_of_every_kind_are_one_line_naming_the_file(tiny_sd_path, adapters, tmp_path, capsys,
                                                                 monkeypatch):
    import dreambooth_dora.adapters.file as adapter_file
    import dreambooth_dora.formats.export as export

    full = SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    def no_space(*args, **kwargs):
        raise full

    # the final adapter (safetensors' own error type)
    out = tmp_path / "run"
    monkeypatch.setattr(adapter_file, "save_file", no_space)
    err = one_line(capsys, train_main(flags(tiny_sd_path, out, "--max_train_steps", "1")))
    assert "could not write the adapter" in err and "No space left on device" in err and " free there" in err
    assert not list(out.glob(".*.tmp"))
    monkeypatch.undo()

    # a checkpoint (torch's zip writer on a full disk raises RuntimeError)
    real_save = torch.save

    def torch_full(obj, f, *args, **kwargs):
        if "optimizer" in str(f):
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", torch_full)
    err = one_line(capsys, train_main(flags(tiny_sd_path, tmp_path / "run2", "--max_train_steps", "2")))
    assert "could not write checkpoint-1" in err and "checkpoint-1" in err and "a full disk?" in err
    assert not list((tmp_path / "run2").glob("checkpoint-*"))
    monkeypatch.undo()

    # exports: the kohya file and the fused folder
    monkeypatch.setattr(export, "save_file", no_space)
    err = one_line(capsys, main(["export", str(adapters["dora"]), "--format", "kohya", "--out",
                                 str(tmp_path / "ex" / "k.safetensors")]))
    assert f"could not write {tmp_path / 'ex' / 'k.safetensors'}: No space left on device (" in err
    assert "free there" in err and not (tmp_path / "ex").exists()  # nothing, not even the folder made for it
    monkeypatch.undo()
    import diffusers

    monkeypatch.setattr(diffusers.DiffusionPipeline, "save_pretrained", no_space)
    err = one_line(capsys, main(["export", str(adapters["dora"]), "--format", "fused", "--out",
                                 str(tmp_path / "fused")]))
    assert f"could not write {tmp_path / 'fused'}: No space left on device" in err
    assert not (tmp_path / "fused").exists() and not list(tmp_path.glob(".fused*"))


def test_a_real_full_disk(adapters, tmp_path, capsys):
    """A 64 KiB tmpfs (where this machine lets us mount one): the real errors, one line each."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("cannot mount a small tmpfs here (not root)")
    try:
        err = one_line(capsys, main(["export", str(adapters["dora"]), "--format", "full", "--out",
                                     str(disk / "f.safetensors")]))
        assert f"could not write {disk / 'f.safetensors'}: No space left on device" in err and "free there" in err
        assert list(disk.iterdir()) == []
    finally:
        subprocess.run(["umount", str(disk)], check=True)


# ---- symlink loops, damaged metadata, stale temp files ----------------------------------------------

def test_symlink_loops_are_one_line(tiny_sd_path, adapters, tmp_path, capsys):
    loop = tmp_path / "loop"
    os.symlink(tmp_path / "loop2", loop)
    os.symlink(loop, tmp_path / "loop2")
    err = one_line(capsys, train_main(flags(tiny_sd_path, loop)))
    assert "symbolic link loop" in err
    for fmt, target in (("fused", loop), ("kohya", loop / "k.safetensors")):
        err = one_line(capsys, main(["export", str(adapters["dora"]), "--format", fmt, "--out", str(target)]))
        assert "symbolic link loop" in err, fmt
    from dreambooth_dora.evaluation import evaluate, load_eval_config

    with pytest.raises(OutputError, match="symbolic link loop"):
        evaluate(load_eval_config(["--base_model", str(tiny_sd_path), "--adapters", str(adapters["dora"]),
                                   "--instance_data_dir", str(ICONS), "--output_dir", str(loop)]))


def test_damaged_metadata_is_one_line_naming_the_file(adapters, tmp_path, capsys):
    from app.core import AppError, Comparison

    src = adapters["dora"] / ADAPTER
    with safe_open(str(src), "pt") as f:
        meta = f.metadata()
    cut = tmp_path / "cut"
    cut.mkdir()
    meta["dreambooth_dora"] = meta["dreambooth_dora"][: len(meta["dreambooth_dora"]) // 2]
    save_file(load_file(str(src)), str(cut / ADAPTER), metadata=meta)
    for argv in (["info", str(cut)], ["verify", str(cut), "--against", str(adapters["dora"])],
                 ["verify", str(adapters["dora"]), "--against", str(cut)],
                 ["export", str(cut), "--format", "kohya", "--out", str(tmp_path / "k.safetensors")]):
        err = one_line(capsys, main(argv))
        assert str(cut / ADAPTER) in err and "metadata field 'dreambooth_dora' is damaged" in err, argv
    comp = Comparison.__new__(Comparison)  # the loader's own check, before any pipeline is needed
    with pytest.raises(Exception) as caught:
        Comparison._load_adapter(comp, "x", cut)
    assert str(cut / ADAPTER) in str(caught.value) and "damaged" in str(caught.value)
    assert isinstance(caught.value, AppError)


def test_temp_files_of_killed_exports_are_recognised_and_removed(adapters, tmp_path):
    from dreambooth_dora.formats.export import export_kohya

    folder = tmp_path / "loras"
    folder.mkdir()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = folder / f".k.safetensors.{int(dead.stdout)}-x1y2z3ab.tmp"  # what a killed export left
    live = folder / ".k.safetensors.1-abcdefgh.tmp"  # a running writer's (pid 1 is alive): kept
    stale.write_bytes(b"half")
    live.write_bytes(b"busy")
    export_kohya(adapters["dora"], folder / "k.safetensors", comfyui_compatible=True)
    assert not stale.exists() and live.exists() and (folder / "k.safetensors").is_file()
    assert sorted(p.name for p in folder.iterdir()) == [live.name, "k.safetensors"]


# ---- inputs that were silently accepted --------------------------------------------------------------

def test_masks_of_another_shape_or_all_black_are_refused(tmp_path):
    from PIL import Image

    from dreambooth_dora.training.data import DataError, load_examples

    data, masks = tmp_path / "data", tmp_path / "masks"
    data.mkdir()
    masks.mkdir()
    for name, size in (("a.png", (64, 48)), ("b.png", (40, 40))):
        Image.new("RGB", size, "red").save(data / name)
    Image.new("L", (64, 48), 255).save(masks / "a.png")
    Image.new("L", (40, 20), 255).save(masks / "b.png")  # another aspect ratio: it would be stretched
    with pytest.raises(DataError, match=r"1 mask\(s\) .* another shape .* stretched .*b.png \(40x20, image 40x40\)"):
        load_examples(str(data), default_caption="x", masked=True, mask_data_dir=str(masks))
    Image.new("L", (40, 40), 0).save(masks / "b.png")  # all black: the image would train nothing
    with pytest.raises(DataError, match=r"1 mask\(s\) .* are all black, so their images would train nothing.*b.png"):
        load_examples(str(data), default_caption="x", masked=True, mask_data_dir=str(masks))
    Image.new("L", (20, 20), 255).save(masks / "b.png")  # the same shape, smaller: scaled, said once
    with pytest.warns(UserWarning, match=r"scaled to their image's size \(same shape\): b.png \(20x20 -> 40x40\)"):
        loaded = load_examples(str(data), default_caption="x", masked=True, mask_data_dir=str(masks))
    assert loaded[1].mask.size == (40, 40) and loaded[1].mask.getextrema() == (255, 255)


def test_a_bucket_over_the_area_budget_is_refused(tiny_sd_path, tmp_path, capsys, monkeypatch):
    from PIL import Image

    from dreambooth_dora.training.buckets import assign, default_buckets

    with pytest.raises(ValueError, match=r"a 4000x10 picture is too narrow .* its own bucket would be 640x8, 5.0x "
                                         r"the area budget 32x32"):
        assign((4000, 10), default_buckets(32, 8), 32, 8, 1.0)
    assert assign((4000, 1000), default_buckets(32, 8), 32, 8, 1.0)[0] * 8 <= 32 * 32 * 8  # a normal one still fits
    data = tmp_path / "thin"
    data.mkdir()
    Image.new("RGB", (4000, 10), "red").save(data / "strip.png")
    monkeypatch.setattr(train_module, "family_of", lambda *a, **k: pytest.fail("a model was loaded"))
    err = one_line(capsys, train_main(flags(tiny_sd_path, tmp_path / "run", "--resolution", "32", "--aspect_buckets",
                                            "--bucket_step", "8", "--bucket_max_upscale", "1", data=data)))
    assert "aspect_buckets: strip.png: a 4000x10 picture is too narrow" in err
    assert not (tmp_path / "run").exists()


def test_identifiers_datasets_and_subject_sets(tiny_sd_path, tmp_path):
    base = ["--pretrained_model_name_or_path", str(tiny_sd_path), "--output_dir", str(tmp_path / "x")]
    pivotal = base + ["--instance_data_dir", str(ICONS), "--instance_prompt", "a icon in 3d", "--train_text_encoder_ti"]
    with pytest.raises(ConfigError, match=r"token_abstraction 'icon' is also a word of class_prompt 'a 3d icon'"):
        load_config(pivotal + ["--token_abstraction", "icon", "--class_prompt", "a 3d icon",
                               "--with_prior_preservation", "--class_data_dir", str(tmp_path / "class")])
    load_config(pivotal + ["--token_abstraction", "TOK", "--class_prompt", "a 3d icon", "--with_prior_preservation",
                           "--class_data_dir", str(tmp_path / "class")])  # a made-up identifier is fine
    config = tmp_path / "sets.yaml"
    config.write_text("datasets: []\n")
    with pytest.raises(ConfigError, match="datasets is empty"):
        load_config(base + ["--config", str(config)])
    config.write_text(f"datasets:\n  - instance_data_dir: {ICONS}\n    instance_prompt: a sks icon\n"
                      f"  - instance_data_dir: {ICONS}/../3d_icon\n    instance_prompt: a sks icon again\n")
    with pytest.raises(ConfigError, match=r"datasets\[1\] uses the same folder as datasets\[0\] .* repeats"):
        load_config(base + ["--config", str(config)])


def test_an_ordinary_word_as_identifier_is_warned_about(tiny_sd_path, tmp_path):
    cfg = load_config(flags(tiny_sd_path, tmp_path / "run", "--max_train_steps", "1", "--checkpointing_steps", "5",
                            "--train_text_encoder_ti", "--token_abstraction", "icon", "--instance_prompt",
                            "a icon in 3d"))
    with pytest.warns(UserWarning, match=r"token_abstraction 'icon' is an ordinary word the text encoder knows"):
        train(cfg)


def test_app_labels_and_scales(tiny_sd_path, adapters, capsys, monkeypatch):
    import app.core
    from app.core import AppError, GridSpec, check_scale
    from app.main import main as app_main

    monkeypatch.setattr(app.core, "Comparison", lambda *a, **k: pytest.fail("the model was loaded"))
    err = one_line(capsys, app_main(["--adapter", f"x={adapters['dora']}", "--adapter", f"x={adapters['lora']}"]))
    assert "column label 'x' is given twice" in err
    err = one_line(capsys, app_main(["--dora", str(adapters["dora"]), "--adapter", f"dora={adapters['lora']}"]))
    assert "column label 'dora' is given twice" in err
    # a run's columns '<prefix> step N' against an adapter of that label, and two runs under one prefix
    err = one_line(capsys, app_main(["--run", f"x={adapters['dora']}", "--adapter", f"x step 2={adapters['lora']}"]))
    assert "column label 'x step 2' is given twice" in err and f"--run x={adapters['dora']}" in err
    assert "--adapter x step 2=..." in err
    err = one_line(capsys, app_main(["--run", f"x={adapters['dora']}", "--run", f"x={adapters['lora']}"]))
    assert "column label 'x step 2' is given twice" in err
    err = one_line(capsys, app_main(["--adapter", f"d={adapters['dora']}", "--adapter", f"d as ComfyUI={adapters['lora']}",
                                     "--view", "d:comfyui"]))
    assert "column label 'd as ComfyUI' is given twice" in err
    monkeypatch.undo()
    for bad in ("1e9", "-1e9", "nan", "inf", "x"):
        with pytest.raises(AppError, match="scale"):
            check_scale(bad)
    assert check_scale("-1.5") == -1.5
    comp = app.core.Comparison(str(tiny_sd_path), device="cpu")
    comp.load("dora", adapters["dora"])
    for values in (["1", "1e9"], ["-1e9"], ["nan"], ["inf"]):
        with pytest.raises(AppError, match=r"outside -8..8|not a number"):
            comp.plan_grid(GridSpec("a sks icon", rows="seeds", row_values=[0], cols="scales", col_values=values,
                                    column="dora", steps=2))
    with pytest.raises(AppError, match="outside"):
        comp.generate("a sks icon", steps=2, scale=float("inf"))
    # whole numbers within range, or one line (2.5 steps were drawn as 2; a seed of 2**70 overflowed)
    for kwargs, words in (({"steps": 2.5}, "steps must be a whole number, got 2.5"),
                          ({"seed": 2**70}, r"seed must be in \[0, 4294967295\]"), ({"seed": -1}, "seed must be in"),
                          ({"num_images": 1.5}, "images must be a whole number"), ({"width": 64.5}, "width")):
        with pytest.raises(AppError, match=words):
            comp.generate("a sks icon", **{"steps": 2, **kwargs})
    for spec, words in ((GridSpec("a sks icon", rows="seeds", row_values=[0, 2**70], col_values=["base"], steps=2),
                         "seed must be in"),
                        (GridSpec("a sks icon", col_values=["base"], steps=2.5), "steps must be a whole number")):
        with pytest.raises(AppError, match=words):
            comp.plan_grid(spec)


def test_kohya_files_never_land_in_root_home_or_the_current_folder(adapters, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for target, place in (("/k.safetensors", "the file-system root"), ("~/k.safetensors", "your home folder"),
                          ("k.safetensors", "the current folder")):
        err = one_line(capsys, main(["export", str(adapters["dora"]), "--format", "kohya", "--out", target]))
        assert f"would write into {place}" in err, target
    assert not (tmp_path / "k.safetensors").exists()
    assert main(["export", str(adapters["dora"]), "--format", "kohya", "--out", "loras/k.safetensors"]) == 0


def test_study_resume_needs_a_study_and_bad_train_args_stop_before_its_record(tmp_path):
    from dreambooth_dora import study

    argv = ["--base_model", "embedded:toy-world", "--instance_data_dir", str(ICONS), "--methods", "dora,lora",
            "--ranks", "2", "--learning_rates", "1e-3", "--training_seeds", "0", "--output_dir", str(tmp_path / "s")]
    with pytest.raises(ConfigError, match=r"training_seeds must be in \[0, 4294967295\], got 4294967296"):
        study.load_study_config([*argv[:-4], "--training_seeds", "0,4294967296", *argv[-2:]])
    with pytest.raises(ConfigError, match=r"--resume: .* holds no study to continue"):
        study.run_study(study.load_study_config(argv + ["--resume"]), progress=False)
    assert not (tmp_path / "s").exists()
    with pytest.raises(ConfigError, match=r"train_args: .*resolution must be a multiple of 8"):
        study.run_study(study.load_study_config(argv + ["--train_args", "--resolution,33"]), progress=False)
    assert not (tmp_path / "s").exists()  # nothing written: a plain run (or a fixed one) can still start there


def test_damaged_numbers_in_an_exports_metadata_are_said_not_raised(adapters, tmp_path, capsys):
    from dreambooth_dora.formats.export import export_svd_lora

    path = export_svd_lora(adapters["dora"], tmp_path / "svd.safetensors", 2)[0]
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    meta["dreambooth_dora_svd_error"], meta["dreambooth_dora_dtype_error"] = "0.1x", "n/a"
    save_file(load_file(str(path)), str(tmp_path / "edited.safetensors"), metadata=meta)
    assert main(["info", str(tmp_path / "edited.safetensors")]) == 0
    out = capsys.readouterr().out
    assert "its dreambooth_dora_svd_error is damaged" in out and "its dreambooth_dora_dtype_error is damaged" in out

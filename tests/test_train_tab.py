"""The Train tab's work without the page: uploads into a dataset under the adapters root (images
only, limits, never a file replaced), captions as the trainer's metadata.jsonl, the settings a job
runs with (a preset, the page's fields, the Advanced section generated from TrainConfig) checked
with the CLI's own messages, and who may use it (loopback, or a login)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from app.core import AppError
from app.train_tab import ADVANCED, DATASET_MARK, PAGE_FIELDS, TrainDesk
from dreambooth_dora.training.config import ConfigError, build_config, describe_fields

REPO = Path(__file__).resolve().parents[1]
ICONS = sorted((REPO / "sample_data/3d_icon").glob("*.png"))


def form(**extra) -> dict:
    return {"dataset": "icon", "instance_prompt": "a sks icon, 3d render", "base": "embedded:toy-world",
            "method": "DoRA and LoRA twins", "rank": 4, "max_train_steps": 10, "learning_rate": 1e-3, **extra}


def test_uploads_make_a_dataset_of_pictures_only_and_replace_nothing(tmp_path, monkeypatch):
    desk = TrainDesk(tmp_path)
    assert "added 4 picture(s)" in desk.add_pictures("icon", [str(p) for p in ICONS[:4]])
    folder = tmp_path / "datasets" / "icon"
    assert (folder / DATASET_MARK).is_file() and [p.name for p in desk.pictures("icon")] == [p.name for p in ICONS[:4]]
    before = (folder / ICONS[0].name).read_bytes()
    message = desk.add_pictures("icon", [str(ICONS[0])])  # the same name again: a new file beside it
    assert "icon_00-2.png" in message and (folder / ICONS[0].name).read_bytes() == before
    fake = tmp_path / "notes.png"
    fake.write_text("not a picture")
    with pytest.raises(AppError, match="nothing added: notes.png: not an image"):
        desk.add_pictures("icon", [str(ICONS[1]), str(fake)])
    assert len(desk.pictures("icon")) == 5  # all or nothing
    monkeypatch.setattr("app.train_tab.MAX_FILES", 6)
    with pytest.raises(AppError, match="at most 6 pictures"):
        desk.add_pictures("icon", [str(p) for p in ICONS[:2]])
    monkeypatch.setattr("app.train_tab.MAX_PIXELS", 100)
    with pytest.raises(AppError, match="megapixels"):
        desk.add_pictures("other", [str(ICONS[0])])
    for bad in ("../outside", "a/b", "", ".hidden"):
        with pytest.raises(AppError, match="dataset name"):
            desk.add_pictures(bad, [str(ICONS[0])])
    (tmp_path / "datasets" / "mine").mkdir()  # a folder the app did not make: left alone
    with pytest.raises(AppError, match="not made by this app"):
        desk.add_pictures("mine", [str(ICONS[0])])
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file() and "icon" not in p.parts) == ["notes.png"]


def test_masks_go_beside_their_pictures_and_into_the_settings(tmp_path):
    desk = TrainDesk(tmp_path)
    with pytest.raises(AppError, match="no pictures yet"):
        desk.add_pictures("icon", [str(ICONS[0])], masks=True)
    desk.add_pictures("icon", [str(p) for p in ICONS[:2]])
    stranger = tmp_path / "other.png"
    shutil.copyfile(ICONS[3], stranger)
    with pytest.raises(AppError, match="mask other.png has no picture of the same name"):
        desk.add_pictures("icon", [str(stranger)], masks=True)
    assert "added 1 mask(s)" in desk.add_pictures("icon", [str(ICONS[0])], masks=True)
    masks = tmp_path / "datasets" / "icon" / "masks"
    assert [p.name for p in masks.iterdir()] == [ICONS[0].name] and len(desk.pictures("icon")) == 2
    runs = desk.job_settings(form(masked=True))
    assert runs["dora"]["masked_loss"] is True and Path(runs["dora"]["mask_data_dir"]) == masks.resolve()


def test_open_in_compare_puts_a_jobs_twins_or_their_checkpoints_in_as_columns(tmp_path, tiny_sd_path, adapters):
    from app.core import Comparison
    from app.train_tab import open_in_compare

    desk = TrainDesk(tmp_path)
    job = desk.queue.submit({"dora": {}, "lora": {}})
    with pytest.raises(AppError, match="no finished adapter yet"):
        open_in_compare(None, desk, job.id)
    for method in ("dora", "lora"):  # two finished runs (checkpoints at steps 2 and 4)
        shutil.copytree(adapters[method], Path(job.folder) / method)
    comp = Comparison(str(tiny_sd_path), adapters_root=tmp_path, device="cpu")
    open_in_compare(comp, desk, job.id)
    assert list(comp.columns) == ["base", f"{job.id} dora", f"{job.id} lora"]
    open_in_compare(comp, desk, job.id, checkpoints=True)
    assert f"{job.id} dora step 2" in comp.columns and f"{job.id} lora step 4" in comp.columns


def test_captions_are_saved_as_the_trainer_reads_them(tmp_path):
    from dreambooth_dora.training.data import load_examples

    desk = TrainDesk(tmp_path)
    desk.add_pictures("icon", [str(p) for p in ICONS[:3]])
    rows = desk.captions("icon")
    assert [r[1] for r in rows] == ["", "", ""]
    rows[1][1] = "a sks icon on a blue background"
    assert "saved 3 caption(s)" in desk.save_captions("icon", rows)
    assert desk.captions("icon")[1][1] == "a sks icon on a blue background"
    examples = load_examples(str(tmp_path / "datasets" / "icon"), caption_column="text")
    assert sorted(e.caption for e in examples) == ["", "", "a sks icon on a blue background"]
    with pytest.raises(AppError, match="no picture 'x.png'"):
        desk.save_captions("icon", [["x.png", "?"]])
    assert desk.job_settings(form())["dora"]["caption_column"] == "text"


def test_settings_are_checked_by_the_clis_rules_and_twins_differ_only_in_use_dora(tmp_path):
    desk = TrainDesk(tmp_path)
    desk.add_pictures("icon", [str(p) for p in ICONS[:4]])
    runs = desk.job_settings(form(preset="quickstart_tiny_icon_dora", advanced={"seed": "7", "lr_scheduler": ""}))
    text, command = desk.yaml_and_command(runs, "outputs/jobs/J")
    assert "use_dora: true" in text and command.count("accelerate launch train_dreambooth_dora.py --config") == 2
    assert "output_dir: outputs/jobs/J/dora" in text
    dora, lora = dict(runs["dora"]), dict(runs["lora"])
    assert dora.pop("use_dora") is True and lora.pop("use_dora") is False and dora == lora
    assert dora["seed"] == 7 and dora["max_train_steps"] == 10 and dora["validation_steps"] == 200  # preset kept
    assert Path(dora["instance_data_dir"]) == tmp_path.resolve() / "datasets" / "icon"
    for advanced, fragment in (({"lr_scheduler": "bogus"}, "lr_scheduler"), ({"seed": "[1"}, "seed"),
                               ({"rnak": "3"}, "rnak")):
        with pytest.raises(ConfigError) as err:
            desk.job_settings(form(advanced=advanced))
        assert fragment in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(ConfigError) as page:  # the same message the CLI gives for the same value
        desk.job_settings(form(rank=0))
    with pytest.raises(ConfigError) as cli:
        build_config({"rank": 0, "instance_prompt": "x", "instance_data_dir": str(ICONS[0].parent), "output_dir": "o"})
    assert str(page.value) == str(cli.value)
    with pytest.raises(AppError, match="outside the adapters root"):
        desk.job_settings(form(folder="../elsewhere"))
    shutil.copytree(REPO / "sample_data/lego", tmp_path / "lego")
    assert desk.job_settings(form(folder="lego", method="LoRA")).keys() == {"lora"}
    assert "lego" in desk.image_folders() and "datasets/icon" in desk.image_folders()
    job = desk.start(form(base="embedded:toy-world-flux", max_train_steps=12))  # queued; nothing runs it here
    assert desk.job_rows()[0][:6] == [job.id, "queued", "dora queued, lora queued", "embedded:toy-world-flux", "12",
                                      f"jobs/{job.id}"]


def test_the_advanced_section_is_every_other_setting_with_its_help():
    names = [f[0] for f in describe_fields()]
    assert sorted([f[0] for f in ADVANCED] + [n for n in PAGE_FIELDS if n in names]) == sorted(names)
    assert all(doc for name, _, _, doc in ADVANCED if name in ("lora_alpha", "use_ema", "validation_prompt"))


def test_the_train_tab_needs_a_login_off_this_machine(capsys, monkeypatch):
    import app.core
    from app.main import main
    from test_app import free_port

    monkeypatch.setattr(app.core, "Comparison", lambda *a, **k: pytest.fail("the model was loaded"))
    for argv, words in ((["--host", "0.0.0.0"], "add --auth USER:PASS, or --no-train"),
                        (["--share"], "public share link"), (["--auth", "user"], "--auth: give USER:PASS"),
                        (["--models-root", "/nonexistent"], "is not a folder")):
        assert main([*argv, "--port", str(free_port())]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and words in err, err


def test_a_recipe_puts_its_base_and_values_in_the_pages_fields(tmp_path, tiny_sd_path):
    """Picking a recipe shows what will run: its base model, prompt, rank, steps and learning rate
    go into the page's fields (which win over the recipe's values), wired in the built page."""
    from app.core import Comparison
    from app.ui import build_ui

    desk = TrainDesk(tmp_path)
    fields = desk.preset_fields("flux1_dev_3d_icon_dora")
    assert fields == {"base": "black-forest-labs/FLUX.1-dev", "instance_prompt": "a sks icon, 3d render", "rank": 16,
                      "max_train_steps": 500, "learning_rate": 1e-4}
    assert desk.preset_fields("quickstart_tiny_icon_flux_dora")["base"] == "embedded:toy-world-flux"
    assert desk.preset_fields("") == {}
    with pytest.raises(AppError, match="no recipe 'nope'"):
        desk.preset_fields("nope")
    desk.add_pictures("icon", [str(p) for p in ICONS[:4]])
    runs = desk.job_settings(form(preset="quickstart_tiny_icon_flux_dora",
                                  **desk.preset_fields("quickstart_tiny_icon_flux_dora")))
    assert runs["dora"]["pretrained_model_name_or_path"] == "embedded:toy-world-flux"
    assert runs["dora"]["max_train_steps"] == 400 and runs["dora"]["train_text_encoder"] is True

    demo = build_ui(Comparison(str(tiny_sd_path), device="cpu"), desk)
    preset = next(b for b in demo.blocks.values() if getattr(b, "elem_id", None) == "preset")
    handler = next(f for f in demo.fns.values() if [c._id for c in f.inputs] == [preset._id])
    said, base, prompt, rank, steps, lr = handler.fn("flux1_dev_3d_icon_dora")
    assert "flux1_dev_3d_icon_dora" in said and base["value"] == "black-forest-labs/FLUX.1-dev"
    assert (rank["value"], steps["value"], lr["value"]) == (16, 500, 1e-4)
    assert [c.elem_id for c in handler.outputs][1:] == ["base", "instance-prompt", "rank", "train-steps",
                                                        "learning-rate"]


def test_every_path_setting_from_the_page_is_checked_by_one_rule(tmp_path, monkeypatch):
    """PATH_SETTINGS lists every setting that names a place (a test of its own fails when a new one
    is missing), each kind has the page's rule, and no path setting from the page (Advanced, a
    recipe, the base model field) reaches outside the adapters root or --models-root."""
    import json
    import re

    from app.train_tab import PAGE_PATH_RULES
    from dreambooth_dora.training.config import PATH_SETTINGS

    looks = {name for name, typ, _, _ in describe_fields() if ("str" in typ or "dict" in typ)
             and re.search(r"(_dir|_path|name_or_path|^dataset_name|checkpoint|^datasets)$", name)}
    assert looks <= set(PATH_SETTINGS) <= {f[0] for f in describe_fields()}, looks - set(PATH_SETTINGS)
    assert set(PATH_SETTINGS.values()) == set(PAGE_PATH_RULES)
    assert all(callable(getattr(TrainDesk, m)) for m in PAGE_PATH_RULES.values())

    models = tmp_path / "models"
    (models / "mine").mkdir(parents=True)
    (models / "escape").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    (tmp_path / "elsewhere").mkdir()
    root = tmp_path / "root"
    desk = TrainDesk(root, models_root=models)
    desk.add_pictures("icon", [str(p) for p in ICONS[:3]])
    (root / "escape").symlink_to(tmp_path / "elsewhere", target_is_directory=True)  # a link under the root, out
    advanced = {n for n, *_ in ADVANCED}
    for name in PATH_SETTINGS:
        for bad in ("/etc", "../..", "../../outside", "~/x", str(tmp_path / "elsewhere"), "escape"):
            if bad == "escape" and PATH_SETTINGS[name] == "inside the run folder":
                continue  # a plain name inside the job's new run folder, where no link can be
            value = f"[{{instance_data_dir: '{bad}', instance_prompt: x}}]" if name == "datasets" else repr(bad)
            extra = {"prior": True, "class_prompt": "an icon"} if name == "class_data_dir" else {}
            if name in advanced:
                given = form(advanced={name: value}, **extra)
            else:  # a page field: only a recipe could carry it
                monkeypatch.setattr(desk, "recipe", lambda preset, name=name, bad=bad: {name: bad})
                given = form(preset="x", **extra)
            try:
                runs = desk.job_settings(given)
            except (AppError, ConfigError):
                continue
            finally:
                monkeypatch.undo()
            assert bad not in json.dumps(runs), (name, bad)  # set by the page itself, or refused
    runs = desk.job_settings(form(base="mine", prior=True, class_prompt="an icon",
                                  advanced={"class_data_dir": "class/icon", "logging_dir": "tb"}))
    assert runs["dora"]["pretrained_model_name_or_path"] == str((models / "mine").resolve())
    assert runs["dora"]["class_data_dir"] == str(root.resolve() / "class" / "icon")
    assert desk.job_settings(form(base="stabilityai/stable-diffusion-xl-base-1.0"))["dora"][
        "pretrained_model_name_or_path"] == "stabilityai/stable-diffusion-xl-base-1.0"
    with pytest.raises(AppError, match="hub id .* or a folder under --models-root"):
        desk.job_settings(form(base="sample_data"))  # a folder here, though it looks like a name
    for place in ("jobs/x", "datasets/icon", "."):
        with pytest.raises(AppError, match="class_data_dir"):
            desk.job_settings(form(prior=True, class_prompt="an icon", advanced={"class_data_dir": place}))


def test_captions_merge_by_picture_and_a_bad_table_changes_nothing(tmp_path, tiny_sd_path):
    from app.core import Comparison
    from app.ui import build_ui

    desk = TrainDesk(tmp_path)
    desk.add_pictures("icon", [str(p) for p in ICONS[:3]])
    names = [p.name for p in desk.pictures("icon")]
    desk.save_captions("icon", [[n, f"caption {i}"] for i, n in enumerate(names)])
    meta = tmp_path / "datasets" / "icon" / "metadata.jsonl"
    before = meta.read_bytes()
    for rows, words in (([], "empty"), ([["", ""]], "empty"), ([[names[0], "x", "y"]], r"3 cell\(s\)"),
                        ([[names[0]]], r"1 cell\(s\)"), ([[names[0], "a"], [names[0], "b"]], "two rows"),
                        ([["x.png", "?"]], "no picture 'x.png'")):
        with pytest.raises(AppError, match=words):
            desk.save_captions("icon", rows)
        assert meta.read_bytes() == before
    assert "3 caption(s)" in desk.save_captions("icon", [[names[1], "new"]])  # one row: the others kept
    assert [c for _, c in desk.captions("icon")] == ["caption 0", "new", "caption 2"]
    # the page's save button takes the table unprocessed: a table of another width is one line
    demo = build_ui(Comparison(str(tiny_sd_path), device="cpu"), desk)
    ids = {getattr(b, "elem_id", None): b._id for b in demo.blocks.values()}
    save = next(f for f in demo.fns.values() if [c._id for c in f.inputs] == [ids["dataset"], ids["captions"]]
                and [c._id for c in f.outputs] == [ids["data-status"]])
    said = save.fn("icon", {"headers": ["picture"], "data": [[names[0]]]})
    assert said.startswith("Error: a caption row has 1 cell(s)")
    assert save.fn("icon", {"headers": ["picture", "caption"], "data": [[names[2], "third"]]}).startswith("saved 3")


def test_a_picture_whose_header_claims_too_many_pixels_is_one_line(tmp_path):
    from test_data import huge_png_header

    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(huge_png_header(60000, 60000))
    desk = TrainDesk(tmp_path / "root")
    with pytest.raises(AppError, match=r"nothing added: bomb.png: its header claims more than \d+ megapixels"):
        desk.add_pictures("icon", [str(bomb)])


def test_colour_masks_are_said_on_upload(tmp_path):
    desk = TrainDesk(tmp_path)
    desk.add_pictures("icon", [str(p) for p in ICONS[:2]])
    said = desk.add_pictures("icon", [str(ICONS[0])], masks=True)  # the picture itself, given as its mask
    assert "colour pictures, not masks" in said
    from PIL import Image

    grey = tmp_path / ICONS[1].name
    Image.open(ICONS[1]).convert("L").save(grey)
    assert "warning" not in desk.add_pictures("icon", [str(grey)], masks=True)

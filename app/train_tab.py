"""The Train tab: pictures in, DoRA and LoRA twins out, compared in the same page.

`TrainDesk` holds what the tab does without the page (tested directly): pictures uploaded into a
dataset folder under the adapters root (images only, limits on count, bytes and pixels), captions
saved as the trainer's `metadata.jsonl`, the settings a job runs with (a recipe preset, the page's
fields and the Advanced section, which is generated from `TrainConfig`: every setting with its
type, default and help) checked by the CLI's own validation, and the equivalent YAML and command.
`train_tab` lays it out; `app/jobs.py` runs the jobs.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import gradio as gr
import yaml

from dreambooth_dora.outputs import ADAPTER_FILE, atomic_path, write_text
from dreambooth_dora.training.config import PATH_SETTINGS, ConfigError, build_config, describe_fields
from dreambooth_dora.training.data import IMAGE_SUFFIXES, DataError, is_colour, load_image, load_image_folder

from .core import AppError, resolve_under_root
from .jobs import Job, JobQueue, last_error, log_tail

REPO = Path(__file__).resolve().parents[1]
PRESETS_DIR = REPO / "train_configs"
DATASETS = "datasets"
DATASET_MARK = ".dreambooth-dora-dataset"  # a dataset folder this app made (pictures may be added to it)
MAX_FILES, MAX_BYTES, MAX_PIXELS = 200, 25 * 2**20, 4096 * 4096  # per dataset / per file / per picture
EMBEDDED = ("embedded:toy-world", "embedded:toy-world-flux")
METHODS = {"DoRA": ("dora",), "LoRA": ("lora",), "DoRA and LoRA twins": ("dora", "lora")}
# what the page's own fields set; the Advanced section has every other setting
PAGE_FIELDS = ("pretrained_model_name_or_path", "instance_data_dir", "instance_prompt", "class_prompt",
               "with_prior_preservation", "rank", "max_train_steps", "learning_rate", "use_dora", "masked_loss",
               "mask_data_dir", "caption_column", "output_dir", "overwrite_output_dir", "resume_from_checkpoint")
ADVANCED = [f for f in describe_fields() if f[0] not in PAGE_FIELDS]
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,95}/[A-Za-z0-9][A-Za-z0-9_.-]{0,95}")  # owner/name
# how the page checks each kind of path setting (PATH_SETTINGS): TrainDesk's method per kind
PAGE_PATH_RULES = {"model": "_model", "read folder": "_read_folder", "dataset": "_dataset",
                   "written folder": "_written_folder", "run folder": "_set_by_the_job",
                   "checkpoint": "_set_by_the_job", "inside the run folder": "_inside_run",
                   "subject sets": "_subject_sets"}


def _safe_name(name: str) -> str:
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(name).stem).strip("._") or "picture"
    return stem[:60]


class TrainDesk:
    """The Train tab's work: data, settings, jobs; every path under `root` (the adapters root)."""

    def __init__(self, root: str | Path, queue: JobQueue | None = None, models_root: str | Path | None = None):
        self.root = Path(root).resolve()
        self.queue = queue or JobQueue(self.root)
        self.models_root = Path(models_root).resolve() if models_root else None

    # ---- data ------------------------------------------------------------------------------------

    def dataset_folder(self, name: str, create: bool = False) -> Path:
        name = (name or "").strip()
        if not NAME.match(name):
            raise AppError(f"dataset name {name!r}: use letters, digits, '.', '_' or '-' (at most 64)")
        folder = self.root / DATASETS / name
        if folder.exists() and not (folder / DATASET_MARK).is_file():
            raise AppError(f"{DATASETS}/{name} was not made by this app; pick another name (nothing there is touched)")
        if create and not folder.exists():
            folder.mkdir(parents=True)
            (folder / DATASET_MARK).write_text("made by the dreambooth-dora app\n", encoding="utf-8")
        return folder

    @staticmethod
    def _check_picture(path: Path) -> str | None:
        """Why `path` is not a picture the trainer can take (None: it is)."""
        from PIL import Image, UnidentifiedImageError

        if path.stat().st_size > MAX_BYTES:
            return f"{path.name}: {path.stat().st_size / 2**20:.1f} MB is over {MAX_BYTES // 2**20} MB"
        try:
            with Image.open(path) as im:
                w, h = im.size
                im.verify()
        except Image.DecompressionBombError:  # the header alone claims more pixels than PIL opens
            return f"{path.name}: its header claims more than {2 * Image.MAX_IMAGE_PIXELS // 10**6} megapixels " \
                   f"(the limit is {MAX_PIXELS // 10**6})"
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
            return f"{path.name}: not an image"
        if w * h > MAX_PIXELS:
            return f"{path.name}: {w}x{h} is over {MAX_PIXELS // 10**6} megapixels"
        return None

    def add_pictures(self, name: str, files: list[str], masks: bool = False) -> str:
        """Copy uploaded pictures (or masks, into `masks/`) into dataset `name`, new names only
        (an existing file is never replaced: a clash gets a suffix); one line of what happened."""
        files = [Path(f) for f in files or []]
        if not files:
            raise AppError("no files given")
        folder = self.dataset_folder(name)
        if masks:
            if not folder.is_dir():
                raise AppError(f"dataset {name!r} has no pictures yet: add them before their masks")
            stems = {p.stem for p in self.pictures(name)}
            folder = folder / "masks"
        have = [p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES] if folder.is_dir() else []
        if len(have) + len(files) > MAX_FILES:
            raise AppError(f"at most {MAX_FILES} pictures per dataset: it has {len(have)}, {len(files)} more given")
        problems = [p for p in (self._check_picture(f) for f in files) if p]
        if problems:
            raise AppError(f"nothing added: {problems[0]}" + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""))
        if masks:
            strangers = [f.name for f in files if _safe_name(f.name) not in stems]
            if strangers:
                raise AppError(f"nothing added: mask {strangers[0]} has no picture of the same name")
        if not masks:
            folder = self.dataset_folder(name, create=True)  # only once everything given is fine
        folder.mkdir(exist_ok=True)
        added = []
        for f in files:
            suffix = f.suffix.lower() if f.suffix.lower() in IMAGE_SUFFIXES else ".png"
            stem, n = _safe_name(f.name), 1
            target = folder / f"{stem}{suffix}"
            while target.exists() and not masks:
                n += 1
                target = folder / f"{stem}-{n}{suffix}"
            with atomic_path(target) as tmp:
                shutil.copyfile(f, tmp)
            added.append(target.name)
        said = f"added {len(added)} {'mask' if masks else 'picture'}(s) to {DATASETS}/{name}: {', '.join(added)}"
        colour = [f.name for f in files if masks and is_colour(load_image(f))]
        if colour:
            said += (f"; warning: {', '.join(colour[:3])}{' ...' if len(colour) > 3 else ''} are colour pictures, "
                     "not masks (white = the subject, black = not): training reads them as grey levels")
        return said

    def pictures(self, name: str) -> list[Path]:
        folder = self.dataset_folder(name)
        return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES) if folder.is_dir() else []

    def captions(self, name: str) -> list[list[str]]:
        """[[file name, caption]] for the dataset's pictures (captions from metadata.jsonl)."""
        known = {}
        meta = self.dataset_folder(name) / "metadata.jsonl"
        if meta.is_file():
            for line in meta.read_text(encoding="utf-8").splitlines():
                try:
                    row = json.loads(line)
                    known[row["file_name"]] = row.get("text", "")
                except (ValueError, KeyError, TypeError):
                    continue
        return [[p.name, known.get(p.name, "")] for p in self.pictures(name)]

    def save_captions(self, name: str, rows) -> str:
        """Merge the table's captions (rows of [picture, caption]) into the trainer's metadata.jsonl
        (file_name, text), by picture name: pictures the table leaves out keep their captions. An
        empty table, a row of another width or a picture not in the dataset changes nothing."""
        pictures = [p.name for p in self.pictures(name)]
        if not pictures:
            raise AppError(f"dataset {name!r} has no pictures yet")
        rows = [list(r) if isinstance(r, (list, tuple)) else [r] for r in (rows or [])]
        rows = [r for r in rows if any(c is not None and str(c).strip() for c in r)]  # blank lines
        if not rows:
            raise AppError("the caption table is empty: nothing saved (the captions on disk are kept)")
        odd = next((r for r in rows if len(r) != 2), None)
        if odd is not None:
            raise AppError(f"a caption row has {len(odd)} cell(s), 2 wanted (picture, caption): nothing saved")
        given = [(str(f).strip(), "" if c is None else str(c).strip()) for f, c in rows]
        unknown = [f for f, _ in given if f not in pictures]
        if unknown:
            raise AppError(f"no picture {unknown[0]!r} in dataset {name!r}: nothing saved")
        twice = next((f for f, _ in given if [g for g, _ in given].count(f) > 1), None)
        if twice:
            raise AppError(f"picture {twice!r} has two rows: nothing saved")
        captions = {**dict(self.captions(name)), **dict(given)}
        lines = [json.dumps({"file_name": f, "text": captions.get(f, "")}) for f in pictures]
        write_text(self.dataset_folder(name) / "metadata.jsonl", "\n".join(lines) + "\n")
        return f"saved {len(lines)} caption(s) to {DATASETS}/{name}/metadata.jsonl ({len(given)} from the table)"

    def image_folders(self) -> list[str]:
        """Folders under the root (two levels) holding pictures, relative to it."""
        out = []
        for folder in [self.root, *self.root.glob("*"), *self.root.glob("*/*")]:
            if folder.is_dir() and not folder.name.startswith(".") and "checkpoint-" not in folder.name and any(
                    p.suffix.lower() in IMAGE_SUFFIXES for p in folder.iterdir() if p.is_file()):
                rel = folder.relative_to(self.root).as_posix()
                if rel != "." and not rel.startswith("jobs/") and "/validation" not in f"/{rel}":
                    out.append(rel)
        return sorted(out)

    # ---- settings --------------------------------------------------------------------------------

    @staticmethod
    def presets() -> list[str]:
        return sorted(p.stem for p in PRESETS_DIR.glob("*.yaml")) if PRESETS_DIR.is_dir() else []

    def recipe(self, preset: str | None) -> dict:
        """A recipe's settings from train_configs/ ({} for none; AppError for one not there)."""
        preset = (preset or "").strip()
        if not preset:
            return {}
        if preset not in self.presets():
            raise AppError(f"no recipe {preset!r} in train_configs/")
        return yaml.safe_load((PRESETS_DIR / f"{preset}.yaml").read_text(encoding="utf-8")) or {}

    def preset_fields(self, preset: str) -> dict:
        """What picking a recipe puts in the page's own fields, so the page shows what will run
        (its fields win over the recipe's values): the recipe's base model, instance prompt, rank,
        steps and learning rate, where it names them; {} for no recipe."""
        values = self.recipe(preset)
        names = {"base": "pretrained_model_name_or_path", "instance_prompt": "instance_prompt", "rank": "rank",
                 "max_train_steps": "max_train_steps", "learning_rate": "learning_rate"}
        return {field: values[key] for field, key in names.items() if values.get(key) not in (None, "")}

    def models(self) -> list[str]:
        found = []
        if self.models_root and self.models_root.is_dir():
            found = sorted(str(p.parent) for p in self.models_root.glob("*/model_index.json"))
        return [*EMBEDDED, *found]

    # ---- paths from the page: every setting of PATH_SETTINGS by the rule of its kind -------------

    def page_paths(self, values: dict) -> dict:
        """`values` with every path setting checked by the rule of its kind (PATH_SETTINGS), folders
        made absolute under the adapters root; AppError for one the page may not name."""
        rules = {kind: getattr(self, method) for kind, method in PAGE_PATH_RULES.items()}
        out = dict(values)
        for name, value in values.items():
            if name in PATH_SETTINGS and value not in (None, ""):
                out[name] = rules[PATH_SETTINGS[name]](name, value)
        return out

    def _model(self, name: str, value) -> str:
        """A hub id (owner/name, not a folder here), an embedded model, or a folder under --models-root."""
        text = str(value).strip()
        if text.startswith("embedded:"):
            return text  # the config's check names the embedded models
        given = Path(text)
        if self.models_root and text and ".." not in given.parts:
            full = (given if given.is_absolute() else self.models_root / given).resolve()
            if full.is_relative_to(self.models_root) and full.is_dir():
                return str(full)
        if HUB_ID.fullmatch(text) and not given.exists():
            return text
        roots = f"a folder under --models-root ({self.models_root})" if self.models_root else \
            "a folder under --models-root (this app was started without one)"
        raise AppError(f"{name} {text!r}: the page takes a hub id (owner/name), an embedded model "
                       f"({', '.join(EMBEDDED)}) or {roots}")

    def _read_folder(self, name: str, value) -> str:
        try:
            return str(resolve_under_root(self.root, str(value)))
        except AppError as err:
            raise AppError(f"{name}: {err}") from None

    def _written_folder(self, name: str, value) -> str:
        """A folder the run may write into: under the adapters root, outside jobs/ and datasets/."""
        full = self._inside(name, value, self.root)
        if full == self.root or any(full.is_relative_to(self.root / top) for top in ("jobs", DATASETS)):
            raise AppError(f"{name} {str(value)!r}: give a folder of its own under the adapters root (not the root, "
                           f"jobs/ or {DATASETS}/)")
        return str(full)

    def _dataset(self, name: str, value) -> str:
        text = str(value).strip()
        if HUB_ID.fullmatch(text) and not Path(text).exists():
            return text
        raise AppError(f"{name} {text!r}: the page takes a dataset hub id (owner/name); upload pictures for a local "
                       "dataset")

    def _set_by_the_job(self, name: str, value):
        raise AppError(f"{name} is set by the job (each job has folders of its own); leave it out")

    def _inside_run(self, name: str, value) -> str:
        self._inside(name, value, self.root)  # relative, no '..' (the config keeps it inside the run folder)
        return str(value).strip()

    def _subject_sets(self, name: str, value):
        if not isinstance(value, list):
            return value  # the config's check says what a list of sets looks like
        return [self.page_paths(entry) if isinstance(entry, dict) else entry for entry in value]

    @staticmethod
    def _inside(name: str, value, root: Path) -> Path:
        text = str(value).strip()
        given = Path(text)
        if not text or given.is_absolute() or ".." in given.parts or text.startswith("~"):
            raise AppError(f"{name} {text!r}: give a path relative to the adapters root, without '..'")
        full = (root / given).resolve()
        if not full.is_relative_to(root.resolve()):
            raise AppError(f"{name} {text!r} leads outside the adapters root")
        return full

    def job_settings(self, form: dict) -> dict[str, dict]:
        """{method: the run's settings} from the page's fields (`form`), checked as the CLI checks
        them (the same one-line messages); AppError / ConfigError / DataError otherwise."""
        values = self.recipe(form.get("preset"))
        values.pop("output_dir", None)
        values.pop("instance_data_dir", None)
        for name, text in (form.get("advanced") or {}).items():
            if text is not None and str(text).strip():
                try:
                    values[name] = yaml.safe_load(str(text))
                except yaml.YAMLError:
                    raise ConfigError(f"{name}: {str(text).strip()!r} is not a value") from None
        base = (form.get("base") or "").strip()
        if not base:
            raise AppError("give a base model")
        data = self._data_folder(form)
        values.update(pretrained_model_name_or_path=base, instance_prompt=(form.get("instance_prompt") or "").strip())
        values = self.page_paths(values)  # the recipe's, Advanced's and the base: one rule per kind
        values["instance_data_dir"] = str(data)
        if (data / "metadata.jsonl").is_file():
            values["caption_column"] = "text"
        if form.get("prior"):
            values.update(with_prior_preservation=True, class_prompt=(form.get("class_prompt") or "").strip())
        if form.get("masked"):
            values["masked_loss"] = True
            if (data / "masks").is_dir():
                values["mask_data_dir"] = str(data / "masks")
        for name in ("rank", "max_train_steps", "learning_rate"):
            if form.get(name) not in (None, ""):
                values[name] = form[name]
        if "rank" in values and "lora_alpha" not in values:
            values["lora_alpha"] = values["rank"]
        methods = METHODS.get(form.get("method") or "", None)
        if methods is None:
            raise AppError(f"method {form.get('method')!r}: pick one of {', '.join(METHODS)}")
        out = {}
        for method in methods:
            run = {**values, "use_dora": method == "dora"}
            build_config({**run, "output_dir": str(self.root / "jobs" / "check")})  # the CLI's checks
            out[method] = run
        load_image_folder(data)  # readable pictures (DataError: the trainer's own message)
        return out

    def _data_folder(self, form: dict) -> Path:
        dataset, folder = (form.get("dataset") or "").strip(), (form.get("folder") or "").strip()
        if folder:
            return resolve_under_root(self.root, folder)
        if not dataset:
            raise AppError("add pictures to a dataset, or pick an image folder")
        path = self.dataset_folder(dataset)
        if not path.is_dir():
            raise AppError(f"dataset {dataset!r} has no pictures yet")
        return path

    @staticmethod
    def yaml_and_command(runs: dict[str, dict], job_folder: str = "JOB") -> tuple[str, str]:
        """The first run's YAML and the commands that run every one (as the job runs them)."""
        method = next(iter(runs))
        text = yaml.safe_dump({**runs[method], "output_dir": f"{job_folder}/{method}"}, sort_keys=False)
        commands = " && ".join(f"accelerate launch train_dreambooth_dora.py --config {job_folder}/{m}.yaml"
                               for m in runs)
        return text, commands

    def start(self, form: dict) -> Job:
        runs = self.job_settings(form)
        first = runs[next(iter(runs))]
        return self.queue.submit(runs, {"base": form.get("base"), "methods": list(runs),
                                        "instance_prompt": (form.get("instance_prompt") or "").strip(),
                                        "seed": first.get("seed", 0), "max_train_steps": first.get("max_train_steps")})

    # ---- a job's view ------------------------------------------------------------------------------

    def job_rows(self) -> list[list[str]]:
        """The jobs table, newest first: id, status, each run's status, the base it trains on, its
        steps, its folder under the root."""
        rows = []
        for job in reversed(self.queue.jobs()):
            runs = ", ".join(f"{r.method} {r.status}" for r in job.runs)
            steps = job.settings.get("max_train_steps")
            rows.append([job.id, job.status, runs, str(job.settings.get("base") or "?"),
                         "?" if steps is None else str(steps), str(Path(job.folder).relative_to(self.root))])
        return rows

    def job_view(self, job_id: str) -> dict:
        """What the page shows of a job: status line, loss points, newest grid, log tail, error."""
        job = self.queue.get(job_id)
        run = job.current() or job.runs[-1]
        records = self.queue.progress(job, run.method)
        steps = [r for r in records if "loss" in r]
        line = f"**{job.id}**: {job.status}; run {run.method} ({run.status})"
        if steps:
            last = steps[-1]
            session = [r for r in steps if r["time"] >= steps[-1]["time"] - 60] or steps
            rate = ((session[-1]["step"] - session[0]["step"]) / (session[-1]["time"] - session[0]["time"])
                    if len(session) > 1 and session[-1]["time"] > session[0]["time"] else None)
            left = (last["max_steps"] - last["step"]) / rate if rate else None
            line += (f"; step {last['step']} / {last['max_steps']}"
                     + (f", {rate:.2f} steps/s" if rate else "")
                     + (f", about {int(left)} s left" if left is not None and job.status == "running" else ""))
        grids = [r["path"] for r in records if r.get("event") == "validation"]
        return {"line": line, "loss": [(r["step"], r["loss"]) for r in steps], "grid": grids[-1] if grids else None,
                "log": log_tail(Path(job.folder) / f"{run.method}.log"),
                "error": job.error or (last_error(Path(job.folder) / f"{run.method}.log") if job.status == "failed" else None),
                "job": job}


# ---- the page --------------------------------------------------------------------------------------

def advanced_widgets() -> dict:
    """One text field per setting not on the page: label name (type), placeholder its default,
    info its help; empty = the preset's value or the default; a value is read as YAML."""
    widgets = {}
    for name, typ, default, doc in ADVANCED:
        widgets[name] = gr.Textbox(label=f"{name} ({typ})", placeholder=f"default {default}", info=doc or None,
                                   elem_id=f"adv-{name}", max_lines=1)
    return widgets


def train_tab(desk: TrainDesk) -> dict:
    """The Train tab's widgets and events ({name: widget}); the caller wires "Open in Compare"."""
    t = {}
    gr.Markdown("### Data: upload pictures (several at once) into a dataset under the adapters root, or pick a folder")
    with gr.Row():
        t["dataset"] = gr.Textbox(label="Dataset name", value="my-subject", elem_id="dataset", scale=2)
        t["folder"] = gr.Dropdown(["", *desk.image_folders()], value="", label="…or an image folder under the root",
                                  elem_id="folder", scale=2)
    with gr.Row():
        t["files"] = gr.File(file_count="multiple", file_types=["image"], label="Pictures (drag and drop)",
                             elem_id="pictures", scale=2)
        t["mask_files"] = gr.File(file_count="multiple", file_types=["image"],
                                  label="Masks (optional; the pictures' names)", elem_id="masks", scale=1)
    t["data_status"] = gr.Markdown("", elem_id="data-status")
    t["gallery"] = gr.Gallery(label="Pictures", columns=8, height=160, elem_id="thumbs", allow_preview=False)
    t["captions"] = gr.Dataframe(headers=["picture", "caption"], datatype=["str", "str"], column_count=(2, "fixed"),
                                 interactive=True, label="Captions (edit, then save)", elem_id="captions")
    t["save_captions"] = gr.Button("Save captions", elem_id="save-captions")
    gr.Markdown("### Settings")
    with gr.Row():
        t["instance_prompt"] = gr.Textbox(label="Instance prompt (with the identifier)", value="a sks icon, 3d render",
                                          elem_id="instance-prompt", scale=2)
        t["prior"] = gr.Checkbox(label="Prior preservation", value=False, elem_id="prior")
        t["class_prompt"] = gr.Textbox(label="Class prompt", elem_id="class-prompt", scale=2)
        t["masked"] = gr.Checkbox(label="Masked loss (alpha or masks)", value=False, elem_id="masked")
    with gr.Row():
        t["base"] = gr.Dropdown(desk.models(), value=desk.models()[0], allow_custom_value=True,
                                label="Base model (embedded, found, or a hub id / path)", elem_id="base", scale=2)
        t["preset"] = gr.Dropdown(["", *desk.presets()], value="", label="Recipe preset (train_configs/)",
                                  elem_id="preset", scale=2)
        t["method"] = gr.Radio(list(METHODS), value="DoRA and LoRA twins", label="Method", elem_id="method", scale=2)
    with gr.Row():
        t["rank"] = gr.Number(label="Rank", value=4, precision=0, elem_id="rank")
        t["max_train_steps"] = gr.Number(label="Steps", value=400, precision=0, elem_id="train-steps")
        t["learning_rate"] = gr.Number(label="Learning rate", value=1e-3, elem_id="learning-rate")
    with gr.Accordion(f"Advanced: the other {len(ADVANCED)} settings (empty = the preset's value or the default)",
                      open=False):
        t["advanced"] = advanced_widgets()
    with gr.Row():
        t["check"] = gr.Button("Check settings", elem_id="check")
        t["start"] = gr.Button("Start", variant="primary", elem_id="start")
    t["settings_status"] = gr.Markdown("", elem_id="settings-status")
    with gr.Accordion("The same as YAML and a command", open=False):
        t["yaml"] = gr.Code(language="yaml", label="YAML (the first run; a twin differs only in use_dora)",
                            elem_id="yaml")
        t["command"] = gr.Textbox(label="Command", buttons=["copy"], elem_id="command")
    gr.Markdown("### Jobs (one runs at a time; each in its own process: closing the page loses nothing)")
    t["jobs"] = gr.Dataframe(headers=["job", "status", "runs", "base", "steps", "folder"], interactive=False, elem_id="jobs",
                             value=desk.job_rows() or None)
    with gr.Row():
        ids = [r[0] for r in desk.job_rows()]
        t["job"] = gr.Dropdown(ids, value=ids[0] if ids else None, label="Job", elem_id="job", scale=2)
        t["stop"] = gr.Button("Stop (checkpoint, then end)", elem_id="job-stop")
        t["resume"] = gr.Button("Resume", elem_id="job-resume")
        t["cancel"] = gr.Button("Cancel (queued)", elem_id="job-cancel")
        t["with_checkpoints"] = gr.Checkbox(label="with its checkpoints", value=False, elem_id="job-checkpoints")
        t["compare"] = gr.Button("Open in Compare", variant="primary", elem_id="job-compare")
    t["job_status"] = gr.Markdown("", elem_id="job-status")
    with gr.Row():
        t["loss"] = gr.LinePlot(x="step", y="loss", title="loss", elem_id="loss-plot", height=260)
        t["grid"] = gr.Image(label="Newest validation grid", elem_id="job-grid", height=260, format="png")
    t["log"] = gr.Textbox(label="Log (tail)", lines=8, max_lines=8, elem_id="job-log")
    t["timer"] = gr.Timer(1.0, active=False)  # on while the Train tab is shown (build_ui)
    wire(desk, t)
    return t


def _form(names: list[str], values) -> dict:
    return dict(zip(names, values))


def wire(desk: TrainDesk, t: dict) -> None:
    import pandas as pd

    adv_names = list(t["advanced"])
    form_names = ["dataset", "folder", "instance_prompt", "prior", "class_prompt", "masked", "base", "preset",
                  "method", "rank", "max_train_steps", "learning_rate"]
    form_inputs = [t[n] for n in form_names] + [t["advanced"][n] for n in adv_names]

    def form_of(values) -> dict:
        form = _form(form_names, values[:len(form_names)])
        form["advanced"] = _form(adv_names, values[len(form_names):])
        return form

    def dataset_view(name):
        try:
            return [str(p) for p in desk.pictures(name)], desk.captions(name) or None
        except AppError:
            return [], None

    def on_upload(name, files, masks=False):
        try:
            message = desk.add_pictures(name, [getattr(f, "name", f) for f in files or []], masks=masks)
        except AppError as err:
            message = f"Error: {err}"
        pics, caps = dataset_view(name)
        return message, pics, caps, gr.update(value=None)

    t["files"].upload(lambda n, f: on_upload(n, f), inputs=[t["dataset"], t["files"]],
                      outputs=[t["data_status"], t["gallery"], t["captions"], t["files"]])
    t["mask_files"].upload(lambda n, f: on_upload(n, f, masks=True), inputs=[t["dataset"], t["mask_files"]],
                           outputs=[t["data_status"], t["gallery"], t["captions"], t["mask_files"]])
    t["dataset"].change(lambda n: dataset_view(n), inputs=t["dataset"], outputs=[t["gallery"], t["captions"]])

    t["save_captions"].click(lambda name, table: save_table(desk, name, table), inputs=[t["dataset"], t["captions"]],
                             outputs=t["data_status"], preprocess=False)

    def checked(values):
        runs = desk.job_settings(form_of(values))
        text, command = desk.yaml_and_command(runs, "outputs/jobs/<new job>")
        return runs, text, command

    def on_check(*values):
        try:
            runs, text, command = checked(values)
        except (AppError, ConfigError, DataError) as err:
            return f"Error: {err}", gr.update(), gr.update()
        return f"OK: {len(runs)} run(s) would start ({', '.join(runs)})", text, command

    t["check"].click(on_check, inputs=form_inputs, outputs=[t["settings_status"], t["yaml"], t["command"]])

    preset_outputs = ["base", "instance_prompt", "rank", "max_train_steps", "learning_rate"]

    def on_preset(preset):
        try:
            fields = desk.preset_fields(preset)
        except AppError as err:
            return (f"Error: {err}", *(gr.update() for _ in preset_outputs))
        said = f"recipe {preset}: its base model and values are in the fields above" if fields else ""
        return (said, *(gr.update(value=fields[n]) if n in fields else gr.update() for n in preset_outputs))

    t["preset"].change(on_preset, inputs=t["preset"], outputs=[t["settings_status"], *(t[n] for n in preset_outputs)])

    def jobs_update(pick=None):
        rows = desk.job_rows()
        ids = [r[0] for r in rows]
        return gr.update(value=rows or None), gr.update(choices=ids, value=pick if pick in ids else (ids[0] if ids else None))

    def on_start(*values):
        try:
            checked(values)
            job = desk.start(form_of(values))
        except (AppError, ConfigError, DataError) as err:
            return (f"Error: {err}", gr.update(), gr.update(), *jobs_update())
        runs = {r.method: yaml.safe_load((Path(job.folder) / f"{r.method}.yaml").read_text(encoding="utf-8"))
                for r in job.runs}
        text, command = desk.yaml_and_command(runs, job.folder)
        return (f"Queued job {job.id} ({', '.join(r.method for r in job.runs)})", text, command,
                *jobs_update(job.id))

    t["start"].click(on_start, inputs=form_inputs,
                     outputs=[t["settings_status"], t["yaml"], t["command"], t["jobs"], t["job"]])

    def view(job_id):
        if not job_id:
            return "No job yet.", None, None, ""
        try:
            v = desk.job_view(job_id)
        except ValueError as err:
            return f"Error: {err}", None, None, ""
        line = v["line"] + (f"\n\n**Error**: `{v['error']}`" if v["error"] else "")
        frame = pd.DataFrame(v["loss"], columns=["step", "loss"]) if v["loss"] else None
        return line, frame, v["grid"], v["log"]

    def on_tick(job_id):
        rows_update, pick_update = jobs_update(job_id)
        return (rows_update, pick_update, *view(job_id))

    view_outputs = [t["job_status"], t["loss"], t["grid"], t["log"]]
    t["timer"].tick(on_tick, inputs=t["job"], outputs=[t["jobs"], t["job"], *view_outputs], queue=False,
                    show_progress="hidden")
    t["job"].change(view, inputs=t["job"], outputs=view_outputs, queue=False)

    def action(kind):
        def run(job_id):
            try:
                job = getattr(desk.queue, kind)(job_id or "")
                message = f"{kind}: job {job.id} is {job.status}"
            except ValueError as err:
                message = f"Error: {err}"
            return (message, *jobs_update(job_id))
        return run

    for kind in ("stop", "resume", "cancel"):
        t[kind].click(action(kind), inputs=t["job"], outputs=[t["settings_status"], t["jobs"], t["job"]], queue=False)


def save_table(desk: TrainDesk, name: str, table) -> str:
    """The caption table as the page sends it, unprocessed (the save event has preprocess=False): a
    table of another width is one line from `save_captions`, not a traceback in Gradio's parsing."""
    data = table.get("data") if isinstance(table, dict) else getattr(table, "data", table)
    try:
        return desk.save_captions(name, data)
    except AppError as err:
        return f"Error: {err}"


def open_in_compare(comp, desk: TrainDesk, job_id: str, checkpoints: bool = False) -> list[str]:
    """A finished job's adapters as Compare columns `<job> <method>` (with `checkpoints`, each run's
    checkpoints and final adapter, `<job> <method> step N`); returns what the loads said."""
    said = []
    for label, folder in job_adapters(desk, job_id):
        if checkpoints:
            said.append("added " + ", ".join(comp.add_run(folder, label)))
        else:
            said.append(comp.load(label, folder))
    return said


def job_adapters(desk: TrainDesk, job_id: str) -> list[tuple[str, Path]]:
    """(column label, adapter folder) of a finished job's runs, for Compare."""
    job = desk.queue.get(job_id)
    done = [(f"{job.id} {r.method}", job.run_folder(r.method)) for r in job.runs
            if (job.run_folder(r.method) / ADAPTER_FILE).is_file()]
    if not done:
        raise AppError(f"job {job.id} has no finished adapter yet ({job.status})")
    return done

"""`dreambooth-dora study`: DoRA vs LoRA over training seeds and learning rates, with intervals.

    dreambooth-dora study --config train_configs/study/toy_3d_icon.yaml [--resume] [--name value ...]

A grid of cells, methods x ranks x learning rates x training seeds, each one real training run
(`train.train`, the cell's settings on top of the study's) and its evaluation (the same
generation and metrics as `evaluate`: every snapshot of the run, the base model's pictures from
the same seeds). Then, per method and rank:

1. the learning rate is chosen on the *selection* generation seeds (the best mean over training
   seeds of the primary metric), never on the seeds it is reported on;
2. on the *report* seeds, each method at its own best learning rate: mean over training seeds
   with a 95% Student-t interval (the training seed is the unit; a percentile bootstrap over 3-5
   seeds covers only 75-84%, the t-interval its nominal 95%: tests/test_study.py simulates it),
   and the paired difference DoRA - LoRA per training seed, of the primary metric and of the
   drift metric, with its interval; "distinguishable" when the interval excludes 0, "cannot be
   told" below MIN_SEEDS seeds; a best rate at the sweep's edge is flagged in the report;
3. plots: metric vs learning rate (bands: the t-interval over training seeds), metric vs
   step at each method's best rate, and the DoRA paper's magnitude / direction scatter of a
   longer run per method (`long_steps`).

OUTPUT_DIR/study.json records the settings and each finished cell; runs/<cell>/ are the training
runs, cells/<cell>.json their metrics. `--resume` continues: finished cells are never run again,
an interrupted run resumes from its latest checkpoint. study.md and the plots are rewritten at
the end (atomically).
"""

from __future__ import annotations

import functools
import json
import math
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from .training.config import ConfigError, check_seeds

MIN_SEEDS = 3  # fewer training seeds: a t-interval on 2 values spans +-12.7 standard errors: nothing to read
USAGE = "usage: dreambooth-dora study [--config FILE.yaml] [--resume] [--name value ...]"
METHODS = ("dora", "lora", "dora-magnitude", "dora-direction", "lora-matched")
METHOD_SETTINGS = {"dora": {"use_dora": True}, "lora": {"use_dora": False},
                   "dora-magnitude": {"use_dora": True, "dora_train": "magnitude"},
                   "dora-direction": {"use_dora": True, "dora_train": "direction"},
                   "lora-matched": {"use_dora": False}}


@dataclass
class StudyConfig:
    """Every field is a YAML key and a `--flag` of the same name."""

    base_model: str = "embedded:toy-world"
    instance_data_dir: str = "sample_data/3d_icon"
    instance_prompt: str = "a sks icon, 3d render"
    methods: list[str] = field(default_factory=lambda: ["dora", "lora"])
    """Any of dora, lora, dora-magnitude, dora-direction (the --dora_train ablations) and
    lora-matched (LoRA at the rank whose trainable count is nearest DoRA's at each rank)."""
    ranks: list[int] = field(default_factory=lambda: [4])
    learning_rates: list[float] = field(default_factory=lambda: [3e-4, 1e-3, 3e-3])
    training_seeds: list[int] = field(default_factory=lambda: [0, 1, 2, 3, 4])
    max_train_steps: int = 200
    """The same for every method (matched budgets)."""
    checkpointing_steps: int = 100
    """Snapshots for metric vs step."""
    train_args: list[str] = field(default_factory=list)
    """Further training flags for every cell, e.g. --resolution 32 --train_batch_size 2 (YAML list)."""
    long_steps: int | None = 2000
    """One longer run per DoRA / LoRA method (first rank, its best rate, first training seed) for
    the magnitude / direction scatter; none to skip."""
    subject_prompts: list[str] = field(default_factory=lambda: ["a sks icon, 3d render", "a photo of a sks icon"])
    class_prompts: list[str] = field(default_factory=lambda: ["a orange square icon"])
    unrelated_prompts: list[str] = field(default_factory=lambda: ["a red ball", "a green brick"])
    identifier: str = "sks"
    selection_seeds: list[int] = field(default_factory=lambda: [100, 101])
    """Generation seeds the learning rate is chosen on."""
    report_seeds: list[int] = field(default_factory=lambda: [200, 201, 202])
    """Generation seeds the comparison is reported on (disjoint from selection_seeds)."""
    num_inference_steps: int = 20
    guidance_scale: float = 5.0
    metric: str = "toy-I"
    """The primary metric (higher is better): toy-I on the embedded world, DINO-I with dino_model."""
    drift_metric: str = "class toy dist"
    """The prior-drift metric reported beside it (lower is better)."""
    dino_model: str | None = None
    clip_model: str | None = None
    output_dir: str = "outputs/study/toy_3d_icon"
    resume: bool = False
    """Continue the study in output_dir (finished cells are kept, an interrupted run resumes)."""
    device: str | None = None

    def validate(self) -> "StudyConfig":
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown or not self.methods:
            raise ConfigError(f"methods: {unknown[0] if unknown else 'empty'}; choose from {', '.join(METHODS)}")
        for name in ("ranks", "learning_rates", "training_seeds", "selection_seeds", "report_seeds"):
            if not getattr(self, name):
                raise ConfigError(f"{name} is empty")
        if any(r < 1 for r in self.ranks) or any(not (lr > 0 and math.isfinite(lr)) for lr in self.learning_rates):
            raise ConfigError("ranks must be >= 1 and learning rates finite and > 0")
        for name in ("training_seeds", "selection_seeds", "report_seeds"):
            check_seeds(name, getattr(self, name))
        if set(self.selection_seeds) & set(self.report_seeds):
            raise ConfigError("selection_seeds and report_seeds must be disjoint (the rate is chosen on one, "
                              "reported on the other)")
        for name in ("max_train_steps", "checkpointing_steps", "num_inference_steps"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1")
        if self.long_steps is not None and self.long_steps < 1:
            raise ConfigError("long_steps must be >= 1 (or none)")
        if not Path(self.instance_data_dir).is_dir():
            raise ConfigError(f"instance_data_dir {self.instance_data_dir!r} is not a folder")
        if not self.subject_prompts:
            raise ConfigError("subject_prompts is empty")
        return self


def load_study_config(argv: list[str]) -> StudyConfig:
    from .training.config import load_config

    return load_config(argv, StudyConfig)


# ---- statistics ------------------------------------------------------------------------------

@functools.lru_cache(maxsize=256)
def t_quantile(p: float, df: int) -> float:
    """The p-quantile of Student's t with `df` degrees of freedom (p in (0.5, 1)): the density
    integrated by Simpson's rule and the CDF inverted by bisection (1e-9; no scipy needed)."""
    log_c = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)

    def cdf(t: float) -> float:
        n = 4000  # even; the density is smooth, so this is exact to ~1e-12 for the t we need
        xs = np.linspace(0.0, t, n + 1)
        f = np.exp(log_c - (df + 1) / 2 * np.log1p(xs * xs / df))
        return 0.5 + (t / n / 3) * (f[0] + f[-1] + 4 * f[1:-1:2].sum() + 2 * f[2:-1:2].sum())

    lo, hi = 0.0, 1.0
    while cdf(hi) < p:
        hi *= 2
    while hi - lo > 1e-9:
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if cdf(mid) < p else (lo, mid)
    return (lo + hi) / 2


def mean_ci(values, level: float = 0.95) -> tuple[float, float, float]:
    """(mean, low, high): the Student-t interval of the mean, mean +- t(n-1) * sd / sqrt(n), over
    independent values (training seeds; for a paired difference, the per-seed differences). NaN
    bounds below 2 values. It holds its level at small n where a percentile bootstrap does not."""
    v = np.asarray(values, dtype=np.float64)
    if v.size == 0:
        return float("nan"), float("nan"), float("nan")
    mean = float(v.mean())
    if v.size < 2:
        return mean, float("nan"), float("nan")
    half = t_quantile((1 + level) / 2, v.size - 1) * float(v.std(ddof=1)) / math.sqrt(v.size)
    return mean, mean - half, mean + half


def matched_rank(rank: int, dora_params: int, lora_params_of) -> int:
    """The LoRA rank whose trainable count is nearest DoRA's at `rank` (ties: the lower rank)."""
    return min(range(1, 4 * rank + 2), key=lambda r: (abs(lora_params_of(r) - dora_params), r))


# ---- cells -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Cell:
    method: str
    rank: int
    lr: float
    seed: int
    steps: int
    train_rank: int  # the rank trained (lora-matched: the matched rank)

    @property
    def id(self) -> str:
        long = f"-steps{self.steps}" if self.steps else ""
        return f"{self.method}-r{self.rank}-lr{self.lr:g}-s{self.seed}{long}"


def adapted_shapes(cfg: StudyConfig) -> tuple[int, int]:
    """(sum of in + out features, sum of out features) over the layers the study's runs adapt:
    a LoRA of rank r has r x the first trainable parameters, a DoRA the second on top."""
    from .adapters.inject import adapted_layers, add_adapters
    from .families import family_of
    from .families.models import resolve_model

    settings = cell_settings(cfg, Cell("lora", 1, 1.0, 0, 0, 1), Path(cfg.output_dir))
    path = resolve_model(settings.pretrained_model_name_or_path)
    family = family_of(path)
    parts = family.load_components(path)
    both = outs = 0
    for model, targets in [(parts.denoiser, family.denoiser_targets(settings, parts.denoiser))] + [
            (te, settings.text_encoder_target_modules)
            for te in (parts.text_encoders if settings.train_text_encoder else [])]:
        add_adapters(model, list(targets), rank=1, alpha=1, use_dora=True)
        for _, layer in adapted_layers(model):
            a, b = layer.lora_A.weight, layer.lora_B.weight
            both += a[0].numel() + b.shape[0]
            outs += b.shape[0]
    return both, outs


def plan(cfg: StudyConfig) -> list[Cell]:
    matched = {}
    if "lora-matched" in cfg.methods:
        both, outs = adapted_shapes(cfg)
        for rank in cfg.ranks:
            matched[rank] = matched_rank(rank, rank * both + outs, lambda r: r * both)
    cells = []
    for method in cfg.methods:
        for rank in cfg.ranks:
            for lr in cfg.learning_rates:
                for seed in cfg.training_seeds:
                    cells.append(Cell(method, rank, lr, seed, 0, matched.get(rank, rank) if method == "lora-matched"
                                      else rank))
    return cells


def cell_settings(cfg: StudyConfig, cell: Cell, run: Path, resume: bool = False):
    """The training settings (TrainConfig) of one cell, its run folder `run`: the study's model and
    data, then `train_args` (which may change those), then the cell's own method, rank, rate,
    seed and budget."""
    from .training.config import build_config, given_values

    steps = cell.steps or cfg.max_train_steps
    values = {"pretrained_model_name_or_path": cfg.base_model, "instance_data_dir": cfg.instance_data_dir,
              "instance_prompt": cfg.instance_prompt, **given_values(cfg.train_args), **METHOD_SETTINGS[cell.method],
              "rank": cell.train_rank, "lora_alpha": float(cell.train_rank), "learning_rate": cell.lr,
              "seed": cell.seed, "max_train_steps": steps,
              "checkpointing_steps": cfg.checkpointing_steps if not cell.steps else max(cfg.checkpointing_steps,
                                                                                      steps // 10),
              "output_dir": str(run), "report_to": "none", "validation_prompt": None,
              **({"resume_from_checkpoint": "latest"} if resume else {})}
    return build_config(values)


def check_train_args(cfg: StudyConfig) -> None:
    """Every cell's training settings validate (ConfigError naming the first problem), checked
    before the study writes anything: one cell per method (the ranks and rates are checked by
    the study's own settings)."""
    for method in cfg.methods:
        cell = Cell(method, cfg.ranks[0], cfg.learning_rates[0], cfg.training_seeds[0], 0, cfg.ranks[0])
        try:
            cell_settings(cfg, cell, Path(cfg.output_dir) / "runs" / cell.id)
        except ConfigError as err:
            raise ConfigError(f"train_args: {err}") from None


def train_cell(cfg: StudyConfig, cell: Cell, out: Path) -> Path:
    """The cell's training run in out/runs/<id> (resumed from its latest checkpoint when there is one)."""
    from .training.checkpoints import list_checkpoints
    from .training.loop import train

    run = out / "runs" / cell.id
    return train(cell_settings(cfg, cell, run, resume=bool(list_checkpoints(run))))


class Judge:
    """The study's evaluation: one pipeline, the embedders, the base model's pictures once."""

    def __init__(self, cfg: StudyConfig):
        import torch

        from .training.data import load_image_folder
        from .evaluation.metrics import ClipEmbedder, DinoEmbedder, ToyEmbedder
        from .families import family_of_pipeline
        from .families.models import load_pipeline, resolve_model

        self.cfg = cfg
        self.device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.pipe = load_pipeline(cfg.base_model).to(self.device)
        self.size = family_of_pipeline(self.pipe).native_size(self.pipe)
        self.prompts = ([("subject", p) for p in cfg.subject_prompts] + [("class", p) for p in cfg.class_prompts]
                        + [("unrelated", p) for p in cfg.unrelated_prompts])
        self.seeds = list(cfg.selection_seeds) + list(cfg.report_seeds)
        self.instances = [e.image for e in load_image_folder(cfg.instance_data_dir)]
        self.embedders = [DinoEmbedder(cfg.dino_model, self.device)] if cfg.dino_model else []
        self.clip = ClipEmbedder(cfg.clip_model, self.device) if cfg.clip_model else None
        classifier = Path(resolve_model(cfg.base_model)) / "classifier"
        if (classifier / "model.safetensors").is_file():
            self.embedders.append(ToyEmbedder(classifier, self.size))
        self.base = None
        self.serial = 0

    def draw(self, adapter: str | None, tokens: dict) -> dict:
        """{(prompt index, seed): [picture]}: each prompt once for all seeds in one batch, every
        seed's initial latents from its own generator (the same latents for every model)."""
        from .evaluation.drawing import draw, seeded_latents

        out = {}
        for j, (_, prompt) in enumerate(self.prompts):
            latents, gens = seeded_latents(self.pipe, self.seeds, 1, self.size, self.size)
            images = draw(self.pipe, adapter, prompt, latents, gens, tokens=tokens,
                          num_inference_steps=self.cfg.num_inference_steps, guidance_scale=self.cfg.guidance_scale,
                          width=self.size, height=self.size)
            out.update({(j, s): [im] for s, im in zip(self.seeds, images)})
        return out

    def __call__(self, run: Path) -> dict:
        """{step: {metric: {"selection": mean over selection seeds, "report": ..., "per_seed": [...]}}}"""
        import logging

        from .adapters.file import load_adapter
        from .evaluation.analysis import snapshots
        from .evaluation.metrics import compute_metrics

        self.pipe.set_progress_bar_config(disable=True)
        if self.base is None:
            self.base = self.draw(None, {})
        out = {}
        quiet = logging.getLogger("dreambooth_dora.adapters.file")
        level = quiet.level
        quiet.setLevel(logging.ERROR)  # the stock loader's known text-encoder gap, restored every time
        try:
            for step, file in snapshots(run):
                self.serial += 1
                name = f"snapshot{self.serial}"  # a new name each time: token names of earlier ones stay taken
                tokens = load_adapter(self.pipe, file.parent, adapter_name=name)["tokens"]
                images = {"base": self.base, "snapshot": self.draw(name, tokens)}
                self.pipe.delete_adapters(name)
                metrics = compute_metrics(images, self.prompts, self.instances, self.embedders, self.clip, self.seeds,
                                          self.cfg.identifier)["snapshot"]
                k = len(self.cfg.selection_seeds)
                out[step] = {m: {"selection": float(np.mean(v["per_seed"][:k])),
                                 "report": float(np.mean(v["per_seed"][k:])), "per_seed": v["per_seed"]}
                             for m, v in metrics.items()}
        finally:
            quiet.setLevel(level)
        return out


# ---- the study ---------------------------------------------------------------------------------

def _settings(cfg: StudyConfig) -> dict:
    return {k: v for k, v in asdict(cfg).items() if k not in ("resume", "device")}


def open_study(cfg: StudyConfig) -> tuple[Path, dict]:
    """The study folder and its record: new (refusing a folder holding anything else), or with
    `resume` this same study (its settings must match, except resume and device)."""
    from .outputs import check_not_degenerate, check_not_inside_outputs, write_text

    from .outputs import OutputError, resolve

    out = Path(cfg.output_dir)
    try:
        where = resolve(cfg.output_dir, "output_dir")
    except OutputError as err:
        raise ConfigError(str(err)) from None
    check_not_degenerate(where, cfg.output_dir, "output_dir")
    check_not_inside_outputs(where, cfg.output_dir, "output_dir")
    record_file = out / "study.json"
    if cfg.resume and not record_file.is_file():
        raise ConfigError(f"--resume: {str(out)!r} holds no study to continue (no study.json); leave out --resume to "
                          "start one there")
    check_train_args(cfg)  # a bad --train_args stops here, before study.json exists
    if out.exists() and any(out.iterdir()):
        if not record_file.is_file():
            raise ConfigError(f"output_dir {str(out)!r} holds files that are not a study; give a new folder")
        record = json.loads(record_file.read_text(encoding="utf-8"))
        if not cfg.resume:
            raise ConfigError(f"output_dir {str(out)!r} holds a study; add --resume to continue it, or give a new "
                              "folder")
        changed = [k for k, v in _settings(cfg).items() if record["settings"].get(k) != v]
        if changed:
            raise ConfigError(f"--resume with other settings ({', '.join(changed)}); give a new output_dir")
        return out, record
    record = {"settings": _settings(cfg), "done": {}}
    write_text(record_file, json.dumps(record, indent=1))
    return out, record


class _StepsInto:
    """Stands in for the training loop's progress bar: its steps advance the study's bar."""

    def __init__(self, bar, cell: str):
        self.bar, self.cell = bar, cell

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def update(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def set_postfix(self, **kw) -> None:
        if self.bar is not None:
            self.bar.set_postfix_str(f"{self.cell} " + " ".join(f"{k}={v}" for k, v in kw.items()))


@contextmanager
def quiet_training(bar=None, cell: str = ""):
    """The training loop reports to the study's one bar (one bar over the grid, its time
    estimate from every step so far) instead of drawing its own."""
    import dreambooth_dora.training.loop as train_module

    real = train_module.tqdm
    train_module.tqdm = lambda *a, **k: _StepsInto(bar, cell)
    try:
        yield
    finally:
        train_module.tqdm = real


def run_study(cfg: StudyConfig, progress: bool = True) -> Path:
    """Run (or continue) the grid, then write the report; returns the report's path."""
    from tqdm.auto import tqdm

    from .outputs import write_text

    out, record = open_study(cfg)
    cells = plan(cfg)
    todo = [c for c in cells if c.id not in record["done"]]
    judge = None
    steps_of = {c.id: (c.steps or cfg.max_train_steps) for c in cells}
    bar = tqdm(total=sum(steps_of[c.id] for c in cells), initial=sum(steps_of[c.id] for c in cells) - sum(
        steps_of[c.id] for c in todo), desc="study", unit="step", disable=not progress)
    for cell in todo:
        bar.set_postfix_str(cell.id)
        with quiet_training(bar, cell.id):
            run = train_cell(cfg, cell, out)
        judge = judge or Judge(cfg)
        metrics = judge(run.parent)
        write_text(out / "cells" / f"{cell.id}.json", json.dumps({"cell": asdict(cell), "metrics": metrics}, indent=1))
        record["done"][cell.id] = asdict(cell)
        write_text(out / "study.json", json.dumps(record, indent=1))
    bar.close()
    if cfg.long_steps:  # the longer runs for the magnitude / direction scatter, at each method's best rate
        for cell in long_cells(cfg, best_rates(cfg, cells, collect(out, cells))):
            if cell.id not in record["done"]:
                if progress:
                    print(f"long run {cell.id} ({cfg.long_steps} steps)", flush=True)
                with quiet_training():
                    train_cell(cfg, cell, out)
                record["done"][cell.id] = asdict(cell)
                write_text(out / "study.json", json.dumps(record, indent=1))
    return write_study_report(cfg, out, cells)


def collect(out: Path, cells: list[Cell]) -> dict:
    """{cell id: {step (int): {metric: {...}}}} of the finished cells."""
    found = {}
    for cell in cells:
        f = out / "cells" / f"{cell.id}.json"
        if f.is_file():
            data = json.loads(f.read_text(encoding="utf-8"))["metrics"]
            found[cell.id] = {int(k): v for k, v in data.items()}
    return found


def value(results: dict, cell: Cell, metric: str, split: str, step: int | None = None) -> float:
    snaps = results[cell.id]
    at = max(snaps) if step is None else step
    entry = snaps[at].get(metric)
    return float("nan") if entry is None else entry[split]


def long_cells(cfg: StudyConfig, best: dict) -> list[Cell]:
    """The longer runs (long_steps) of DoRA and LoRA: first rank, the method's best rate, first seed."""
    rank = cfg.ranks[0]
    return [Cell(method, rank, best[(method, rank)], cfg.training_seeds[0], cfg.long_steps, rank)
            for method in cfg.methods if method in ("dora", "lora") and (method, rank) in best]


def best_rates(cfg: StudyConfig, cells: list[Cell], results: dict) -> dict:
    """{(method, rank): the learning rate with the best mean primary metric on the selection seeds}."""
    best = {}
    for method in cfg.methods:
        for rank in cfg.ranks:
            scores = {}
            for lr in cfg.learning_rates:
                vals = [value(results, c, cfg.metric, "selection") for c in _cells(cells, method, rank, lr)
                        if c.id in results]
                if vals:
                    scores[lr] = float(np.mean(vals))
            if scores:
                best[(method, rank)] = max(scores, key=lambda lr: (scores[lr], -lr))
    return best


def _cells(cells: list[Cell], method: str, rank: int, lr: float) -> list[Cell]:
    return [c for c in cells if c.method == method and c.rank == rank and c.lr == lr]


def summary(cfg: StudyConfig, cells: list[Cell], results: dict) -> dict:
    """Per (method, rank) at its best rate: mean and 95% interval over training seeds of the
    primary and drift metrics on the report seeds; per rank, the paired DoRA - LoRA difference."""
    best = best_rates(cfg, cells, results)
    rows, pairs = [], []
    per_seed = {}
    for (method, rank), lr in best.items():
        done = [c for c in _cells(cells, method, rank, lr) if c.id in results]
        vals = {c.seed: value(results, c, cfg.metric, "report") for c in done}
        drift = {c.seed: value(results, c, cfg.drift_metric, "report") for c in done}
        per_seed[(method, rank)] = vals
        per_seed[(method, rank, "drift")] = drift
        rows.append({"method": method, "rank": rank, "train_rank": done[0].train_rank if done else rank,
                     "lr": lr, "seeds": len(vals), "metric": mean_ci(list(vals.values())),
                     "drift": mean_ci(list(drift.values())), "edge": rate_edge(cfg.learning_rates, lr)})
    for rank in cfg.ranks:
        for other in [m for m in cfg.methods if m != "dora"]:
            for what, key, name in (("metric", (rank,), cfg.metric), ("drift", (rank, "drift"), cfg.drift_metric)):
                a, b = per_seed.get(("dora", *key)), per_seed.get((other, *key))
                if not a or not b:
                    continue
                common = sorted(set(a) & set(b))
                mean, lo, hi = mean_ci([a[s] - b[s] for s in common])
                pairs.append({"rank": rank, "versus": other, "of": what, "metric": name, "seeds": len(common),
                              "diff": (mean, lo, hi),
                              "distinguishable": bool(len(common) >= MIN_SEEDS and (lo > 0 or hi < 0))})
    return {"best": {f"{m} r{r}": lr for (m, r), lr in best.items()}, "rows": rows, "pairs": pairs}


def rate_edge(rates: list[float], lr: float) -> str | None:
    """'top' / 'bottom' when the chosen rate is the sweep's largest / smallest (its best may lie beyond)."""
    if len(set(rates)) < 2:
        return None
    return "top" if lr == max(rates) else "bottom" if lr == min(rates) else None


def verdict(pair: dict, metric: str | None = None) -> str:
    """The paired DoRA - other difference of one metric in words, at the level the interval holds."""
    metric = metric or pair.get("metric")
    mean, lo, hi = pair["diff"]
    if pair["seeds"] < MIN_SEEDS:
        return (f"{metric}: cannot be told at rank {pair['rank']}: {pair['seeds']} training seed(s) give no interval "
                f"worth the name (DoRA - {pair['versus']} = {mean:+.4f}); use at least {MIN_SEEDS}")
    if not pair["distinguishable"]:
        return (f"{metric}: not distinguishable from zero at rank {pair['rank']}: DoRA - {pair['versus']} = "
                f"{mean:+.4f} [{lo:+.4f}, {hi:+.4f}] over {pair['seeds']} training seeds")
    better = "higher" if mean > 0 else "lower"
    return (f"{metric}: DoRA's is {better} than {pair['versus']}'s at rank {pair['rank']}: {mean:+.4f} "
            f"[{lo:+.4f}, {hi:+.4f}] over {pair['seeds']} training seeds (the 95% interval excludes zero)")


# ---- plots and the report --------------------------------------------------------------------

def band_plot(series: list[tuple[str, list[float], list[tuple[float, float, float]]]], title: str, xlabel: str,
              ylabel: str, log_x: bool = False, size=(560, 380)):
    """Lines of means with shaded intervals: series = [(label, xs, [(mean, low, high), ...])]."""
    from PIL import Image, ImageDraw

    from .training.validation import _font
    from .evaluation.analysis import PALETTE

    w, h = size
    left, right, top, bottom = 70, 150, 40, 50
    img = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(img, "RGBA")
    font, small = _font(15), _font(12)
    draw.text((left, 8), title, fill="black", font=font)
    tx = (lambda x: math.log10(x)) if log_x else (lambda x: x)
    xs = [tx(x) for _, xv, _ in series for x in xv]
    ys = [v for _, _, st in series for m in st for v in m if math.isfinite(v)]
    if not xs or not ys:
        return img
    xlo, xhi = min(xs), max(xs)
    ylo, yhi = min(ys), max(ys)
    xpad = (xhi - xlo) * 0.05 or 0.5
    ypad = (yhi - ylo) * 0.08 or abs(yhi) * 0.05 or 0.01
    xlo, xhi, ylo, yhi = xlo - xpad, xhi + xpad, ylo - ypad, yhi + ypad
    x0, x1, y0, y1 = left, w - right, top, h - bottom

    def px(x, y):
        return x0 + (tx(x) - xlo) / (xhi - xlo) * (x1 - x0), y1 - (y - ylo) / (yhi - ylo) * (y1 - y0)

    draw.rectangle([x0, y0, x1, y1], outline="black")
    for k in range(5):
        y = ylo + (yhi - ylo) * k / 4
        _, py = px(10 ** xlo if log_x else xlo, y)
        draw.line([x0 - 4, py, x0, py], fill="black")
        draw.text((4, py - 7), f"{y:.3g}", fill="black", font=small)
    for x in sorted({x for _, xv, _ in series for x in xv}):
        qx, _ = px(x, ylo)
        draw.line([qx, y1, qx, y1 + 4], fill="black")
        draw.text((qx - 16, y1 + 6), f"{x:g}", fill="black", font=small)
    draw.text((x0 + (x1 - x0) // 2 - 40, h - 20), xlabel, fill="black", font=small)
    draw.text((4, y0 - 18), ylabel, fill="black", font=small)
    for i, (label, xv, stats) in enumerate(series):
        colour = PALETTE[i % len(PALETTE)]
        # a point without an interval (one seed) is drawn without its band
        pts = [(x, tuple(v if math.isfinite(v) else s[0] for v in s)) for x, s in zip(xv, stats)
               if math.isfinite(s[0])]
        if not pts:
            continue
        band = [px(x, s[2]) for x, s in pts] + [px(x, s[1]) for x, s in reversed(pts)]
        if len(pts) > 1:
            draw.polygon(band, fill=colour + (50,))
        line = [px(x, s[0]) for x, s in pts]
        if len(line) > 1:
            draw.line(line, fill=colour, width=2)
        for (qx, qy), (_, s) in zip(line, pts):
            draw.ellipse([qx - 3, qy - 3, qx + 3, qy + 3], fill=colour)
            _, lo = px(pts[0][0], s[1])
            _, hi = px(pts[0][0], s[2])
            draw.line([qx, lo, qx, hi], fill=colour, width=1)
        draw.text((x1 + 10, y0 + 20 * i), label, fill=colour, font=small)
    return img


def run_points(cfg: StudyConfig, run: Path) -> list:
    """The DoRA paper's magnitude / direction points of a run's query projections, every snapshot."""
    from .adapters.file import apply_to_models, read_adapter
    from .families import pipeline_models
    from .families.models import load_pipeline
    from .evaluation.analysis import analyse

    models = pipeline_models(load_pipeline(cfg.base_model))
    adapter = read_adapter(run)
    apply_to_models(adapter, models)
    return analyse(models, run.name, run, ["to_q", "q_proj"], final=adapter)


def weight_slope(cfg: StudyConfig, run: Path) -> dict:
    """A run's weight pattern: slope of dM on dD over its snapshots, r, mean changes."""
    from .evaluation.analysis import summarise

    sm = summarise(run_points(cfg, run))
    return {k: sm[k] for k in ("slope", "r", "mean_dm", "mean_dd")}


def weight_slopes(cfg: StudyConfig, out: Path, cells: list[Cell]) -> dict:
    """{cell id: weight analysis} for every finished cell, kept in its cells/<id>.json."""
    from .outputs import write_text

    found = {}
    for cell in cells:
        f = out / "cells" / f"{cell.id}.json"
        if not f.is_file():
            continue
        data = json.loads(f.read_text(encoding="utf-8"))
        if "weights" not in data:
            data["weights"] = weight_slope(cfg, out / "runs" / cell.id)
            write_text(f, json.dumps(data, indent=1))
        found[cell.id] = data["weights"]
    return found


def write_study_report(cfg: StudyConfig, out: Path, cells: list[Cell]) -> Path:
    """study.md, summary.json and the plots, each written atomically."""
    from .outputs import ADAPTER_FILE, atomic_path, write_text

    results = collect(out, cells)
    s = summary(cfg, cells, results)
    best = best_rates(cfg, cells, results)
    slopes = weight_slopes(cfg, out, cells)
    for row in s["rows"]:  # the weight pattern at the chosen rate, over training seeds
        ids = [c.id for c in _cells(cells, row["method"], row["rank"], row["lr"]) if c.id in slopes]
        row["slope"] = mean_ci([slopes[i]["slope"] for i in ids])
    # metric vs learning rate, per method and rank (bands over training seeds, report seeds)
    series = []
    for method in cfg.methods:
        for rank in cfg.ranks:
            stats = [mean_ci([value(results, c, cfg.metric, "report") for c in _cells(cells, method, rank, lr)
                                   if c.id in results]) for lr in cfg.learning_rates]
            series.append((f"{method} r{rank}", list(cfg.learning_rates), stats))
    plots = {"metric_vs_lr.png": band_plot(series, f"{cfg.metric} vs learning rate (95% interval over training seeds)",
                                           "learning rate", cfg.metric, log_x=True)}
    series = []
    for (method, rank), lr in best.items():
        done = [c for c in _cells(cells, method, rank, lr) if c.id in results]
        steps = sorted(set.intersection(*[set(results[c.id]) for c in done])) if done else []
        stats = [mean_ci([value(results, c, cfg.metric, "report", st) for c in done]) for st in steps]
        series.append((f"{method} r{rank} lr {lr:g}", steps, stats))
    plots["metric_vs_step.png"] = band_plot(series, f"{cfg.metric} vs step at each method's best rate", "step",
                                            cfg.metric)
    long_lines = []
    groups = []
    for cell in long_cells(cfg, best) if cfg.long_steps else []:
        run = out / "runs" / cell.id
        if (run / ADAPTER_FILE).is_file():
            from .evaluation.analysis import summarise

            points = run_points(cfg, run)
            groups.append((f"{cell.method} {cfg.long_steps} steps", points))
            sm = summarise(points)
            long_lines.append(f"| {cell.method} | {cfg.long_steps} | {cell.lr:g} | {sm['slope']:.3g} | {sm['r']:.2f} | "
                              f"{sm['points']} |")
    if groups:
        from .evaluation.analysis import scatter_plot

        plots["magnitude_direction.png"] = scatter_plot(groups)
    for name, img in plots.items():
        with atomic_path(out / name) as tmp:
            img.save(tmp, format="PNG")
    write_text(out / "summary.json", json.dumps({**s, "settings": _settings(cfg)}, indent=1, default=str))
    lines = [f"# DoRA vs LoRA: {cfg.base_model}, {cfg.instance_data_dir}", "",
             f"{len(results)} of {len(cells)} cells: methods {', '.join(cfg.methods)} x ranks "
             f"{', '.join(map(str, cfg.ranks))} x learning rates {', '.join(f'{x:g}' for x in cfg.learning_rates)} x "
             f"training seeds {', '.join(map(str, cfg.training_seeds))}; {cfg.max_train_steps} steps each (the same "
             "budget for every method).", "",
             f"Primary metric: **{cfg.metric}** (higher is better), drift: **{cfg.drift_metric}** (lower is better). "
             f"The learning rate is chosen per method and rank on generation seeds {cfg.selection_seeds}; everything "
             f"below is on seeds {cfg.report_seeds}. Intervals: 95% Student-t over training seeds (the seed is "
             "the unit; paired differences use the same seed's two runs); below "
             f"{MIN_SEEDS} seeds a difference cannot be told. The choice of rate uses the same trained adapters as "
             "the report (other generation seeds): the training-seed noise that picked it is still in the numbers, "
             "so a best rate favours its method slightly.", "",
             f"| method | rank | best lr | seeds | {cfg.metric} mean [95% CI] | {cfg.drift_metric} mean [95% CI] | "
             "weight slope dM/dD [95% CI] |", "|---|---|---|---|---|---|---|"]
    for r in s["rows"]:
        m, d = r["metric"], r["drift"]
        rank = f"{r['rank']}" + (f" (trained at {r['train_rank']}: matched parameters)" if r["train_rank"] != r["rank"]
                                 else "")
        w = r.get("slope", (float("nan"),) * 3)
        lines.append(f"| {r['method']} | {rank} | {r['lr']:g} | {r['seeds']} | {m[0]:.4f} [{m[1]:.4f}, {m[2]:.4f}] | "
                     f"{d[0]:.4f} [{d[1]:.4f}, {d[2]:.4f}] | {w[0]:.3f} [{w[1]:.3f}, {w[2]:.3f}] |")
    edges = [r for r in s["rows"] if r["edge"]]
    for r in edges:
        lines += ["", f"**WARNING: {r['method']} at rank {r['rank']} does best at the sweep's {r['edge']} rate "
                      f"({r['lr']:g}); its real best may lie beyond, so the comparison may understate it: widen "
                      "learning_rates.**"]
    lines += ["", "Paired differences (the same training seed, each method at its own best rate):", ""]
    lines += [f"- {verdict(p)}" for p in s["pairs"]] or ["- (no pair: dora and another method are needed)"]
    lines += ["", "![metric vs learning rate](metric_vs_lr.png)", "", "![metric vs step](metric_vs_step.png)", ""]
    if long_lines:
        lines += ["Magnitude / direction change of the query projections over a longer run (the DoRA paper's "
                  "figure: its FT has a negative slope, LoRA a positive one):", "",
                  "| method | steps | lr | slope dM/dD | r | points |", "|---|---|---|---|---|---|", *long_lines, "",
                  "![magnitude vs direction](magnitude_direction.png)", ""]
    report = out / "study.md"
    write_text(report, "\n".join(lines) + "\n")
    return report

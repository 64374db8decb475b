"""`dreambooth-dora evaluate`: subject and prompt fidelity, prior drift, and the weight analysis.

    dreambooth-dora evaluate --config train_configs/evaluate/toy_3d_icon_ranks.yaml [--name value ...]

For the base model and each adapter, with the same prompts, seeds and initial latents:

    subject prompts    DINO, CLIP-I (vs the instance images), CLIP-T (vs the prompt without the
                       identifier), and the toy judge's feature similarity on the embedded world
    class / unrelated  prior drift against the base model's picture of the same seed: pixel MSE,
    prompts            SSIM, 1 - cosine of DINO / CLIP / toy features; and CLIP-T
    weights            the DoRA paper's magnitude / direction change per layer and checkpoint

Means are over prompts and images of one seed; the report gives mean and standard deviation
over seeds. OUTPUT_DIR gets report.md, metrics.json, weight_analysis.png and grids/*.png, and
appears complete or not at all (built in a temporary folder, then renamed).
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from .analysis import analyse, points_as_dicts, scatter_plot, summarise
from .config import ConfigError
from .metrics import ClipEmbedder, DinoEmbedder, ToyEmbedder, cosine, pixel_mse, ssim
from .outputs import atomic_dir, check_output_target
from .models import load_pipeline, pipeline_models, resolve_model
from .adapter_file import AdapterFile, apply_to_models, check_fits, load_adapter, read_adapter
from .validation import image_grid

log = logging.getLogger(__name__)
KINDS = ("subject", "class", "unrelated")
USAGE = "usage: dreambooth-dora evaluate [--config FILE.yaml] [--name value ...]"


@dataclass
class EvalConfig:
    """Every field is a YAML key and a `--flag` of the same name."""

    base_model: str = "embedded:toy-world"
    """The model the adapters were trained on: hub id, local diffusers folder or `embedded:<name>`."""
    adapters: list[str] = field(default_factory=list)
    """Adapter folders or files, each optionally `label=path`; a training output folder also gives
    its checkpoints to the weight analysis. Separated by ',' on the command line."""
    instance_data_dir: str | None = None
    """The subject's images (the training set) that DINO and CLIP-I compare against."""
    subject_prompts: list[str] | None = None
    """Prompts with the identifier; default: the instance prompts the adapters recorded."""
    class_prompts: list[str] = field(default_factory=list)
    """Prompts of the subject's class without the identifier (prior drift)."""
    unrelated_prompts: list[str] = field(default_factory=list)
    """Prompts of other things (prior drift: the base model's "long-term memory")."""
    identifier: str = "sks"
    """The subject's token, removed from subject prompts for CLIP-T (CLIP does not know it)."""
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    images_per_prompt: int = 2
    num_inference_steps: int = 25
    guidance_scale: float = 7.5
    resolution: int | None = None
    """Image size; default: the model's native size."""
    dino_model: str | None = "facebook/dino-vits16"
    """DINO ViT (hub id or local folder); 'none' skips DINO."""
    clip_model: str | None = "openai/clip-vit-base-patch32"
    """CLIP (hub id or local folder); 'none' skips CLIP-I and CLIP-T."""
    analysis_modules: list[str] | None = field(default_factory=lambda: ["to_q", "q_proj"])
    """Layers in the weight analysis (name or name suffix); the paper plots the query projections.
    'none': every adapted layer."""
    output_dir: str = "outputs/evaluation"
    """The report folder: new or empty, or an earlier report (with `overwrite`)."""
    overwrite: bool = False
    """Replace an earlier evaluation report at output_dir (never anything else)."""
    device: str | None = None
    """'cuda', 'cpu', ...; default: cuda when available."""

    def validate(self) -> "EvalConfig":
        if not self.adapters:
            raise ConfigError("adapters is empty: give adapter folders, e.g. --adapters outputs/run_dora,outputs/run_lora")
        if not self.instance_data_dir:
            raise ConfigError("instance_data_dir is not set: the subject's images are needed for DINO / CLIP-I")
        if not self.seeds:
            raise ConfigError("seeds is empty")
        for name in ("images_per_prompt", "num_inference_steps"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1")
        if self.resolution is not None and (self.resolution < 16 or self.resolution % 8):
            raise ConfigError("resolution must be a multiple of 8, at least 16 (SSIM's window is 11 pixels)")
        if not self.identifier.strip():
            raise ConfigError("identifier is empty")
        if any(seed < 0 for seed in self.seeds):
            raise ConfigError(f"seeds must be >= 0, got {self.seeds}")
        from .config import check_ranges
        from .models import check_embedded_name

        check_ranges(self, {"guidance_scale": (">=", 0)})
        try:
            check_embedded_name(self.base_model)
        except ValueError as err:
            raise ConfigError(f"base_model: {err}") from None
        return self


def load_eval_config(argv: list[str]) -> EvalConfig:
    from .config import load_config

    return load_config(argv, EvalConfig)


def parse_sources(entries: list[str]) -> list[tuple[str, Path, AdapterFile]]:
    """[(label, path, adapter)]: `label=path` or a path labelled by method and rank ('DoRA r8')."""
    out = []
    for entry in entries:
        label, eq, path = entry.partition("=")
        if not eq:
            label, path = "", entry
        adapter = read_adapter(path)  # a clear error for a missing or non-adapter path
        if not label:
            prefix = "unet" if adapter.part("unet") else next(iter(sorted({k.split(".", 1)[0] for k in adapter.tensors})))
            label = f"{'DoRA' if adapter.use_dora else 'LoRA'} r{adapter.rank_alpha(prefix)[0]}"
        out.append((label, Path(path), adapter))
    labels = [lbl for lbl, _, _ in out]
    # same method and rank twice: tell them apart by folder name
    return [(f"{lbl} ({p.name})" if labels.count(lbl) > 1 else lbl, p, a) for lbl, p, a in out]


def clip_text(prompt: str, identifier: str) -> str:
    """The prompt CLIP-T compares with: the identifier token removed ('a sks dog' -> 'a dog')."""
    return re.sub(rf"\s*\b{re.escape(identifier)}\b", "", prompt).strip()


def _stats(values: list[float]) -> dict:
    v = np.asarray(values, dtype=np.float64)
    return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0,
            "per_seed": [float(x) for x in v]}


def _upscale(im: Image.Image, min_side: int = 128) -> Image.Image:
    if min(im.size) >= min_side:
        return im
    k = -(-min_side // min(im.size))
    return im.resize((im.width * k, im.height * k), Image.NEAREST)


@torch.no_grad()
def generate(pipe, names: list[str], prompts: list[tuple[str, str]], cfg: EvalConfig, size: int,
             progress: bool = True) -> dict:
    """{model: {(prompt index, seed): [images]}}; model 'base' runs with every adapter disabled,
    adapter i alone as `adapter<i>`. Each (prompt, seed) starts from the same latents for all."""
    out = {}
    bar = tqdm(total=len(names) * len(prompts) * len(cfg.seeds), desc="generating", disable=not progress)
    for m, name in enumerate(names):
        if m == 0:
            pipe.disable_lora()
        else:
            pipe.enable_lora()
            pipe.set_adapters([f"adapter{m - 1}"])
        out[name] = {}
        for j, (_, prompt) in enumerate(prompts):
            for seed in cfg.seeds:
                out[name][(j, seed)] = pipe(prompt, num_images_per_prompt=cfg.images_per_prompt,
                                            num_inference_steps=cfg.num_inference_steps,
                                            guidance_scale=cfg.guidance_scale, width=size, height=size,
                                            generator=torch.Generator("cpu").manual_seed(seed)).images
                bar.update(1)
    bar.close()
    return out


def compute_metrics(images: dict, prompts: list[tuple[str, str]], instances: list[Image.Image], embedders: list,
                    clip: ClipEmbedder | None, seeds: list[int], identifier: str) -> dict:
    """{model: {metric: {"mean", "std", "per_seed"}}} (see the module docstring)."""
    names = list(images)
    keys = [(j, s) for j in range(len(prompts)) for s in seeds]
    # features of every picture once per embedder: feats[embedder][model][key] -> (n, D)
    order = [(m, k) for m in names for k in keys]
    feats = {}
    for emb in embedders:
        f = emb.images([im for m, k in order for im in images[m][k]])
        feats[emb.name] = {m: {} for m in names}
        for (m, k), rows in zip(order, torch.split(f, [len(images[m][k]) for m, k in order])):
            feats[emb.name][m][k] = rows
    inst = {emb.name: emb.images(instances) for emb in embedders}
    texts = clip.texts([clip_text(p, identifier) for _, p in prompts]) if clip else None
    by_kind = {kind: [j for j, (k, _) in enumerate(prompts) if k == kind] for kind in KINDS}

    results = {}
    for m in names:
        per_seed: dict[str, list[float]] = {}

        def add(metric, value):
            per_seed.setdefault(metric, []).append(float(value))

        for s in seeds:
            subj = [(j, s) for j in by_kind["subject"]]
            for emb in embedders:
                g = torch.cat([feats[emb.name][m][k] for k in subj])
                add(f"{emb.name}-I", cosine(g, inst[emb.name]).mean())
            if clip:
                add("CLIP-T", torch.cat([cosine(feats["CLIP"][m][(j, s)], texts[j:j + 1]).flatten()
                                         for j, _ in subj]).mean())
            for kind in ("class", "unrelated"):
                ks = [(j, s) for j in by_kind[kind]]
                if not ks:
                    continue
                if clip:
                    add(f"{kind} CLIP-T", torch.cat([cosine(feats["CLIP"][m][k], texts[k[0]:k[0] + 1]).flatten()
                                                     for k in ks]).mean())
                if m == names[0]:
                    continue  # the base model's drift from itself is zero by definition
                gen = [im for k in ks for im in images[m][k]]
                ref = [im for k in ks for im in images[names[0]][k]]
                add(f"{kind} MSE", pixel_mse(gen, ref).mean())
                add(f"{kind} SSIM", ssim(gen, ref).mean())
                for emb in embedders:
                    a = torch.cat([feats[emb.name][m][k] for k in ks])
                    b = torch.cat([feats[emb.name][names[0]][k] for k in ks])
                    add(f"{kind} {emb.name} dist", (1 - cosine(a, b).diagonal()).mean())
        results[m] = {metric: _stats(v) for metric, v in per_seed.items()}
    return results


def _table(results: dict, metrics: list[str], arrows: dict) -> str:
    present = [k for k in metrics if any(k in r for r in results.values())]
    if not present:
        return "_no metrics (no feature models and no prompts of this kind)_\n"
    lines = ["| model | " + " | ".join(f"{k} {arrows.get(k, '')}".strip() for k in present) + " |",
             "|---" * (len(present) + 1) + "|"]
    for m, r in results.items():
        cells = [f"{r[k]['mean']:.4f} ± {r[k]['std']:.4f}" if k in r else "—" for k in present]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def metric_names(embedders: list, clip) -> dict[str, list[str]]:
    e = [emb.name for emb in embedders]
    subject = [f"{n}-I" for n in e] + (["CLIP-T"] if clip else [])
    drift = {kind: [f"{kind} MSE", f"{kind} SSIM"] + [f"{kind} {n} dist" for n in e] + ([f"{kind} CLIP-T"] if clip else [])
             for kind in ("class", "unrelated")}
    return {"subject": subject, **drift}


def arrows_for(names: dict[str, list[str]]) -> dict[str, str]:
    out = {}
    for metric in sum(names.values(), []):
        lower = metric.endswith(("MSE", "dist"))
        out[metric] = "↓" if lower else "↑"
    return out


def write_report(folder: Path, cfg: EvalConfig, prompts, images, instances, results, names, points, summaries):
    grids = folder / "grids"
    grids.mkdir(parents=True)
    models = list(images)
    lines = [f"# Evaluation of {', '.join(models[1:])} on `{cfg.base_model}`", "",
             f"Instance images: `{cfg.instance_data_dir}` ({len(instances)}); seeds {cfg.seeds}, "
             f"{cfg.images_per_prompt} image(s) per prompt and seed, {cfg.num_inference_steps} steps, "
             f"guidance {cfg.guidance_scale}. Every model starts from the same latents per prompt and seed; "
             "the base model runs with all adapters disabled. Values: mean ± standard deviation over seeds.", "",
             "![instance images](instances.png)", "", "## Subject and prompt fidelity (subject prompts)", "",
             "DINO-I / CLIP-I / toy-I: cosine similarity to the instance images (higher = nearer the subject); "
             f"CLIP-T: similarity of picture and prompt with `{cfg.identifier}` removed.", "",
             _table(results, names["subject"], arrows_for(names))]
    for kind in ("class", "unrelated"):
        lines += [f"## Prior drift: {kind} prompts", "",
                  "Each adapter's picture against the base model's picture of the same seed and latents: "
                  "pixel MSE, SSIM, 1 - cosine of features (dist). Lower drift = more of the base model kept.", "",
                  _table(results, names[kind], arrows_for(names))]
    lines += ["## Weight decomposition (DoRA paper, Figure 2)", "",
              "Per adapted layer and checkpoint: dM = mean |row-norm change|, dD = mean (1 - cosine) of the "
              "rows against the base weight. The paper finds a negative slope for full fine-tuning and DoRA, a "
              f"positive one for LoRA. Layers: {cfg.analysis_modules or 'all adapted'}.", "",
              "![weight analysis](weight_analysis.png)", "",
              "| adapter | layers | checkpoints (steps) | slope dM/dD | r | mean dM | mean dD |", "|---|---|---|---|---|---|---|"]
    for label, s in summaries.items():
        lines.append(f"| {label} | {s['layers']} | {', '.join(map(str, s['snapshots']))} | {s['slope']:.4g} | "
                     f"{s['r']:.3f} | {s['mean_dm']:.4g} | {s['mean_dd']:.4g} |")
        by_part = {}
        for p in points:
            if p.adapter == label:
                by_part.setdefault(p.module.split(".", 1)[0], []).append(p)
        for part, pts in sorted(by_part.items()) if len(by_part) > 1 else []:  # UNet and text encoders apart
            t = summarise(pts)
            lines.append(f"| {label} · {part} | {t['layers']} | | {t['slope']:.4g} | {t['r']:.3f} | "
                         f"{t['mean_dm']:.4g} | {t['mean_dd']:.4g} |")
    lines += ["", "## Pictures", "", f"Columns: {' | '.join(models)}; one row per seed and image.", ""]
    for j, (kind, prompt) in enumerate(prompts):
        rows, labels = [], []
        for s in cfg.seeds:
            for i in range(cfg.images_per_prompt):
                rows.append([_upscale(images[m][(j, s)][i]) for m in models])
                labels.append(f"seed {s}" + (f" #{i}" if cfg.images_per_prompt > 1 else ""))
        name = f"{kind}_{j:02d}.png"
        image_grid(rows, labels, column_labels=models).save(grids / name)
        lines += [f"### {kind}: {prompt}", "", f"![{prompt}](grids/{name})", ""]
    cell = _upscale(images[models[0]][(0, cfg.seeds[0])][0]).size
    image_grid([[im.convert("RGB").resize(cell, Image.BICUBIC) for im in instances]]).save(folder / "instances.png")
    scatter_plot([(label, [p for p in points if p.adapter == label]) for label in summaries]).save(
        folder / "weight_analysis.png")
    (folder / "report.md").write_text("\n".join(lines))
    (folder / "metrics.json").write_text(json.dumps({
        "config": asdict(cfg), "prompts": [{"kind": k, "prompt": p} for k, p in prompts],
        "metrics": results, "weight_analysis": summaries, "points": points_as_dicts(points)}, indent=1))


def evaluate(cfg: EvalConfig, progress: bool = True) -> tuple[Path, dict]:
    """Run the evaluation; returns (output folder, metrics)."""
    from .data import load_image_folder

    instances = [e.image for e in load_image_folder(cfg.instance_data_dir)]
    sources = parse_sources(cfg.adapters)
    out = check_output_target(cfg.output_dir, "evaluation-report", overwrite=cfg.overwrite, what="output_dir",
                              flag="--overwrite", sources=(cfg.instance_data_dir, *(a.path.parent for _, _, a in sources)))
    subject = cfg.subject_prompts or sorted({a.info.instance_prompt for _, _, a in sources} - {None})
    if not subject:
        raise ConfigError("subject_prompts is not set and the adapters record no instance prompt")
    prompts = [("subject", p) for p in subject] + [("class", p) for p in cfg.class_prompts] + \
              [("unrelated", p) for p in cfg.unrelated_prompts]
    device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    base_path = Path(resolve_model(cfg.base_model))

    # feature models first: a hub id that cannot load should fail before minutes of generation
    embedders = [DinoEmbedder(cfg.dino_model, device)] if cfg.dino_model else []
    clip = ClipEmbedder(cfg.clip_model, device) if cfg.clip_model else None
    embedders += [clip] if clip else []

    # every adapter must fit the base before any long work starts
    models = pipeline_models(load_pipeline(cfg.base_model))
    for label, _, adapter in sources:
        check_fits(adapter, models)
        recorded = adapter.info.base_model
        if recorded and recorded != cfg.base_model and resolve_model(recorded) != str(base_path):
            log.warning("%s was trained on %s, evaluated on %s", label, recorded, cfg.base_model)

    # weight analysis on fp32 copies of the base, one per adapter
    points = []
    for label, path, adapter in tqdm(sources, desc="weight analysis", disable=not progress):
        models = models or pipeline_models(load_pipeline(cfg.base_model))
        apply_to_models(adapter, models)
        points += analyse(models, label, path, cfg.analysis_modules, final=adapter)
        models = None
    summaries = {label: summarise([p for p in points if p.adapter == label]) for label, _, _ in sources}

    pipe = load_pipeline(cfg.base_model, torch_dtype=torch.float16 if device.type == "cuda" else torch.float32)
    pipe.to(device)
    for i, (_, path, _) in enumerate(sources):
        load_adapter(pipe, path, adapter_name=f"adapter{i}")
    size = cfg.resolution or pipe.unet.config.sample_size * pipe.vae_scale_factor
    images = generate(pipe, ["base"] + [label for label, _, _ in sources], prompts, cfg, size, progress)
    del pipe

    if (base_path / "classifier" / "model.safetensors").is_file():  # the embedded world's judge
        embedders.append(ToyEmbedder(base_path / "classifier", size))
    results = compute_metrics(images, prompts, instances, embedders, clip, cfg.seeds, cfg.identifier)
    names = metric_names(embedders, clip)

    with atomic_dir(out, "evaluation-report") as tmp:
        write_report(tmp, cfg, prompts, images, instances, results, names, points, summaries)
    return out, {"metrics": results, "weight_analysis": summaries, "names": names}


def summary_lines(result: dict) -> list[str]:
    """A short plain-text summary for the terminal."""
    lines = []
    for m, r in result["metrics"].items():
        cells = [f"{k} {v['mean']:.3f}" for k, v in r.items()]
        lines.append(f"  {m}: " + ", ".join(cells))
    for label, s in result["weight_analysis"].items():
        lines.append(f"  {label}: weight slope dM/dD {s['slope']:.3g} (r {s['r']:.2f}, {s['points']} points)")
    return lines


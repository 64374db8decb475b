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

    config.py      the settings (EvalConfig)
    generation.py  which adapters, and every model's pictures from the same latents
    metrics.py     DINO / CLIP / toy embedders, SSIM, MSE, and the per-seed metric table
    analysis.py    the DoRA paper's magnitude / direction analysis and its scatter plot
    report.py      report.md, metrics.json, grids; the terminal summary
"""

from __future__ import annotations

import dataclasses

import logging
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..adapters.file import apply_to_models, check_fits, load_adapter
from ..training.config import ConfigError
from ..families import family_of_pipeline, pipeline_models
from ..families.models import load_pipeline, resolve_model
from ..outputs import atomic_dir, check_output_target, claim_output
from .analysis import analyse, summarise
from .config import USAGE, EvalConfig, load_eval_config
from .generation import generate, parse_sources
from .metrics import ClipEmbedder, DinoEmbedder, ToyEmbedder, clip_text, compute_metrics
from .report import metric_names, summary_lines, write_report

__all__ = ["USAGE", "EvalConfig", "clip_text", "evaluate", "load_eval_config", "summary_lines"]
log = logging.getLogger(__name__)


def evaluate(cfg: EvalConfig, progress: bool = True) -> tuple[Path, dict]:
    """Run the evaluation; returns (output folder, metrics)."""
    from ..training.data import load_image_folder

    instances = [e.image for e in load_image_folder(cfg.instance_data_dir)]
    sources = parse_sources(cfg.adapters)
    target = dict(overwrite=cfg.overwrite, what="output_dir", flag="--overwrite",
                  sources=(cfg.instance_data_dir, *(a.path.parent for _, _, a in sources)))
    out = check_output_target(cfg.output_dir, "evaluation-report", **target)
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
    tokens = [{}] + [load_adapter(pipe, path, adapter_name=f"adapter{i}")["tokens"]
                     for i, (_, path, _) in enumerate(sources)]
    size = cfg.resolution or family_of_pipeline(pipe).native_size(pipe)
    if cfg.guidance_scale is None:  # the report states the value drawn with
        cfg = dataclasses.replace(cfg, guidance_scale=family_of_pipeline(pipe).default_guidance)
    images = generate(pipe, ["base"] + [label for label, _, _ in sources], prompts, cfg, size, progress, tokens)
    del pipe

    if (base_path / "classifier" / "model.safetensors").is_file():  # the embedded world's judge
        embedders.append(ToyEmbedder(base_path / "classifier", size))
    results = compute_metrics(images, prompts, instances, embedders, clip, cfg.seeds, cfg.identifier)
    names = metric_names(embedders, clip)

    with claim_output(cfg.output_dir, "evaluation-report", command="evaluate", **target) as out:
        with atomic_dir(out, "evaluation-report") as tmp:
            write_report(tmp, cfg, prompts, images, instances, results, names, points, summaries)
    return out, {"metrics": results, "weight_analysis": summaries, "names": names}



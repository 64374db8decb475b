"""The report folder's contents: report.md (tables, plot, grids), metrics.json, the pictures; and
the terminal summary."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from PIL import Image

from ..training.validation import image_grid
from .analysis import points_as_dicts, scatter_plot, summarise
from .config import EvalConfig


def _upscale(im: Image.Image, min_side: int = 128) -> Image.Image:
    if min(im.size) >= min_side:
        return im
    k = -(-min_side // min(im.size))
    return im.resize((im.width * k, im.height * k), Image.NEAREST)


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


def summary_lines(result: dict) -> list[str]:
    """A short plain-text summary for the terminal."""
    lines = []
    for m, r in result["metrics"].items():
        cells = [f"{k} {v['mean']:.3f}" for k, v in r.items()]
        lines.append(f"  {m}: " + ", ".join(cells))
    for label, s in result["weight_analysis"].items():
        lines.append(f"  {label}: weight slope dM/dD {s['slope']:.3g} (r {s['r']:.2f}, {s['points']} points)")
    return lines

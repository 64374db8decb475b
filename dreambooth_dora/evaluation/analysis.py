"""The DoRA paper's weight-decomposition analysis (Liu et al. 2024, section 3.2 and Figure 2).

For an adapted layer with base weight W0 (out, in) and trained weight W' (the merged weight),
per output row n (the paper's ||.||_c: one norm per output feature)::

    dM = mean_n | ||W'_n|| - ||W0_n|| |        magnitude change
    dD = mean_n ( 1 - cos(W'_n, W0_n) )        directional change

For DoRA ||W'_n|| is the learned magnitude m_n; for LoRA it is whatever W0 + s*B@A implies.
One point per (layer, snapshot); the paper finds a negative dM-on-dD slope across layers and
training steps for full fine-tuning and DoRA, and a positive one for LoRA.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from ..adapters.file import AdapterFile, read_adapter
from ..adapters.inject import _matches, adapted_layers, load_adapter_state_dict
from ..training.checkpoints import checkpoint_step, list_checkpoints
from ..outputs import ADAPTER_FILE


@torch.no_grad()
def weight_change(w0: torch.Tensor, w: torch.Tensor) -> tuple[float, float]:
    """(dM, dD) of a trained weight `w` against its base `w0` (conv kernels flattened per row)."""
    w0, w = w0.flatten(1).double(), w.flatten(1).double()
    dm = (w.norm(dim=1) - w0.norm(dim=1)).abs().mean()
    dd = (1 - F.cosine_similarity(w, w0, dim=1, eps=1e-12)).mean()
    return float(dm), float(dd)


def fit_line(x, y) -> tuple[float, float, float]:
    """Least-squares y = slope * x + intercept, and Pearson's r (nan where undefined)."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if len(x) < 2 or np.ptp(x) == 0:
        return float("nan"), float("nan"), float("nan")
    xc, yc = x - x.mean(), y - y.mean()
    slope = float((xc * yc).sum() / (xc * xc).sum())
    denom = np.sqrt((xc * xc).sum() * (yc * yc).sum())
    r = float((xc * yc).sum() / denom) if denom > 0 else float("nan")
    return slope, float(y.mean() - slope * x.mean()), r


@dataclass
class LayerPoint:
    adapter: str  # label
    step: int  # training step of the snapshot
    module: str  # "<prefix>.<module path>"
    dm: float
    dd: float


def snapshots(path: str | Path, final: AdapterFile | None = None) -> list[tuple[int, Path]]:
    """(step, adapter file) for every finished checkpoint of a run folder, then its final adapter;
    a single adapter file or folder without checkpoints gives one snapshot. `final`: the folder's
    adapter when the caller has already read it."""
    path = Path(path)
    final = final or read_adapter(path)
    found = []
    if path.is_dir():
        found = [(checkpoint_step(c), c / ADAPTER_FILE) for c in list_checkpoints(path) if (c / ADAPTER_FILE).is_file()]
    last = int(final.info.steps or (found[-1][0] if found else 0))
    found = [(s, p) for s, p in found if s != last]  # the final adapter stands for its step
    return found + [(last, final.path)]


@torch.no_grad()
def analyse(models: dict[str, torch.nn.Module], label: str, path: str | Path,
            modules: list[str] | None = None, final: AdapterFile | None = None) -> list[LayerPoint]:
    """Points for every adapted layer whose name matches `modules` (PEFT suffix rule; None = all),
    at every snapshot of `path`. `models` must already carry this adapter's layers
    (`export.apply_to_models`); each snapshot's tensors are loaded into them in turn. `final`:
    the adapter of `path`, when already read."""
    final = final or read_adapter(path)
    points = []
    for step, file in snapshots(path, final):
        adapter = final if file == final.path else read_adapter(file)
        for prefix, model in models.items():
            part = adapter.part(prefix, model)
            if not part:
                continue
            load_adapter_state_dict(model, part)
            for name, layer in adapted_layers(model):
                if modules is None or _matches(name, modules):
                    dm, dd = weight_change(layer.weight, layer.merged_weight())
                    points.append(LayerPoint(label, step, f"{prefix}.{name}", dm, dd))
    return points


def summarise(points: list[LayerPoint]) -> dict:
    slope, intercept, r = fit_line([p.dd for p in points], [p.dm for p in points])
    return {"points": len(points), "layers": len({p.module for p in points}),
            "snapshots": sorted({p.step for p in points}), "slope": slope, "intercept": intercept, "r": r,
            "mean_dm": float(np.mean([p.dm for p in points])) if points else float("nan"),
            "mean_dd": float(np.mean([p.dd for p in points])) if points else float("nan")}


PALETTE = [(214, 39, 40), (31, 119, 180), (44, 160, 44), (148, 103, 189), (255, 127, 14), (140, 86, 75)]


def _ticks(lo: float, hi: float) -> list[float]:
    return [lo + (hi - lo) * k / 2 for k in range(3)]


def scatter_plot(groups: list[tuple[str, list[LayerPoint]]], panel=(300, 260)) -> Image.Image:
    """One panel per adapter: dD on x, dM on y, a point per (layer, snapshot), early snapshots
    light and the last one dark, and the least-squares line with its slope in the title."""
    pw, ph = panel
    left, bottom, top, right = 58, 34, 48, 12
    img = Image.new("RGB", (pw * max(len(groups), 1), ph + 16), "white")
    draw = ImageDraw.Draw(img)
    for g, (label, pts) in enumerate(groups):
        ox = g * pw
        x0, x1, y0, y1 = ox + left, ox + pw - right, top, ph - bottom
        draw.rectangle([x0, y0, x1, y1], outline="black")
        colour = PALETTE[g % len(PALETTE)]
        s = summarise(pts)
        draw.text((ox + 6, 4), f"{label}", fill=colour)
        draw.text((ox + 6, 16), f"slope {s['slope']:.3g}  r {s['r']:.2f}  ({s['points']} pts)", fill="black")
        if not pts:
            continue
        xs, ys = [p.dd for p in pts], [p.dm for p in pts]
        xlo, xhi = min(xs), max(xs)
        ylo, yhi = min(ys), max(ys)
        xpad, ypad = (xhi - xlo) * 0.06 or abs(xhi) * 0.1 or 1e-6, (yhi - ylo) * 0.06 or abs(yhi) * 0.1 or 1e-6
        xlo, xhi, ylo, yhi = xlo - xpad, xhi + xpad, ylo - ypad, yhi + ypad

        def px(x, y):
            return (x0 + (x - xlo) / (xhi - xlo) * (x1 - x0), y1 - (y - ylo) / (yhi - ylo) * (y1 - y0))

        for t in _ticks(xlo, xhi):
            x, _ = px(t, ylo)
            draw.line([x, y1, x, y1 + 3], fill="black")
            draw.text((x - 14, y1 + 5), f"{t:.2g}", fill="black")
        for t in _ticks(ylo, yhi):
            _, y = px(xlo, t)
            draw.line([x0 - 3, y, x0, y], fill="black")
            draw.text((ox + 2, y - 5), f"{t:.2g}", fill="black")
        draw.text((x1 - 60, y1 + 18), "dD (direction)", fill="black")
        draw.text((ox + 2, y0 - 12), "dM (magnitude)", fill="black")
        steps = sorted({p.step for p in pts})
        for p in sorted(pts, key=lambda p: p.step):
            f = 0.25 + 0.75 * (steps.index(p.step) + 1) / len(steps)  # light = early, dark = last
            c = tuple(int(255 - (255 - v) * f) for v in colour)
            x, y = px(p.dd, p.dm)
            draw.ellipse([x - 2.5, y - 2.5, x + 2.5, y + 2.5], fill=c)
        if np.isfinite(s["slope"]):  # the fitted line, clipped to the plot area
            a, b = s["slope"], s["intercept"]
            lo, hi = xlo, xhi
            if a != 0:
                ends = sorted(((ylo - b) / a, (yhi - b) / a))
                lo, hi = max(lo, ends[0]), min(hi, ends[1])
            if lo < hi:
                draw.line([px(lo, a * lo + b), px(hi, a * hi + b)], fill=colour, width=2)
    return img


def points_as_dicts(points: list[LayerPoint]) -> list[dict]:
    return [asdict(p) for p in points]

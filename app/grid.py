"""`python -m app.grid SETTINGS.json --out NEW.png`: draw a saved X/Y grid again from its JSON.

The JSON the app saves beside each grid names the base model, every column's source (adapter or
checkpoint folder, merged pipeline, or a UI view of an adapter column) and the grid's settings;
this rebuilds the same columns and draws the same cells from the same initial latents. NEW.png
must not exist (nothing is replaced).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def comparison_from(settings: dict, base: str | None = None, device: str | None = None):
    """A Comparison holding the columns the saved grid used."""
    from .core import Comparison

    comp = Comparison(base or settings["base_model"], device=device, max_work=10**15)
    for label, col in settings["columns"].items():
        if col["kind"] in ("adapter", "merged"):
            comp.load(label, col["path"], step=col.get("step"))
    for label, col in settings["columns"].items():  # views after the columns they show
        if col["kind"] == "view":
            comp.add_view(col["source"], col["rule"], label=label)
    return comp


def redraw(settings: dict, comp):
    """(spec, pictures) of the saved grid, drawn again."""
    from .core import GridSpec

    spec = GridSpec(**settings["grid"])
    for _ in comp.draw_grid(spec):
        pass
    return comp.last_grid


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m app.grid", description=__doc__.splitlines()[0])
    parser.add_argument("settings", help="the JSON saved beside a grid")
    parser.add_argument("--out", required=True, help="the new PNG (must not exist)")
    parser.add_argument("--base", help="another location of the same base model")
    parser.add_argument("--device")
    args = parser.parse_args(argv)
    out = Path(args.out)
    if out.exists():
        print(f"error: {out} exists; give a new file", file=sys.stderr)
        return 2
    try:
        settings = json.loads(Path(args.settings).read_text(encoding="utf-8"))
        settings["grid"], settings["columns"], settings["base_model"]
    except (OSError, ValueError, KeyError) as err:
        print(f"error: {args.settings} is not a saved grid's settings ({type(err).__name__}: {err})", file=sys.stderr)
        return 2
    missing = [c["path"] for c in settings["columns"].values() if c.get("path") and not Path(c["path"]).exists()]
    if missing:  # before the base model loads
        print(f"error: the grid's column source {missing[0]!r} is not there (moved or deleted?)", file=sys.stderr)
        return 2
    from dreambooth_dora.outputs import atomic_path

    from .core import AppError, grid_picture

    try:
        comp = comparison_from(settings, args.base, args.device)
        spec, pictures = redraw(settings, comp)
    except AppError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    with atomic_path(out) as tmp:
        grid_picture(spec, pictures).save(tmp, format="PNG")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

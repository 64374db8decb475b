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


def source_of(col: dict, folder: Path) -> Path | None:
    """Where a saved column's files are now: the absolute path it was saved with, else the same
    place relative to the JSON's folder (the grid and its sources moved together), else None."""
    if not col.get("path"):
        return None
    saved = Path(col["path"])
    if saved.exists():
        return saved
    moved = (folder / col["relative_path"]).resolve() if col.get("relative_path") else None
    if moved is not None and moved.exists():
        return moved
    return None if saved.is_absolute() else (folder / saved if (folder / saved).exists() else None)


def comparison_from(settings: dict, base: str | None = None, device: str | None = None, folder: Path = Path(".")):
    """A Comparison holding the columns the saved grid used (their sources found by `source_of`)."""
    from .core import Comparison

    comp = Comparison(base or settings["base_model"], device=device, max_work=10**15)
    for label, col in settings["columns"].items():
        if col["kind"] in ("adapter", "merged"):
            comp.load(label, source_of(col, folder), step=col.get("step"))
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
    from dreambooth_dora.families.models import quiet_libraries

    quiet_libraries()  # like the app: the libraries' load reports would bury the one line that matters
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
    folder = Path(args.settings).resolve().parent
    missing = [c["path"] for c in settings["columns"].values() if c.get("path") and source_of(c, folder) is None]
    if missing:  # before the base model loads
        print(f"error: the grid's column source {missing[0]!r} is not there (moved or deleted?)", file=sys.stderr)
        return 2
    from dreambooth_dora.outputs import atomic_path

    from .core import AppError, grid_picture

    try:
        comp = comparison_from(settings, args.base, args.device, folder)
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

"""The command-line layer: `dreambooth-dora <command>` and `train_dreambooth_dora.py`.

Errors a user can fix (bad settings, bad data) print one line and exit with status 2.
"""

from __future__ import annotations

import os
import sys

from .models import quiet_libraries

USAGE = """usage: dreambooth-dora <command> [options]

commands:
  train    train a DoRA/LoRA adapter: dreambooth-dora train --config train_configs/X.yaml [--flag value ...]
           (the same as: accelerate launch train_dreambooth_dora.py --config ...)
  export   dreambooth-dora export ADAPTER_DIR --format fused --out DIR        (a merged diffusers pipeline)
           dreambooth-dora export ADAPTER_DIR --format kohya --out FILE.safetensors [--comfyui]
  evaluate dreambooth-dora evaluate --config train_configs/evaluate/X.yaml [--adapters A,B ...]
           (DINO / CLIP fidelity, prior drift, magnitude/direction analysis -> a report folder)
  info     dreambooth-dora info ADAPTER_DIR_OR_FILE                           (method, rank, targets, base)
  app      dreambooth-dora app [--base MODEL] [--dora DIR] [--lora DIR] [--port N]  (the comparison app)
"""


def _user_errors():
    from .config import ConfigError
    from .data import DataError
    from .evaluation.metrics import MetricModelError
    from .models import ModelLoadError
    from .outputs import OutputError
    from .adapter_file import AdapterError
    from .train import TrainingError

    return (ConfigError, DataError, TrainingError, ModelLoadError, AdapterError, MetricModelError, OutputError, OSError)


def _one_line(err: BaseException) -> str:
    """The first line of an error; an OSError as 'what: path' (a full disk, a missing folder)."""
    if isinstance(err, OSError) and err.strerror:
        where = f": {err.filename!r}" if err.filename else ""
        return f"{err.strerror}{where}"
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


def train_main(argv: list[str] | None = None) -> int:
    from .config import help_text, load_config
    from .train import train

    argv = sys.argv[1:] if argv is None else argv
    quiet_libraries()
    if argv and argv[0] in ("-h", "--help"):
        print(help_text())
        return 0
    try:
        cfg = load_config(argv)
        path = train(cfg)
    except _user_errors() as err:
        print(f"error: {_one_line(err)}", file=sys.stderr)
        return 2
    if os.environ.get("RANK", "0") == "0":  # once, not once per process
        flag = "--dora" if cfg.use_dora else "--lora"
        print(f"adapter saved to {path}\ncompare it with the base model: "
              f"python -m app --base {cfg.pretrained_model_name_or_path} {flag} {path.parent}")
    return 0


def export_main(argv: list[str]) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="dreambooth-dora export")
    parser.add_argument("adapter", help="adapter folder (or its .safetensors file)")
    parser.add_argument("--format", choices=["fused", "kohya"], required=True)
    parser.add_argument("--out", required=True, help="folder (fused) or .safetensors file (kohya)")
    parser.add_argument("--base", help="base model; default: the one recorded in the adapter")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an earlier export of the same format at --out (never anything else)")
    parser.add_argument("--comfyui", action="store_true",
                        help="kohya: write dora_scale for ComfyUI's loader (exact there, wrong in LyCORIS/A1111)")
    args = parser.parse_args(argv)
    from .export import export_fused, export_kohya

    try:
        if args.format == "fused":
            out = export_fused(args.adapter, args.out, base=args.base, overwrite=args.overwrite)
        else:
            if not args.out.endswith(".safetensors"):
                print("error: --out must be a .safetensors file for --format kohya", file=sys.stderr)
                return 2
            out = export_kohya(args.adapter, args.out, base=args.base, comfyui_compatible=args.comfyui,
                               overwrite=args.overwrite)
    except _user_errors() as err:
        print(f"error: {_one_line(err)}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


def evaluate_main(argv: list[str]) -> int:
    from .config import help_text
    from .evaluation import USAGE, EvalConfig, evaluate, load_eval_config, summary_lines

    if argv and argv[0] in ("-h", "--help"):
        print(help_text(EvalConfig, USAGE))
        return 0
    try:
        cfg = load_eval_config(argv)
        out, result = evaluate(cfg)
    except _user_errors() as err:
        print(f"error: {_one_line(err)}", file=sys.stderr)
        return 2
    print("\n".join(summary_lines(result)))
    print(f"report: {out / 'report.md'}")
    return 0


def info_main(argv: list[str]) -> int:
    import argparse
    import json

    parser = argparse.ArgumentParser(prog="dreambooth-dora info")
    parser.add_argument("adapter", help="adapter folder or .safetensors file")
    parser.add_argument("--json", action="store_true", help="print JSON")
    args = parser.parse_args(argv)
    from .adapter_file import describe

    try:
        d = describe(args.adapter)
    except _user_errors() as err:
        print(f"error: {_one_line(err)}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(d.as_dict(), indent=2))
        return 0
    print(f"{d.file}\n  method: {d.method}\n  base model: {d.base_model}\n"
          f"  steps: {d.steps}\n  instance prompt: {d.instance_prompt}\n  parameters: {d.parameters:,}")
    for prefix, p in d.parts.items():
        print(f"  {prefix}: rank {p.rank}, alpha {p.alpha:g}, {p.modules} modules "
              f"({', '.join(p.targets)}), {p.parameters:,} parameters")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    quiet_libraries()
    if command == "train":
        return train_main(rest)
    if command == "export":
        return export_main(rest)
    if command == "info":
        return info_main(rest)
    if command == "evaluate":
        return evaluate_main(rest)
    if command == "app":
        from app.main import main as app_main

        return app_main(rest)
    print(f"error: unknown command {command!r}\n{USAGE}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())

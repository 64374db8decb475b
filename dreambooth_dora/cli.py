"""The command-line layer: `dreambooth-dora <command>` and `train_dreambooth_dora.py`.

Errors a user can fix (bad settings, bad data) print one line and exit with status 2.
"""

from __future__ import annotations

import os
import sys

from .families.models import quiet_libraries

USAGE = """usage: dreambooth-dora <command> [options]

commands:
  train    train a DoRA/LoRA adapter: dreambooth-dora train --config train_configs/X.yaml [--flag value ...]
           (the same as: accelerate launch train_dreambooth_dora.py --config ...)
  export   dreambooth-dora export ADAPTER_DIR --format fused --out DIR        (a merged diffusers pipeline)
           dreambooth-dora export ADAPTER_DIR --format kohya --out FILE.safetensors [--comfyui]
           dreambooth-dora export ADAPTER_DIR --format full --out FILE.safetensors   (exact in every UI)
           dreambooth-dora export ADAPTER_DIR --format kohya-lora --rank R --out FILE.safetensors (SVD)
           (all: [--dtype fp32|fp16|bf16] [--overwrite])
  evaluate dreambooth-dora evaluate --config train_configs/evaluate/X.yaml [--adapters A,B ...]
           (DINO / CLIP fidelity, prior drift, magnitude/direction analysis -> a report folder)
  study    dreambooth-dora study --config train_configs/study/X.yaml [--resume]
           (DoRA vs LoRA over training seeds and learning rates, 95% intervals -> study.md)
  info     dreambooth-dora info FILE_OR_DIR     (any adapter, export or fused folder: format, rank, exact in)
  verify   dreambooth-dora verify FILE --against ADAPTER_DIR [--base MODEL]  (every UI's merge vs the truth)
  app      dreambooth-dora app [--base MODEL] [--adapter LABEL=DIR ...] [--run DIR] [--port N]  (the comparison app)
"""


def _user_errors():
    from .training.config import ConfigError
    from .training.data import DataError
    from .evaluation.metrics import MetricModelError
    from .families.models import ModelLoadError
    from .outputs import OutputError
    from .adapters.file import AdapterError
    from .training.loop import TrainingError

    return (ConfigError, DataError, TrainingError, ModelLoadError, AdapterError, MetricModelError, OutputError, OSError)


def _one_line(err: BaseException) -> str:
    """The first line of an error; an OSError as 'what: path' (a full disk, a missing folder)."""
    if isinstance(err, OSError) and err.strerror:
        where = f": {err.filename!r}" if err.filename else ""
        return f"{err.strerror}{where}"
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


def train_main(argv: list[str] | None = None) -> int:
    from .training.config import help_text, load_config
    from .training.control import STOPPED_STATUS, TrainingStopped
    from .training.loop import train

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
    except TrainingStopped as stopped:  # SIGTERM: a checkpoint of the last step, then this
        if os.environ.get("RANK", "0") == "0":
            print(str(stopped), file=sys.stderr)
        return STOPPED_STATUS
    if os.environ.get("RANK", "0") == "0":  # once, not once per process
        flag = "--dora" if cfg.use_dora else "--lora"
        print(f"adapter saved to {path}\ncompare it with the base model: "
              f"python -m app --base {cfg.pretrained_model_name_or_path} {flag} {path.parent}")
    return 0


def export_main(argv: list[str]) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="dreambooth-dora export")
    parser.add_argument("adapter", help="adapter folder (or its .safetensors file)")
    parser.add_argument("--format", choices=["fused", "kohya", "full", "kohya-lora"], required=True,
                        help="fused: a merged pipeline folder; kohya: LoRA/DoRA file for UIs; full: exact "
                             "weight differences every UI applies the same way (A1111 included); kohya-lora: "
                             "a plain LoRA of --rank re-extracted by SVD (for UIs without DoRA; error printed)")
    parser.add_argument("--rank", type=int, help="kohya-lora: the rank of the re-extracted LoRA")
    parser.add_argument("--out", required=True, help="folder (fused) or .safetensors file (kohya, full)")
    parser.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default="fp32",
                        help="stored precision (DoRA scales and differences are computed in fp32 first)"),
    parser.add_argument("--base", help="base model; default: the one recorded in the adapter")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an earlier export of the same format at --out (never anything else)")
    parser.add_argument("--comfyui", action="store_true",
                        help="kohya: write dora_scale for ComfyUI's loader (exact there, wrong in LyCORIS/A1111)")
    args = parser.parse_args(argv)
    from .formats.export import export_full, export_fused, export_kohya, export_svd_lora, precision_said

    if args.format != "fused" and not args.out.lower().endswith(".safetensors"):
        print(f"error: --out must be a .safetensors file for --format {args.format}", file=sys.stderr)
        return 2
    if args.comfyui and args.format != "kohya":
        print("error: --comfyui applies to --format kohya only", file=sys.stderr)
        return 2
    if (args.format == "kohya-lora") != (args.rank is not None) or (args.rank is not None and args.rank < 1):
        print("error: --format kohya-lora needs --rank R (R >= 1), and --rank applies to it only", file=sys.stderr)
        return 2
    try:
        if args.format == "fused":
            out = export_fused(args.adapter, args.out, base=args.base, overwrite=args.overwrite, dtype=args.dtype)
        elif args.format == "full":
            out = export_full(args.adapter, args.out, base=args.base, overwrite=args.overwrite, dtype=args.dtype)
        elif args.format == "kohya-lora":
            out, error = export_svd_lora(args.adapter, args.out, args.rank, base=args.base, overwrite=args.overwrite,
                                         dtype=args.dtype)
            print(f"rank-{args.rank} re-extraction: max over layers ||LoRA - change|| / ||change|| = {error:.3e}")
        else:
            out = export_kohya(args.adapter, args.out, base=args.base, comfyui_compatible=args.comfyui,
                               overwrite=args.overwrite, dtype=args.dtype)
    except _user_errors() as err:
        print(f"error: {_one_line(err)}", file=sys.stderr)
        return 2
    size = sum(f.stat().st_size for f in ([out] if out.is_file() else out.rglob("*")) if f.is_file())
    print(f"wrote {out} ({size / 2**20:.1f} MiB)")
    said = precision_said(out)
    if said:
        print(said)
    return 0


def verify_main(argv: list[str]) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="dreambooth-dora verify",
                                     description="merge FILE with every UI's rule and compare with the adapter")
    parser.add_argument("file", help="a kohya / full export, an adapter, or a fused pipeline folder")
    parser.add_argument("--against", required=True, help="the adapter (folder or file) the export was made from")
    parser.add_argument("--base", help="base model; default: the one recorded in the adapter")
    parser.add_argument("--summary", action="store_true", help="only the max / median / verdict rows")
    args = parser.parse_args(argv)
    from .formats.verify import verify

    try:
        report = verify(args.file, args.against, base=args.base)
    except _user_errors() as err:
        print(f"error: {_one_line(err)}", file=sys.stderr)
        return 2
    print(f"{report.file} ({report.dtype}): error of each UI's merge relative to the adapter's own change, per "
          "layer (exact: <= 1e-4; a 16-bit file's own rounding is shown as 'rounding: X%'; NaN/inf: WRONG)")
    print("\n".join(report.table(per_layer=not args.summary)))
    if report.unchanged:
        print(f"layers the adapter leaves unchanged, judged against ||W0|| instead: {len(report.unchanged)} "
              f"(e.g. {report.unchanged[0]})")
    if report.advice():
        print(f"note: {report.advice()}")
    if report.missing:
        print(f"layers the file does not cover: {len(report.missing)} (e.g. {report.missing[0]})")
    if report.unmatched:
        print(f"file modules that match no adapted layer: {len(report.unmatched)} (e.g. {report.unmatched[0]})")
    return 0


def evaluate_main(argv: list[str]) -> int:
    from .training.config import help_text
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


def study_main(argv: list[str]) -> int:
    from .training.config import help_text
    from .study import USAGE, StudyConfig, load_study_config, run_study

    if argv and argv[0] in ("-h", "--help"):
        print(help_text(StudyConfig, USAGE))
        return 0
    try:
        cfg = load_study_config(argv)
        report = run_study(cfg)
    except _user_errors() as err:
        print(f"error: {_one_line(err)}", file=sys.stderr)
        return 2
    print(report.read_text(encoding="utf-8").split("![", 1)[0].rstrip())
    print(f"report: {report}")
    return 0


def info_main(argv: list[str]) -> int:
    import argparse
    import json

    parser = argparse.ArgumentParser(prog="dreambooth-dora info")
    parser.add_argument("adapter", help="adapter folder or .safetensors file")
    parser.add_argument("--json", action="store_true", help="print JSON")
    args = parser.parse_args(argv)
    from .adapters.file import describe
    from .formats.info import file_info

    try:
        info = file_info(args.adapter)
        ours = describe(args.adapter) if info.format.startswith("diffusers / PEFT adapter") else None
    except _user_errors() as err:
        print(f"error: {_one_line(err)}", file=sys.stderr)
        return 2
    if args.json:  # our adapters keep their detailed record; every file gets format / exact_in
        extra = {k: v for k, v in info.as_dict().items() if k not in ("parts", "method", "base_model", "parameters")}
        print(json.dumps({**(ours.as_dict() if ours else info.as_dict()), **extra}, indent=2))
        return 0
    print("\n".join(info.lines()))
    if ours:
        print(f"  steps: {ours.steps}\n  instance prompt: {ours.instance_prompt}")
    return 0


def app_main(argv: list[str]) -> int:
    from app.main import main

    return main(argv)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    quiet_libraries()
    commands = {"train": train_main, "export": export_main, "info": info_main, "evaluate": evaluate_main,
                "study": study_main, "verify": verify_main, "app": app_main}
    if command in commands:
        return commands[command](rest)
    print(f"error: unknown command {command!r}\n{USAGE}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())

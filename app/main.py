"""`python -m app` / `dreambooth-dora app`: start the comparison app.

    python -m app --base MODEL [--adapter LABEL=PATH ...] [--run [PREFIX=]RUN_DIR ...] [--view LABEL:comfyui|a1111]
                  [--dora DIR] [--lora DIR] [--port N] [--host 127.0.0.1] [--adapters-root DIR]
                  [--grids-dir DIR] [--max-work N] [--no-train] [--auth USER:PASS] [--models-root DIR]

With no arguments: the embedded default model and the quick start's outputs when they exist.
Safe by default: listens on 127.0.0.1, no public share link unless --share, reads only
.safetensors adapters, and the UI opens folders under --adapters-root only. The Train tab
(uploads, training jobs) is on by default only on 127.0.0.1: on any other address it needs
--auth USER:PASS, or --no-train.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .limits import GPU_FACTOR

QUICKSTART = {"dora": Path("outputs/quickstart_tiny_icon_dora"), "lora": Path("outputs/quickstart_tiny_icon_lora")}


def parse(argv):
    parser = argparse.ArgumentParser(prog="python -m app", description="base | LoRA | DoRA comparison")
    parser.add_argument("--base", default="embedded:toy-world", help="hub id, local diffusers folder or embedded:NAME")
    parser.add_argument("--adapter", action="append", default=[], metavar="LABEL=PATH",
                        help="a column: an adapter folder or file, or a merged pipeline folder (repeat for more)")
    parser.add_argument("--run", action="append", default=[], metavar="[PREFIX=]RUN_DIR",
                        help="a training run's checkpoints and final adapter as columns '<PREFIX> step <N>'")
    parser.add_argument("--view", action="append", default=[], metavar="LABEL:comfyui|a1111",
                        help="adapter column LABEL as ComfyUI / A1111 draws its exported kohya file")
    parser.add_argument("--dora", help="the column 'dora' (same as --adapter dora=DIR)")
    parser.add_argument("--lora", help="the column 'lora' (same as --adapter lora=DIR)")
    parser.add_argument("--grids-dir", help="where saved grids go (default: ADAPTERS_ROOT/grids)")
    parser.add_argument("--adapters-root", help="the only folder the UI may open adapters from (default: outputs/)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: this machine only)")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--share", action="store_true", help="open a public Gradio share link (off by default)")
    parser.add_argument("--device", help="cpu, cuda, ... (default: cuda when available)")
    parser.add_argument("--no-train", action="store_true", help="no Train tab (compare only)")
    parser.add_argument("--auth", metavar="USER:PASS", help="a login for the page (needed for the Train tab when "
                                                             "--host is not a loopback address)")
    parser.add_argument("--models-root", help="folders under it holding a diffusers model are offered as base models "
                                              "in the Train tab")
    parser.add_argument("--max-work", type=int, default=None,
                        help="the most work one request may ask for, width x height x steps x images x columns "
                             "(default: about a minute of SD 1.5 on 2 CPU cores; "
                             f"{GPU_FACTOR}x that on a GPU)")
    return parser.parse_args(argv)


def port_problem(host: str, port: int) -> str | None:
    """Why the server could not listen on host:port (in use, not allowed), checked before any model loads."""
    import socket

    if not 0 < port < 65536:
        return f"--port must be between 1 and 65535, got {port}"
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as err:
        return f"--host {host!r} is not an address of this machine: {err.strerror}"
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server does: TIME_WAIT is no conflict
        try:
            s.bind(address)
        except OSError as err:
            return f"cannot listen on {host}:{port}: {err.strerror} (another server there? pick one with --port)"
    return None


def is_loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def train_problem(args) -> str | None:
    """The Train tab runs commands on this machine: off the loopback address it needs a login."""
    if args.auth is not None:
        user, colon, password = args.auth.partition(":")
        if not colon or not user or not password:
            return "--auth: give USER:PASS (both non-empty)"
    if not args.no_train and args.auth is None and (args.share or not is_loopback(args.host)):
        where = "a public share link" if args.share else f"--host {args.host}"
        return (f"the Train tab would let anyone who reaches {where} run training on this machine: "
                "add --auth USER:PASS, or --no-train")
    if args.models_root and not Path(args.models_root).is_dir():
        return f"--models-root {args.models_root!r} is not a folder"
    return None


def main(argv: list[str] | None = None) -> int:
    from dreambooth_dora.families.models import quiet_libraries

    quiet_libraries()
    args = parse(sys.argv[1:] if argv is None else argv)
    problem = port_problem(args.host, args.port)
    if problem is None and args.max_work is not None and args.max_work < 1:
        problem = f"--max-work must be >= 1, got {args.max_work}"
    if problem is None:
        problem = train_problem(args)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    columns, problem = [], None
    for item in args.adapter:
        name, eq, path = item.partition("=")
        if not eq or not name.strip() or not path.strip():
            problem = f"--adapter {item!r}: give LABEL=PATH"
        columns.append((name.strip(), path.strip()))
    for item in args.view:
        name, colon, rule = item.rpartition(":")
        if not colon or rule not in ("comfyui", "a1111"):
            problem = f"--view {item!r}: give LABEL:comfyui or LABEL:a1111"
    for item in [*(p for _, p in columns), *(r.rpartition("=")[2] for r in args.run), args.dora, args.lora]:
        if item and not Path(item).exists():
            problem = f"{item!r} does not exist"
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    from .core import AppError, Comparison, run_snapshots
    from .core import RULES as VIEWS

    # every column's label, known before any model loads: a label given twice would replace a column
    given = [(slot, f"--{slot}") for slot in ("dora", "lora") if getattr(args, slot)]
    given += [(name, f"--adapter {name}=...") for name, _ in columns]
    for item in args.run:
        prefix, _, folder = item.rpartition("=")
        given += [(f"{(prefix or Path(folder).name).strip()} step {step}", f"--run {item}")
                  for step, _ in run_snapshots(Path(folder))]
    given += [(f"{name} as {VIEWS[rule]}", f"--view {item}")
              for item in args.view for name, _, rule in [item.rpartition(":")]]
    labels = [label for label, _ in given]
    twice = next((label for label in labels if labels.count(label) > 1), None)
    if twice:
        where = " and ".join(dict.fromkeys(flag for label, flag in given if label == twice))
        print(f"error: column label {twice!r} is given twice ({where}); each column needs its own label, or the "
              "second would replace the first", file=sys.stderr)
        return 2
    from .ui import build_ui

    root = args.adapters_root or ("outputs" if Path("outputs").is_dir() else None)
    if not (columns or args.run or args.dora or args.lora):  # nothing asked: the quick start's outputs
        columns = [(slot, str(path)) for slot, path in QUICKSTART.items() if path.is_dir()]
    columns = [(slot, getattr(args, slot)) for slot in ("dora", "lora") if getattr(args, slot)] + columns
    try:
        comp = Comparison(args.base, adapters_root=root, device=args.device, max_work=args.max_work,
                          grids_dir=args.grids_dir)
        for name, path in columns:
            print(comp.load(name, path))
        for item in args.run:
            prefix, _, folder = item.rpartition("=")
            print("added " + ", ".join(comp.add_run(folder, prefix or None)))
        for item in args.view:
            name, _, rule = item.rpartition(":")
            print(comp.add_view(name, rule))
    except (AppError, OSError, ValueError) as err:
        print(f"error: {str(err).splitlines()[0]}", file=sys.stderr)
        return 2
    desk = None
    if not args.no_train:  # jobs and datasets live under the adapters root (outputs/ by default)
        from .train_tab import TrainDesk

        train_root = Path(root or "outputs")
        train_root.mkdir(parents=True, exist_ok=True)
        if comp.root is None:
            comp.root = train_root.resolve()
            comp.grids_dir = comp.grids_dir or comp.root / "grids"
        desk = TrainDesk(comp.root, models_root=args.models_root)
        desk.queue.start()
    demo = build_ui(comp, desk)
    print(f"open http://{args.host}:{args.port}" + (" (and a public share link)" if args.share else ""))
    auth = tuple(args.auth.split(":", 1)) if args.auth else None
    demo.launch(server_name=args.host, server_port=args.port, share=args.share, inbrowser=False, auth=auth)
    return 0

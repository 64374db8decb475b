"""The command-line layer: `dreambooth-dora <command>` and `train_dreambooth_dora.py`.

Errors a user can fix (bad settings, bad data) print one line and exit with status 2.
"""

from __future__ import annotations

import os
import sys

USAGE = """usage: dreambooth-dora <command> [options]

commands:
  train    train a DoRA/LoRA adapter: dreambooth-dora train --config train_configs/X.yaml [--flag value ...]
           (the same as: accelerate launch train_dreambooth_dora.py --config ...)
"""


def _user_errors():
    from .config import ConfigError
    from .data import DataError
    from .train import TrainingError

    return (ConfigError, DataError, TrainingError, FileNotFoundError)


def train_main(argv: list[str] | None = None) -> int:
    from .config import help_text, load_config
    from .train import train

    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("-h", "--help"):
        print(help_text())
        return 0
    try:
        path = train(load_config(argv))
    except _user_errors() as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if os.environ.get("RANK", "0") == "0":  # once, not once per process
        print(f"adapter saved to {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command == "train":
        return train_main(rest)
    print(f"error: unknown command {command!r}\n{USAGE}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())

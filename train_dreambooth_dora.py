"""Entry point: `accelerate launch train_dreambooth_dora.py --config train_configs/X.yaml [--flag value ...]`."""

import sys

from dreambooth_dora.cli import train_main

if __name__ == "__main__":
    sys.exit(train_main())

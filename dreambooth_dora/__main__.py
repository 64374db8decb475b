"""`python -m dreambooth_dora <command>`: the same as the `dreambooth-dora` command."""

import sys

from .cli import main

sys.exit(main())

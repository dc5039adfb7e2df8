"""``python -m saekit``: the command line (this is what ``torchrun -m saekit`` runs)."""

import sys

from saekit.cli import main

sys.exit(main())

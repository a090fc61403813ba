"""``python -m quipu_logging``: the ``quipu-log`` command line."""

import sys

from .cli import main

sys.exit(main())

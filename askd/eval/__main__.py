"""``python -m askd.eval``: see :mod:`askd.eval.cli`."""

import sys

from .cli import main

sys.exit(main())

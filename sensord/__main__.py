"""``python -m sensord``: the same command line as the ``sensord`` script, for a venv whose bin/ is not on PATH."""

import sys

from .cli import main

sys.exit(main())

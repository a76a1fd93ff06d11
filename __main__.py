"""``python -m squeezer`` = the ``squeezer`` command."""

import sys

from .search.cli import main

sys.exit(main())

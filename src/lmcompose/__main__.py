"""``python -m lmcompose``: the same as the ``lmcompose`` console script."""

import sys

from .cli import main

sys.exit(main())

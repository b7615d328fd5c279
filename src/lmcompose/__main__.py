"""``python -m lmcompose``: the same as the ``lmcompose`` console script."""

import sys

from .cli.main import main

sys.exit(main())

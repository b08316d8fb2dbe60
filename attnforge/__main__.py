"""``python -m attnforge`` == the ``attnforge`` console script."""

import sys

from .cli import main

sys.exit(main())

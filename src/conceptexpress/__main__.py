"""``python -m conceptexpress …``: the ``conceptexpress`` command line."""

import sys

from .cli import main

sys.exit(main())

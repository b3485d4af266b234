"""``python -m conceptexpress.testing tiny|sd21 DIR``: write a random pipeline for offline trials."""

from . import _main

raise SystemExit(_main())

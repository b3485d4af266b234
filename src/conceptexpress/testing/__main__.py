"""``python -m conceptexpress.testing {tiny,tiny-sd1,tiny-sdxl,sd21} DIR``: write a random pipeline for offline trials."""

from . import _main

raise SystemExit(_main())

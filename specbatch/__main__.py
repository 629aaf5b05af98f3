"""``python -m specbatch``: the same command line as ``specbatch``."""

import sys

from specbatch.cli import main

sys.exit(main())

"""``python -m bench [--quick]``: the same as ``mmufuzz bench``."""

import sys

from bench.cli import main

sys.exit(main())

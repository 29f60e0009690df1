"""``python -m mmufuzz.bench [--quick]``: the same as ``mmufuzz bench``."""

import sys

from mmufuzz.bench.cli import main

sys.exit(main())

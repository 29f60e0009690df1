"""Atomic file writes: a reader sees the old file or the new one, never half of either.

Campaign outputs, bench results and the instrumentation cache are all written
this way, so a killed process never leaves a truncated file behind.  This
module imports nothing of the project: the instrumentation cache needs it
before the system under test may be imported.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def write_atomic(path: Path, data) -> None:
    """Write ``data`` (str or bytes) so that readers see the old file or the new one, never half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    mode = "wb" if isinstance(data, bytes) else "w"
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode) as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise

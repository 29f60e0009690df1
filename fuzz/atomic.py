"""Atomic file writes: a reader sees the old file or the new one, never half of either.

Campaign outputs, bench results and the instrumentation cache are all written
this way, so a killed process never leaves a truncated file behind.  This
module imports nothing of the project: the instrumentation cache needs it
before the system under test may be imported.
"""

from __future__ import annotations

import os
from pathlib import Path

_TEMP_TRIES = 100


def _create_temp(path: Path) -> tuple[int, Path]:
    """A new, empty file beside ``path``, mode 0666 less the umask (as ``open()`` makes
    files: ``tempfile.mkstemp``'s 0600 would leave every output private to its writer)."""
    for _ in range(_TEMP_TRIES):
        tmp = path.parent / f".{path.name}.{os.getpid()}.{os.urandom(4).hex()}.tmp"
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666), tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"no free temporary name beside {path}")


def write_atomic(path: Path, data) -> None:
    """Write ``data`` (str or bytes) so that readers see the old file or the new one, never half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    mode = "wb" if isinstance(data, bytes) else "w"
    fd, tmp = _create_temp(path)
    try:
        with os.fdopen(fd, mode) as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise

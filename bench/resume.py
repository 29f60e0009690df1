"""Resuming a stopped bench: what was measured is kept, not measured again.

A full bench takes about an hour; one stopped by a reboot or a Ctrl-C at
trial 220 of 225 should not start over.  Each finished phase is in
``results.json`` (rewritten after every phase), and each finished measurement
of the long phases (a time-to-detect trial, a fault's minimization) is written
to ``OUT/work/done/PHASE/KEY.json`` the moment it ends, atomically.
``mmufuzz bench --resume`` takes both back and measures only the rest.

Only the same configuration may resume: numbers measured with another cap,
seed set or fault list would be mixed silently into a report that names one
configuration (options that did not exist when the stopped run began belong
to phases added since, and are taken from the resume).  The code may have
changed in between (a resume is how a phase added later is measured into an
existing run), so each resume records its commit and the report names them.
A fresh run clears what an earlier one left (:data:`OUTPUTS`) and writes its
own ``results.json`` before measuring anything, so a resume never picks up
the phases of a run before the one it continues.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Callable

from mmufuzz.fuzz.atomic import write_atomic
from mmufuzz.bench import report
from mmufuzz.bench.procs import stopping

DONE = "done"
# What a fresh run clears: its measurements and raw findings, minimized and soak reproducers.
OUTPUTS = ("work", "minimized", "soak")
# Configuration fields a resumed run may change: how it was invoked, not what it measures.
NOT_MEASURED = ("command", "out")


class CannotResume(ValueError):
    """The results to resume are missing, unreadable, or of another configuration."""


def stored_results(path: Path, config: dict) -> dict:
    """The results document at ``path``, if it was measured with ``config``."""
    try:
        results = report.load(path)
    except report.BadResults as error:
        raise CannotResume(f"cannot resume: {error}") from None
    stored = results["config"]
    for field in sorted(config.keys() & stored.keys() - set(NOT_MEASURED)):
        if stored[field] != config[field]:
            raise CannotResume(
                f"{path}: cannot resume: field 'config.{field}' is {stored[field]!r}, this "
                f"run's is {config[field]!r} (same options, or another --out)")
    # A field the stored run did not have belongs to a phase added since: it is measured now.
    results["config"] = {**config, **stored}
    return results


def clear(out: Path) -> None:
    """Forget everything an earlier run left in ``out`` (see :data:`OUTPUTS`)."""
    for folder in OUTPUTS:
        shutil.rmtree(out / folder, ignore_errors=True)


class Done:
    """The finished measurements of one phase, one JSON file each."""

    def __init__(self, out: Path, phase: str):
        self.folder = out / "work" / DONE / phase

    def kept(self) -> int:
        return sum(1 for _ in self.folder.glob("*.json"))

    def measure(self, key: str, measure: Callable[[], dict]) -> tuple:
        """``(result, kept)``: the stored result of ``key``, else ``measure()``'s, now stored.

        A file that is not JSON (edited by hand) is measured again.  A
        measurement that ends while the bench is stopping (:data:`stopping`)
        was cut short by the stop: it is not stored, so a resume runs it again.
        """
        path = self.folder / f"{key}.json"
        try:
            return json.loads(path.read_text()), True
        except (FileNotFoundError, json.JSONDecodeError):
            pass
        result = measure()
        if not stopping.is_set():
            write_atomic(path, json.dumps(result, sort_keys=True) + "\n")
        return result, False

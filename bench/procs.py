"""Starting, timing and stopping measurement processes (the parent's side).

Two kinds of process: a :mod:`mmufuzz.bench.child` measurement, which reports JSON
lines on stdout, and a real ``mmufuzz fuzz`` campaign, which reports through
its directory.  Both are timed by the parent's monotonic clock from the moment
they are launched, so every engine pays its own start-up and is timed the same
way.  Only processes started here are ever signalled, by pid.
"""

from __future__ import annotations

import json
import queue
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import psutil

# How often the parent looks for a campaign's first finding.
POLL_SECONDS = 0.05
# A stopping campaign gets this long to stop libFuzzer and its minimizer before SIGKILL.
STOP_SECONDS = 20.0


class MeasurementFailed(RuntimeError):
    """A measurement process died: its numbers would be meaningless, so the bench stops."""


@dataclass
class ChildRun:
    """What a child reported: ``(seconds since launch, record)`` per line, and how it ended."""

    records: list = field(default_factory=list)
    stopped_at_cap: bool = False
    returncode: Optional[int] = None

    def first(self, event: str) -> Optional[tuple]:
        """The first ``(seconds, record)`` whose record has ``event``."""
        return next(((t, r) for t, r in self.records if r.get("event") == event), None)

    def result(self) -> dict:
        """The last record: a measurement's final result (the caller checked there is one)."""
        return self.records[-1][1]


def child_command(kind: str, params: dict) -> list:
    return [sys.executable, "-m", "mmufuzz.bench.child", kind, json.dumps(params, sort_keys=True)]


def run_child(kind: str, params: dict, log: Path, cap: Optional[float] = None,
              until: Optional[str] = None) -> ChildRun:
    """Run a measurement; stop it at ``cap`` seconds or at its first ``until`` event."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "wb") as err:
        launched = time.monotonic()
        proc = subprocess.Popen(child_command(kind, params), stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=err)
    lines: queue.Queue = queue.Queue()

    def read() -> None:
        for line in proc.stdout:
            lines.put((time.monotonic() - launched, line))
        lines.put(None)

    threading.Thread(target=read, daemon=True).start()
    run = ChildRun()
    try:
        while True:
            remaining = None if cap is None else launched + cap - time.monotonic()
            try:
                item = lines.get(timeout=None if remaining is None else max(remaining, 0))
            except queue.Empty:
                run.stopped_at_cap = True
                break
            if item is None:
                break
            seconds, line = item
            record = json.loads(line)
            run.records.append((seconds, record))
            if until is not None and record.get("event") == until:
                break
    finally:
        if proc.poll() is None:
            proc.kill()
        run.returncode = proc.wait()
        proc.stdout.close()
    return run


@dataclass
class CampaignRun:
    """A campaign as the parent saw it: when its first counted finding appeared, if it did."""

    out: Path
    finding: Optional[Path]
    first_finding: Optional[float]
    seconds: float
    returncode: Optional[int]


def _findings(out: Path) -> list:
    folder = out / "findings"
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def run_campaign(args: list, out: Path, log: Path, cap: Optional[float] = None,
                 counts: Optional[Callable[[Path], bool]] = None, jobs: int = 1) -> CampaignRun:
    """``mmufuzz fuzz ARGS --out OUT`` until it exits or ``cap`` passes.

    With ``counts`` (which judges a finding's folder), stop at the first
    finding that counts: the moment its folder is published under
    ``OUT/findings`` (the campaign's own record of it), seen by polling.
    """
    command = [sys.executable, "-m", "mmufuzz.fuzz.cli", "fuzz", *args, "--jobs", str(jobs),
               "--out", str(out)]
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "wb") as output:
        launched = time.monotonic()
        proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=output,
                                stderr=output)
    judged: set = set()
    found = first = None
    try:
        while proc.poll() is None and (cap is None or time.monotonic() - launched < cap):
            time.sleep(POLL_SECONDS)
            if counts is None:
                continue
            now = time.monotonic() - launched
            for folder in _findings(out):
                if folder.name not in judged:
                    judged.add(folder.name)
                    if counts(folder):
                        found, first = folder, now
                        break
            if found is not None:
                break
    finally:
        seconds = time.monotonic() - launched
        stop_campaign(proc)
    return CampaignRun(out, found, first, seconds, proc.returncode)


def stop_campaign(proc: subprocess.Popen) -> None:
    """Stop a campaign the way Ctrl-C does, and its minimizer too; SIGKILL what is left.

    The first SIGINT makes the supervisor stop libFuzzer; it then minimizes
    the pending findings, which a benchmark does not wait for: each minimizer
    it starts is interrupted (the campaign treats that as Ctrl-C).
    """
    try:
        family = psutil.Process(proc.pid).children(recursive=True)
    except psutil.Error:
        family = []
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
    deadline = time.monotonic() + STOP_SECONDS
    while proc.poll() is None and time.monotonic() < deadline:
        for child in _minimizers(proc.pid):
            family.append(child)
            _signal(child, signal.SIGINT)
        time.sleep(POLL_SECONDS)
    for child in family:
        _signal(child, signal.SIGKILL)
    if proc.poll() is None:
        proc.kill()
    proc.wait()


def _minimizers(pid: int) -> list:
    """The ``mmufuzz minimize`` children a campaign started."""
    try:
        children = psutil.Process(pid).children()
    except psutil.Error:
        return []
    found = []
    for child in children:
        try:
            if "minimize" in child.cmdline():
                found.append(child)
        except psutil.Error:
            continue
    return found


def _signal(process: psutil.Process, signum: int) -> None:
    try:
        process.send_signal(signum)
    except psutil.Error:
        pass


# Set while a run_parallel is being stopped.  The measurements still running then end early,
# cut short by the same Ctrl-C (or by the failure's cause): what they return is not a result.
stopping = threading.Event()


def run_parallel(measure: Callable, items: list, jobs: int) -> list:
    """``measure(item)`` for every item, ``jobs`` at a time (each starts one process).

    If one fails, or on Ctrl-C (which the terminal delivers to the running
    measurements' processes too), the queued ones are cancelled, not started,
    and :data:`stopping` is set while the running ones end.
    """
    stopping.clear()
    pool = ThreadPoolExecutor(max_workers=jobs)
    try:
        results = list(pool.map(measure, items))
    except BaseException:
        stopping.set()
        pool.shutdown(cancel_futures=True)
        raise
    pool.shutdown()
    return results

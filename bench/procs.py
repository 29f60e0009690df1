"""Starting, timing and stopping measurement processes (the parent's side).

Two kinds of process: a :mod:`mmufuzz.bench.child` measurement, which reports JSON
lines on stdout, and a real ``mmufuzz fuzz`` campaign, which reports through
its directory.  Both are timed by the parent's monotonic clock from the moment
they are launched, so every engine pays its own start-up and is timed the same
way.  Only processes started here are ever signalled, by pid.

A search (a time-to-detect trial) is given a :class:`Budget` of CPU seconds,
not of wall-clock ones: on a shared machine an engine's wall-clock time says
as much about its neighbours as about it, its CPU time does not.  The
:class:`Meter` reads the CPU time of the whole process tree (a campaign is a
supervisor, a libFuzzer worker and perhaps a minimizer) and notes where its
start-up ended (its first exec), so that the budget is spent on the search
alone and times are reported after start-up as well as from launch.
"""

from __future__ import annotations

import json
import os
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


@dataclass(frozen=True)
class Budget:
    """What a search may spend: ``cpu`` seconds after its start-up.

    ``startup_limit`` CPU seconds bound the start-up itself (an engine that
    never reaches its first exec is broken), and the wall clock bounds the
    whole only as a safety against a process that stops using CPU (its
    limit is generous: a loaded machine gives a process a fraction of a core).
    """

    cpu: float
    startup_limit: float = 120.0

    @property
    def wall(self) -> float:
        return 4 * (self.cpu + self.startup_limit) + 60


def tree_cpu(process: psutil.Process) -> Optional[float]:
    """CPU seconds (user + system) of ``process`` and every descendant, live or reaped.

    A reaped process's time is in its parent's ``children_*`` times, so the
    sum over the live tree of all four fields counts every process once.
    None once ``process`` itself is gone.
    """
    try:
        family = [process, *process.children(recursive=True)]
    except psutil.Error:
        return None
    total = 0.0
    for member in family:
        try:
            times = member.cpu_times()
        except psutil.Error:
            continue
        total += times.user + times.system + times.children_user + times.children_system
    return total


class Meter:
    """The clocks of one launched process tree: wall and CPU since launch, start-up's end."""

    def __init__(self, proc: subprocess.Popen, launched: float):
        self.process = psutil.Process(proc.pid)
        self.launched = launched
        self.startup: Optional[float] = None
        self.last_cpu = 0.0

    def wall(self) -> float:
        return time.monotonic() - self.launched

    def cpu(self) -> float:
        """The tree's CPU seconds now (the last reading once the process is gone)."""
        now = tree_cpu(self.process)
        if now is not None:
            self.last_cpu = max(self.last_cpu, now)
        return self.last_cpu

    def started(self, cpu: Optional[float] = None) -> None:
        """Start-up ended (the first exec ran) at ``cpu`` seconds, or now."""
        if self.startup is None:
            self.startup = self.cpu() if cpu is None else cpu

    def spent(self, budget: Budget) -> bool:
        if self.wall() >= budget.wall:
            return True
        if self.startup is None:
            return self.cpu() >= budget.startup_limit
        return self.cpu() - self.startup >= budget.cpu


@dataclass
class ChildRun:
    """What a child reported: ``(seconds since launch, record)`` per line, and how it ended."""

    records: list = field(default_factory=list)
    stopped_at_cap: bool = False
    returncode: Optional[int] = None
    # With a budget: CPU seconds at the end of start-up and at the end, as the meter read them.
    startup: Optional[float] = None
    cpu: Optional[float] = None

    def first(self, event: str) -> Optional[tuple]:
        """The first ``(seconds, record)`` whose record has ``event``."""
        return next(((t, r) for t, r in self.records if r.get("event") == event), None)

    def result(self) -> dict:
        """The last record: a measurement's final result (the caller checked there is one)."""
        return self.records[-1][1]


def child_command(kind: str, params: dict) -> list:
    return [sys.executable, "-m", "mmufuzz.bench.child", kind, json.dumps(params, sort_keys=True)]


def environment(extra: Optional[dict]) -> Optional[dict]:
    """This process's environment with ``extra`` (a ``PYTHONPATH`` goes first on the path)."""
    if not extra:
        return None
    env = dict(os.environ, **extra)
    if "PYTHONPATH" in extra and os.environ.get("PYTHONPATH"):
        env["PYTHONPATH"] = os.pathsep.join([extra["PYTHONPATH"], os.environ["PYTHONPATH"]])
    return env


def run_child(kind: str, params: dict, log: Path, cap: Optional[float] = None,
              until: Optional[str] = None, budget: Optional[Budget] = None,
              env: Optional[dict] = None) -> ChildRun:
    """Run a measurement; stop it at ``cap`` seconds or at its first ``until`` event.

    With a ``budget`` it is stopped when that is spent instead: its start-up
    ends at its ``started`` record (which gives its own CPU time, ``cpu``).
    ``env``: variables added to the child's environment.
    """
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "wb") as err:
        launched = time.monotonic()
        proc = subprocess.Popen(child_command(kind, params), stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=err, env=environment(env))
    meter = Meter(proc, launched) if budget is not None else None
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
            if meter is not None:
                remaining = POLL_SECONDS
            try:
                item = lines.get(timeout=None if remaining is None else max(remaining, 0))
            except queue.Empty:
                if meter is None or meter.spent(budget):
                    run.stopped_at_cap = True
                    break
                continue
            if item is None:
                break
            seconds, line = item
            record = json.loads(line)
            run.records.append((seconds, record))
            if meter is not None and record.get("event") == "started":
                meter.started(record["cpu"])
            if until is not None and record.get("event") == until:
                break
    finally:
        if meter is not None:
            run.cpu, run.startup = meter.cpu(), meter.startup
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
    # With a budget: CPU seconds at the end of start-up, at the finding, at the end; and the
    # execs the workers had reported (heartbeats, up to a second old) at the finding.
    startup: Optional[float] = None
    finding_cpu: Optional[float] = None
    cpu: Optional[float] = None
    execs: Optional[int] = None


def _findings(out: Path) -> list:
    folder = out / "findings"
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def worker_execs(out: Path) -> int:
    """The execs a campaign's running workers last reported in their heartbeats."""
    execs = 0
    for beat in (out / "workers").glob("*.json"):
        try:
            execs += json.loads(beat.read_text())["execs"]
        except (OSError, ValueError, KeyError):
            continue
    return execs


def run_campaign(args: list, out: Path, log: Path, cap: Optional[float] = None,
                 counts: Optional[Callable[[Path], bool]] = None, jobs: int = 1,
                 budget: Optional[Budget] = None, env: Optional[dict] = None) -> CampaignRun:
    """``mmufuzz fuzz ARGS --out OUT`` until it exits or ``cap`` passes (or ``budget`` is spent).

    With ``counts`` (which judges a finding's folder), stop at the first
    finding that counts: the moment its folder is published under
    ``OUT/findings`` (the campaign's own record of it), seen by polling.
    With a ``budget``, start-up ends when the first worker heartbeat appears
    (a worker writes it after its first exec).  ``env``: variables added to
    the campaign's environment (its workers inherit them).
    """
    command = [sys.executable, "-m", "mmufuzz.fuzz.cli", "fuzz", *args, "--jobs", str(jobs),
               "--out", str(out)]
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "wb") as output:
        launched = time.monotonic()
        proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=output,
                                stderr=output, env=environment(env))
    meter = Meter(proc, launched) if budget is not None else None
    judged: set = set()
    found = first = finding_cpu = execs = None

    def going() -> bool:
        if meter is not None:
            return not meter.spent(budget)
        return cap is None or time.monotonic() - launched < cap

    try:
        while proc.poll() is None and going():
            time.sleep(POLL_SECONDS)
            if meter is not None and meter.startup is None and \
                    any((out / "workers").glob("*.json")):
                meter.started()
            if counts is None:
                continue
            now = time.monotonic() - launched
            for folder in _findings(out):
                if folder.name not in judged:
                    judged.add(folder.name)
                    if meter is not None:
                        finding_cpu, execs = meter.cpu(), worker_execs(out)
                    if counts(folder):
                        found, first = folder, now
                        break
            if found is not None:
                break
    finally:
        seconds = time.monotonic() - launched
        cpu = meter.cpu() if meter is not None else None
        if meter is not None and found is None:
            execs = worker_execs(out)
        stop_campaign(proc)
    return CampaignRun(out, found, first, seconds, proc.returncode,
                       meter.startup if meter else None, finding_cpu if found else None, cpu,
                       execs)


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

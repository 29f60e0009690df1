"""Long-running campaigns: a supervisor around libFuzzer workers (DESIGN §7).

``mmufuzz fuzz`` does not fuzz in its own process.  It prepares the campaign
directory, starts libFuzzer (``python -m mmufuzz.fuzz.fuzz_mmu``, which spreads over
cores with libFuzzer's own ``-jobs/-workers``) in a process group of its own,
and watches: it sums the workers' heartbeats and libFuzzer's logs into a
progress line and ``stats.jsonl``, minimizes each new finding in a child
process (so neither the fuzzers' coverage nor the progress line stalls),
enforces the limits, and on Ctrl-C or a limit stops the group and prints a
summary.  Everything lives in the directory, so running again on it resumes:

    DIR/campaign.json     target and fault; a rerun must agree with them
    DIR/corpus/           libFuzzer's corpus (grows; kept across runs)
    DIR/seeds/            corpus/seeds encoded to bytes, rewritten every run
    DIR/findings/SIG/     per signature: input.bin, finding.repro, minimized.repro
    DIR/stats.jsonl       one JSON object per interval, totals carried across runs
    DIR/logs/             libFuzzer's output, fuzz-N.log per job
    DIR/crashes/          libFuzzer artifacts: an exception that escaped the differential run,
                          a hang, the memory limit, an input slower than 10 s
    DIR/workers/          heartbeats of the running workers (cleared every run)
    DIR/campaign.lock     flock'ed while the supervisor or any of its workers lives: one
                          campaign per directory
"""

from __future__ import annotations

import collections
import fcntl
import functools
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path
from typing import Optional, TextIO

import psutil

from mmufuzz.harness import faults
from mmufuzz.fuzz.atomic import write_atomic
from mmufuzz.fuzz.corpus import DEFAULT_TARGET, NO_FAULT, file_targets, injected_faults
from mmufuzz.fuzz.encoding import encode, load_reproducer, parse_reproducer
from mmufuzz.fuzz.lifeline import Lifeline, die_with_parent
from mmufuzz.fuzz.runner import make_target

CAMPAIGN_ENV = "MMUFUZZ_CAMPAIGN"
DEFAULT_OUT = "fuzz-out"
PROGRESS_SECONDS = 1.0
RATE_WINDOW = 10
STATS_SECONDS = 10.0
# Time a stopping libFuzzer gets to exit after SIGINT, and a limit to overshoot, before SIGKILL.
GRACE_SECONDS = 10.0
MINIMIZE_SECONDS = 300
MAX_LEN = 4096
# An input runs in milliseconds; one still running after this long is a hang (a crash artifact).
INPUT_TIMEOUT_SECONDS = 60
# A callback (an input and the schedule exploration it paid for) over this many seconds of wall
# clock leaves a slow-unit artifact: worth a look, not a failure.
SLOW_INPUT_SECONDS = 10
EXIT_FAILED = 3

_LIBFUZZER_STATS = re.compile(rb"cov: (\d+) ft: (\d+)")


class CampaignError(ValueError):
    """A campaign cannot start: bad options, or a directory holding another campaign."""


# --- configuration and layout -----------------------------------------------------

@dataclass(frozen=True)
class CampaignConfig:
    """What a campaign fuzzes; fixed for the life of its directory."""

    target: str = DEFAULT_TARGET
    inject: str = NO_FAULT
    # Fraction of inputs whose run checks invariants after every op (the others: after the last).
    invariant_rate: float = 0.1

    @classmethod
    def load(cls, path: Path) -> "CampaignConfig":
        """The config stored at ``path``; ValueError (or OSError) naming what is wrong."""
        try:
            fields = json.loads(Path(path).read_text())
        except UnicodeDecodeError:
            raise ValueError("not UTF-8 text") from None
        except json.JSONDecodeError as error:
            raise ValueError(f"not JSON (line {error.lineno}: {error.msg})") from None
        if not isinstance(fields, dict) or set(fields) != {"target", "inject", "invariant_rate"}:
            raise ValueError("not an object with exactly target, inject and invariant_rate")
        rate = fields["invariant_rate"]
        if not (isinstance(fields["target"], str) and isinstance(fields["inject"], str)
                and type(rate) in (int, float) and 0 <= rate <= 1):
            raise ValueError("target and inject must be strings, invariant_rate in [0, 1]")
        return cls(**fields)

    def save(self, path: Path) -> None:
        write_atomic(path, json.dumps(asdict(self), indent=1, sort_keys=True) + "\n")


@dataclass(frozen=True)
class Options:
    """``mmufuzz fuzz`` options; None means "the default, or what the directory says"."""

    out: Path = Path(DEFAULT_OUT)
    target: Optional[str] = None
    inject: Optional[str] = None
    max_time: Optional[float] = None
    max_execs: Optional[int] = None
    jobs: int = 1
    rss_limit_mb: Optional[int] = None
    seed: Optional[int] = None


class Layout:
    """The paths of a campaign directory."""

    def __init__(self, root: Path):
        self.root = Path(root).resolve()
        self.config = self.root / "campaign.json"
        self.corpus = self.root / "corpus"
        self.seeds = self.root / "seeds"
        self.findings = self.root / "findings"
        self.stats = self.root / "stats.jsonl"
        self.logs = self.root / "logs"
        self.crashes = self.root / "crashes"
        self.workers = self.root / "workers"
        self.lock = self.root / "campaign.lock"

    def prepare(self) -> None:
        """Create the folders; drop what only a running campaign may hold.

        Seeds are re-encoded and logs rewritten by every run, so the previous
        run's are dropped too: a seed removed from corpus/seeds, or the log of
        a job a smaller --jobs no longer runs, must not feed this run.
        """
        for path in (self.corpus, self.seeds, self.findings, self.logs, self.crashes):
            path.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(self.workers, ignore_errors=True)
        self.workers.mkdir()
        for leftover in self.findings.glob(".*.tmp"):
            shutil.rmtree(leftover, ignore_errors=True)
        for stale in [*self.seeds.glob("*.bin"), *self.logs.glob("*.log")]:
            stale.unlink()


def hold_lock(layout: Layout) -> TextIO:
    """Lock the directory for this process: the returned file holds the lock while open.

    Two campaigns on one directory would clear each other's heartbeats, seeds
    and logs and mix their statistics, so the second is refused.  The
    supervisor passes the locked file to every process that writes into the
    directory (libFuzzer and its jobs, the minimizer): an ``flock`` is held
    while any process has the file open, so the directory stays locked until
    the last writer is gone, and the kernel releases it then, so a killed
    campaign's directory resumes without cleanup.  (The writers die with the
    supervisor, :mod:`mmufuzz.fuzz.lifeline`.)
    """
    layout.root.mkdir(parents=True, exist_ok=True)
    lock = open(layout.lock, "a")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.close()
        raise CampaignError(f"{layout.root} is in use by another campaign: wait for it to "
                            "stop, or use another --out") from None
    return lock


# --- a damaged directory ------------------------------------------------------------

def set_aside(path: Path) -> Path:
    """Rename what a campaign cannot read to ``NAME.damaged`` (``NAME.damaged-2``, ... if
    taken), so that nothing is lost and the campaign can go on; return the new path."""
    target, n = path.with_name(path.name + ".damaged"), 1
    while target.exists() or target.is_symlink():
        n += 1
        target = path.with_name(f"{path.name}.damaged-{n}")
    os.rename(path, target)
    return target


def repair_stats(stats: Path) -> tuple:
    """The totals of ``stats.jsonl`` and a note if it had to be repaired (else None).

    Lines that are not stats records (torn by a crash, or garbage) are dropped
    from the file, which is rewritten with the others; the original is set
    aside.  Anything that is not a readable file is set aside whole and the
    totals start again from zero.
    """
    if not stats.exists() and not stats.is_symlink():
        return Totals(), None
    try:
        data = stats.read_bytes() if stats.is_file() else None
    except OSError:
        data = None
    if data is None:
        moved = set_aside(stats)
        return Totals(), (f"{stats} is not a readable file: set aside as {moved.name}; "
                          "totals start again from zero")
    kept, bad, totals = [], [], Totals()
    for number, line in enumerate(data.split(b"\n"), 1):
        if not line:
            continue
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        current = Totals.from_record(record)
        if current is None:
            bad.append(number)
        else:
            kept.append(line + b"\n")
            totals = current
    if not bad and (not data or data.endswith(b"\n")):
        return totals, None
    moved = set_aside(stats)
    write_atomic(stats, b"".join(kept))
    lines = ", ".join(map(str, bad[:5])) + (", ..." if len(bad) > 5 else "")
    what = f"{len(bad)} unreadable line(s) ({lines})" if bad else "no newline at its end"
    return totals, (f"{stats}: {what}: original set aside as {moved.name}, "
                    f"kept {len(kept)} line(s); totals from the last of them")


def repair_findings(folder: Path) -> list:
    """Set aside each finding whose files a campaign cannot read; one note each.

    A finding whose ``finding.repro`` is unreadable goes whole (its signature
    can then be found and stored again); an unreadable ``minimized.repro``
    alone goes, and the finding is minimized again.
    """
    notes = []
    for path in sorted(folder.iterdir()) if folder.is_dir() else []:
        if not _is_signature(path.name):
            continue
        finding = StoredFinding(path)
        if not path.is_dir():
            notes.append(f"{path}: not a folder: set aside as {set_aside(path).name}")
            continue
        raw, minimized = finding.raw, finding.minimized
        for file in (raw, minimized):
            if file == minimized and not (file.exists() or file.is_symlink()):
                continue
            try:
                load_reproducer(file)
            except (ValueError, OSError) as error:
                reason = _clip((str(error) or type(error).__name__).splitlines()[0], 100)
                whole = file == raw
                moved = set_aside(path if whole else file)
                notes.append(f"{file}: {reason}: set aside as {moved.name}" +
                             ("" if whole else "; it is minimized again"))
                break
    return notes


# --- findings ---------------------------------------------------------------------

def _is_signature(name: str) -> bool:
    """A finding's folder name: not a worker's ``.SIG.PID.tmp`` nor a ``SIG.damaged``."""
    return "." not in name


@dataclass(frozen=True)
class StoredFinding:
    """One signature's folder under ``findings/``."""

    path: Path

    @property
    def signature(self) -> str:
        return self.path.name

    @property
    def raw(self) -> Path:
        return self.path / "finding.repro"

    @property
    def minimized(self) -> Path:
        return self.path / "minimized.repro"

    def summary(self) -> str:
        """The ``# finding:`` line of the raw reproducer."""
        return load_reproducer(self.raw).meta.get("finding", "?")

    def status(self) -> str:
        """``pending`` (not minimized yet), ``flaky``, ``not reproduced`` or ``N ops, from M``."""
        if not self.minimized.exists():
            return "pending"
        meta = load_reproducer(self.minimized).meta
        if "flaky" in meta or "not-reproduced" in meta:
            return "flaky" if "flaky" in meta else "not reproduced"
        ops = len(load_reproducer(self.minimized).program.ops)
        return f"{ops} ops, from {len(load_reproducer(self.raw).program.ops)}"


class FindingStore:
    """Findings deduplicated by signature, safe against concurrent workers.

    A worker writes a new signature's files into a private temporary folder
    and publishes it with one ``rename``: the first worker wins, the others
    see the folder and drop their copy, and a reader never sees half a finding.
    """

    def __init__(self, root: Path):
        self.root = Path(root)
        self._known: set[str] = set()

    def has(self, signature: str) -> bool:
        """True if a finding with ``signature`` is stored (by any worker)."""
        if signature not in self._known and (self.root / signature).exists():
            self._known.add(signature)
        return signature in self._known

    def record(self, data: bytes, report: str, signature: str) -> bool:
        """Store a finding's raw input and report unless its signature is known; True if new."""
        if self.has(signature):
            return False
        staging = self.root / f".{signature}.{os.getpid()}.tmp"
        staging.mkdir(parents=True, exist_ok=True)
        write_atomic(staging / "input.bin", data)
        write_atomic(staging / "finding.repro", report)
        self._known.add(signature)
        try:
            os.rename(staging, self.root / signature)
        except OSError:
            shutil.rmtree(staging, ignore_errors=True)
            return False
        return True

    def entries(self) -> list[StoredFinding]:
        """The published findings, by signature."""
        return [StoredFinding(p) for p in sorted(self.root.glob("*"))
                if p.is_dir() and _is_signature(p.name)]


# --- seeds ------------------------------------------------------------------------

def seed_files() -> list:
    """The shipped seed reproducers (``corpus/seeds``, package data ``fuzz/seeds``), by name.

    ``fuzz/seeds`` is a symlink to ``../corpus/seeds`` in the source tree, so a
    checkout, an editable install and a wheel all find the same files.
    """
    folder = resources.files("mmufuzz.fuzz") / "seeds"
    return sorted((p for p in folder.iterdir() if p.name.endswith(".repro")),
                  key=lambda p: p.name)


def write_seeds(folder: Path) -> int:
    """Encode every seed reproducer to the bytes libFuzzer starts from; return how many."""
    files = seed_files()
    for path in files:
        program = parse_reproducer(path.read_text(), str(path)).program
        write_atomic(folder / (path.name.removesuffix(".repro") + ".bin"), encode(program))
    return len(files)


# --- statistics -------------------------------------------------------------------

@dataclass
class Totals:
    """Counters carried across runs of one directory (from the last line of ``stats.jsonl``)."""

    execs: int = 0
    ops: int = 0
    seconds: float = 0.0
    runs: int = 0
    # Whether the last run wrote its final line (a killed run did not).
    finished: bool = True

    @classmethod
    def from_record(cls, record) -> Optional["Totals"]:
        """The totals a stats line carries, or None if it is not one of ours."""
        if not isinstance(record, dict):
            return None
        values = [record.get(key) for key in ("execs", "ops", "seconds", "run")]
        if not all(type(v) in (int, float) and v >= 0 for v in values) \
                or not all(type(v) is int for v in values[:2] + values[3:]):
            return None
        return cls(*values, finished=record.get("final") is True)


@dataclass
class Snapshot:
    """What the campaign looks like now: this run's counters plus the earlier runs'."""

    elapsed: float
    execs: int
    ops: int
    cov: int
    ft: int
    features: int
    corpus: int
    findings: int
    rss_mb: float
    workers: int


class Monitor:
    """Reads workers' heartbeats, libFuzzer's logs and the directory into snapshots."""

    def __init__(self, layout: Layout, process: psutil.Process):
        self.layout, self.process = layout, process
        self._log_offsets: dict[Path, int] = {}
        self._log_stats: dict[Path, tuple] = {}
        self._heartbeats: dict[str, dict] = {}
        self._rss_mb = 0.0

    def _read_heartbeats(self) -> None:
        for path in self.layout.workers.glob("*.json"):
            try:
                self._heartbeats[path.name] = json.loads(path.read_text())
            except (OSError, ValueError):
                continue  # replaced while we read it: next time

    def _read_logs(self) -> None:
        for path in self.layout.logs.glob("fuzz-*.log"):
            offset = self._log_offsets.get(path, 0)
            with open(path, "rb") as log:
                log.seek(offset)
                chunk = log.read()
            # Only whole lines: a line being written is read again next time.
            end = chunk.rfind(b"\n") + 1
            self._log_offsets[path] = offset + end
            matches = _LIBFUZZER_STATS.findall(chunk[:end])
            if matches:
                self._log_stats[path] = tuple(map(int, matches[-1]))

    def rss_mb(self) -> float:
        """Resident memory of libFuzzer and all its workers (the last seen, once they exited)."""
        total = 0
        try:
            for proc in [self.process] + self.process.children(recursive=True):
                try:
                    total += proc.memory_info().rss
                except psutil.Error:
                    continue
        except psutil.Error:
            pass
        if total:
            self._rss_mb = total / 2**20
        return self._rss_mb

    def snapshot(self, elapsed: float) -> Snapshot:
        self._read_heartbeats()
        self._read_logs()
        beats = self._heartbeats.values()
        stats = self._log_stats.values()
        return Snapshot(
            elapsed=elapsed,
            execs=sum(b["execs"] for b in beats), ops=sum(b["ops"] for b in beats),
            cov=max((s[0] for s in stats), default=0), ft=max((s[1] for s in stats), default=0),
            features=max((b["features"] for b in beats), default=0),
            corpus=sum(1 for _ in self.layout.corpus.iterdir()),
            findings=len(FindingStore(self.layout.findings).entries()),
            rss_mb=self.rss_mb(), workers=len(self._heartbeats))


def _si(value: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if value >= scale:
            return f"{value / scale:.1f}{unit}"
    return f"{value:.0f}"


def progress_line(now: Snapshot, rate: tuple) -> str:
    """``#execs (execs/s) ops (ops/s) cov ft corpus findings rss``, one line."""
    execs_per_s, ops_per_s = rate
    return (f"[{now.elapsed:7.0f}s] execs {_si(now.execs)} ({_si(execs_per_s)}/s)  "
            f"ops {_si(now.ops)} ({_si(ops_per_s)}/s)  cov {now.cov} ft {now.ft} "
            f"feat {now.features}  corpus {now.corpus}  findings {now.findings}  "
            f"rss {now.rss_mb:.0f}MB")


# --- the supervisor ---------------------------------------------------------------

def stored_config(layout: Layout) -> tuple:
    """``(config, why)``: the directory's config, or None and why it cannot be read."""
    if not layout.config.exists() and not layout.config.is_symlink():
        return None, None
    try:
        return CampaignConfig.load(layout.config), None
    except (ValueError, OSError) as error:
        return None, str(error) or type(error).__name__


def resolve_config(layout: Layout, options: Options) -> CampaignConfig:
    """The directory's config, or a new one from the options; they must agree.

    An unreadable config counts as none (the campaign sets it aside and says so).
    """
    inject = (",".join(injected_faults(options.inject)) or NO_FAULT) if options.inject else None
    stored, _ = stored_config(layout)
    if stored is not None:
        # A directory is data: it may name a registered target, never code to load.
        if stored.target not in file_targets() and options.target != stored.target:
            raise CampaignError(f"{layout.config}: target {stored.target[:80]!r} is not a "
                                f"registered target: only the command line may name code to "
                                f"load (repeat --target to resume this campaign)")
        for name, wanted in (("target", options.target), ("inject", inject)):
            if wanted is not None and wanted != getattr(stored, name):
                raise CampaignError(f"{layout.root} holds a campaign with {name} "
                                    f"{getattr(stored, name)!r}, not {wanted!r}: use another --out")
        return stored
    return CampaignConfig(options.target or DEFAULT_TARGET, inject or NO_FAULT)


def libfuzzer_command(layout: Layout, options: Options) -> list:
    """The worker command line: flags for the limits and jobs, then corpus, then seeds."""
    command = [sys.executable, "-m", "mmufuzz.fuzz.fuzz_mmu",
               f"-artifact_prefix={layout.crashes}/", f"-max_len={MAX_LEN}",
               f"-timeout={INPUT_TIMEOUT_SECONDS}", f"-report_slow_units={SLOW_INPUT_SECONDS}"]
    if options.max_time is not None:
        command.append(f"-max_total_time={max(1, math.ceil(options.max_time))}")
    if options.max_execs is not None:
        command.append(f"-runs={math.ceil(options.max_execs / options.jobs)}")
    if options.rss_limit_mb is not None:
        command.append(f"-rss_limit_mb={options.rss_limit_mb}")
    if options.seed is not None:
        command.append(f"-seed={options.seed}")
    if options.jobs > 1:
        command += [f"-jobs={options.jobs}", f"-workers={options.jobs}"]
    return command + [str(layout.corpus), str(layout.seeds)]


class Campaign:
    """One run of ``mmufuzz fuzz`` over a campaign directory."""

    def __init__(self, options: Options, out: TextIO = sys.stderr):
        if options.jobs < 1:
            raise CampaignError(f"--jobs must be at least 1, not {options.jobs}")
        self.options, self.out = options, out
        self.layout = Layout(options.out)
        self.config = resolve_config(self.layout, options)
        faults.check(injected_faults(self.config.inject))
        make_target(self.config.target)  # fails here, with a clear message, if unknown
        self.lock = hold_lock(self.layout)
        self.lifeline = Lifeline()
        # What a resume found unreadable and set aside: one line each, said at the start.
        self.notes: list[str] = []
        _, damaged = stored_config(self.layout)
        if damaged is not None:
            moved = set_aside(self.layout.config)
            self.notes.append(f"{self.layout.config}: {_clip(damaged, 100)}: set aside as "
                              f"{moved.name}; target {self.config.target} and fault "
                              f"{self.config.inject} from the command line (or the defaults)")
        self.layout.prepare()
        self.config.save(self.layout.config)
        self.totals, note = repair_stats(self.layout.stats)
        self.notes += [note] if note else []
        self.notes += repair_findings(self.layout.findings)
        self.findings = FindingStore(self.layout.findings)
        self.known = {f.signature for f in self.findings.entries()}
        self.minimizer: Optional[tuple] = None
        self.attempted: set[str] = set()
        self.tty = hasattr(out, "isatty") and out.isatty()
        self.rss_start: Optional[float] = None
        self._printed = -STATS_SECONDS

    # --- the run -----------------------------------------------------------------

    def run(self) -> int:
        """Fuzz until a limit or Ctrl-C; return the exit code (0 clean, 1 findings, 3 failed)."""
        seeds = write_seeds(self.layout.seeds)
        for note in self.notes:
            self._say(f"mmufuzz: repaired {note}")
        if self.totals.runs or self.known:
            self._say(self._resuming())
        self._say(f"mmufuzz: fuzzing target {self.config.target}, inject {self.config.inject}, "
                  f"{self.options.jobs} job(s), {seeds} seeds, in {self.layout.root}")
        started = time.monotonic()
        previous = {s: signal.signal(s, _interrupt) for s in (signal.SIGTERM, signal.SIGHUP)}
        fuzzer = self._start()
        monitor = Monitor(self.layout, psutil.Process(fuzzer.pid))
        # Rates over the last RATE_WINDOW snapshots: heartbeats come once a second, unaligned.
        first = monitor.snapshot(0)
        window = collections.deque([first], maxlen=RATE_WINDOW)
        reason, last_stats = None, None
        try:
            while fuzzer.poll() is None:
                time.sleep(PROGRESS_SECONDS)
                now = monitor.snapshot(time.monotonic() - started)
                if self.rss_start is None and now.workers:
                    self.rss_start = now.rss_mb
                rate = _rate(window[0], now)
                window.append(now)
                self._progress(now, rate)
                if last_stats is None or now.elapsed - last_stats >= STATS_SECONDS:
                    self._append_stats(now, rate)
                    last_stats = now.elapsed
                self._minimize_next()
                if self._over_time(now.elapsed):
                    reason = "max-time reached"
                    break
        except KeyboardInterrupt:
            reason = "interrupted"
        except Exception:
            self._stop(fuzzer)  # a failing supervisor never leaves libFuzzer running
            raise
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)
        code = self._stop(fuzzer)
        final = monitor.snapshot(time.monotonic() - started)
        failed = code not in (0, None) and reason is None
        if failed:
            reason = f"libFuzzer exited with {code}" + _worker_error(self.layout.logs)
        reason = reason or "limit reached"
        self._append_stats(final, _rate(first, final), final=True)
        self._finish_minimizing()
        self._summary(reason, final, failed)
        if failed:
            return EXIT_FAILED
        return 1 if self.findings.entries() else 0

    def _resuming(self) -> str:
        """One line: what the earlier runs left in the directory."""
        entries = self.findings.entries()
        pending = sum(not f.minimized.exists() for f in entries)
        corpus = sum(1 for _ in self.layout.corpus.iterdir())
        text = (f"mmufuzz: resuming {self.layout.root}: {self.totals.runs} earlier run(s), "
                f"{self.totals.execs} execs in {self.totals.seconds:.0f} s, corpus {corpus}, "
                f"{len(entries)} finding(s)" + (f" ({pending} to minimize)" if pending else ""))
        if not self.totals.finished:
            text += ("; the last run was killed: its inputs after its last stats line "
                     "are not counted")
        return text

    def _start(self) -> subprocess.Popen:
        """libFuzzer in its own process group: Ctrl-C reaches the supervisor, which stops it.

        It and its jobs hold the directory's lock and the lifeline, and die with
        the supervisor (:mod:`mmufuzz.fuzz.lifeline`).
        """
        env = dict(os.environ, **{CAMPAIGN_ENV: str(self.layout.root)}, **self.lifeline.env())
        # The worker runs in logs/: a relative PYTHONPATH (a target module beside the user)
        # means what it meant where the user typed it.
        if env.get("PYTHONPATH"):
            env["PYTHONPATH"] = os.pathsep.join(
                os.path.abspath(entry) if entry else entry
                for entry in env["PYTHONPATH"].split(os.pathsep))
        # With -jobs, libFuzzer writes each job's output to fuzz-N.log itself.
        name = "libfuzzer.log" if self.options.jobs > 1 else "fuzz-0.log"
        with open(self.layout.logs / name, "wb") as log:
            return subprocess.Popen(libfuzzer_command(self.layout, self.options),
                                    cwd=self.layout.logs, env=env, stdin=subprocess.DEVNULL,
                                    stdout=log, stderr=log, start_new_session=True,
                                    **self._child_of_mine(self.lifeline.read))

    def _child_of_mine(self, *fds: int) -> dict:
        """Popen arguments for a writer into the directory: it holds the lock (and ``fds``)
        and gets SIGKILL when this process dies."""
        return {"pass_fds": (self.lock.fileno(), *fds),
                "preexec_fn": functools.partial(die_with_parent, os.getpid())}

    def _over_time(self, elapsed: float) -> bool:
        """libFuzzer stops itself at -max_total_time; this is the backstop if it does not."""
        limit = self.options.max_time
        return limit is not None and elapsed > limit + GRACE_SECONDS

    def _stop(self, fuzzer: subprocess.Popen) -> Optional[int]:
        """SIGINT to the group (libFuzzer exits cleanly on it); SIGKILL after a grace period
        or a second Ctrl-C.  Jobs outlive a killed parent: the group is killed in any case."""
        try:
            if fuzzer.poll() is None:
                _signal_group(fuzzer.pid, signal.SIGINT)
                fuzzer.wait(GRACE_SECONDS)
        except (subprocess.TimeoutExpired, KeyboardInterrupt):
            pass
        _signal_group(fuzzer.pid, signal.SIGKILL)
        return fuzzer.wait()

    # --- findings ----------------------------------------------------------------

    def _minimize_next(self) -> None:
        """Keep one minimizer child busy with the oldest un-minimized finding.

        Each finding gets one attempt per run; a minimizer that fails leaves
        its log next to the finding and the finding for the next run.
        """
        if self.minimizer is not None:
            process, finding = self.minimizer
            if process.poll() is None:
                return
            self.minimizer = None
            status = finding.status() if process.returncode in (0, 1) else \
                f"minimizer failed (exit {process.returncode}), see {finding.path / 'minimize.log'}"
            self._say(f"mmufuzz: minimized {finding.signature}: {status}")
        for finding in self.findings.entries():
            if finding.signature not in self.known:
                self.known.add(finding.signature)
                self._say(f"mmufuzz: new finding {finding.signature}: "
                          f"{_clip(finding.summary())}")
            if not finding.minimized.exists() and finding.signature not in self.attempted:
                self.attempted.add(finding.signature)
                command = [sys.executable, "-m", "mmufuzz.fuzz.cli", "minimize", str(finding.raw),
                           "-o", str(finding.minimized), "--max-time", str(MINIMIZE_SECONDS),
                           "--target", self.config.target, "--inject", self.config.inject]
                # Its own session: the Ctrl-C that stops fuzzing must not stop it.
                with open(finding.path / "minimize.log", "wb") as log:
                    self.minimizer = (subprocess.Popen(command, stdin=subprocess.DEVNULL,
                                                       stdout=log, stderr=log,
                                                       start_new_session=True,
                                                       **self._child_of_mine()), finding)
                return

    def _finish_minimizing(self) -> None:
        """Minimize what is still pending; a Ctrl-C leaves the rest to the next run."""
        try:
            while True:
                self._minimize_next()
                if self.minimizer is None:
                    return
                self.minimizer[0].wait()
        except KeyboardInterrupt:
            if self.minimizer is not None:
                self.minimizer[0].kill()
                self.minimizer[0].wait()
                self.minimizer = None
            self._say("mmufuzz: minimization interrupted; the next run on this directory "
                      "resumes it")

    # --- output ------------------------------------------------------------------

    def _say(self, text: str) -> None:
        if self.tty:
            text = "\r\033[K" + text
        print(text, file=self.out, flush=True)

    def _progress(self, now: Snapshot, rate: tuple) -> None:
        text = progress_line(now, rate)
        if self.tty:
            print("\r\033[K" + text, end="", file=self.out, flush=True)
        elif now.elapsed - self._printed >= STATS_SECONDS:
            self._printed = now.elapsed
            print(text, file=self.out, flush=True)

    def _append_stats(self, now: Snapshot, rate: tuple, final: bool = False) -> None:
        """One JSON line; appended with a single write, so a reader sees whole lines only."""
        record = {"time": round(time.time(), 3), "run": self.totals.runs + 1,
                  "seconds": round(self.totals.seconds + now.elapsed, 3),
                  "run_seconds": round(now.elapsed, 3),
                  "execs": self.totals.execs + now.execs, "ops": self.totals.ops + now.ops,
                  "execs_per_s": round(rate[0], 1), "ops_per_s": round(rate[1], 1),
                  "cov": now.cov, "ft": now.ft, "features": now.features,
                  "corpus": now.corpus, "findings": now.findings,
                  "rss_mb": round(now.rss_mb, 1), "workers": now.workers, "final": final}
        if final and self.rss_start is not None:
            record["rss_start_mb"] = round(self.rss_start, 1)
        fd = os.open(self.layout.stats, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, (json.dumps(record, sort_keys=True) + "\n").encode())
        finally:
            os.close(fd)

    def _summary(self, reason: str, final: Snapshot, failed: bool = False) -> None:
        seconds = max(final.elapsed, 1e-9)
        lines = [
            f"mmufuzz: stopped: {reason}",
            f"  this run: {final.elapsed:.1f} s, {final.execs} execs "
            f"({final.execs / seconds:.0f}/s), {final.ops} guest ops ({final.ops / seconds:.0f}/s)",
            f"  coverage: cov {final.cov}, ft {final.ft}, {final.features} outcome features; "
            f"corpus {final.corpus} inputs",
            f"  rss: {self.rss_start or 0:.0f} MB at start, {final.rss_mb:.0f} MB at end",
            f"  all runs: {self.totals.execs + final.execs} execs in "
            f"{self.totals.seconds + final.elapsed:.0f} s over {self.totals.runs + 1} run(s)",
        ]
        entries = self.findings.entries()
        clean = "" if entries or failed else " (clean)"
        lines.append(f"  findings: {len(entries)}{clean}")
        for finding in entries:
            shown = finding.minimized if finding.minimized.exists() else finding.raw
            lines.append(f"    {finding.signature}  {_clip(finding.summary())}")
            lines.append(f"      {shown}  ({finding.status()})")
        kinds = collections.Counter(_artifact_kind(path.name)
                                    for path in self.layout.crashes.iterdir())
        for kind, meaning in _ARTIFACTS.items():
            if kinds[kind]:
                lines.append(f"  {kinds[kind]} libFuzzer {kind} artifact(s) in "
                             f"{self.layout.crashes}: {meaning}, see logs/")
        self._say("\n".join(lines))


# libFuzzer's artifact file prefixes and what each means here (a finding of the differential
# run is never one: the worker records it under findings/).
_ARTIFACTS = {
    "crash": "an exception escaped the differential run (the reference, a target's reset, "
             "or mmufuzz itself)",
    "timeout": f"an input still running after {INPUT_TIMEOUT_SECONDS} s (a hang)",
    "oom": "the worker went over its memory limit",
    "slow-unit": f"an input's callback took over {SLOW_INPUT_SECONDS} s of wall clock, the "
                 "schedule exploration it paid for included (not a failure; a loaded machine "
                 "makes them)",
    "other": "an artifact of an unknown kind",
}


def _artifact_kind(name: str) -> str:
    """The kind of a libFuzzer artifact, by its file name's prefix (``crash-<sha1>``, ...)."""
    return next((kind for kind in _ARTIFACTS if name.startswith(kind + "-")), "other")


def _worker_error(logs: Path) -> str:
    """``: `` and the last line of the first worker log that ends in a traceback, if any.

    A worker that cannot start (a target module that does not import in the worker's
    environment, say) leaves its traceback in its log; the console names the error, so a
    campaign that ran nothing never reads as clean.
    """
    for path in sorted(logs.glob("fuzz-*.log")):
        try:
            with open(path, "rb") as log:
                log.seek(max(0, path.stat().st_size - 4096))
                tail = log.read().decode(errors="replace").splitlines()
        except OSError:
            continue
        last = next((line for line in reversed(tail) if line.strip()), "")
        if "Traceback (most recent call last):" in tail:
            return f": {_clip(last.strip())} (in {path})"
    return ""


def _clip(text: str, width: int = 160) -> str:
    """One console line: a dirty log of 512 gfns is in the reproducer, not on the terminal."""
    return text if len(text) <= width else text[:width - 3] + "..."


def _rate(start: Snapshot, now: Snapshot) -> tuple:
    """Execs and guest ops per second between two snapshots."""
    span = max(now.elapsed - start.elapsed, 1e-9)
    return (now.execs - start.execs) / span, (now.ops - start.ops) / span


def _interrupt(signum, frame):
    """SIGTERM and SIGHUP stop a campaign as Ctrl-C does, so no worker is left behind."""
    raise KeyboardInterrupt


def _signal_group(pid: int, signum: int) -> None:
    try:
        os.killpg(pid, signum)
    except ProcessLookupError:
        pass

"""Time-to-detect: how long each engine takes to find each fault (the parent's side).

A trial is one (fault, engine, seed).  ``mmufuzz`` is a real ``mmufuzz fuzz
--inject F --seed S --max-time CAP`` campaign whose first finding is the
moment its folder appears under ``findings/``; the baselines are
:mod:`mmufuzz.bench.engines` children whose first finding is the moment their report
line arrives.  Every clock starts at launch, so start-up counts for everyone.
Only a finding that needs the fault counts (one the target also shows
without it is the target's own bug).  A trial that finds nothing by the cap
counts as the cap.

Trials run ``jobs`` at a time, one process per core, in the order fault ->
seed -> engine, so at any moment the engines share the machine with a mix of
each other and none gets a quieter neighbour than another.
"""

from __future__ import annotations

import itertools
import shutil
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from mmufuzz.fuzz.campaign import StoredFinding
from mmufuzz.fuzz.corpus import NO_FAULT
from mmufuzz.fuzz.encoding import ReproError, load_reproducer
from mmufuzz.bench.engines import fault_needed
from mmufuzz.bench.procs import MeasurementFailed, run_campaign, run_child, run_parallel
from mmufuzz.bench.resume import Done

ENGINES = ("mmufuzz", "random", "hypothesis")


@dataclass(frozen=True)
class Trial:
    fault: str
    engine: str
    seed: int


@dataclass(frozen=True)
class Detection:
    """One trial's result; ``seconds`` is the cap when nothing was found."""

    fault: str
    engine: str
    seed: int
    found: bool
    seconds: float
    signature: str = ""
    summary: str = ""


def trials(fault_names, seeds, engines=ENGINES) -> list:
    return [Trial(f, e, s) for f in fault_names for s in seeds for e in engines]


def _fault_needed(folder: Path, target: str) -> bool:
    try:
        program = load_reproducer(StoredFinding(folder).raw).program
    except ReproError:
        return False
    return fault_needed(program, target)


def _campaign_trial(trial: Trial, target: str, cap: float, work: Path) -> Detection:
    name = f"{trial.fault}-seed{trial.seed}"
    out = work / "campaigns" / name
    raw = work / "raw" / f"{name}.repro"
    shutil.rmtree(out, ignore_errors=True)
    raw.unlink(missing_ok=True)  # a stopped attempt's: this trial's finding is the next one
    args = ["--target", target, "--inject", trial.fault, "--seed", str(trial.seed),
            "--max-time", str(cap)]
    log = work / "logs" / f"mmufuzz-{name}.log"

    def counts(folder: Path) -> bool:
        return trial.fault == NO_FAULT or _fault_needed(folder, target)

    run = run_campaign(args, out, log, cap=cap, counts=counts)
    if run.finding is None or run.first_finding > cap:
        # A campaign that died early found nothing for its user either: it counts at the cap,
        # and its folder is kept for the post-mortem.
        if run.seconds < cap and run.returncode not in (0, 1):
            return Detection(trial.fault, trial.engine, trial.seed, False, cap,
                             summary=f"campaign failed (exit {run.returncode}): see {out}/logs")
        shutil.rmtree(out, ignore_errors=True)
        return Detection(trial.fault, trial.engine, trial.seed, False, cap)
    stored = StoredFinding(run.finding)
    raw.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(stored.raw, raw)
    detection = Detection(trial.fault, trial.engine, trial.seed, True, run.first_finding,
                          stored.signature, stored.summary())
    shutil.rmtree(out, ignore_errors=True)
    return detection


def _baseline_trial(trial: Trial, target: str, cap: float, work: Path) -> Detection:
    name = f"{trial.engine}-{trial.fault}-seed{trial.seed}"
    log = work / "logs" / f"{name}.log"
    run = run_child(trial.engine, {"target": target, "inject": trial.fault, "seed": trial.seed},
                    log, cap=cap, until="finding")
    hit = run.first("finding")
    if hit is not None and hit[0] <= cap:
        seconds, record = hit
        return Detection(trial.fault, trial.engine, trial.seed, True, seconds,
                         record["signature"], record["summary"])
    if not run.stopped_at_cap and not run.records:
        raise MeasurementFailed(f"{trial.engine} ended without a finding (exit "
                                f"{run.returncode}): see {log}")
    last = run.records[-1][1]["event"] if run.records else ""
    return Detection(trial.fault, trial.engine, trial.seed, False, cap,
                     summary="" if run.stopped_at_cap else last)


def run_trial(trial: Trial, target: str, cap: float, work: Path) -> Detection:
    measure = _campaign_trial if trial.engine == "mmufuzz" else _baseline_trial
    return measure(trial, target, cap, work)


def detect(planned: list, target: str, cap: float, work: Path, jobs: int, done: Done) -> list:
    """Run every trial not already ``done``, ``jobs`` at a time; results in the order planned."""
    finished = itertools.count(done.kept() + 1)

    def one(trial: Trial) -> dict:
        key = f"{trial.fault}-{trial.engine}-seed{trial.seed}"
        result, kept = done.measure(key, lambda: asdict(run_trial(trial, target, cap, work)))
        if not kept:
            shown = f"{result['seconds']:6.1f}s" if result["found"] else f" >{cap:g}s"
            print(f"bench: [{next(finished)}/{len(planned)}] {trial.fault} {trial.engine} seed "
                  f"{trial.seed}: {shown}", file=sys.stderr, flush=True)
        return result

    return run_parallel(one, planned, jobs)


def raw_finding(work: Path, fault: str, seeds) -> Path | None:
    """The raw reproducer of the lowest seed whose campaign found ``fault``."""
    for seed in seeds:
        path = work / "raw" / f"{fault}-seed{seed}.repro"
        if path.exists():
            return path
    return None

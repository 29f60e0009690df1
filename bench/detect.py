"""Time-to-detect: how much CPU each engine spends to find each bug (the parent's side).

A trial is one (bug, engine, seed).  A bug is a catalog fault, injected, or a
mutant of the target's source (:mod:`mmufuzz.bench.mutants`), loaded in the
trial's processes in place of the original and nothing injected.  The engines:

- ``mmufuzz``: a real ``mmufuzz fuzz --seed S`` campaign, whose first finding
  is the moment its folder appears under ``findings/``;
- ``unguided``: the same campaign with ``MMUFUZZ_GUIDANCE=off``, its ablation
  (same seeds, mutator, explorer, decoder and budget; libFuzzer gets no
  coverage: see :mod:`mmufuzz.fuzz.fuzz_mmu`);
- ``seeds``: the shipped seeds replayed, nothing else (deterministic: seed 1 only);
- ``random`` and ``hypothesis``: the baselines of :mod:`mmufuzz.bench.engines`,
  whose first finding is the moment their report line arrives.

Every trial gets the same :class:`~mmufuzz.bench.procs.Budget` of CPU seconds
after its start-up (its first exec), and reports the CPU it spent searching,
its start-up, its wall-clock time and its execs.  Only a finding that needs
the bug counts: its program must run clean on the original target with no
fault (one the target also shows is the target's own bug).  A trial that
finds nothing within its budget counts as the budget.

Trials run ``jobs`` at a time, one process per core, in the order bug ->
seed -> engine, so at any moment the engines share the machine with a mix of
each other and none gets a quieter neighbour than another.
"""

from __future__ import annotations

import itertools
import re
import shutil
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

from mmufuzz.fuzz.campaign import StoredFinding
from mmufuzz.fuzz.corpus import NO_FAULT
from mmufuzz.fuzz.encoding import ReproError, load_reproducer, parse_reproducer
from mmufuzz.fuzz.fuzz_mmu import GUIDANCE_ENV
from mmufuzz.bench.engines import fault_needed
from mmufuzz.bench.procs import (Budget, MeasurementFailed, run_campaign, run_child,
                                 run_parallel)
from mmufuzz.bench.resume import Done

ENGINES = ("mmufuzz", "unguided", "seeds", "random", "hypothesis")
# The campaign engines and what each adds to the campaign's environment.
CAMPAIGNS = {"mmufuzz": {}, "unguided": {GUIDANCE_ENV: "off"}}
# Engines whose every seed runs the same: measured for the first seed only.
DETERMINISTIC = ("seeds",)


@dataclass(frozen=True)
class Bug:
    """What a trial seeks: ``inject`` a catalog fault, or load a mutant through ``env``."""

    name: str
    inject: str
    env: tuple = ()  # (variable, value) pairs added to every process of the trial

    @classmethod
    def fault(cls, name: str) -> "Bug":
        return cls(name, name)


@dataclass(frozen=True)
class Trial:
    fault: str
    engine: str
    seed: int


@dataclass(frozen=True)
class Detection:
    """One trial's result.

    ``seconds``: CPU seconds spent searching (after start-up), the budget when
    nothing was found; ``startup``: CPU seconds until the first exec;
    ``wall_seconds``: wall clock from launch; ``execs``: programs run by then
    (for a campaign, its workers' last heartbeat, up to a second old).
    """

    fault: str
    engine: str
    seed: int
    found: bool
    seconds: float
    signature: str = ""
    summary: str = ""
    startup: Optional[float] = None
    wall_seconds: Optional[float] = None
    execs: Optional[int] = None


def trials(fault_names, seeds, engines=ENGINES) -> list:
    return [Trial(f, e, s) for f in fault_names for s in seeds for e in engines
            if e not in DETERMINISTIC or s == seeds[0]]


def _fault_needed(folder: Path, target: str, inject: str) -> bool:
    try:
        program = load_reproducer(StoredFinding(folder).raw).program
    except ReproError:
        return False
    return fault_needed(program, target, inject)


def _searched(cpu: Optional[float], startup: Optional[float], cap: float) -> float:
    """CPU seconds after start-up at ``cpu`` (from launch when start-up never ended)."""
    if cpu is None:
        return cap
    return max(cpu - (startup or 0.0), 0.0)


def _cut_short(spent: float, cap: float) -> str:
    """Why a trial that found nothing stopped before its budget was spent (empty if it was)."""
    if spent >= cap:
        return ""
    return (f"stopped by the wall-clock safety after {spent:.1f} of {cap:g} CPU s "
            "(the machine gave it too little CPU)")


def _libfuzzer_summary(out: Path) -> str:
    """``; libFuzzer: WHAT (the last Python error)`` from a failed campaign's worker logs."""
    summary = error = ""
    for log in sorted((out / "logs").glob("fuzz-*.log")):
        for line in log.read_text(errors="replace").splitlines():
            if line.startswith("SUMMARY: libFuzzer:"):
                summary = line.removeprefix("SUMMARY: ")
            elif re.match(r"^[A-Za-z.]*(Error|Exception)\b", line):
                error = line.strip()
    if not summary:
        return ""
    return f"; {summary}" + (f" ({error})" if error else "")


def _campaign_trial(trial: Trial, bug: Bug, target: str, budget: Budget,
                    work: Path) -> Detection:
    name = f"{trial.engine}-{trial.fault}-seed{trial.seed}"
    out = work / "campaigns" / name
    raw = work / "raw" / f"{trial.fault}-seed{trial.seed}.repro"
    shutil.rmtree(out, ignore_errors=True)
    if trial.engine == "mmufuzz":
        raw.unlink(missing_ok=True)  # a stopped attempt's: this trial's finding is the next one
    # --max-time is wall clock: only a safety here, the budget (CPU) stops the campaign.
    args = ["--target", target, "--inject", bug.inject, "--seed", str(trial.seed),
            "--max-time", str(budget.wall)]
    log = work / "logs" / f"{name}.log"

    def counts(folder: Path) -> bool:
        return ((bug.inject == NO_FAULT and not bug.env)
                or _fault_needed(folder, target, bug.inject))

    run = run_campaign(args, out, log, counts=counts, budget=budget,
                       env={**CAMPAIGNS[trial.engine], **dict(bug.env)})
    cap = budget.cpu
    if run.finding is None:
        # A campaign that died early found nothing for its user either: it counts at the cap,
        # and its folder is kept for the post-mortem.
        spent = _searched(run.cpu, run.startup, cap)
        if spent < cap and run.returncode not in (0, 1):
            return Detection(trial.fault, trial.engine, trial.seed, False, cap,
                             summary=f"campaign failed (exit {run.returncode}"
                                     f"{_libfuzzer_summary(out)}): see {out}/logs",
                             startup=run.startup, wall_seconds=run.seconds, execs=run.execs)
        shutil.rmtree(out, ignore_errors=True)
        return Detection(trial.fault, trial.engine, trial.seed, False, cap,
                         summary=_cut_short(spent, cap), startup=run.startup,
                         wall_seconds=run.seconds, execs=run.execs)
    stored = StoredFinding(run.finding)
    if trial.engine == "mmufuzz":  # the raw finding the minimization phase starts from
        raw.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(stored.raw, raw)
    detection = Detection(trial.fault, trial.engine, trial.seed, True,
                          _searched(run.finding_cpu, run.startup, cap), stored.signature,
                          stored.summary(), run.startup, run.first_finding, run.execs)
    shutil.rmtree(out, ignore_errors=True)
    return detection


def _baseline_trial(trial: Trial, bug: Bug, target: str, budget: Budget,
                    work: Path) -> Detection:
    name = f"{trial.engine}-{trial.fault}-seed{trial.seed}"
    log = work / "logs" / f"{name}.log"
    run = run_child(trial.engine, {"target": target, "inject": bug.inject, "seed": trial.seed},
                    log, until="finding", budget=budget, env=dict(bug.env))
    cap = budget.cpu
    hit = run.first("finding")
    last = run.records[-1][1] if run.records else {}
    if hit is not None:
        seconds, record = hit
        spent = _searched(record["cpu"], run.startup, cap)
        if spent <= cap and (not bug.env or
                             fault_needed(parse_reproducer(record["repro"]).program, target)):
            return Detection(trial.fault, trial.engine, trial.seed, True, spent,
                             record["signature"], record["summary"], run.startup, seconds,
                             record["execs"])
        last = {"event": "finding the original target shows too"} if spent <= cap else last
    if not run.stopped_at_cap and not run.records:
        raise MeasurementFailed(f"{trial.engine} ended without a finding (exit "
                                f"{run.returncode}): see {log}")
    summary = last.get("event", "")
    if run.stopped_at_cap:
        summary = _cut_short(_searched(run.cpu, run.startup, cap), cap)
    return Detection(trial.fault, trial.engine, trial.seed, False, cap, summary=summary,
                     startup=run.startup, wall_seconds=run.records[-1][0] if run.records else None,
                     execs=last.get("execs"))


def run_trial(trial: Trial, bug: Bug, target: str, budget: Budget, work: Path) -> Detection:
    measure = _campaign_trial if trial.engine in CAMPAIGNS else _baseline_trial
    return measure(trial, bug, target, budget, work)


def detect(planned: list, target: str, cap: float, work: Path, jobs: int, done: Done,
           bugs: Optional[dict] = None) -> list:
    """Run every trial not already ``done``, ``jobs`` at a time; results in the order planned.

    ``cap``: each trial's CPU budget; ``bugs``: the :class:`Bug` of each trial's
    ``fault`` (default: the catalog fault of that name).
    """
    finished = itertools.count(done.kept() + 1)
    budget = Budget(cap)

    def one(trial: Trial) -> dict:
        key = f"{trial.fault}-{trial.engine}-seed{trial.seed}"
        bug = (bugs or {}).get(trial.fault) or Bug.fault(trial.fault)
        result, kept = done.measure(key, lambda: asdict(run_trial(trial, bug, target, budget,
                                                                  work)))
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

"""The whole benchmark, phase by phase, into one results document.

Order matters for fairness: the throughput phase runs first and alone (one
measurement at a time, so a rate is never shared with a neighbour; ``--jobs
2`` and the pair of replay loops get both cores to themselves); then the
findings-over-time campaign, alone; then the time-to-detect trials, the
minimizations and the clean soak, ``jobs`` at a time, one process per core.
Every phase leaves its raw numbers in the results, which ``results.json``
keeps so the report can be redrawn without measuring again.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from mmufuzz.fuzz.atomic import write_atomic
from mmufuzz.fuzz.campaign import StoredFinding
from mmufuzz.fuzz.corpus import NO_FAULT
from mmufuzz.bench import detect, machine, mutants, soak, throughput
from mmufuzz.bench.procs import MeasurementFailed, run_campaign, run_child, run_parallel
from mmufuzz.bench.resume import Done, clear, stored_results

# A campaign that overruns its --max-time by this much is stopped by the bench.
CAMPAIGN_GRACE = 60.0
THROUGHPUT_SEED = 1
RESULTS = "results.json"


@dataclass(frozen=True)
class Config:
    """What to measure and for how long; recorded in the report."""

    command: str
    target: str
    faults: tuple
    seeds: tuple
    cap: float
    jobs: int
    campaign_time: float
    loop_time: float
    minimize_time: float
    soak_programs: int
    out: Path
    quick: bool
    mutants: int = 0
    mutant_seed: int = 1
    mutant_programs: int = 1000
    mutant_budget: float = 120.0
    # What a trial's budget (cap) counts: CPU seconds after its start-up.  (Runs before the
    # CPU budget have no such field: their caps and times were wall-clock seconds from launch.)
    clock: str = "cpu"
    # The phases and the time-to-detect engines asked for (default: all of them).
    phases: tuple = ()
    engines: tuple = detect.ENGINES

    def selected(self) -> list:
        """``PHASES`` this run measures, in order."""
        return [(name, measure) for name, measure in PHASES
                if not self.phases or name in self.phases]

    def to_json(self) -> dict:
        return {**asdict(self), "out": str(self.out), "faults": list(self.faults),
                "seeds": list(self.seeds), "phases": list(self.phases),
                "engines": list(self.engines)}


def _say(text: str) -> None:
    print(f"bench: {text}", file=sys.stderr, flush=True)


def _campaign(config: Config, name: str, inject: str, jobs: int = 1) -> tuple:
    """A campaign of ``campaign_time`` seconds in ``work/NAME``, run to its end.

    Returns its folder and, if it failed (libFuzzer died), what to tell the reader.
    """
    out = config.out / "work" / name
    shutil.rmtree(out, ignore_errors=True)
    args = ["--target", config.target, "--inject", inject, "--seed", str(THROUGHPUT_SEED),
            "--max-time", str(config.campaign_time)]
    log = config.out / "work" / "logs" / f"{name}.log"
    run = run_campaign(args, out, log, cap=config.campaign_time + CAMPAIGN_GRACE, jobs=jobs)
    failure = "" if run.returncode in (0, 1) else \
        f"the campaign failed after {run.seconds:.0f} s (exit {run.returncode}): see {out}/logs"
    return out, failure


def _throughput_campaign(config: Config, name: str, jobs: int) -> Path:
    """A no-fault campaign whose rate is measured: a failed one has no rate to report."""
    out, failure = _campaign(config, name, NO_FAULT, jobs)
    if failure:
        raise MeasurementFailed(f"throughput {failure}")
    return out


def _loop(config: Config, kind: str, corpus: Path, name: str = "") -> dict:
    params = {"corpus": str(corpus), "target": config.target, "seconds": config.loop_time}
    log = config.out / "work" / "logs" / f"{name or kind}.log"
    run = run_child(kind, params, log)
    if run.returncode != 0 or not run.records:
        raise MeasurementFailed(f"{kind} loop failed (exit {run.returncode}): see {log}")
    return run.result()


def measure_throughput(config: Config) -> dict:
    """Campaign (1 job, then 2), then replay and differential loops over its corpus.

    With 2 jobs, two replay loops also run at once: two identical processes
    that share nothing, whose summed rate over one loop's is what this machine
    gives a second process at best, the ceiling for the campaigns' scaling.
    """
    _say(f"throughput: campaign, 1 job, {config.campaign_time:g} s")
    single = _throughput_campaign(config, "throughput-jobs1", 1)
    results = {"campaign": throughput.campaign_rate(single / "stats.jsonl")}
    if config.jobs >= 2:
        _say(f"throughput: campaign, 2 jobs, {config.campaign_time:g} s")
        double = _throughput_campaign(config, "throughput-jobs2", 2)
        results["campaign_jobs2"] = throughput.campaign_rate(double / "stats.jsonl")
    corpus = single / "corpus"
    results["corpus_inputs"] = len(throughput.corpus_inputs(str(corpus)))
    for kind in ("replay", "differential", "coverage"):
        _say(f"throughput: {kind} loop, {config.loop_time:g} s")
        results[kind] = _loop(config, kind, corpus)
    if config.jobs >= 2:
        _say(f"throughput: two replay loops at once, {config.loop_time:g} s")
        results["replay_pair"] = run_parallel(
            lambda i: _loop(config, "replay", corpus, f"replay-pair-{i}"), [1, 2], 2)
    _say("throughput: profiling the differential loop")
    results["profile"] = _loop(config, "profile", corpus)
    return results


def measure_campaign_over_time(config: Config) -> dict:
    """One campaign with every benchmarked fault injected at once: coverage and findings."""
    inject = ",".join(f for f in config.faults if f != NO_FAULT) or NO_FAULT
    _say(f"campaign over time: inject {inject}, {config.campaign_time:g} s")
    out, failure = _campaign(config, "over-time", inject)
    records = [json.loads(line) for line in (out / "stats.jsonl").read_text().splitlines()
               if line]
    started = records[0]["time"] - records[0]["run_seconds"] if records else 0.0
    findings = []
    for path in sorted((out / "findings").glob("[!.]*")):
        stored = StoredFinding(path)
        findings.append({"signature": stored.signature, "summary": stored.summary(),
                         "seconds": (path / "input.bin").stat().st_mtime - started})
    findings.sort(key=lambda f: f["seconds"])
    return {"inject": inject, "records": records, "findings": findings, "failure": failure}


def _done(config: Config, phase: str) -> Done:
    done = Done(config.out, phase)
    kept = done.kept()
    if kept:
        _say(f"{phase}: {kept} measurements kept from the stopped run")
    return done


def measure_detection(config: Config) -> list:
    planned = detect.trials(config.faults, config.seeds, config.engines)
    _say(f"time-to-detect: {len(planned)} trials, cap {config.cap:g} s, {config.jobs} at a time")
    return detect.detect(planned, config.target, config.cap, config.out / "work", config.jobs,
                         _done(config, "detection"))


def _minimize_fault(config: Config, fault: str) -> dict:
    row = {"fault": fault}
    raw = detect.raw_finding(config.out / "work", fault, config.seeds)
    if raw is None:
        return row
    output = config.out / "minimized" / f"{fault}.repro"
    params = {"raw": str(raw), "target": config.target, "inject": fault,
              "max_seconds": config.minimize_time, "output": str(output)}
    result = run_child("minimize", params, config.out / "work" / "logs" / f"minimize-{fault}.log",
                       cap=config.minimize_time + CAMPAIGN_GRACE)
    if not result.records:
        return {**row, "problem": f"minimizer exited {result.returncode}"}
    row.update(result.result())
    del row["event"]
    return row


def measure_minimization(config: Config) -> list:
    _say(f"minimization: {len(config.faults)} faults, {config.jobs} at a time")
    done = _done(config, "minimization")

    def one(fault: str) -> dict:
        return done.measure(fault, lambda: _minimize_fault(config, fault))[0]

    return run_parallel(one, list(config.faults), config.jobs)


def measure_soak(config: Config) -> dict:
    _say(f"clean soak: {config.soak_programs:,} random programs with parallel ops, "
         f"{config.jobs} at a time")
    return soak.soak(config.target, config.soak_programs, config.jobs, config.out)


MUTANT_ENGINES = ("mmufuzz", "unguided", "random", "hypothesis")


def measure_mutants(config: Config) -> dict:
    """Sample mutants, sort out the shallow ones, give every engine each deep one's budget."""
    _say(f"mutants: sampling {config.mutants} (seed {config.mutant_seed})")
    total = len(mutants.all_mutants())
    drawn = mutants.sample(config.mutants, config.mutant_seed)
    checked = _done(config, "mutant-check")
    work = config.out / "work"
    _say(f"mutants: shallow check ({config.mutant_programs} random programs), "
         f"{config.jobs} at a time")

    def check(mutant) -> dict:
        return checked.measure(mutants.slug(mutant.name), lambda: mutants.classify(
            mutant, mutants.TARGET, config.mutant_programs, config.mutant_seed, work))[0]

    rows = run_parallel(check, drawn, config.jobs)
    deep = [row for row in rows if row["kind"] == mutants.DEEP]
    bugs = {row["name"]: detect.Bug(row["name"], NO_FAULT,
                                    mutants.environment(Path(row["package"]))) for row in deep}
    engines = [engine for engine in MUTANT_ENGINES if engine in config.engines]
    planned = detect.trials(list(bugs), config.seeds[:1], engines)
    _say(f"mutants: {len(deep)} deep of {len(rows)}; {len(planned)} trials, "
         f"{config.mutant_budget:g} CPU s each")
    found = detect.detect(planned, mutants.TARGET, config.mutant_budget, work, config.jobs,
                          _done(config, "mutants"), bugs)
    return {"generator": f"cosmic-ray {machine.version('cosmic-ray')}", "total": total,
            "mutants": rows, "detection": found}


PHASES = (("throughput", measure_throughput), ("over_time", measure_campaign_over_time),
          ("detection", measure_detection), ("mutants", measure_mutants),
          ("minimization", measure_minimization), ("soak", measure_soak))


def run(config: Config, resume: bool = False) -> dict:
    """Every phase asked for, in order (with ``resume``, those not finished yet); the results.

    ``results.json`` is rewritten after each phase (``complete`` false until
    the last), so a run stopped early can still be reported with ``--render``
    and continued with ``resume`` (see :mod:`mmufuzz.bench.resume`).  The 1-minute
    load average before and after each phase is kept, so a reader can tell a
    quiet machine from one that was shared.
    """
    path = config.out / RESULTS
    selected = config.selected()
    if resume:
        results = stored_results(path, config.to_json())
        missing = [name for name, _ in selected if name not in results]
        if missing:
            now = machine.describe()
            results.setdefault("resumed", []).append(
                {"date": now["date"], "commit": now["commit"], "phases": missing})
            results["complete"] = False
    else:
        clear(config.out)
        results = {"config": config.to_json(), "machine": machine.describe(), "load": {},
                   "complete": False}
    write_atomic(path, json.dumps(results, indent=1) + "\n")
    for name, measure in selected:
        if name in results:
            _say(f"{name}: kept from the stopped run")
            continue
        before = os.getloadavg()[0]
        results[name] = measure(config)
        results["load"][name] = [round(before, 2), round(os.getloadavg()[0], 2)]
        results["complete"] = all(phase in results for phase, _ in selected)
        write_atomic(path, json.dumps(results, indent=1) + "\n")
    return results

"""The Markdown report of a results document: targets first, then each measurement."""

from __future__ import annotations

import importlib.util
import json
import statistics
from pathlib import Path

from mmufuzz.fuzz.atomic import write_atomic
from mmufuzz.fuzz.schedules import SHARE
from mmufuzz.bench.analysis import (check_targets, explorer_part, geomean, kills, machine_scaling,
                                    rate, speedups, summarize_detection)
from mmufuzz.bench.detect import DETERMINISTIC, ENGINES
from mmufuzz.bench.minimization import with_known_minima
from mmufuzz.bench.mutants import SHALLOW_CPU

# Engines the guided campaign's speed-up is stated against (those measured).
BASELINES = ("unguided", "random", "hypothesis")

# Fields the report reads, checked by ``load`` so that ``--render`` names a missing one
# instead of failing halfway through drawing.  SECTIONS are in every results document
# (a partial run's too); OPTIONAL ones where they were measured; ENTRIES are in every
# element of a list section that was measured.
SECTIONS = {
    "config": ("command", "target", "seeds", "cap", "jobs", "campaign_time", "loop_time",
               "minimize_time", "quick"),
    "machine": ("date", "cpu", "logical_cpus", "physical_cores", "memory_gb", "os", "python",
                "packages", "commit"),
    "load": (),
}
OPTIONAL = {
    "soak": ("programs", "parallel_ops", "ops", "seconds", "findings", "reproducers"),
}
ENTRIES = {
    "detection": ("fault", "engine", "seed", "found", "seconds", "summary"),
    "minimization": ("fault",),
}


class BadResults(ValueError):
    """A results document that cannot be reported: unreadable, not JSON, or a field missing."""


def load(path: Path) -> dict:
    """The results document at ``path``, checked for the fields the report reads."""
    try:
        results = json.loads(path.read_text())
    except OSError as error:
        raise BadResults(f"{path}: cannot read: {error.strerror}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise BadResults(f"{path}: not JSON: {error}") from None
    if not isinstance(results, dict):
        raise BadResults(f"{path}: not a results document (a JSON object)")
    for section, fields in SECTIONS.items():
        if section not in results:
            raise BadResults(f"{path}: field '{section}' is missing")
        _require(results[section], section, fields, path)
    for section, fields in OPTIONAL.items():
        if section in results:
            _require(results[section], section, fields, path)
    for section, fields in ENTRIES.items():
        entries = results.get(section, [])
        if not isinstance(entries, list):
            raise BadResults(f"{path}: field '{section}' is not a list")
        for i, entry in enumerate(entries):
            _require(entry, f"{section}[{i}]", fields, path)
    return results


def _require(obj, name: str, fields: tuple, path: Path) -> None:
    """``obj``, the field ``name`` of the document at ``path``, is an object with ``fields``."""
    if not isinstance(obj, dict):
        raise BadResults(f"{path}: field '{name}' is not an object")
    for field in fields:
        if field not in obj:
            raise BadResults(f"{path}: field '{name}.{field}' is missing")


def _table(headers: list, rows: list) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _met(value) -> str:
    return {True: "yes", False: "**no**", None: "n/a"}[value]


def _targets(results: dict) -> str:
    rows = [(c.name, c.goal, c.measured, _met(c.met), c.shortfall)
            for c in check_targets(results)]
    return "## The issue's targets\n\n" + _table(["target", "goal", "measured", "met", "gap"], rows)


def _times(numerator: float, denominator: float, digits: int = 1) -> str:
    """``numerator / denominator`` as ``2.5x``, or ``n/a`` where the denominator measured
    nothing (a campaign of seconds on a loaded machine may not get to run an op)."""
    return f"{numerator / denominator:.{digits}f}x" if denominator else "n/a"


def _throughput(results: dict) -> str:
    measured = results.get("throughput")
    if not measured:
        return ""
    if "coverage" in measured:
        measured = dict(measured, explorer=explorer_part(measured["coverage"]))
    modes = (("replay", "plain replay: target only (no reference, no coverage)"),
             ("differential", "differential loop: decode + target + reference + sampled "
                              "invariants (no coverage)"),
             ("coverage", "differential loop under coverage (hit record) and its schedule "
                          "explorer, per CPU-second: the inputs' own ops"),
             ("explorer", "the same loop's schedule explorer: its variants' ops, per CPU-second "
                          "(programs/s: variants)"),
             ("campaign", "campaign, 1 job: the differential loop under coverage and libFuzzer"),
             ("campaign_jobs2", "campaign, 2 jobs"))
    base = rate(measured["replay"])[1] if "replay" in measured else None
    rows = []
    for key, label in modes:
        if key not in measured:
            continue
        execs, ops = rate(measured[key])
        workers = measured[key].get("workers", 1)
        ratio = "1x" if not base or key == "replay" else \
            f"{_times(base, ops)} slower" if ops else "n/a"
        if measured[key].get("with_startup"):
            label += " (campaign too short for stats intervals: start-up included)"
        rows.append((label, f"{execs:,.0f}", f"{ops:,.0f}", f"{ops / workers:,.0f}",
                     f"{measured[key]['ops'] / max(measured[key]['execs'], 1):.1f}", ratio))
    text = ("## Throughput\n\nOne workload for every row: the "
            f"{measured.get('corpus_inputs', '?')} inputs of the corpus the 1-job campaign built "
            "(the campaign rows run libFuzzer's own mutants of it).  A guest op is one top-level "
            "op; a `parallel` counts once.\n\n")
    text += _table(["mode", "programs/s", "guest ops/s", "guest ops/s/core", "ops/program",
                    "vs plain replay"], rows)
    if "differential" in measured and "campaign" in measured:
        diff, camp = rate(measured["differential"])[1], rate(measured["campaign"])[1]
        text += (f"\nThe reference, invariant sampling and decoding cost "
                 f"{_times(base, diff)} over the target alone; coverage instrumentation, "
                 f"libFuzzer and schedule exploration cost a further {_times(diff, camp)}.  "
                 f"Exploration may take {SHARE:.0%} of a worker's time: its variants resume "
                 "from a checkpoint before a `parallel` op and run the pair, interleaved, and "
                 "a short tail, so their ops are the dearest a campaign counts.\n")
    return text + _profile(measured.get("profile"))


def _profile(profile) -> str:
    if not profile:
        return ""
    text = ("\n### Where the differential loop's time goes (cProfile, self time)\n\n"
            + _table(["part", "share"], [(k, f"{v:.0%}") for k, v in profile["packages"]])
            + "\n"
            + _table(["function", "self", "cumulative", "calls"],
                     [(f"`{f['function']}`", f"{f['share']:.1%}", f"{f['cumulative_share']:.0%}",
                       f"{f['calls']:,}") for f in profile["functions"]]))
    return text


def _soak(results: dict) -> str:
    soaked = results.get("soak")
    if not soaked:
        return ""
    text = ("## Clean soak\n\nRandom programs (random bytes through the campaign's decoder, as "
            "the random baseline makes them) with at least one `parallel` op, run on the target "
            "with no fault injected, invariants checked after every op, "
            f"{results['config']['jobs']} processes: every finding is a false positive of "
            "mmufuzz or a bug of the target.\n\n")
    text += _table(["programs", "`parallel` ops", "guest ops", "seconds", "findings"],
                   [(f"{soaked['programs']:,}", f"{soaked['parallel_ops']:,}", f"{soaked['ops']:,}",
                     f"{soaked['seconds']:.0f}", soaked["findings"])])
    if soaked["reproducers"]:
        text += "\nKept reproducers:\n\n" + "".join(
            f"- `{r['path']}`: {r['summary']}\n" for r in soaked["reproducers"])
    return text


def _scaling(results: dict) -> str:
    measured = results.get("throughput", {})
    if "campaign" not in measured:
        return ""
    if "campaign_jobs2" not in measured:
        return "## Scaling\n\nNot measured (fewer than 2 measurement jobs).\n"
    (execs1, ops1), (execs2, ops2) = rate(measured["campaign"]), rate(measured["campaign_jobs2"])
    rows = [("1", f"{execs1:,.0f}", "1.00x", f"{ops1:,.0f}", "1.00x"),
            ("2", f"{execs2:,.0f}", _times(execs2, execs1, 2), f"{ops2:,.0f}",
             _times(ops2, ops1, 2))]
    text = ("## Scaling\n\nThe same campaign (no fault, seed 1) for the same time with "
            "`--jobs 1` and `--jobs 2`, each alone on the machine.  The target is stated in "
            "execs/s; guest ops/s is shown beside it because the two campaigns' corpora grow "
            "apart, and a program's length is part of its cost.\n\n"
            + _table(["--jobs", "execs/s", "speed-up", "guest ops/s", "speed-up"], rows))
    ceiling = machine_scaling(measured)
    if ceiling is not None:
        text += ("\nThe machine's own ceiling: two plain replay loops over the same corpus, run "
                 f"at once as two processes that share nothing, together get {ceiling:.2f}x "
                 "the execs/s of one loop alone.\n")
    return text


def _median_cell(summary, cap: float, times: list, execs: list = ()) -> str:
    """Median (min-max) [found/runs], and the median execs to a finding where counted."""
    if summary is None:
        return "-"
    spread = f" ({min(times):.1f}-{max(times):.1f})" if len(times) > 1 else ""
    median = f"≥{cap:g}" if summary.capped_median else f"{summary.median:.1f}"
    counted = f", {statistics.median(execs):,.0f} execs" if execs else ""
    return f"{median}{spread} [{summary.found}/{summary.runs}{counted}]"


def _speedup_cell(value, baseline, mine) -> str:
    """The ratio, marked as a bound where a median is at the cap."""
    if value is None:
        return "-"
    if baseline.capped_median and mine.capped_median:
        return "1x (both at cap)"
    bound = "≥" if baseline.capped_median else "≤" if mine.capped_median else ""
    return f"{bound}{value:.1f}x"


def _engines(detections: list) -> list:
    """The engines of ``detections``, in the bench's order."""
    present = {d["engine"] for d in detections}
    return [engine for engine in ENGINES if engine in present]


def _cpu_clock(results: dict) -> bool:
    """True for runs whose budgets and times are CPU seconds after start-up."""
    return results["config"].get("clock") == "cpu"


def _clock_words(results: dict, cap: float) -> str:
    if _cpu_clock(results):
        return (f"CPU seconds after start-up (the process tree's user + system time from its "
                f"first exec; each trial's budget is {cap:g} CPU s)")
    return f"seconds from launch (wall clock; cap {cap:g} s)"


def _speed_table(detections: list, cap: float) -> tuple:
    """Rows of medians and speed-ups per bug, the engines and baselines measured."""
    summary = summarize_detection(detections, cap)
    engines = _engines(detections)
    baselines = [b for b in BASELINES if b in engines]
    ratios = {b: speedups(summary, b) for b in baselines}
    rows = []
    for fault, measured in summary.items():
        cells = []
        for engine in engines:
            runs = [d for d in detections if d["fault"] == fault and d["engine"] == engine]
            execs = [d["execs"] for d in runs if d["found"] and d.get("execs") is not None]
            if engine in DETERMINISTIC:  # one run that ends when its programs do: no cap
                cells.append(f"{runs[0]['seconds']:.2f} [1/1]" if runs[0]["found"]
                             else "not found [0/1]")
                continue
            cells.append(_median_cell(measured.get(engine), cap, [d["seconds"] for d in runs],
                                      execs))
        for baseline in baselines:
            cells.append(_speedup_cell(ratios[baseline].get(fault), measured.get(baseline),
                                       measured.get("mmufuzz")))
        rows.append((fault, *cells))
    means = [geomean(ratios[b].values()) for b in baselines]
    rows.append(("**geomean**", *[""] * len(engines),
                 *[("-" if m is None else f"**{m:.1f}x**") for m in means]))
    headers = [*engines, *(f"vs {b}" for b in baselines)]
    return headers, rows


def _execs_and_startup(detections: list) -> str:
    """Per engine: median execs at the first finding, median start-up CPU, wall over CPU."""
    def median(values: list, form: str) -> str:
        return format(statistics.median(values), form) if values else "-"

    rows = []
    for engine in _engines(detections):
        runs = [d for d in detections if d["engine"] == engine]
        execs = [d["execs"] for d in runs if d["found"] and d.get("execs") is not None]
        missed = [d["execs"] for d in runs if not d["found"] and d.get("execs") is not None]
        startups = [d["startup"] for d in runs if d.get("startup") is not None]
        rows.append((engine, median(execs, ",.0f"), median(missed, ",.0f"),
                     median(startups, ".2f"), f"{sum(d['found'] for d in runs)}/{len(runs)}"))
    return _table(["engine", "median execs to the first finding",
                   "median execs of a whole budget (found nothing)", "median start-up CPU s",
                   "found / trials"], rows)


def _failed_trials(detections: list, what: str) -> str:
    """The trials that ended, without a finding, before their budget was spent, and why."""
    failed = [d for d in detections if d["summary"] and not d["found"]
              and d["engine"] not in DETERMINISTIC]
    if not failed:
        return ""
    return ("\nTrials that ended without a finding before their budget was spent (they count at "
            "the budget):\n\n" + _table([what, "engine", "seed", "why"],
                                         [(d["fault"], d["engine"], d["seed"], d["summary"])
                                          for d in failed]))


def _detection(results: dict, plots: list) -> str:
    detections = results.get("detection")
    if not detections:
        return ""
    cap = results["config"]["cap"]
    headers, rows = _speed_table(detections, cap)
    clock = _clock_words(results, cap)
    text = (f"## Time to detect\n\n{clock[0].upper()}{clock[1:]} to the first finding, median "
            f"over {len(results['config']['seeds'])} seeds (min-max) [runs that found it / runs]; "
            f"a run that found nothing counts as its budget, and a median at the budget "
            "reads ≥budget.  Speed-up = baseline median / mmufuzz median (medians under "
            "0.01 s count as 0.01 s); where the baseline's median is at the budget it is a lower "
            "bound (≥).  `mmufuzz` is the guided campaign, `unguided` its ablation, `seeds` "
            "the shipped seeds replayed once (deterministic: one run).\n\n")
    if "time_to_detect.png" in plots:
        text += "![time to detect](bench/time_to_detect.png)\n\n"
    text += _table(["fault", *headers], rows)
    if any("execs" in d for d in detections):
        text += "\n" + _execs_and_startup(detections)
    if "detected_over_time.png" in plots:
        text += "\n![detected over time](bench/detected_over_time.png)\n"
    first: dict = {}
    for d in detections:
        if d["found"] and d["engine"] == "mmufuzz":
            first.setdefault((d["fault"], d["signature"]), []).append(d)
    text += _failed_trials(detections, "fault")
    if first:
        text += "\nWhat mmufuzz found first, per fault (an example finding of each signature):\n\n"
        text += _table(["fault", "signature", "seeds", "example"],
                       [(f, f"`{s}`", len(runs), runs[0]["summary"])
                        for (f, s), runs in first.items()])
    return text


def _mutant_rows(rows: list, kind: str, with_finding: bool) -> list:
    return [(f"`{r['name']}`", f"`{r['change']}`",
             *((r.get("by", ""), r.get("summary", "")) if with_finding else ()))
            for r in rows if r["kind"] == kind]


def _mutants(results: dict) -> str:
    measured = results.get("mutants")
    if not measured or not measured.get("mutants"):
        return ""
    config = results["config"]
    rows, budget = measured["mutants"], config["mutant_budget"]
    kinds: dict = {}
    for row in rows:
        kinds[row["kind"]] = kinds.get(row["kind"], 0) + 1
    text = (f"## Mutant benchmark\n\n{len(rows)} mutants of `harness/tdp` (invariant checks "
            f"excepted) drawn with seed {config['mutant_seed']} from the {measured['total']:,} "
            f"that {measured['generator']}'s core operators make.  Each is loaded in its trials' "
            "processes only.  *Shallow*: killed by replaying the shipped seeds, the regression "
            f"reproducers and {config['mutant_programs']:,} random programs (no fault injected); "
            "only counted.  *Deep*: survived that; the benchmark.  A kill is a differential "
            "finding whose program runs clean on the original target.\n\n")
    text += _table(["kind", "mutants"], sorted(kinds.items()))
    shallow_by: dict = {}
    for row in rows:
        if row["kind"] == "shallow":
            source = row["by"].split()[0]
            shallow_by[source] = shallow_by.get(source, 0) + 1
    if shallow_by:
        text += "\nShallow mutants by what killed them first: " + ", ".join(
            f"{source} {count}" for source, count in sorted(shallow_by.items())) + ".\n"
    detections = measured.get("detection", [])
    if detections:
        headers, speed = _speed_table(detections, budget)
        clock = _clock_words(results, budget)
        text += (f"\n### Deep mutants: time to kill\n\nEvery engine gets the same budget per "
                 f"deep mutant, seed {config['seeds'][0]}: {clock} to the kill "
                 "[killed / runs].\n\n" + _table(["mutant", *headers], speed))
        text += "\n" + _execs_and_startup(detections)
        text += _failed_trials(detections, "mutant")
        killed = kills(results)
        deep = kinds.get("deep", 0)
        text += "\nDeep mutants killed, per engine: " + ", ".join(
            f"{engine} {count}/{deep}" for engine, count in killed.items()) + ".\n"
        killed_names = {d["fault"] for d in detections if d["found"]}
        for title, chosen in (
                ("Deep mutants some engine killed", [r for r in rows if r["name"] in killed_names]),
                ("Killed by no engine (likely equivalent, or beyond every engine within the "
                 "budget)", [r for r in rows if r["name"] not in killed_names])):
            if any(r["kind"] == "deep" for r in chosen):
                text += f"\n{title}:\n\n" + _table(["mutant", "change"],
                                                      _mutant_rows(chosen, "deep", False))
    for kind, title in (("shallow", "Shallow mutants"), ("hang", "Mutants that hang"),
                        ("broken", "Mutants that do not run"),
                        ("unclear", "Mutants whose first finding the original shows too")):
        if kinds.get(kind):
            text += f"\n{title}:\n\n" + _table(["mutant", "change", "by", "finding"],
                                                  _mutant_rows(rows, kind, True))
    return text


def _over_time(results: dict, plots: list) -> str:
    run = results.get("over_time")
    if not run:
        return ""
    text = (f"## A campaign over time\n\nOne `mmufuzz fuzz` campaign with every benchmarked "
            f"fault injected at once (`--inject {run['inject']}`), 1 job.  Findings are "
            "signatures (several faults may share one, and one may hide another).\n\n")
    if run.get("failure"):
        text += f"**Note**: {run['failure']}.\n\n"
    if "campaign_over_time.png" in plots:
        text += "![campaign over time](bench/campaign_over_time.png)\n\n"
    if run["findings"]:
        text += _table(["seconds", "signature", "finding"],
                       [(f"{f['seconds']:.1f}", f"`{f['signature']}`", f["summary"])
                        for f in run["findings"]])
    else:
        text += "No findings.\n"
    return text


def _minimization(results: dict) -> str:
    rows = []
    for m in results.get("minimization", []):
        hand = "-"
        if "hand_ops" in m:
            hand = str(m["hand_ops"]) if m.get("hand_verified") else \
                f"{m['hand_ops']} (unverified: {m['hand_problem']})"
        if "ops" not in m:
            rows.append((m["fault"], "-", m.get("problem", "not found by mmufuzz"), hand,
                         "-", m.get("regression_ops", "-"), "-", "-"))
            continue
        minimized = str(m["ops"]) if m["reproducible"] else \
            ("flaky, not minimized" if m["flaky"] else "did not reproduce")
        same = "" if not m.get("hand_signature") else \
            (" (same signature)" if m["hand_signature"] == m["signature"] else
             " (other signature)")
        ratio = f"{m['ratio']:.2f}x{same}" if "ratio" in m else "-"
        rows.append((m["fault"], m["original_ops"], minimized, hand, ratio,
                     m.get("regression_ops", "-"), f"{m['seconds']:.2f}", m["runs"]))
    if not rows:
        return ""
    return ("## Minimization\n\n`fuzz.minimize` on the raw finding of the lowest seed whose "
            "campaign found the fault, against the hand-written minimal reproducer in "
            "`bench/minimal/` (verified: fails with the fault, clean without) and the "
            "project's `corpus/regressions/` reproducer.  Lengths are ops.\n\n"
            + _table(["fault", "raw", "minimized", "hand-minimal", "ratio", "regression",
                      "seconds", "runs"], rows))


def _timing(results: dict) -> str:
    if not _cpu_clock(results):
        return """- Time-to-detect is timed by the bench's clock from launch to the first finding, for every
  engine alike (start-up included), capped at the cap (wall clock): for mmufuzz, the moment the
  campaign publishes the finding's folder under `findings/` (polled every 50 ms), after which
  the campaign is stopped; for the baselines, the moment their report line arrives.  A finding
  counts only if its program runs clean without the fault (else it is the target's own bug,
  and the engine goes on searching; Hypothesis, which stops at its first failure, then counts
  as not having found it)."""
    return """- Every trial gets the same budget of CPU seconds after its start-up: the user + system time
  of its whole process tree (a campaign's supervisor, libFuzzer worker and minimizer), read
  every 50 ms; start-up ends at the first exec (a campaign worker's first heartbeat, a baseline's
  `started` line).  Time-to-detect is that CPU time at the first finding: for a campaign, the
  moment it publishes the finding's folder under `findings/`; for the others, their report line
  (which gives their own CPU time).  Start-up CPU, wall-clock time and execs are kept too.
  A finding counts only if its program runs clean on the original target without the fault
  (else it is the target's own bug, and the engine goes on searching; Hypothesis, which stops at
  its first failure, then counts as not having found it)."""


def _engines_measured(results: dict) -> str:
    """A note when the time-to-detect trials ran fewer engines than the bench has."""
    measured = _engines(results.get("detection") or [])
    if not measured or len(measured) == len(ENGINES):
        return ""
    return (f"  This run's time-to-detect trials ran only {', '.join(measured)}"
            f"{'' if results['config'].get('engines') else ' (it predates the others)'}.\n")


def _mutant_method(results: dict) -> str:
    config = results["config"]
    if "mutants" not in results:
        return """- Mutant benchmark (`mmufuzz bench --phases mutants`): not measured in this run.  Mutants
  of `harness/tdp` (all but `invariants.py`, the oracle) are generated with cosmic-ray's
  argument-free core operators, sampled with a seeded `random.Random`, loaded from a scratch
  copy of the package in their trials' processes only; those killed by the seeds, the
  regression reproducers and 1,000 random programs are shallow and only counted, the others
  get every engine for the same CPU budget.
"""
    return f"""- Mutants: `bench/mutants.py`.  Every position each argument-free core operator of
  cosmic-ray (`mutation_positions` over the parso tree, cosmic-ray's own occurrence numbering)
  can mutate in `harness/tdp/*.py` but `invariants.py`; {config['mutants']} drawn with
  `random.Random({config['mutant_seed']}).sample`; each applied to a copy of the package in a
  scratch folder put first on `PYTHONPATH` (with `PYTHONSAFEPATH=1`) of its trials only.
  Shallow check: seeds, regressions and {config['mutant_programs']:,} random programs, each run
  as a campaign worker runs an input, at most {SHALLOW_CPU:g} CPU s (past it: a hang).  Deep
  mutants: each engine once (seed {config['seeds'][0]}), {config['mutant_budget']:g} CPU s
  after start-up.
"""


def _method(results: dict, raw: Path) -> str:
    config = results["config"]
    return f"""## Method

- Every measurement is a process of its own: a real `mmufuzz fuzz` campaign for mmufuzz,
  `python -m mmufuzz.bench.child` for everything else, so no engine inherits another's imports.  One
  thing is kept between measurements, as it is for a user: campaign workers load their
  instrumented code from `~/.cache/mmufuzz/instrumented`, which the first campaign filled
  (`python bench/bench_startup.py` measures a worker's start-up cold against warm).
{_timing(results)}
- Engines: **mmufuzz** `mmufuzz fuzz --target {config['target']} --inject F --seed S` (1 job);
  **unguided**: the same campaign with `MMUFUZZ_GUIDANCE=off` (no instrumentation, outcome
  features computed but never given to libFuzzer, corpus = the seeds, `-keep_seed=1`; same
  seeds, mutator, schedule explorer, decoder and budget); **seeds**: each shipped seed run once
  as a campaign worker runs an input; **random**: `random.Random(S)` bytes of uniform length
  1..4096 (the campaign's `-max_len`), `fuzz.encoding.decode`, the campaign worker's run
  (`fuzz.runner.run_program`, invariants sampled as campaigns do), no coverage; **hypothesis**:
  `fuzz.stateful.machine_for(target)` through `get_state_machine_test`, `phases=[generate]`,
  `database=None`, `deadline=None`, default `stateful_step_count`, `hypothesis.seed(S)`; its
  execs are the examples it ran (each one program), counted in the machine's `teardown`.
{_engines_measured(results)}{_mutant_method(results)}- Parallelism: at most {config['jobs']} measurements at once, one process per core, trials
  queued fault -> seed -> engine so each engine's neighbour is a mix of all of them.  The
  throughput phase and the over-time campaign ran alone, one measurement at a time (but for
  the two replay loops that measure the machine's ceiling, which run together).
- Throughput rates leave start-up out: the loops time themselves; campaign rates come from
  `stats.jsonl`, from its first line with a running worker to its last.
- Seeds {', '.join(map(str, config['seeds']))}; cap {config['cap']:g} s; campaigns
  {config['campaign_time']:g} s; loops {config['loop_time']:g} s; minimization limit
  {config['minimize_time']:g} s.  Raw numbers: [`bench/results.json`](bench/results.json)
  (`python -m mmufuzz.bench --render {raw}` redraws this report).
"""


def _machine(results: dict) -> str:
    m = results["machine"]
    packages = ", ".join(f"{k} {v}" for k, v in m["packages"].items())
    load = ", ".join(f"{phase} {a:g} -> {b:g}" for phase, (a, b) in results["load"].items())
    return (f"## Machine\n\n- {m['cpu']}, {m['physical_cores']} cores / {m['logical_cpus']} "
            f"logical CPUs, {m['memory_gb']} GB RAM\n- {m['os']}, Python {m['python']}\n"
            f"- {packages}\n- commit {m['commit'] or 'unknown'}\n"
            f"- 1-minute load average before -> after each phase: {load} (the bench itself "
            f"keeps at most {results['config']['jobs']} cores busy; more means the machine "
            "was shared)\n")


def render(results: dict, plots: list, raw: Path = Path("docs/bench/results.json")) -> str:
    """The report's Markdown; ``raw`` is where its results document is kept."""
    config, m = results["config"], results["machine"]
    head = (f"# mmufuzz benchmarks\n\nMeasured {m['date']} on {m['cpu']} "
            f"({m['logical_cpus']} CPUs){' — quick smoke run, not for citing' if config['quick'] else ''}."
            f"\n\nCommand: `{config['command']}`\n\n")
    if config.get("phases"):
        head += (f"Phases asked for: {', '.join(config['phases'])} (`--phases`); the others were "
                 "not measured.\n\n")
    if config.get("engines") and len(config["engines"]) < len(ENGINES):
        head += (f"Engines asked for: {', '.join(config['engines'])} (`--engines`).\n\n")
    if not results.get("complete", True):
        done = (f"after the {', '.join(results['load'])} phase(s)" if results["load"]
                else "before its first phase ended")
        head += f"**Partial run**: stopped {done}; the other sections are missing.\n\n"
    for resumed in results.get("resumed", []):
        # Runs resumed before resumes named their phases said only that something was left.
        measured = (f"measured the {', '.join(resumed['phases'])} phase(s); "
                    if "phases" in resumed else "")
        head += (f"Resumed {resumed['date']} at commit {resumed['commit']} (`--resume`): "
                 f"{measured}what was finished before was kept.\n\n")
    busiest = max((load for pair in results.get("load", {}).values() for load in pair), default=0)
    if busiest > config["jobs"] + 0.5:
        head += (f"**The machine was shared**: the 1-minute load average reached {busiest:g} on "
                 f"{m['logical_cpus']} CPUs while the bench kept at most {config['jobs']} busy, "
                 "so rates read low and times long (see Machine).\n\n")
    parts = [head, _targets(results), _throughput(results), _scaling(results),
             _detection(results, plots), _mutants(results), _over_time(results, plots),
             _minimization(results),
             _soak(results), _method(results, raw), _machine(results)]
    return "\n".join(p for p in parts if p)


def write(results: dict, report: Path) -> list:
    """The report at ``report``, its plots and raw numbers in ``bench/`` beside it.

    Returns the plot files.  The raw numbers go along so that the committed
    report can always be redrawn (``--render``).
    """
    from mmufuzz.bench import plots as drawing
    shown = {**results, "minimization": with_known_minima(results.get("minimization", []),
                                                         results["config"]["target"])}
    folder = report.parent / "bench"
    drawn = drawing.draw_all(shown, folder)
    write_atomic(folder / "results.json", json.dumps(results, indent=1) + "\n")
    text = render(shown, drawn, folder / "results.json")
    if not drawn and importlib.util.find_spec("matplotlib") is None:
        text += "\n(Plots skipped: matplotlib is not installed; `pip install mmufuzz[bench]`.)\n"
    write_atomic(report, text)
    return [report.parent / "bench" / name for name in drawn]

"""The Markdown report of a results document: targets first, then each measurement."""

from __future__ import annotations

import json
from pathlib import Path

from mmufuzz.fuzz.atomic import write_atomic
from mmufuzz.fuzz.schedules import SHARE
from mmufuzz.bench.analysis import (check_targets, geomean, machine_scaling, rate, speedups,
                            summarize_detection)
from mmufuzz.bench.detect import ENGINES
from mmufuzz.bench.minimization import with_known_minima

BASELINES = ("random", "hypothesis")

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
    modes = (("replay", "plain replay: target only (no reference, no coverage)"),
             ("differential", "differential loop: decode + target + reference + sampled "
                              "invariants (no coverage)"),
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


def _median_cell(summary, cap: float, times: list) -> str:
    if summary is None:
        return "-"
    spread = f" ({min(times):.1f}-{max(times):.1f})" if len(times) > 1 else ""
    median = f"≥{cap:g}" if summary.capped_median else f"{summary.median:.1f}"
    return f"{median}{spread} [{summary.found}/{summary.runs}]"


def _speedup_cell(value, baseline, mine) -> str:
    """The ratio, marked as a bound where a median is at the cap."""
    if value is None:
        return "-"
    if baseline.capped_median and mine.capped_median:
        return "1x (both at cap)"
    bound = "≥" if baseline.capped_median else "≤" if mine.capped_median else ""
    return f"{bound}{value:.1f}x"


def _detection(results: dict, plots: list) -> str:
    detections = results.get("detection")
    if not detections:
        return ""
    cap = results["config"]["cap"]
    summary = summarize_detection(detections, cap)
    ratios = {b: speedups(summary, b) for b in BASELINES}
    rows = []
    for fault, engines in summary.items():
        cells = []
        for engine in ENGINES:
            times = [d["seconds"] for d in detections
                     if d["fault"] == fault and d["engine"] == engine]
            cells.append(_median_cell(engines.get(engine), cap, times))
        for baseline in BASELINES:
            cells.append(_speedup_cell(ratios[baseline].get(fault), engines.get(baseline),
                                       engines.get("mmufuzz")))
        rows.append((fault, *cells))
    means = [geomean(ratios[b].values()) for b in BASELINES]
    rows.append(("**geomean**", "", "", "",
                 *[("-" if m is None else f"**{m:.1f}x**") for m in means]))
    text = (f"## Time to detect\n\nSeconds from launch to the first finding, median over "
            f"{len(results['config']['seeds'])} seeds (min-max) [runs that found it / runs]; "
            f"a run that found nothing counts as the cap ({cap:g} s), and a median at the cap "
            "reads ≥cap.  Speed-up = baseline median / mmufuzz median; where the baseline's "
            "median is at the cap it is a lower bound (≥).\n\n")
    if "time_to_detect.png" in plots:
        text += "![time to detect](bench/time_to_detect.png)\n\n"
    text += _table(["fault", *ENGINES, "vs random", "vs hypothesis"], rows)
    if "detected_over_time.png" in plots:
        text += "\n![detected over time](bench/detected_over_time.png)\n"
    first: dict = {}
    for d in detections:
        if d["found"] and d["engine"] == "mmufuzz":
            first.setdefault((d["fault"], d["signature"]), []).append(d)
    failed = [d for d in detections if d["summary"] and not d["found"]]
    if failed:
        text += "\nTrials that ended without a finding before the cap (they count at the cap):\n\n"
        text += _table(["fault", "engine", "seed", "why"],
                       [(d["fault"], d["engine"], d["seed"], d["summary"]) for d in failed])
    if first:
        text += "\nWhat mmufuzz found first, per fault (an example finding of each signature):\n\n"
        text += _table(["fault", "signature", "seeds", "example"],
                       [(f, f"`{s}`", len(runs), runs[0]["summary"])
                        for (f, s), runs in first.items()])
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


def _method(results: dict) -> str:
    config = results["config"]
    return f"""## Method

- Every measurement is a process of its own: a real `mmufuzz fuzz` campaign for mmufuzz,
  `python -m mmufuzz.bench.child` for everything else, so no engine inherits another's imports.  One
  thing is kept between measurements, as it is for a user: campaign workers load their
  instrumented code from `~/.cache/mmufuzz/instrumented`, which the first campaign filled
  (`python bench/bench_startup.py` measures a worker's start-up cold against warm).
- Time-to-detect is timed by the bench's clock from launch to the first finding, for every
  engine alike (start-up included): for mmufuzz, the moment the campaign publishes the
  finding's folder under `findings/` (polled every 50 ms), after which the campaign is stopped;
  for the baselines, the moment their report line arrives.  A finding counts only if its
  program runs clean without the fault (else it is the target's own bug, and the engine goes on
  searching; Hypothesis, which stops at its first failure, then counts as not having found it).
- Engines: **mmufuzz** `mmufuzz fuzz --target {config['target']} --inject F --seed S
  --max-time {config['cap']:g}` (1 job); **random**: `random.Random(S)` bytes of uniform length
  1..4096 (the campaign's `-max_len`), `fuzz.encoding.decode`, the campaign worker's run
  (`fuzz.runner.run_program`, invariants sampled as campaigns do), no coverage; **hypothesis**:
  `fuzz.stateful.machine_for(target)` through `get_state_machine_test`, `phases=[generate]`,
  `database=None`, `deadline=None`, default `stateful_step_count`, `hypothesis.seed(S)`,
  stopped at the cap.
- Parallelism: at most {config['jobs']} measurements at once, one process per core, trials
  queued fault -> seed -> engine so each engine's neighbour is a mix of all three.  The
  throughput phase and the over-time campaign ran alone, one measurement at a time (but for
  the two replay loops that measure the machine's ceiling, which run together).
- Throughput rates leave start-up out: the loops time themselves; campaign rates come from
  `stats.jsonl`, from its first line with a running worker to its last.
- Seeds {', '.join(map(str, config['seeds']))}; cap {config['cap']:g} s; campaigns
  {config['campaign_time']:g} s; loops {config['loop_time']:g} s; minimization limit
  {config['minimize_time']:g} s.  Raw numbers: [`bench/results.json`](bench/results.json)
  (`python -m mmufuzz.bench --render docs/bench/results.json` redraws this report).
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


def render(results: dict, plots: list) -> str:
    config, m = results["config"], results["machine"]
    head = (f"# mmufuzz benchmarks\n\nMeasured {m['date']} on {m['cpu']} "
            f"({m['logical_cpus']} CPUs){' — quick smoke run, not for citing' if config['quick'] else ''}."
            f"\n\nCommand: `{config['command']}`\n\n")
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
             _detection(results, plots), _over_time(results, plots), _minimization(results),
             _soak(results), _method(results), _machine(results)]
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
    text = render(shown, drawn)
    if not drawn:
        text += "\n(Plots skipped: matplotlib is not installed; `pip install mmufuzz[bench]`.)\n"
    write_atomic(report, text)
    return [report.parent / "bench" / name for name in drawn]

"""From raw measurements to the numbers the report states: medians, ratios, targets.

Pure functions of the results document, so ``--render`` can redo the report
from ``results.json`` without measuring again.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Optional

# The targets.
TARGET_MEDIAN_SECONDS = 60.0
TARGET_SPEEDUP = 10.0
TARGET_OPS_PER_CORE = 30_000.0
TARGET_SCALING = 1.8
TARGET_MINIMIZED_RATIO = 1.2
TARGET_SOAK_PROGRAMS = 50_000  # issue 7: no false positive in this many programs with pairs
# Issue 29: guidance against its unguided ablation.
TARGET_ABLATION_SPEEDUP = 3.0
TARGET_ABLATION_KILLS = 1.5
TARGET_ABLATION_WORST = 1.25  # no catalog fault found more than this much later than unguided
# Times below this are one exec's noise (a CPU-time clock after start-up reads ~0 for a fault
# the first seed shows): ratios are taken of times at least this long.
FLOOR_SECONDS = 0.01


def geomean(values) -> Optional[float]:
    values = [v for v in values if v is not None]
    if not values:
        return None
    return math.exp(sum(math.log(v) for v in values) / len(values))


@dataclass(frozen=True)
class EngineSummary:
    """One engine on one fault: the median over seeds (capped runs at the cap), hits."""

    median: float
    found: int
    runs: int
    capped_median: bool


def summarize_detection(detections: list, cap: float) -> dict:
    """``{fault: {engine: EngineSummary}}``, faults and engines in the order measured."""
    grouped: dict = {}
    for d in detections:
        grouped.setdefault(d["fault"], {}).setdefault(d["engine"], []).append(d)
    summary = {}
    for fault, engines in grouped.items():
        summary[fault] = {}
        for engine, runs in engines.items():
            median = statistics.median(min(r["seconds"], cap) for r in runs)
            summary[fault][engine] = EngineSummary(median, sum(r["found"] for r in runs),
                                                   len(runs), median >= cap)
    return summary


def speedups(summary: dict, baseline: str, engine: str = "mmufuzz") -> dict:
    """``{fault: median(baseline) / median(engine)}`` (a capped median counts as the cap).

    Medians under :data:`FLOOR_SECONDS` count as it.
    """
    return {fault: max(engines[baseline].median, FLOOR_SECONDS) /
            max(engines[engine].median, FLOOR_SECONDS)
            for fault, engines in summary.items() if baseline in engines and engine in engines}


def mutant_summary(results: dict) -> dict:
    """``summarize_detection`` of the deep mutants' trials (empty when not measured)."""
    measured = results.get("mutants") or {}
    return summarize_detection(measured.get("detection", []),
                               results["config"].get("mutant_budget", 0.0))


def kills(results: dict) -> dict:
    """``{engine: deep mutants it killed}``, engines in the order measured."""
    killed: dict = {}
    for d in (results.get("mutants") or {}).get("detection", []):
        killed.setdefault(d["engine"], set())
        if d["found"]:
            killed[d["engine"]].add(d["fault"])
    return {engine: len(names) for engine, names in killed.items()}


def speedup_bound(summary: dict, baseline: str, engine: str = "mmufuzz") -> Optional[tuple]:
    """``(geomean, start_up)``: the most ``engine`` could gain over ``baseline`` on these faults.

    No campaign finds anything before it has started, so its fastest median
    over the faults (``start_up``) is what it needs at least for any of them;
    with every fault found at that moment, the speed-ups would be the
    baseline's medians over it.  Faults a baseline finds within start-up cap
    the geomean whatever the search does.  None when not measured.
    """
    mine = [engines[engine].median for engines in summary.values() if engine in engines]
    theirs = [engines[baseline].median for engines in summary.values()
              if baseline in engines and engine in engines]
    if not theirs:
        return None
    start_up = max(min(mine), FLOOR_SECONDS)
    return geomean(median / start_up for median in theirs), start_up


def rate(measurement: dict) -> tuple:
    """``(execs/s, ops/s)`` of a throughput measurement."""
    seconds = measurement["seconds"] or float("nan")
    return measurement["execs"] / seconds, measurement["ops"] / seconds


def explorer_part(coverage: dict) -> dict:
    """The schedule explorer's share of a ``coverage`` loop's result, as a rate record
    (its variants as execs)."""
    return {"execs": coverage["explorer_runs"], "ops": coverage["explorer_ops"],
            "seconds": coverage["explorer_seconds"]}


def machine_scaling(throughput: dict) -> Optional[float]:
    """Two replay loops at once over one alone, in execs/s: what a second process can add here.

    The replay loops share nothing, run the same workload and never grow a
    corpus, so this is the machine's own ceiling (cores shared with hyper-
    threads or a busy host show up here), against which the campaigns'
    ``--jobs 2`` scaling is read.  None when not measured.
    """
    pair = throughput.get("replay_pair")
    if not pair or "replay" not in throughput:
        return None
    return sum(rate(loop)[0] for loop in pair) / rate(throughput["replay"])[0]


@dataclass(frozen=True)
class TargetCheck:
    """One of the issue's targets: what was measured, whether it is met, by how much not."""

    name: str
    goal: str
    measured: str
    met: Optional[bool]
    shortfall: str = ""


def _factor(measured: float, goal: float, higher_is_better: bool = True) -> str:
    """``missed by 3.2x``: how far a measurement is from its goal."""
    if measured <= 0:
        return "nothing measured"
    ratio = goal / measured if higher_is_better else measured / goal
    return f"missed by {ratio:.2f}x" if ratio < 2 else f"missed by {ratio:.1f}x"


def check_targets(results: dict) -> list:
    """The issues' targets against this run's numbers (None: not measured)."""
    checks = []
    cap = results["config"]["cap"]
    summary = summarize_detection(results.get("detection", []), cap)
    mine = {f: e["mmufuzz"] for f, e in summary.items() if "mmufuzz" in e}
    if mine:
        worst_fault = max(mine, key=lambda f: mine[f].median)
        worst = mine[worst_fault]
        slow = [f for f, s in mine.items() if s.capped_median or s.median > TARGET_MEDIAN_SECONDS]
        measured = (f"worst median {'≥' if worst.capped_median else ''}{worst.median:.1f} s "
                    f"({worst_fault})")
        shortfall = (f"{len(slow)} of {len(mine)} faults over: {', '.join(slow)}"
                     + (f" (cap {cap:g} s)" if cap < TARGET_MEDIAN_SECONDS else "")) if slow else ""
        checks.append(TargetCheck("time-to-detect", f"every fault median ≤ {TARGET_MEDIAN_SECONDS:g} s",
                                  measured, not slow, shortfall))
    for baseline in ("random", "hypothesis"):
        ratios = speedups(summary, baseline)
        value = geomean(ratios.values())
        if value is None:
            continue
        shortfall = ""
        if value < TARGET_SPEEDUP:
            best, start_up = speedup_bound(summary, baseline)
            shortfall = (f"{_factor(value, TARGET_SPEEDUP)}; at most {best:.1f}x had every "
                         f"fault been found at start-up ({start_up:.2f} s, the fastest median)")
        checks.append(TargetCheck(f"speed-up over {baseline}", f"geomean ≥ {TARGET_SPEEDUP:g}x",
                                  f"{value:.1f}x", value >= TARGET_SPEEDUP, shortfall))
    checks += _ablation_checks(results, summary)
    throughput = results.get("throughput", {})
    if "campaign" in throughput:
        ops = rate(throughput["campaign"])[1] / throughput["campaign"].get("workers", 1)
        shortfall = "" if ops >= TARGET_OPS_PER_CORE else _factor(ops, TARGET_OPS_PER_CORE) + (
            f"; the target alone replays {rate(throughput['replay'])[1]:,.0f} ops/s"
            if "replay" in throughput else "")
        checks.append(TargetCheck("differential loop under coverage",
                                  f"≥ {TARGET_OPS_PER_CORE / 1000:g}k guest ops/s/core",
                                  f"{ops:,.0f} ops/s/core", ops >= TARGET_OPS_PER_CORE,
                                  shortfall))
    if "coverage" in throughput:
        ops = rate(throughput["coverage"])[1]
        explored = rate(explorer_part(throughput["coverage"]))[1]
        checks.append(TargetCheck("differential loop under the hit record (CPU time)",
                                  f"≥ {TARGET_OPS_PER_CORE / 1000:g}k guest ops/s/core",
                                  f"{ops:,.0f} ops/CPU-s (explorer: {explored:,.0f})",
                                  ops >= TARGET_OPS_PER_CORE,
                                  "" if ops >= TARGET_OPS_PER_CORE
                                  else _factor(ops, TARGET_OPS_PER_CORE)))
    if "campaign" in throughput and "campaign_jobs2" in throughput:
        scale = rate(throughput["campaign_jobs2"])[0] / rate(throughput["campaign"])[0]
        ceiling = machine_scaling(throughput)
        shortfall = "" if scale >= TARGET_SCALING else _factor(scale, TARGET_SCALING) + (
            f"; two independent replay processes get {ceiling:.2f}x on this machine"
            if ceiling is not None else "")
        checks.append(TargetCheck("scaling", f"--jobs 2 ≥ {TARGET_SCALING:g}x --jobs 1",
                                  f"{scale:.2f}x", scale >= TARGET_SCALING, shortfall))
    ratios = [m["ratio"] for m in results.get("minimization", []) if m.get("ratio")]
    if ratios:
        worst = max(ratios)
        checks.append(TargetCheck("minimization", f"≤ {TARGET_MINIMIZED_RATIO:g}x the known minimum",
                                  f"worst {worst:.2f}x", worst <= TARGET_MINIMIZED_RATIO,
                                  "" if worst <= TARGET_MINIMIZED_RATIO else
                                  _factor(worst, TARGET_MINIMIZED_RATIO, higher_is_better=False)))
    soaked = results.get("soak")
    if soaked:
        programs, findings = soaked["programs"], soaked["findings"]
        shortfall = (f"{findings} findings" if findings else
                     f"only {programs:,} programs" if programs < TARGET_SOAK_PROGRAMS else "")
        checks.append(TargetCheck("clean soak", f"0 findings in ≥ {TARGET_SOAK_PROGRAMS:,} random "
                                  "programs with `parallel` ops, no fault injected",
                                  f"{findings} in {programs:,}", not shortfall, shortfall))
    return checks


def _ablation_checks(results: dict, catalog: dict) -> list:
    """Issue 29's targets: guidance against its unguided ablation, on faults and deep mutants."""
    checks = []
    both = {**catalog, **mutant_summary(results)}
    for baseline, goal in (("unguided", TARGET_ABLATION_SPEEDUP), ("random", TARGET_SPEEDUP)):
        value = geomean(speedups(both, baseline).values())
        if value is None or not mutant_summary(results):
            continue
        checks.append(TargetCheck(f"speed-up over {baseline}, faults and deep mutants",
                                  f"geomean ≥ {goal:g}x", f"{value:.1f}x", value >= goal,
                                  "" if value >= goal else _factor(value, goal)))
    ratios = speedups(catalog, "unguided")
    if ratios:
        worst_fault = min(ratios, key=ratios.get)
        worst = 1 / ratios[worst_fault]
        checks.append(TargetCheck("no catalog fault later than unguided",
                                  f"≤ {TARGET_ABLATION_WORST:g}x the ablation's median",
                                  f"worst {worst:.2f}x ({worst_fault})",
                                  worst <= TARGET_ABLATION_WORST,
                                  "" if worst <= TARGET_ABLATION_WORST else
                                  _factor(worst, TARGET_ABLATION_WORST, higher_is_better=False)))
    killed = kills(results)
    if "mmufuzz" in killed and "unguided" in killed:
        mine, theirs = killed["mmufuzz"], killed["unguided"]
        ratio = mine / theirs if theirs else (float("inf") if mine else 0.0)
        met = ratio >= TARGET_ABLATION_KILLS
        checks.append(TargetCheck("deep mutants killed, guided over unguided",
                                  f"≥ {TARGET_ABLATION_KILLS:g}x at equal CPU",
                                  f"{mine} vs {theirs}", met,
                                  "" if met else (_factor(ratio, TARGET_ABLATION_KILLS)
                                                  if ratio else "guided killed none")))
    return checks

"""PNG plots of a results document (matplotlib, imported lazily: ``pip install mmufuzz[bench]``)."""

from __future__ import annotations

from pathlib import Path

from mmufuzz.bench.analysis import summarize_detection
from mmufuzz.bench.detect import DETERMINISTIC, ENGINES

COLORS = {"mmufuzz": "#1f77b4", "unguided": "#9467bd", "random": "#ff7f0e",
          "hypothesis": "#2ca02c"}


def _unit(results: dict) -> str:
    """What the detection times are (runs before the CPU budget timed wall clock from launch)."""
    cpu = results["config"].get("clock") == "cpu"
    return "CPU seconds after start-up" if cpu else "seconds since launch"


def _engines(results: dict) -> list:
    """The engines measured, in the bench's order; not the seeds, which have no cap to plot."""
    present = {d["engine"] for d in results["detection"]}
    return [engine for engine in ENGINES if engine in present and engine not in DETERMINISTIC]


def _pyplot():
    """matplotlib's pyplot on the file-only backend; ImportError if the extra is missing."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def time_to_detect(results: dict, path: Path) -> None:
    """Per fault, each engine's median (bar) and every seed's time (dots); log scale, cap line."""
    plt = _pyplot()
    cap = results["config"]["cap"]
    summary = summarize_detection(results["detection"], cap)
    faults = list(summary)
    engines = _engines(results)
    height = 0.8 / len(engines)
    fig, ax = plt.subplots(figsize=(9, 2.2 + 0.55 * len(faults)))
    for e, engine in enumerate(engines):
        ys = [i + (e - (len(engines) - 1) / 2) * height for i in range(len(faults))]
        medians = [summary[f][engine].median if engine in summary[f] else float("nan")
                   for f in faults]
        bars = ax.barh(ys, medians, height=height * 0.9, color=COLORS[engine], alpha=0.55,
                       label=engine)
        for bar, fault in zip(bars, faults):
            if engine in summary[fault] and summary[fault][engine].capped_median:
                bar.set_hatch("//")
        for y, fault in zip(ys, faults):
            times = [d["seconds"] for d in results["detection"]
                     if d["fault"] == fault and d["engine"] == engine]
            ax.scatter(times, [y] * len(times), s=9, color=COLORS[engine], zorder=3)
    ax.axvline(cap, color="black", linestyle="--", linewidth=1)
    ax.text(cap, 1.0, f"cap {cap:g} s", transform=ax.get_xaxis_transform(), ha="center",
            va="bottom", fontsize=8)
    ax.set_yticks(range(len(faults)))
    ax.set_yticklabels(faults, fontsize=8)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.set_xlabel(f"{_unit(results)} to the first finding (bar: median over seeds, hatched: "
                  "median at the cap)")
    ax.set_title("Time to detect each injected fault", pad=14)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.12 - 0.3 / len(faults)),
              ncol=len(engines), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def detected_over_time(results: dict, path: Path) -> None:
    """Fraction of (fault, seed) trials each engine had detected by time t."""
    plt = _pyplot()
    cap = results["config"]["cap"]
    fig, ax = plt.subplots(figsize=(7, 4))
    for engine in _engines(results):
        runs = [d for d in results["detection"] if d["engine"] == engine]
        times = sorted(d["seconds"] for d in runs if d["found"])
        xs = [0.0] + times + [cap]
        ys = [i / len(runs) for i in range(len(times) + 1)] + [len(times) / len(runs)]
        ax.step(xs, ys, where="post", color=COLORS[engine], label=engine)
    ax.set_xlim(0, cap)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel(_unit(results))
    ax.set_ylabel("fraction of fault x seed trials detected")
    ax.set_title("Faults detected over time")
    ax.legend(loc="lower right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def campaign_over_time(results: dict, path: Path) -> None:
    """Coverage (libFuzzer cov, outcome features, corpus) and findings of one campaign."""
    plt = _pyplot()
    run = results["over_time"]
    records = run["records"]
    seconds = [r["run_seconds"] for r in records]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 6), sharex=True,
                                      gridspec_kw={"height_ratios": [2, 1]})
    for key, label in (("cov", "cov (libFuzzer edges)"), ("features", "outcome features"),
                       ("corpus", "corpus inputs")):
        top.plot(seconds, [r[key] for r in records], marker=".", label=label)
    top.set_ylabel("count")
    injected = [name for name in run["inject"].split(",") if name != "none"]
    what = f"{len(injected)} faults injected" if len(injected) > 1 else f"inject: {run['inject']}"
    top.set_title(f"Campaign over time ({what})", fontsize=10)
    top.legend(fontsize=8)
    top.grid(alpha=0.3)
    found = [f["seconds"] for f in run["findings"]]
    end = max(seconds + found, default=1.0)
    bottom.step([0.0] + found + [end], list(range(len(found) + 1)) + [len(found)], where="post")
    bottom.set_ylabel("findings (signatures)")
    bottom.set_xlabel("seconds")
    bottom.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# file -> (the phase whose results it draws, how)
PLOTS = {"time_to_detect.png": ("detection", time_to_detect),
         "detected_over_time.png": ("detection", detected_over_time),
         "campaign_over_time.png": ("over_time", campaign_over_time)}


def draw_all(results: dict, folder: Path) -> list:
    """Every plot into ``folder``; returns the file names drawn (none without matplotlib)."""
    try:
        _pyplot()
    except ImportError:
        return []
    folder.mkdir(parents=True, exist_ok=True)
    drawn = []
    for name, (phase, draw) in PLOTS.items():
        if results.get(phase):
            draw(results, folder / name)
            drawn.append(name)
    return drawn

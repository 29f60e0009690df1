"""``mmufuzz bench`` / ``python -m mmufuzz.bench``: options, the run, the report.

Exit codes: 0 measured and reported (a missed target is a result, not an
error), 2 bad options, a ``--render`` file that is missing or malformed or a
``--resume`` of another configuration (one line names the file and the
field), 3 a measurement process failed (its log is named), 130 Ctrl-C.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shlex
import signal
import sys
from pathlib import Path

from mmufuzz.harness import faults
from mmufuzz.fuzz.corpus import DEFAULT_TARGET, NO_FAULT
from mmufuzz.bench import report, suite
from mmufuzz.bench.detect import ENGINES
from mmufuzz.bench.procs import MeasurementFailed
from mmufuzz.bench.resume import CannotResume

EXIT_OK, EXIT_BAD_OPTIONS, EXIT_FAILED, EXIT_INTERRUPTED = 0, 2, 3, 130
DEFAULT_OUT = "bench-out"
DEFAULT_REPORT = "docs/benchmarks.md"

# (full, --quick) defaults.  The quick run is a smoke test of the whole pipeline in
# under five minutes on two cores; its numbers are not for citing.
DEFAULTS = {
    "seeds": (5, 3),
    "cap": (300.0, 10.0),
    "campaign_time": (60.0, 10.0),
    "loop_time": (20.0, 4.0),
    "minimize_time": (120.0, 20.0),
    "soak_programs": (50_000, 500),
    "mutants": (40, 3),
    "mutant_programs": (1000, 50),
    "mutant_budget": (120.0, 5.0),
}
# The options with those defaults, in --help's order: (name, type, metavar, what it sets);
# the help's "(default FULL; --quick QUICK)" comes from DEFAULTS.
SCALED = (
    ("seeds", int, "N", "seeds 1..N per fault and engine"),
    ("cap", float, "SECONDS", "time-to-detect budget per trial, in CPU seconds after start-up"),
    ("campaign_time", float, "SECONDS", "length of the throughput and over-time campaigns"),
    ("loop_time", float, "SECONDS", "length of each replay/differential loop"),
    ("minimize_time", float, "SECONDS", "minimizer time limit per fault"),
    ("soak_programs", int, "N", "random programs with parallel ops run on the fault-free target"),
    ("mutants", int, "N",
     "mutants of harness/tdp sampled for the mutant benchmark, 0 for none"),
    ("mutant_programs", int, "N",
     "random programs of the shallow check, after the seeds and regressions"),
    ("mutant_budget", float, "SECONDS",
     "CPU seconds after start-up each engine gets per deep mutant"),
)
MUTANT_SEED = 1
QUICK_FAULTS = ("mmio-stale-generation", "pending-access-maps")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mmufuzz bench",
        description="Measure throughput, time-to-detect (mmufuzz vs its unguided ablation, "
                    "the seeds alone, a random and a Hypothesis baseline), a mutant benchmark, "
                    "minimization and scaling; write a Markdown report with plots.")
    parser.add_argument("--quick", action="store_true",
                        help=f"a smoke run under 5 minutes: {len(QUICK_FAULTS)} faults, short "
                             "caps and campaigns")
    parser.add_argument("--faults", metavar="NAMES",
                        help="comma-separated faults to detect, or 'none' for a target with a "
                             "planted bug (default: the catalog's faults of --target; --quick: "
                             f"{','.join(QUICK_FAULTS)})")
    parser.add_argument("--target", default=DEFAULT_TARGET, metavar="NAME",
                        help="system under test, as for mmufuzz fuzz (default tdp)")
    for name, kind, metavar, what in SCALED:
        full, quick = DEFAULTS[name]
        parser.add_argument(f"--{name.replace('_', '-')}", type=kind, metavar=metavar,
                            help=f"{what} (default {full:g}; --quick {quick:g})")
    parser.add_argument("--mutant-seed", type=int, default=MUTANT_SEED, metavar="N",
                        help=f"seed of the mutant sample (default {MUTANT_SEED})")
    parser.add_argument("--phases", metavar="NAMES",
                        help="comma-separated phases to measure (default all: "
                             f"{','.join(name for name, _ in suite.PHASES)}); the report says "
                             "which were asked for")
    parser.add_argument("--engines", metavar="NAMES",
                        help="comma-separated engines of the time-to-detect and mutant trials "
                             f"(default all: {','.join(ENGINES)})")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, metavar="N",
                        help="measurements run at once, one per core (default: the CPU count)")
    parser.add_argument("--out", default=DEFAULT_OUT, metavar="DIR",
                        help=f"working folder and results.json (default {DEFAULT_OUT})")
    parser.add_argument("--report", metavar="PATH",
                        help=f"the Markdown report; plots go to bench/ beside it (default "
                             f"{DEFAULT_REPORT}; --quick: DIR/benchmarks.md)")
    parser.add_argument("--resume", action="store_true",
                        help="continue the stopped run in --out (same options): keep its "
                             "finished phases and trials, measure the rest")
    parser.add_argument("--render", metavar="RESULTS",
                        help="do not measure: redraw the report from a results.json")
    return parser


def _fault_names(text, quick: bool, target: str) -> tuple:
    """The faults to detect: as given, else the quick set or the catalog's faults of ``target``."""
    if text is None:
        if quick:
            return QUICK_FAULTS
        return tuple(name for name, fault in faults.CATALOG.items() if fault.target == target)
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    if names != (NO_FAULT,):
        faults.check(names)
    return names


def _names(text, known, what: str) -> tuple:
    """The comma-separated ``text`` as a tuple in ``known``'s order (empty: none given)."""
    if text is None:
        return ()
    names = {n.strip() for n in text.split(",") if n.strip()}
    unknown = sorted(names - set(known))
    if unknown or not names:
        raise ValueError(f"unknown {what} {', '.join(unknown) or repr(text)}: choose from "
                         f"{', '.join(known)}")
    return tuple(name for name in known if name in names)


def config_from(args, argv: list) -> suite.Config:
    def pick(name):
        value = getattr(args, name)
        return DEFAULTS[name][args.quick] if value is None else value

    if args.jobs < 1 or any(n is not None and n < 1 for n in (args.seeds, args.soak_programs)):
        raise ValueError("--jobs, --seeds and --soak-programs must be at least 1")
    if any(n is not None and n < 0 for n in (args.mutants, args.mutant_programs)):
        raise ValueError("--mutants and --mutant-programs must be at least 0")
    phases = _names(args.phases, [name for name, _ in suite.PHASES], "phase")
    engines = _names(args.engines, ENGINES, "engine") or ENGINES
    if pick("mutants") and (not phases or "mutants" in phases) and \
            importlib.util.find_spec("cosmic_ray") is None:
        raise ValueError("the mutant benchmark needs cosmic-ray: pip install 'mmufuzz[bench]' "
                         "(or --mutants 0)")
    return suite.Config(command=shlex.join(["mmufuzz", "bench", *argv]), target=args.target,
                        faults=_fault_names(args.faults, args.quick, args.target),
                        seeds=tuple(range(1, pick("seeds") + 1)), cap=pick("cap"),
                        jobs=args.jobs, campaign_time=pick("campaign_time"),
                        loop_time=pick("loop_time"), minimize_time=pick("minimize_time"),
                        soak_programs=pick("soak_programs"), mutants=pick("mutants"),
                        mutant_seed=args.mutant_seed, mutant_programs=pick("mutant_programs"),
                        mutant_budget=pick("mutant_budget"),
                        phases=phases, engines=engines, out=Path(args.out), quick=args.quick)


def _handle_sigint() -> None:
    """Take Ctrl-C even when started in the background (``cmd &`` ignores SIGINT).

    A campaign is stopped with SIGINT; a process started with SIGINT ignored
    passes that on to every campaign it starts, which then could only be
    killed.  With a handler here, children start with the default again.
    """
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def _stopped(why: str, config: suite.Config, code: int) -> int:
    print(f"mmufuzz bench: {why}; the phases done so far are in {config.out / suite.RESULTS} "
          "(--render draws them, --resume continues)", file=sys.stderr)
    return code


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    _handle_sigint()
    if args.render:
        try:
            results = report.load(Path(args.render))
        except report.BadResults as error:
            print(f"mmufuzz bench: error: {error}", file=sys.stderr)
            return EXIT_BAD_OPTIONS
        path = Path(args.report or DEFAULT_REPORT)
    else:
        try:
            config = config_from(args, argv)
        except ValueError as error:  # faults.UnknownFault among them
            print(f"mmufuzz bench: error: {error}", file=sys.stderr)
            return EXIT_BAD_OPTIONS
        try:
            results = suite.run(config, resume=args.resume)
        except CannotResume as error:
            print(f"mmufuzz bench: error: {error}", file=sys.stderr)
            return EXIT_BAD_OPTIONS
        except MeasurementFailed as error:
            return _stopped(f"measurement failed: {error}", config, EXIT_FAILED)
        except KeyboardInterrupt:
            return _stopped("interrupted", config, EXIT_INTERRUPTED)
        path = Path(args.report) if args.report else \
            (config.out / "benchmarks.md" if args.quick else Path(DEFAULT_REPORT))
    drawn = report.write(results, path)
    print(f"mmufuzz bench: report {path}" + "".join(f", {p}" for p in drawn), file=sys.stderr)
    return EXIT_OK

"""``mmufuzz``: the command line.

Exit codes are part of the interface: 0 clean, 1 a finding, 2 bad input (and
3 for a campaign whose fuzzer failed).  Bad input is reported as one line
naming the file, line and field, never a traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from mmufuzz.harness import faults
from mmufuzz.harness.target import TARGETS, TargetRefused, UnknownTarget
from mmufuzz.fuzz.atomic import write_atomic
from mmufuzz.fuzz.campaign import DEFAULT_OUT, Campaign, CampaignError, Options
from mmufuzz.fuzz.corpus import DEFAULT_TARGET, NO_FAULT, injected_faults, replay, reproducer_files
from mmufuzz.fuzz.encoding import Reproducer, ReproError, decode, format_program, load_reproducer
from mmufuzz.fuzz.minimize import minimize, report

EXIT_CLEAN, EXIT_FINDING, EXIT_BAD_INPUT = 0, 1, 2
EXIT_BROKEN_PIPE = 128 + 13  # killed by SIGPIPE, in the shell's words

TARGET_NAMES = sorted(TARGETS) + ["reference"]


def cmd_show(args) -> int:
    """Pretty-print reproducers in canonical form with line numbers."""
    for path in reproducer_files(args.files):
        repro = load_reproducer(path)
        text = format_program(repro.program, repro.marker, repro.meta)
        for number, line in enumerate(text.splitlines(), 1):
            print(f"{number:4} {line}")
    return EXIT_CLEAN


def cmd_replay(args) -> int:
    """Replay reproducers; print the report of every one that fails."""
    if args.inject is not None:
        faults.check(injected_faults(args.inject))
    # Parse everything first: a bad file anywhere is reported before any replay output.
    loaded = [(path, load_reproducer(path)) for path in reproducer_files(args.files)]
    status = EXIT_CLEAN
    for path, repro in loaded:
        try:
            result = replay(repro, args.target, args.inject)
        except TargetRefused as refused:
            raise ReproError(path, 0, None, str(refused)) from None
        if result.finding is None:
            print(f"{path}: clean (target {result.target}, inject {result.inject})")
            continue
        status = EXIT_FINDING
        print(f"{path}: {result.finding.kind} {result.finding.signature}")
        print(result.report())
    return status


def cmd_fuzz(args) -> int:
    """Run a coverage-guided campaign; 0 clean, 1 the directory holds findings."""
    options = Options(out=Path(args.out), target=args.target, inject=args.inject,
                      max_time=args.max_time, max_execs=args.max_execs, jobs=args.jobs,
                      rss_limit_mb=args.rss_limit_mb, seed=args.seed)
    return Campaign(options).run()


def _load_input(path: str) -> Reproducer:
    """A ``.repro`` file is text; anything else is fuzzer bytes (``decode`` is total)."""
    if path.endswith(".repro"):
        return load_reproducer(path)
    try:
        return Reproducer(decode(Path(path).read_bytes()))
    except OSError as error:
        raise ReproError(path, 0, None, f"cannot read: {error.strerror or error}") from None


def cmd_minimize(args) -> int:
    """Minimize one finding; 0 minimized, 1 clean or flaky (reported, not reduced)."""
    repro = _load_input(args.file)
    target = args.target or repro.meta.get("target", DEFAULT_TARGET)
    inject = repro.meta.get("inject", NO_FAULT) if args.inject is None else args.inject
    names = faults.check(injected_faults(inject))
    result = minimize(repro.program, target, sorted(names), repro.meta.get("signature"),
                      max_seconds=args.max_time)
    text = report(result, target, ",".join(sorted(names)) or NO_FAULT)
    if args.output:
        write_atomic(Path(args.output), text)
    else:
        print(text, end="")
    if result.reproducible:
        print(f"mmufuzz: minimized {result.original_ops} -> {len(result.program.ops)} ops "
              f"({result.runs} runs, {result.seconds:.1f} s), signature {result.signature}",
              file=sys.stderr)
        return EXIT_CLEAN
    if result.signature is None:
        detail = f"no finding in {result.attempts} replays"
    else:
        detail = f"signature {result.signature} came back in {result.reproduced} of " \
                 f"{result.attempts} replays"
        if result.finding and result.finding.signature != result.signature:
            detail += f" (got {result.finding.signature})"
    print(f"mmufuzz: {'flaky' if result.flaky else 'not reproduced'}: {detail}; not minimized",
          file=sys.stderr)
    return EXIT_FINDING


def cmd_faults(args) -> int:
    """List the fault catalog."""
    if not faults.CATALOG:
        print("no faults in the catalog")
    for fault in faults.CATALOG.values():
        where = f"{fault.target}{', concurrent' if fault.concurrent else ''}"
        print(f"{fault.name:28} [{where}] {fault.description}\n{'':28} source: {fault.source}")
    return EXIT_CLEAN


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mmufuzz", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    show = sub.add_parser("show", help="pretty-print reproducers with line numbers")
    show.add_argument("files", nargs="+", metavar="FILE|DIR")
    show.set_defaults(func=cmd_show)

    rep = sub.add_parser("replay", help="replay reproducers: 0 clean, 1 finding, 2 bad input")
    rep.add_argument("files", nargs="+", metavar="FILE|DIR")
    rep.add_argument("--target", metavar="NAME",
                     help=f"system under test: {', '.join(TARGET_NAMES)} "
                          "(default: the file's '# target:', else tdp)")
    rep.add_argument("--inject", metavar="NAME",
                     help="fault(s) to inject, comma-separated, or 'none' "
                          "(default: the file's '# inject:')")
    rep.set_defaults(func=cmd_replay)

    flt = sub.add_parser("faults", help="list the injectable faults")
    flt.set_defaults(func=cmd_faults)

    fz = sub.add_parser("fuzz", help="run a coverage-guided campaign (resumes DIR if it exists)",
                        description="Fuzz until a limit or Ctrl-C.  Findings are kept per "
                                    "signature in DIR/findings, minimized, and fuzzing goes on.")
    fz.add_argument("--target", metavar="NAME",
                    help=f"system under test: {', '.join(TARGET_NAMES)}, or module:factory "
                         "(default: DIR's campaign, else tdp)")
    fz.add_argument("--inject", metavar="NAME", help="fault(s) to inject, comma-separated "
                                                     "(default: DIR's campaign, else none)")
    fz.add_argument("--max-time", type=float, metavar="SECONDS", help="stop after this long")
    fz.add_argument("--max-execs", type=int, metavar="N", help="stop after about N inputs")
    fz.add_argument("--jobs", type=int, default=1, metavar="N",
                    help="parallel libFuzzer jobs, one per core (default 1)")
    fz.add_argument("--out", default=DEFAULT_OUT, metavar="DIR",
                    help=f"campaign directory (default {DEFAULT_OUT})")
    fz.add_argument("--rss-limit-mb", type=int, metavar="MB",
                    help="libFuzzer's per-worker memory limit (default 2048)")
    fz.add_argument("--seed", type=int, metavar="N", help="random seed (job k uses N+k)")
    fz.set_defaults(func=cmd_fuzz)

    mini = sub.add_parser("minimize", help="reduce a finding to a minimal reproducer",
                          description="FILE is a reproducer (*.repro) or raw fuzzer bytes.  "
                                      "0: minimized; 1: clean or flaky (not reduced).")
    mini.add_argument("file", metavar="FILE")
    mini.add_argument("-o", "--output", metavar="OUT", help="write here (default: stdout)")
    mini.add_argument("--target", metavar="NAME",
                      help="system under test (default: the file's '# target:', else tdp)")
    mini.add_argument("--inject", metavar="NAME",
                      help="fault(s) to inject (default: the file's '# inject:')")
    mini.add_argument("--max-time", type=float, metavar="SECONDS",
                      help="stop reducing after this long and keep the best so far")
    mini.set_defaults(func=cmd_minimize)

    # Listed for --help only: main() hands "bench ..." over whole, its options included.
    sub.add_parser("bench", add_help=False,
                   help="benchmarks: throughput, time-to-detect vs baselines (bench --help)")
    return parser


def cmd_bench(argv: list) -> int:
    """Hand over to ``bench`` (imported only here: it is heavy and optional)."""
    from mmufuzz.bench.cli import main as bench_main
    return bench_main(argv)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["bench"]:
        return cmd_bench(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ReproError, faults.UnknownFault, UnknownTarget, CampaignError) as error:
        print(f"mmufuzz: error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except BrokenPipeError:
        # The reader left (``mmufuzz replay DIR | head``): stop quietly, as a shell tool
        # does on SIGPIPE, and keep the interpreter's final flush from raising again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_BROKEN_PIPE


if __name__ == "__main__":
    sys.exit(main())

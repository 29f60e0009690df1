"""``mmufuzz``: the command line.

Exit codes are part of the interface: 0 clean, 1 a finding, 2 bad input.  Bad
input is reported as one line naming the file, line and field, never a
traceback.
"""

from __future__ import annotations

import argparse
import sys

from harness import faults
from harness.target import TARGETS, UnknownTarget
from fuzz.corpus import replay, reproducer_files
from fuzz.encoding import ReproError, format_program, load_reproducer

EXIT_CLEAN, EXIT_FINDING, EXIT_BAD_INPUT = 0, 1, 2

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
        faults.check(n for n in args.inject.split(",") if n != "none")
    # Parse everything first: a bad file anywhere is reported before any replay output.
    loaded = [(path, load_reproducer(path)) for path in reproducer_files(args.files)]
    status = EXIT_CLEAN
    for path, repro in loaded:
        result = replay(repro, args.target, args.inject)
        if result.finding is None:
            print(f"{path}: clean (target {result.target}, inject {result.inject})")
            continue
        status = EXIT_FINDING
        print(f"{path}: {result.finding.kind} {result.finding.signature}")
        print(result.report())
    return status


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
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ReproError, faults.UnknownFault, UnknownTarget) as error:
        print(f"mmufuzz: error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())

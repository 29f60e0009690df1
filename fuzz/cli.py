"""The ``mmufuzz`` command line.

Exit codes are part of the interface: 0 clean, 1 a finding, 2 bad input (and
3 for a campaign whose fuzzer failed).  Bad input (a file, a comment in it, an
option) is reported as one line naming the file, line and field, never a
traceback.  Code is imported only because the command line says so
(``--target module:factory``); files may name registered targets only.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from importlib import metadata
from pathlib import Path

from mmufuzz.harness import faults
from mmufuzz.harness.target import TargetRefused, UnknownTarget
from mmufuzz.fuzz.atomic import write_atomic
from mmufuzz.fuzz.campaign import DEFAULT_OUT, Campaign, CampaignError, Options
from mmufuzz.fuzz.corpus import (NO_FAULT, check_file_target, file_targets, replay,
                                 replay_settings, reproducer_files)
from mmufuzz.fuzz.encoding import (MAX_FILE_BYTES, Reproducer, ReproError, decode, excerpt,
                                   format_program, load_reproducer, read_input)
from mmufuzz.fuzz.minimize import minimize, report

EXIT_CLEAN, EXIT_FINDING, EXIT_BAD_INPUT = 0, 1, 2
EXIT_BROKEN_PIPE = 128 + 13  # killed by SIGPIPE, in the shell's words
CAMPAIGN_CONFIG = "campaign.json"
# A raw input's campaign.json is looked for this many directories up (DIR/findings/SIG/input.bin).
_CONFIG_LEVELS = 3
_MAX_CONFIG_BYTES = 1 << 16


def cmd_show(args) -> int:
    """Pretty-print reproducers in canonical form with line numbers (after replay's checks)."""
    for path in reproducer_files(args.files):
        repro = load_reproducer(path)
        replay_settings(repro)  # a '# target:' or '# inject:' replay would refuse is bad input
        text = format_program(repro.program, repro.marker, repro.meta)
        for number, line in enumerate(text.splitlines(), 1):
            print(f"{number:4} {line}")
    return EXIT_CLEAN


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def cmd_replay(args) -> int:
    """Replay reproducers; print the report of every one that fails."""
    # Parse and check everything first: a bad file anywhere is reported before any output.
    loaded = []
    for path in reproducer_files(args.files):
        repro = load_reproducer(path)
        target, names = replay_settings(repro, args.target, args.inject)
        loaded.append((path, repro, target, ",".join(names) or NO_FAULT))
    findings = 0
    for path, repro, target, inject in loaded:
        try:
            result = replay(repro, target, inject)
        except TargetRefused as refused:
            raise ReproError(path, 0, None, str(refused)) from None
        if result.finding is None:
            print(f"{path}: clean (target {result.target}, inject {result.inject})")
            continue
        findings += 1
        print(f"{path}: {result.finding.kind} {result.finding.signature}")
        print(result.report())
    if len(loaded) > 1 or any(Path(name).is_dir() for name in args.files):
        print(f"{_count(len(loaded), 'file')}: {len(loaded) - findings} clean, "
              f"{_count(findings, 'finding')}")
    return EXIT_FINDING if findings else EXIT_CLEAN


def cmd_fuzz(args) -> int:
    """Run a coverage-guided campaign; 0 clean, 1 the directory holds findings."""
    _check_writable(Path(args.out), "--out", directory=True)
    options = Options(out=Path(args.out), target=args.target, inject=args.inject,
                      max_time=args.max_time, max_execs=args.max_execs, jobs=args.jobs,
                      rss_limit_mb=args.rss_limit_mb, seed=args.seed)
    return Campaign(options).run()


def _campaign_config(raw: Path, target: str | None) -> dict:
    """``target`` and ``inject`` of the campaign a raw input comes from: its ``campaign.json``,
    beside the input or in a directory above it (``DIR/findings/SIG/input.bin``); {} if none.

    The file is data like any other: its target must be a registered one unless
    the command line gives ``target``.
    """
    for folder in list(raw.resolve().parents)[:_CONFIG_LEVELS]:
        path = folder / CAMPAIGN_CONFIG
        if not path.exists():
            continue
        try:
            config = json.loads(read_input(path, _MAX_CONFIG_BYTES).decode("utf-8"))
        except (ValueError, RecursionError):  # not UTF-8, not JSON, nested past the stack
            config = None
        if not isinstance(config, dict):
            raise ReproError(path, 0, None, "not a campaign config (a JSON object); "
                                            "give --target and --inject")
        settings = {}
        for key in ("target", "inject"):
            value = config.get(key)
            if value is not None and not isinstance(value, str):
                raise ReproError(path, 0, key, f"must be a string, not {excerpt(value)}")
            if value is not None:
                settings[key] = value
        if target is None and "target" in settings:
            check_file_target(settings["target"], lambda message: ReproError(
                path, 0, "target", f"{message}; or give --target"))
        return settings
    return {}


def _load_input(path: str, target: str | None) -> Reproducer:
    """A ``.repro`` file is text; anything else is fuzzer bytes (``decode`` is total), whose
    target and fault come from its campaign unless the command line gives them."""
    if path.endswith(".repro"):
        return load_reproducer(path)
    program = decode(read_input(path, MAX_FILE_BYTES))
    return Reproducer(program, None, _campaign_config(Path(path), target), path)


def _check_writable(path: Path, option: str, directory: bool) -> None:
    """Refuse a path the command could not write before it spends minutes working:
    ``path`` must be a directory (or a file) or not exist, and the nearest folder that
    exists must be one this process may write in."""
    kind = "a directory" if directory else "a file"
    if path.exists() and path.is_dir() != directory:
        raise ReproError(path, 0, None, f"{option} must name {kind}, this is not one")
    for folder in (path, *path.parents) if directory else path.parents:
        if folder.exists():
            if not folder.is_dir():
                raise ReproError(path, 0, None, f"{option}: {folder} is not a directory")
            if not os.access(folder, os.W_OK | os.X_OK):
                raise ReproError(path, 0, None, f"{option}: cannot write in {folder}")
            return


def cmd_minimize(args) -> int:
    """Minimize one finding; 0 minimized, 1 clean or flaky (reported, not reduced)."""
    if args.output:
        _check_writable(Path(args.output), "-o", directory=False)
    repro = _load_input(args.file, args.target)
    target, names = replay_settings(repro, args.target, args.inject)
    result = minimize(repro.program, target, names, repro.meta.get("signature"),
                      max_seconds=args.max_time)
    text = report(result, target, ",".join(names) or NO_FAULT)
    if args.output:
        try:
            write_atomic(Path(args.output), text)
        except OSError as error:
            raise ReproError(args.output, 0, None, f"-o: cannot write: "
                                                   f"{error.strerror or error}") from None
    else:
        print(text, end="")
    if result.reproducible:
        unwrapped = "" if result.signature == result.original_signature else \
            f" (was {result.original_signature}: a parallel's no-op side went)"
        print(f"mmufuzz: minimized {result.original_ops} -> {len(result.program.ops)} ops "
              f"({result.runs} runs, {result.seconds:.1f} s), signature {result.signature}"
              f"{unwrapped}", file=sys.stderr)
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


EXIT_CODES = """exit codes:
  0  every file ran clean
  1  a finding (the report shows the reproducer, '>>>' at the failing op)
  2  bad input: one line naming the file, line and field"""

FUZZ_EXIT_CODES = """exit codes:
  0  no finding in DIR
  1  DIR holds findings (each in DIR/findings/SIGNATURE/)
  2  bad input or options (one line says which)
  3  the fuzzer itself failed (see DIR/logs)"""


def _seconds(text: str) -> float:
    """An ``argparse`` type: a finite, non-negative number of seconds."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{excerpt(text)} is not a number of seconds") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"{excerpt(text)} is not a finite, non-negative "
                                         "number of seconds")
    return value


def _positive(text: str) -> int:
    """An ``argparse`` type: a whole number of at least 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{excerpt(text)} is not a whole number of at least 1")
    return value


def _version() -> str:
    try:
        return metadata.version("mmufuzz")
    except metadata.PackageNotFoundError:
        return "unknown (not installed)"


class _Parser(argparse.ArgumentParser):
    """argparse, with a usage error as one line (the usage is one ``--help`` away)."""

    def error(self, message):
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: error: {message} (see: {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    raw = argparse.RawDescriptionHelpFormatter
    parser = _Parser(
        prog="mmufuzz", formatter_class=raw,
        description="A coverage-guided differential fuzzer for hypervisor MMUs.",
        epilog="Exit codes: 0 clean, 1 a finding, 2 bad input, 3 the fuzzer failed.\n"
               "'mmufuzz COMMAND --help' describes a command.")
    parser.add_argument("--version", action="version", version=f"mmufuzz {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    targets = ", ".join(file_targets())

    show = sub.add_parser("show", help="pretty-print reproducers with line numbers",
                          description="Print reproducers in canonical form, with line numbers. "
                                      "Exit 0, or 2 on bad input.")
    show.add_argument("files", nargs="+", metavar="FILE|DIR")
    show.set_defaults(func=cmd_show)

    rep = sub.add_parser("replay", help="replay reproducers: 0 clean, 1 finding, 2 bad input",
                         formatter_class=raw, epilog=EXIT_CODES,
                         description="Replay reproducer files (a directory: every *.repro "
                                     "under it) and report each; a summary line ends a "
                                     "replay of several.")
    rep.add_argument("files", nargs="+", metavar="FILE|DIR")
    rep.add_argument("--target", metavar="NAME",
                     help=f"system under test: {targets}, or module:factory "
                          "(default: the file's '# target:', else tdp)")
    rep.add_argument("--inject", metavar="NAME",
                     help="fault(s) to inject, comma-separated, or 'none' "
                          "(default: the file's '# inject:')")
    rep.set_defaults(func=cmd_replay)

    flt = sub.add_parser("faults", help="list the injectable faults",
                         description="List the injectable faults: each is a real MMU bug, "
                                     "with the commit or thread it comes from.")
    flt.set_defaults(func=cmd_faults)

    fz = sub.add_parser("fuzz", help="run a coverage-guided campaign (resumes DIR if it exists)",
                        formatter_class=raw, epilog=FUZZ_EXIT_CODES,
                        description="Fuzz until a limit or Ctrl-C.  Findings are kept per "
                                    "signature in DIR/findings, minimized, and fuzzing goes on.")
    fz.add_argument("--target", metavar="NAME",
                    help=f"system under test: {targets}, or module:factory "
                         "(default: DIR's campaign, else tdp)")
    fz.add_argument("--inject", metavar="NAME", help="fault(s) to inject, comma-separated "
                                                     "(default: DIR's campaign, else none)")
    fz.add_argument("--max-time", type=_seconds, metavar="SECONDS", help="stop after this long")
    fz.add_argument("--max-execs", type=_positive, metavar="N", help="stop after about N inputs")
    fz.add_argument("--jobs", type=_positive, default=1, metavar="N",
                    help="parallel libFuzzer jobs, one per core (default 1)")
    fz.add_argument("--out", default=DEFAULT_OUT, metavar="DIR",
                    help=f"campaign directory (default {DEFAULT_OUT})")
    fz.add_argument("--rss-limit-mb", type=_positive, metavar="MB",
                    help="libFuzzer's per-worker memory limit (default 2048)")
    fz.add_argument("--seed", type=int, metavar="N", help="random seed (job k uses N+k)")
    fz.set_defaults(func=cmd_fuzz)

    mini = sub.add_parser("minimize", help="reduce a finding to a minimal reproducer",
                          description="FILE is a reproducer (*.repro) or raw fuzzer bytes (a "
                                      "campaign's input.bin: its target and fault come from "
                                      "the campaign.json above it).  Exit 0: minimized; 1: "
                                      "clean or flaky (not reduced); 2: bad input.")
    mini.add_argument("file", metavar="FILE")
    mini.add_argument("-o", "--output", metavar="OUT", help="write here (default: stdout)")
    mini.add_argument("--target", metavar="NAME",
                      help="system under test (default: the file's '# target:', else tdp)")
    mini.add_argument("--inject", metavar="NAME",
                      help="fault(s) to inject (default: the file's '# inject:')")
    mini.add_argument("--max-time", type=_seconds, metavar="SECONDS",
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
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as done:  # --help, --version, a usage error: argparse has said why
        return done.code
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
    except OSError as error:
        # A path the system refuses (no space, no permission, not a directory): one line.
        where = f"{error.filename}: " if error.filename else ""
        print(f"mmufuzz: error: {where}{error.strerror or error}", file=sys.stderr)
        return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())

"""The mutant benchmark: bugs nobody tuned the fuzzer for, made by a mutation-testing library.

The catalog's faults were written by people who knew the fuzzer; a mutant of
the target's source was not.  Mutants of ``harness/tdp`` are made by
cosmic-ray's mutation operators (``pip install mmufuzz[bench]``), driven only
to *generate* them: every position each of its core operators (those that
take no arguments) can mutate in every module but the invariant checks (the
oracle, not the system under test), outside the lines that only an injected
catalog fault runs (:func:`fault_only_lines`), is one mutant, ``(file, operator,
occurrence)`` in cosmic-ray's own numbering; a run samples ``N`` of them with
``random.Random(seed)``, so the same options give the same mutants on the same
source.

A mutant is only ever applied in the processes of its trials: its package is
a copy of ``mmufuzz`` in a scratch folder (``fuzz``, ``reference`` and
``bench`` linked, ``harness`` copied, the one module replaced by its mutated
source) put first on ``PYTHONPATH``; the repository's files are never edited.

Each sampled mutant is first checked cheaply (:func:`shallow_check`, child
side): the shipped seeds, the regression reproducers (no fault injected) and
``programs`` random programs, each run as a campaign worker runs an input.
A mutant killed there is *shallow* and only counted; one that hangs or cannot
even be imported is counted apart; the rest are *deep*, the benchmark: every
engine gets the same CPU budget per deep mutant (:mod:`mmufuzz.bench.detect`).
A mutant is killed only by a finding of the differential runner (a Python
exception in the model counts when the runner reports it as a crash finding)
whose program runs clean on the original target.  The fuzzer knows none of
this: nothing in ``fuzz/`` names a mutant.
"""

from __future__ import annotations

import ast
import difflib
import random
import re
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

from mmufuzz.fuzz.campaign import CampaignConfig, seed_files
from mmufuzz.fuzz.corpus import NO_FAULT
from mmufuzz.fuzz.encoding import (ReproError, encode, format_program, load_reproducer,
                                   parse_reproducer)
from mmufuzz.fuzz.worker import Worker
from mmufuzz.bench.engines import fault_needed
from mmufuzz.bench.procs import Budget, run_child

# The installed package (a checkout's mmufuzz/ links harness/ and the others).
PACKAGE = Path(__file__).resolve().parent.parent / "mmufuzz"
MUTATED = "harness/tdp"
TARGET = "tdp"  # the target whose source is mutated
# The oracle, not the system under test: a mutant there weakens or breaks the checks.
NOT_MUTATED = ("invariants.py",)
REGRESSIONS = PACKAGE.parent / "corpus" / "regressions"
# CPU seconds the shallow check may take: past this the mutant hangs (a loop that never ends).
SHALLOW_CPU = 120.0
# What a mutant is, after the shallow check.
DEEP, SHALLOW, HANG, BROKEN, UNCLEAR = "deep", "shallow", "hang", "broken", "unclear"


@dataclass(frozen=True)
class Mutant:
    """One mutation: cosmic-ray's ``operator`` at its ``occurrence`` in ``file`` (repo-relative)."""

    file: str
    operator: str
    occurrence: int
    line: int

    @property
    def name(self) -> str:
        """Short and unique: ``mmu.py:218:ReplaceComparisonOperator_Eq_NotEq#3``."""
        return f"{Path(self.file).name}:{self.line}:{self.operator.split('/')[-1]}#{self.occurrence}"


def _operators() -> list:
    """cosmic-ray's core operators that take no arguments, by name: ``[(name, instance)]``."""
    from cosmic_ray import plugins
    return [(name, plugins.get_operator(name)()) for name in sorted(plugins.operator_names())
            if name.startswith("core/") and not plugins.get_operator(name).arguments()]


def all_mutants(root: Path = PACKAGE) -> list:
    """Every mutant of the mutated package's modules (under the package ``root``), in order."""
    from cosmic_ray.ast import ast_nodes, get_ast
    found = []
    operators = _operators()
    for path in sorted((root / MUTATED).glob("*.py")):
        if path.name in NOT_MUTATED:
            continue
        source = path.read_text()
        nodes = list(ast_nodes(get_ast(source)))
        injected_only = fault_only_lines(source)
        for name, operator in operators:
            positions = (start for node in nodes for start, _ in operator.mutation_positions(node))
            found += [Mutant(f"{MUTATED}/{path.name}", name, occurrence, start[0])
                      for occurrence, start in enumerate(positions)
                      if start[0] not in injected_only]
    return found


def fault_only_lines(source: str) -> set:
    """The lines of ``source`` that run only while a catalog fault is injected: the body of an
    ``if faults.active(...)`` and the ``else`` of an ``if not faults.active(...)``.

    They are the catalog's bugs, not the system under test: a mutant there changes nothing a
    run without the fault executes, so it would count as a deep mutant no engine can kill.
    (A mutant of the test itself stays: it injects the fault, which the regressions kill.)
    """
    def is_active(test) -> bool:
        return (isinstance(test, ast.Call) and isinstance(test.func, ast.Attribute)
                and test.func.attr == "active" and isinstance(test.func.value, ast.Name)
                and test.func.value.id == "faults")

    lines: set = set()
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.If):
            continue
        test = node.test
        if is_active(test):
            branch = node.body
        elif isinstance(test, ast.UnaryOp) and isinstance(test.op, ast.Not) and is_active(test.operand):
            branch = node.orelse
        else:
            continue
        for statement in branch:
            lines.update(range(statement.lineno, statement.end_lineno + 1))
    return lines


def sample(count: int, seed: int, root: Path = PACKAGE) -> list:
    """``count`` mutants drawn with ``random.Random(seed)``, in the order drawn."""
    mutants = all_mutants(root)
    return random.Random(seed).sample(mutants, min(count, len(mutants)))


def mutated_source(mutant: Mutant, root: Path = PACKAGE) -> str:
    from cosmic_ray import plugins
    from cosmic_ray.mutating import mutate_code
    code = mutate_code((root / mutant.file).read_text(), plugins.get_operator(mutant.operator)(),
                       mutant.occurrence)
    if code is None:
        raise ValueError(f"{mutant.name}: cosmic-ray applied no mutation (source changed?)")
    return code


def change(mutant: Mutant, root: Path = PACKAGE) -> str:
    """The mutated line(s), ``before -> after``, for the reader."""
    before = (root / mutant.file).read_text().splitlines()
    after = mutated_source(mutant, root).splitlines()
    removed, added = [], []
    for line in difflib.unified_diff(before, after, lineterm="", n=0):
        if line.startswith("-") and not line.startswith("---"):
            removed.append(line[1:].strip())
        elif line.startswith("+") and not line.startswith("+++"):
            added.append(line[1:].strip())
    return f"{' / '.join(removed)} -> {' / '.join(added) or '(removed)'}"


def package_with(mutant: Mutant, folder: Path, root: Path = PACKAGE) -> Path:
    """A scratch ``mmufuzz`` package with ``mutant`` applied; returns the folder for PYTHONPATH."""
    shutil.rmtree(folder, ignore_errors=True)
    package = folder / "mmufuzz"
    package.mkdir(parents=True)
    shutil.copyfile(PACKAGE / "__init__.py", package / "__init__.py")
    for linked in ("fuzz", "reference", "bench"):
        (package / linked).symlink_to((PACKAGE / linked).resolve(), target_is_directory=True)
    shutil.copytree((root / "harness").resolve(), package / "harness",
                    ignore=shutil.ignore_patterns("__pycache__"))
    target = package / "harness" / Path(mutant.file).relative_to("harness")
    target.write_text(mutated_source(mutant, root))
    return folder


# --- child side: the shallow check ---------------------------------------------------------

def _regressions(target: str) -> list:
    """The regression reproducers of ``target``, run with no fault injected."""
    programs = []
    for path in sorted(REGRESSIONS.glob("*.repro")):
        try:
            repro = load_reproducer(path)
        except ReproError:
            continue
        if repro.meta.get("target", target) == target:
            programs.append((f"regression {path.name}", repro.program))
    return programs


def shallow_check(emit: Callable, target: str, programs: int, seed: int, package: str) -> None:
    """Seeds, regressions, then ``programs`` random programs; the first finding kills.

    Runs in a process whose ``mmufuzz`` is a mutant's package; reports
    ``killed`` (with where, and the program, for the parent to check on the
    original) or ``survived``.  Everything runs as a campaign worker runs an
    input, with no fault injected.
    """
    import mmufuzz
    from mmufuzz.bench.engines import random_input
    loaded = Path(mmufuzz.__file__).parent
    if loaded != Path(package) / "mmufuzz":
        raise RuntimeError(f"the mutant's package is not the one loaded: {loaded}")
    fixed = [(f"seed {path.name}", load_reproducer(path).program) for path in seed_files()]
    fixed += _regressions(target)
    worker = Worker(CampaignConfig(target, NO_FAULT))
    rng = random.Random(seed)
    emit({"event": "started", "cpu": time.process_time()})
    inputs = [(where, encode(program)) for where, program in fixed]
    inputs += [(f"random program {i + 1}", None) for i in range(programs)]
    for where, data in inputs:
        program, finding = worker.run(random_input(rng) if data is None else data)
        if finding is not None:
            emit({"event": "killed", "by": where, "signature": finding.signature,
                  "summary": finding.summary(target), "repro": format_program(program),
                  "execs": worker.execs})
            return
    emit({"event": "survived", "execs": worker.execs})


# --- parent side: sampling, classifying ------------------------------------------------

def slug(name: str) -> str:
    """A mutant's name as a file name."""
    return re.sub(r"[^A-Za-z0-9_.]+", "-", name)


def environment(folder: Path) -> tuple:
    """What a trial of the mutant packaged in ``folder`` adds to its processes' environment.

    ``python -m`` puts the working directory first on ``sys.path``, before
    ``PYTHONPATH``; in a checkout that holds the original ``mmufuzz/``, so
    ``PYTHONSAFEPATH`` keeps it off (the shallow check verifies the mutant
    is what was loaded).
    """
    return (("PYTHONPATH", str(folder)), ("PYTHONSAFEPATH", "1"))


def classify(mutant: Mutant, target: str, programs: int, seed: int, work: Path) -> dict:
    """The mutant, described, with its ``kind`` after the shallow check and what decided it.

    A finding kills only if its program runs clean on the original target
    (checked here, in the parent, which has the original loaded).
    """
    folder = package_with(mutant, work / "mutants" / slug(mutant.name))
    log = work / "logs" / f"shallow-{slug(mutant.name)}.log"
    run = run_child("shallow", {"target": target, "programs": programs, "seed": seed,
                                "package": str(folder)}, log,
                    budget=Budget(SHALLOW_CPU), env=dict(environment(folder)))
    row = {**asdict(mutant), "name": mutant.name, "change": change(mutant),
           "package": str(folder)}
    last = run.records[-1][1] if run.records else {}
    if run.stopped_at_cap:
        return {**row, "kind": HANG, "by": f"over {SHALLOW_CPU:g} CPU s"}
    if last.get("event") == "survived":
        return {**row, "kind": DEEP, "execs": last["execs"]}
    if last.get("event") != "killed":
        lines = log.read_text(errors="replace").strip().splitlines()
        return {**row, "kind": BROKEN,
                "by": f"exit {run.returncode}: {lines[-1] if lines else 'no output'}"}
    killed = {**row, "by": last["by"], "signature": last["signature"],
              "summary": last["summary"], "execs": last["execs"]}
    if fault_needed(parse_reproducer(last["repro"]).program, target):
        return {**killed, "kind": SHALLOW}
    return {**killed, "kind": UNCLEAR}


if __name__ == "__main__":  # python -m mmufuzz.bench.mutants [COUNT [SEED]]: list a sample
    for drawn in sample(int(sys.argv[1]) if len(sys.argv) > 1 else 10,
                        int(sys.argv[2]) if len(sys.argv) > 2 else 1):
        print(f"{drawn.name}: {change(drawn)}")

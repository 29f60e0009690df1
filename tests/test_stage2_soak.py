"""The stage2 target against the reference: random decoded programs and the corpus.

Every decoded program is bent to what the target runs (``Capabilities.restrict``:
default VMs, no private memory), as a campaign on ``--target stage2`` does.  The
CI-sized soak is bounded by program count; the 100,000-program one is slow:

    MMUFUZZ_STAGE2_SOAK=100000 python3 -m pytest -m slow tests/test_stage2_soak.py -s
"""

from __future__ import annotations

import os
import random
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pytest

from mmufuzz.fuzz.corpus import replay
from mmufuzz.fuzz.encoding import decode, format_program, load_reproducer
from mmufuzz.fuzz.runner import make_target, run_program
from mmufuzz.harness.target import TargetRefused

ROOT = Path(__file__).resolve().parents[1]
CHUNK = 500


def _run(target_name: str, first: int, count: int):
    """(programs, ops, the first failing seed's report or None) for seeds [first, first+count)."""
    target = make_target(target_name)
    caps = target.capabilities
    ops = 0
    for seed in range(first, first + count):
        rng = random.Random(seed)
        program = caps.restrict(decode(rng.randbytes(rng.randrange(400))))
        ops += len(program.ops)
        finding = run_program(program, target)
        if finding is not None:
            report = format_program(program, finding.op_index, {"seed": seed})
            return count, ops, f"{finding.summary(target_name)}\n{report}"
    return count, ops, None


@pytest.mark.parametrize("target_name, programs", [("stage2", 400), ("stage2-pkvm", 200)])
def test_random_programs_run_clean(target_name, programs):
    done, ops, failure = _run(target_name, 0, programs)
    assert failure is None, failure
    assert done == programs and ops > programs  # the programs were not emptied by restrict


def _chunk(args):
    return _run(*args)


@pytest.mark.slow
@pytest.mark.parametrize("target_name", ["stage2", "stage2-pkvm"])
def test_many_random_programs_run_clean(target_name):
    total = int(os.environ.get("MMUFUZZ_STAGE2_SOAK", "100000"))
    starts = [(target_name, first, min(CHUNK, total - first)) for first in range(0, total, CHUNK)]
    programs = ops = 0
    with ProcessPoolExecutor(max_workers=os.cpu_count()) as pool:
        for done, chunk_ops, failure in pool.map(_chunk, starts):
            programs, ops = programs + done, ops + chunk_ops
            assert failure is None, failure
    print(f"\n{target_name}: {programs} programs, {ops} ops, zero findings")


def _clean_reproducers():
    """Every reproducer of the corpus that runs clean without a fault: seeds, clean
    regressions, and fault regressions (clean once their fault is out)."""
    for path in sorted((ROOT / "corpus").rglob("*.repro")):
        meta = load_reproducer(path).meta
        if meta.get("expect") != "divergence" or meta.get("inject", "none") != "none":
            yield path


@pytest.mark.parametrize("path", list(_clean_reproducers()), ids=lambda p: p.name)
@pytest.mark.parametrize("target_name", ["stage2", "stage2-pkvm"])
def test_corpus_runs_clean_where_a_default_vm_can_run_it(path, target_name):
    try:
        result = replay(load_reproducer(path), target=target_name, inject="none")
    except TargetRefused as refused:
        # Refused only for what a default VM cannot have: TDX, private memory, accept.
        assert any(word in str(refused) for word in ("tdx", "private", "accept",
                                                      "set_attributes")), refused
        return
    assert result.finding is None, result.report()

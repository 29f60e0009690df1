"""Properties of the reference over decoded (arbitrary) programs.

``run`` must report an outcome ``step`` accepts, every outcome an Expect lists
must be accepted, the reference must never raise on a decodable program, and
its outcomes must not depend on PYTHONHASHSEED.
"""

from __future__ import annotations

import subprocess
import sys

from hypothesis import given, settings, strategies as st

from mmufuzz.fuzz.encoding import decode
from mmufuzz.harness.ops import (AccessKind, Access, FlushTlb, Invlpg, MemslotAdd, MemslotFlag, Paging,
                         Parallel, PteFlag, VmHeader, VmType, WritePte)
from mmufuzz.reference.model import Reference


def simple_ops(program):
    """The program's ops with each ``parallel`` run as ``a`` then ``b``."""
    for op in program.ops:
        if isinstance(op, Parallel):
            yield op.a
            yield op.b
        else:
            yield op


def check_consistent(header, ops, data):
    """Every listed outcome is accepted and ``run`` reports the canonical one.

    The state advances along a choice drawn from ``data``, so that states only
    reachable through non-canonical outcomes get checked too.
    """
    ref = Reference(header)
    for op in ops:
        expect = ref.allowed(op)
        for outcome, _ in expect.choices:
            assert ref.copy().step(op, outcome) is None, (op, outcome, str(expect))
        assert ref.copy().run(op) == expect.canonical
        chosen = data.draw(st.sampled_from([outcome for outcome, _ in expect.choices]))
        assert ref.step(op, chosen) is None


@settings(max_examples=150, deadline=None)
@given(st.binary(min_size=1, max_size=600), st.data())
def test_decoded_programs_are_judged_consistently(raw, data):
    program = decode(raw)
    check_consistent(program.header, list(simple_ops(program)), data)


# A small paging world where stale translations are common: tables at gfns 1..4,
# data at 0x10/0x11 and a 2M frame at 0x200, two vCPUs.
_GVAS = (0x0, 0x1000, 0x200000, 0x400000, 0x5ff000, 0x8000000000)
_paging_ops = st.one_of(
    st.builds(WritePte, st.integers(0, 1), st.integers(1, 4), st.integers(0, 2),
              st.sampled_from((2, 3, 4, 0x10, 0x11, 0x200, 0x500)),
              st.sampled_from([PteFlag(0), PteFlag.P, PteFlag.P | PteFlag.RW,
                               PteFlag.P | PteFlag.RW | PteFlag.PS, PteFlag.P | PteFlag.NX,
                               PteFlag.P | PteFlag.RW | PteFlag.PS | PteFlag.NX])),
    st.builds(Access, st.integers(0, 1), st.sampled_from(_GVAS), st.just(True),
              st.integers(0, 1), st.sampled_from([AccessKind.READ, AccessKind.FETCH]),
              st.none(), st.just(False)),
    st.builds(Access, st.integers(0, 1), st.sampled_from(_GVAS + (0x10000, 0x11000)),
              st.booleans(), st.integers(0, 1), st.just(AccessKind.WRITE),
              st.integers(0, 3), st.just(False)),
    st.builds(Invlpg, st.integers(0, 1), st.sampled_from(_GVAS)),
    st.builds(FlushTlb, st.integers(0, 1)),
    st.builds(Paging, st.integers(0, 1), st.sampled_from((1, 2, None))),
)


@settings(max_examples=200, deadline=None)
@given(st.lists(_paging_ops, max_size=40), st.data())
def test_paging_programs_are_judged_consistently(ops, data):
    rw = PteFlag.P | PteFlag.RW
    tables = [WritePte(0, table, index, target, flags) for table, index, target, flags in (
        (1, 0, 2, rw), (2, 0, 3, rw), (3, 0, 4, rw), (3, 1, 4, rw), (3, 2, 0x200, rw | PteFlag.PS),
        (4, 0, 0x10, rw), (4, 1, 0x11, rw))]
    setup = [MemslotAdd(0, 0x0, 0x400, MemslotFlag.DIRTY_LOG, 0), *tables, Paging(0, 1),
             Paging(1, 1)]
    check_consistent(VmHeader(VmType.DEFAULT, 2), setup + ops, data)


@settings(max_examples=60, deadline=None)
@given(st.binary(min_size=1, max_size=600))
def test_a_copy_evolves_independently(data):
    program = decode(data)
    ops = list(simple_ops(program))
    head, tail = ops[:len(ops) // 2], ops[len(ops) // 2:]

    def replay(history):
        ref = Reference(program.header)
        for op in history:
            ref.run(op)
        return ref

    original = replay(head)
    twin = original.copy()
    for op in tail + head:                 # drive the original elsewhere first
        original.run(op)
    assert [twin.run(op) for op in tail] == list(map(replay(head).run, tail))
    assert [original.run(op) for op in tail] == list(map(replay(head + tail + head).run, tail))


_OUTCOMES_DIGEST = """
import hashlib, random
from mmufuzz.fuzz.encoding import decode
from mmufuzz.harness.ops import (AccessKind, Access, FlushTlb, Invlpg, MemslotAdd, MemslotFlag, Paging,
                         Parallel, PteFlag, VmHeader, VmType, WritePte)
from mmufuzz.reference.model import Reference
rng = random.Random(7)
digest = hashlib.sha256()
for _ in range(150):
    program = decode(rng.randbytes(rng.randint(1, 500)))
    ref = Reference(program.header)
    for op in program.ops:
        for simple in ((op.a, op.b) if isinstance(op, Parallel) else (op,)):
            digest.update(str(ref.allowed(simple)).encode())
            ref.run(simple)
print(digest.hexdigest())
"""


def test_outcomes_are_the_same_under_any_hash_seed():
    digests = {subprocess.run([sys.executable, "-c", _OUTCOMES_DIGEST],
                              env={"PYTHONHASHSEED": seed}, capture_output=True, text=True,
                              check=True).stdout
               for seed in ("0", "1", "4242")}
    assert len(digests) == 1 and digests != {""}

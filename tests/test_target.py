"""Target capabilities: what a target refuses, and how a campaign bends programs to it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from planted import DefaultOnly

from mmufuzz.fuzz.encoding import parse_reproducer
from mmufuzz.harness.ops import OP_NAMES, Parallel, VmType, ZapAll
from mmufuzz.harness.target import EVERYTHING, Capabilities, StateEvents

TDX_PROGRAM = """\
vm type=tdx vcpus=2
memslot_add slot=0 base=0x200 npages=0x200 flags=host_huge host_offset=0
zap_all
parallel a=(access vcpu=0 gpa=0x200000 word=0 kind=read private=0) \
b=(zap_all) schedule=0x0
access vcpu=1 gpa=0x200000 word=0 kind=read private=0
"""


def test_everything_refuses_nothing_and_restricts_to_the_same_program():
    program = parse_reproducer(TDX_PROGRAM).program
    assert EVERYTHING.everything
    assert EVERYTHING.refusal(program) is None
    assert EVERYTHING.restrict(program) == program


def test_refusal_names_the_header_first_then_the_first_refused_op():
    program = parse_reproducer(TDX_PROGRAM).program
    caps = DefaultOnly.capabilities
    assert caps.refusal(program) == "header: vm type=tdx is not supported by this target"
    default = parse_reproducer(TDX_PROGRAM.replace("type=tdx", "type=default")).program
    assert caps.refusal(default) == "op 2: zap_all is not supported by this target"


def test_restrict_gives_a_program_the_target_accepts():
    program = parse_reproducer(TDX_PROGRAM).program
    restricted = DefaultOnly.capabilities.restrict(program)
    assert DefaultOnly.capabilities.refusal(restricted) is None
    assert restricted.header.type is VmType.DEFAULT
    assert not any(isinstance(op, (Parallel, ZapAll)) for op in restricted.ops)
    # The parallel keeps the side the target can run, in place.
    assert [type(op).__name__ for op in restricted.ops] == ["MemslotAdd", "Access", "Access"]


def test_restrict_drops_the_actors_a_target_refuses_and_keeps_the_others_racing():
    line = ("parallel a=(access vcpu=0 gpa=0x200000 word=0 kind=read private=0) b=(zap_all) "
            "c=(access vcpu=1 gpa=0x200000 word=0 kind=read private=0) schedule=0x15\n")
    program = parse_reproducer("vm type=default vcpus=2\n" + line).program
    (three,) = program.ops
    no_zap = Capabilities(ops=set(OP_NAMES) - {ZapAll})
    # Without b: a and c, in the order the schedule ran them (a b c -> a c, base 2).
    assert no_zap.restrict(program).ops == (Parallel(three.a, three.c, 0b10),)
    # A target that runs no parallel gets its first side it can run.
    assert DefaultOnly.capabilities.restrict(program).ops == (three.a,)


def test_replay_refuses_with_file_and_reason_and_exit_2(tmp_path):
    path = tmp_path / "tdx.repro"
    path.write_text(TDX_PROGRAM)
    tests = Path(__file__).parent
    done = subprocess.run([sys.executable, "-m", "mmufuzz.fuzz.cli", "replay", str(path),
                           "--target", "planted:DefaultOnly"],
                          capture_output=True, text=True, cwd=tests, timeout=60,
                          env={"PYTHONPATH": str(tests), "PATH": ""})
    assert done.returncode == 2
    assert done.stdout == ""
    assert done.stderr.strip() == (f"mmufuzz: error: {path}: target planted:DefaultOnly cannot "
                                   "run this program: header: vm type=tdx is not supported by "
                                   "this target")


def test_state_events_drain_the_names_an_op_raised_in_index_order():
    events = StateEvents(["walk", "zap", "flush"])
    counts = events.counts()
    assert events.drain(counts) == []
    counts[2] += 1
    counts[0] += 3
    assert events.drain(counts) == ["walk", "flush"]
    assert counts == [0, 0, 0] and events.drain(counts) == []
    with pytest.raises(ValueError):
        StateEvents(["walk", "walk"])

"""The minimizer: known-minimal results from padded programs, signatures kept, flakiness told."""

from __future__ import annotations

from mmufuzz.harness.ops import (PG_LEVEL_2M, Accept, Access, AccessKind, DirtyLog, FlushTlb, GetDirtyLog,
                         HostInvalidate, Invlpg, MemslotAdd, MemslotDelete, MemslotFlag,
                         MemslotMove, MemslotSetFlags, Ok, Paging, Parallel, Program, Recover,
                         SetAttributes, Split, VmHeader, VmType, ZapAll)
from mmufuzz.harness.target import InvariantViolation
from mmufuzz.fuzz import minimize as minimize_module
from mmufuzz.fuzz.cli import main
from mmufuzz.fuzz.encoding import encode, format_program, load_reproducer
from mmufuzz.fuzz.minimize import minimize, report
from mmufuzz.fuzz.runner import ReferenceTarget, make_target, run_program
from planted import FetchForgets, ZapForgets

NO_FLAGS = MemslotFlag(0)


def write(gpa, value, vcpu=0, word=0):
    return Access(vcpu, gpa, False, word, AccessKind.WRITE, value, False)


def read(gpa, vcpu=0, word=0):
    return Access(vcpu, gpa, False, word, AccessKind.READ, None, False)


class DirtyLogCrash(ReferenceTarget):
    """Planted: reporting a non-empty dirty log raises."""

    name = "dirty-log-crash"

    def execute(self, op):
        outcome = super().execute(op)
        if isinstance(outcome, DirtyLog) and outcome.gfns:
            raise RuntimeError(f"gfn={outcome.gfns[0]:#x} bitmap overflow")
        return outcome


class RecoverBreaks(ReferenceTarget):
    """Planted: once two slots exist, ``recover`` breaks a named invariant."""

    name = "recover-breaks"

    def reset(self, header):
        super().reset(header)
        self.slots, self.broken = set(), False

    def execute(self, op):
        outcome = super().execute(op)
        if isinstance(op, MemslotAdd) and outcome == Ok():
            self.slots.add(op.slot)
        self.broken |= isinstance(op, Recover) and len(self.slots) >= 2
        return outcome

    def check_invariants(self):
        if self.broken:
            raise InvariantViolation("refcount_matches_children", "gfn=0x0 level=2")


class TableLeak(ReferenceTarget):
    """Planted: a read of a gfn that has a page table under it breaks an invariant.

    A gfn gets a table from a read while no slot holds it (an MMIO SPTE), or
    from enabling dirty logging on its slot once a read mapped it (a split).
    """

    name = "table-leak"

    def reset(self, header):
        super().reset(header)
        self.slots, self.mapped, self.tables, self.broken = {}, set(), set(), False

    def execute(self, op):
        outcome = super().execute(op)
        if isinstance(op, MemslotAdd) and outcome == Ok():
            self.slots[op.slot] = range(op.base, op.base + op.npages)
        elif isinstance(op, MemslotSetFlags) and op.flags & MemslotFlag.DIRTY_LOG:
            self.tables |= {gfn for gfn in self.mapped if gfn in self.slots.get(op.slot, ())}
        elif isinstance(op, Access):
            gfn = op.addr >> 12
            if not any(gfn in gfns for gfns in self.slots.values()):
                self.tables.add(gfn)
            else:
                self.broken |= gfn in self.tables
                self.mapped.add(gfn)
        return outcome

    def check_invariants(self):
        if self.broken:
            raise InvariantViolation("leaked_table_page", "gfn=0x100 level=1")


class EveryOtherRun(ZapForgets):
    """Planted flakiness: the zap bug shows only on every other run of one instance."""

    name = "every-other-run"

    def __init__(self):
        self.runs = 0

    def reset(self, header):
        super().reset(header)
        self.runs += 1

    def execute(self, op):
        if self.runs % 2:
            return super().execute(op)
        return ReferenceTarget.execute(self, op)


def padded(header, core, noise):
    """``core`` ops with ``noise`` ops interleaved before each of them."""
    ops = []
    for index, op in enumerate(core):
        ops += noise[index::len(core)]
        ops.append(op)
    return Program(header, tuple(ops))


SLOT = MemslotAdd(0, 0x100, 0x10, NO_FLAGS, 0)
NOISE = (
    MemslotAdd(5, 0x4000, 0x200, MemslotFlag.HOST_HUGE, 0), write(0x4000000, 9, vcpu=2),
    read(0x4001000, vcpu=3), FlushTlb(1), Invlpg(2, 0x5000), Paging(3, None),
    HostInvalidate(0x4000, 0x10), MemslotSetFlags(5, MemslotFlag.HOST_HUGE | MemslotFlag.DIRTY_LOG),
    GetDirtyLog(5), read(0x9000000, vcpu=1), write(0x4002000, 3, vcpu=1, word=7),
    MemslotDelete(7), Split(5), SetAttributes(0x4000, 1, True), read(0x100000, vcpu=3, word=9),
    MemslotAdd(6, 0x100000, 0x40000, NO_FLAGS, 0), GetDirtyLog(6),
)
HEADER = VmHeader(VmType.DEFAULT, 4)

# (target class, minimal core, noise): the core is the known-minimal program.
CASES = {
    "divergence": (ZapForgets, (SLOT, write(0x100000, 0x2a), ZapAll(), read(0x100000)), NOISE),
    "crash": (DirtyLogCrash, (MemslotAdd(0, 0x100, 0x10, MemslotFlag.DIRTY_LOG, 0),
                              write(0x100000, 1), GetDirtyLog(0)), NOISE[:5] + NOISE[9:]),
    "invariant": (RecoverBreaks, (SLOT, MemslotAdd(1, 0x200, 0x10, NO_FLAGS, 0), Recover()),
                  NOISE),
}


def spec(cls) -> str:
    return f"{cls.__module__}:{cls.__name__}"


def test_each_planted_case_reaches_its_known_minimal_size_with_the_same_signature():
    for kind, (cls, core, noise) in CASES.items():
        program = padded(HEADER, core, noise)
        before = run_program(program, cls())
        assert before is not None and before.kind == kind, kind
        assert run_program(Program(HEADER, core), cls()).signature == before.signature

        result = minimize(program, spec(cls))
        assert result.reproducible and not result.flaky
        assert result.signature == before.signature == result.finding.signature, kind
        assert len(result.program.ops) <= 1.2 * len(core), (kind, format_program(result.program))
        assert run_program(result.program, cls()).signature == before.signature
        assert result.original_ops == len(program.ops) > 3 * len(core)


def test_private_memory_comes_out_as_a_whole_when_the_finding_does_not_need_it():
    """The slot's private flag, set_attributes, the accept and the accesses' private bits
    each hold up the private path alone: no one-op change removes any of them, together
    they leave the shared minimum (slot, write, fetch) in a default VM."""
    gpa = 0x201000
    program = Program(VmHeader(VmType.TDX, 1), (
        MemslotAdd(0, 0, 0x400, MemslotFlag.PRIVATE | MemslotFlag.HOST_HUGE, 0),
        SetAttributes(0x200, 0x200, True),
        Accept(0, 0x200000, PG_LEVEL_2M), Access(0, gpa, False, 0, AccessKind.WRITE, 1, True),
        Access(0, gpa, False, 0, AccessKind.FETCH, None, True)))
    before = run_program(program, FetchForgets())
    result = minimize(program, spec(FetchForgets))
    assert result.signature == before.signature
    assert result.program.header.type is VmType.DEFAULT and len(result.program.ops) == 3, \
        format_program(result.program)


def test_a_slot_move_is_dropped_together_with_the_address_change_it_forced():
    moved = (SLOT, write(0x100000, 0x2a), MemslotMove(0, 0x800), ZapAll(), read(0x800000))
    program = padded(HEADER, moved, NOISE)
    assert run_program(Program(HEADER, moved[:2] + moved[3:]), ZapForgets()) is None
    result = minimize(program, spec(ZapForgets))
    assert len(result.program.ops) == 4, format_program(result.program)
    assert result.signature == run_program(program, ZapForgets()).signature


def test_an_op_moved_earlier_lets_another_go():
    """The table from a dirty-log split over a mapping, or from a read before the slot exists:
    no op of the first program can go, the second is one op shorter and the same ops in
    another order."""
    split = Program(VmHeader(VmType.DEFAULT, 1), (
        SLOT, read(0x100000), MemslotSetFlags(0, MemslotFlag.DIRTY_LOG), read(0x100000)))
    signature = run_program(split, TableLeak()).signature
    for index in range(len(split.ops)):
        assert run_program(split.with_ops(split.ops[:index] + split.ops[index + 1:]),
                           TableLeak()) is None
    result = minimize(split, spec(TableLeak))
    assert result.signature == signature
    assert [type(op) for op in result.program.ops] == [Access, MemslotAdd, Access], \
        format_program(result.program)


def test_fields_and_numbering_are_simplified():
    _, core, noise = CASES["divergence"]
    core = (MemslotAdd(9, 0x100, 0x10, MemslotFlag.HOST_HUGE, 17),
            write(0x100000, 0x2a, vcpu=3, word=5), ZapAll(), read(0x100000, vcpu=3, word=5))
    result = minimize(padded(HEADER, core, noise), spec(ZapForgets))
    add, store, _, load = result.program.ops
    assert result.program.header.vcpus == 1 and store.vcpu == load.vcpu == 0
    assert add == MemslotAdd(0, 0x100, 0x1, NO_FLAGS, 0)
    assert store.value == 1 and store.word == load.word


def test_no_program_runs_twice(monkeypatch):
    ran = []

    def recording(program, target, **kwargs):
        ran.append(program)
        return run_program(program, target, **kwargs)

    monkeypatch.setattr(minimize_module, "run_program", recording)
    result = minimize(padded(HEADER, CASES["divergence"][1], NOISE), spec(ZapForgets))
    # The first replays repeat the input on purpose; every later candidate is new.
    assert result.runs == len(ran) > 20
    later = ran[result.attempts:]
    assert len(later) == len(set(later))


def test_flaky_finding_is_reported_not_minimized():
    program = padded(HEADER, CASES["divergence"][1], NOISE)
    result = minimize(program, spec(EveryOtherRun))
    assert result.flaky and not result.reproducible
    assert result.program == program and 0 < result.reproduced < result.attempts
    text = report(result, spec(EveryOtherRun), "none")
    assert "# flaky: signature" in text and "# expect:" not in text


def test_clean_program_is_not_reproduced():
    result = minimize(Program(HEADER, (SLOT, read(0x100000))), spec(ZapForgets))
    assert result.reproduced == 0 and not result.flaky and result.finding is None


def test_deadline_stops_reduction_and_keeps_a_failing_program():
    program = padded(HEADER, CASES["divergence"][1], NOISE)
    result = minimize(program, spec(ZapForgets), max_seconds=0)
    assert result.reproducible and result.runs <= result.attempts + 1
    assert run_program(result.program, make_target(spec(ZapForgets))) is not None


def test_cli_minimize_writes_a_reproducer_that_replays_with_the_same_signature(tmp_path, capsys):
    raw = tmp_path / "raw.repro"
    raw.write_text(format_program(padded(HEADER, CASES["divergence"][1], NOISE)))
    out = tmp_path / "min.repro"
    assert main(["minimize", str(raw), "--target", spec(ZapForgets), "-o", str(out)]) == 0
    assert "minimized 21 -> 4 ops" in capsys.readouterr().err
    text = out.read_text()
    for line in ("# finding: divergence at op 3 (access)", f"# target: {spec(ZapForgets)}",
                 "# inject: none", "# signature: ", "# expected: ok(0x1)", "# actual:   ok(0x0)",
                 ">>> access vcpu=0 gpa=0x100000 word=0 kind=read private=0"):
        assert line in text, line
    signature = load_reproducer(out).meta["signature"]
    # The file names a module:factory target: only the command line may load that.
    assert main(["replay", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"{out}:3: field 'target': unknown target" in err and "--target" in err
    assert main(["replay", "--target", spec(ZapForgets), str(out)]) == 1
    assert f"divergence {signature}" in capsys.readouterr().out


def test_a_parallel_whose_other_side_is_a_failing_noop_is_unwrapped(tmp_path):
    """The pair is one op in disguise: the side that fails and changes nothing goes, also
    when the finding is at the pair itself (a pair's signature names its diverging side, so
    the signature stays)."""
    prefix = (SLOT, write(0x100000, 0x2a), ZapAll())
    alone = minimize(Program(HEADER, prefix + (read(0x100000),)), spec(ZapForgets))
    overlapping = MemslotAdd(1, 0x100, 0x1, NO_FLAGS, 0)  # einval: slot 0 holds 0x100
    noops = (overlapping, SetAttributes(0x100, 0, True))  # npages=0: einval (unsupported here)
    for noop in noops:
        for pair in (Parallel(read(0x100000), noop, 0x5), Parallel(noop, read(0x100000), 0x0)):
            result = minimize(Program(HEADER, prefix + (pair,)), spec(ZapForgets))
            assert result.reproducible
            assert result.program == alone.program, (noop, result.program)
            assert result.signature == alone.signature == result.original_signature
    # A side that changes state is no no-op, but the bug does not need it here: since a
    # pair's signature names its diverging side, the plain unwrap takes the pair apart too.
    racing = Parallel(read(0x100000), write(0x100000, 0x7, vcpu=1), 0x0)
    program = Program(HEADER, (SLOT, write(0x100000, 0x2a), ZapAll(), racing))
    result = minimize(program, spec(ZapForgets))
    assert result.program == alone.program
    assert result.signature == result.original_signature


def test_cli_minimize_takes_raw_fuzzer_bytes(tmp_path, capsys):
    raw = tmp_path / "input.bin"
    raw.write_bytes(encode(padded(HEADER, CASES["divergence"][1], NOISE)))
    assert main(["minimize", str(raw), "--target", spec(ZapForgets)]) == 0
    assert ">>> access" in capsys.readouterr().out


def test_cli_minimize_of_a_clean_file_exits_1(tmp_path, capsys):
    clean = tmp_path / "clean.repro"
    clean.write_text(format_program(Program(HEADER, (SLOT, read(0x100000)))))
    assert main(["minimize", str(clean), "--target", "reference"]) == 1
    assert "not reproduced: no finding in 3 replays" in capsys.readouterr().err


def test_the_actors_a_finding_does_not_need_are_dropped():
    """A read racing a zap_all loses its page (planted); a flush and a TLB invalidation on
    other vCPUs race along.  The minimizer drops them, one actor at a time, down to the
    pair that fails: a parallel of the zap and the read, or the read alone cannot fail."""
    prefix = (SLOT, write(0x100000, 0x2a))
    pair = minimize(Program(HEADER, prefix + (Parallel(ZapAll(), read(0x100000), 0x0),)),
                    spec(ZapForgets))
    assert isinstance(pair.program.ops[-1], Parallel) and len(pair.program.ops) == 3
    noise = (FlushTlb(2), Invlpg(3, 0x5000))
    zap, access = ZapAll(), read(0x100000)
    for actors in ((zap, noise[0], access), (noise[1], zap, noise[0], access)):
        program = Program(HEADER, prefix + (Parallel.of(actors, 0x1b),))
        result = minimize(program, spec(ZapForgets))
        assert result.reproducible and result.signature == pair.signature
        assert result.program == pair.program, format_program(result.program)


def test_a_dropped_actor_takes_its_schedule_digits_with_it():
    """Without c, a b c's schedule keeps the order it ran a and b in, in base 2."""
    digits = (0, 1, 2, 0, 1, 2)  # a b c a b c, step 0 first
    op = Parallel.of((ZapAll(), Recover(), FlushTlb(0)),
                     sum(d * 3 ** i for i, d in enumerate(digits)))
    assert op.without(2) == Parallel(ZapAll(), Recover(), 0b1010)  # a b a b
    assert op.without(0) == Parallel(Recover(), FlushTlb(0), 0b1010)  # b c b c -> a b a b
    assert Parallel(ZapAll(), Recover(), 0b10).without(1) == ZapAll()

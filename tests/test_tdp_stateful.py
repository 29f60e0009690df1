"""The tdp target against the reference, op by op, under Hypothesis' state machine.

Ops come from small pools of interesting values (slot boundaries, 2M-aligned
gfns and their neighbours, misaligned host offsets) so that short programs
reach huge pages, splits, merges, conversions, dirty logging and guest paging.
Every outcome is judged by ``Reference.step`` and every invariant is checked
after every op; a ``parallel`` must be explained by ``a;b`` or ``b;a``.
"""

from __future__ import annotations

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, precondition, rule

from mmufuzz.harness.ops import (Accept, Access, AccessKind, FlushTlb, GetDirtyLog, HostInvalidate, Invlpg,
                         MemslotAdd, MemslotDelete, MemslotFlag, MemslotMove, MemslotSetFlags,
                         Paging, Parallel, PteFlag, Recover, SetAttributes, Split, VmHeader,
                         VmType, WritePte, ZapAll)
from mmufuzz.harness.tdp import TdpTarget
from mmufuzz.fuzz.runner import Differential

SLOTS = st.integers(0, 2)
# Slot 0 covers [0x200, 0x600), slot 1 [0x600, 0x801) after create_vm; 0x0 and 0x801 have none.
GFNS = st.sampled_from([0x0, 0x200, 0x201, 0x3ff, 0x400, 0x401, 0x5ff, 0x600, 0x601, 0x800,
                        0x801])
BASES = st.sampled_from([0x0, 0x1, 0x200, 0x201, 0x600, 0x800])
NPAGES = st.sampled_from([0x1, 0x10, 0x1ff, 0x200, 0x201, 0x400])
HOST_OFFSETS = st.sampled_from([0, 0, 1, 511])
WORDS = st.sampled_from([0, 1, 511])
VALUES = st.integers(1, 0xFF)
GVAS = st.sampled_from([0x0, 0x1000, 0x200000, 0x201000, 0x400000])
TABLES = st.sampled_from([0x200, 0x201, 0x202, 0x203, 0x600])
POINTEES = st.sampled_from([0x201, 0x202, 0x203, 0x400, 0x600, 0x601, 0x0])
SHARED_FLAGS = [MemslotFlag(0), MemslotFlag.HOST_HUGE, MemslotFlag.DIRTY_LOG,
                MemslotFlag.DIRTY_LOG | MemslotFlag.HOST_HUGE,
                MemslotFlag.READONLY | MemslotFlag.HOST_HUGE]
PRIVATE_FLAGS = [MemslotFlag.PRIVATE | MemslotFlag.HOST_HUGE, MemslotFlag.PRIVATE]
SLOT_FLAGS = st.sampled_from(SHARED_FLAGS + PRIVATE_FLAGS)
PTE_FLAGS = st.sampled_from([PteFlag.P | PteFlag.RW, PteFlag.P, PteFlag.P | PteFlag.RW | PteFlag.NX,
                             PteFlag.P | PteFlag.RW | PteFlag.PS, PteFlag(0)])


class TdpVersusReference(RuleBasedStateMachine):
    """Drive one VM on both sides; the reference judges every tdp outcome."""

    @initialize(tdx=st.booleans(), vcpus=st.integers(2, 3), data=st.data())
    def create_vm(self, tdx, vcpus, data):
        self.header = VmHeader(VmType.TDX if tdx else VmType.DEFAULT, vcpus)
        self.tdx = tdx
        self.differential = Differential(self.header, TdpTarget())
        flags = st.sampled_from(SHARED_FLAGS[:2] + PRIVATE_FLAGS if tdx else SHARED_FLAGS)
        self.judge(MemslotAdd(0, 0x200, 0x400, data.draw(flags), data.draw(HOST_OFFSETS)))
        self.judge(MemslotAdd(1, 0x600, 0x201, data.draw(flags), data.draw(HOST_OFFSETS)))

    def judge(self, op):
        """The runner's oracle: outcome judged, then every invariant checked."""
        finding = self.differential.step(op)
        if finding is not None:
            raise AssertionError(finding.summary("tdp"))

    def vcpu(self, data):
        return data.draw(st.integers(0, self.header.vcpus - 1))

    # --- guest ops -----------------------------------------------------------

    def access_op(self, data, vcpu=None):
        kind = data.draw(st.sampled_from(list(AccessKind)))
        virtual = data.draw(st.booleans())
        addr = data.draw(GVAS) if virtual else data.draw(GFNS) << 12
        return Access(self.vcpu(data) if vcpu is None else vcpu, addr, virtual, data.draw(WORDS),
                      kind, data.draw(VALUES) if kind is AccessKind.WRITE else None,
                      self.tdx and data.draw(st.booleans()))

    @rule(data=st.data())
    def access(self, data):
        self.judge(self.access_op(data))

    @rule(data=st.data())
    def access_again(self, data):
        """A second access to the same page: the TLB/SPTE hit path."""
        op = self.access_op(data)
        self.judge(op)
        self.judge(op)

    @rule(data=st.data(), table=TABLES, index=st.sampled_from([0, 1, 2]),
          pointee=POINTEES, flags=PTE_FLAGS)
    def write_pte(self, data, table, index, pointee, flags):
        if flags & PteFlag.PS and pointee % 512:
            flags &= ~PteFlag.PS
        self.judge(WritePte(self.vcpu(data), table, index, pointee, flags))

    @rule(data=st.data(), root=st.sampled_from([None, 0x200, 0x201]))
    def paging(self, data, root):
        self.judge(Paging(self.vcpu(data), root))

    @rule(data=st.data(), gva=GVAS)
    def invlpg(self, data, gva):
        self.judge(Invlpg(self.vcpu(data), gva))

    @rule(data=st.data())
    def flush_tlb(self, data):
        self.judge(FlushTlb(self.vcpu(data)))

    @precondition(lambda self: self.tdx)
    @rule(data=st.data(), gfn=GFNS, huge=st.booleans())
    def accept(self, data, gfn, huge):
        gfn = gfn - gfn % 512 if huge else gfn
        self.judge(Accept(self.vcpu(data), gfn << 12, 2 if huge else 1))

    # --- host ops --------------------------------------------------------------

    @rule(slot=SLOTS, base=BASES, npages=NPAGES, flags=SLOT_FLAGS, host_offset=HOST_OFFSETS)
    def memslot_add(self, slot, base, npages, flags, host_offset):
        self.judge(MemslotAdd(slot, base, npages, flags, host_offset))

    @rule(slot=SLOTS)
    def memslot_delete(self, slot):
        self.judge(MemslotDelete(slot))

    @rule(slot=SLOTS, base=BASES)
    def memslot_move(self, slot, base):
        self.judge(MemslotMove(slot, base))

    @rule(slot=SLOTS, flags=SLOT_FLAGS)
    def memslot_set_flags(self, slot, flags):
        self.judge(MemslotSetFlags(slot, flags))

    @precondition(lambda self: self.tdx)
    @rule(base=GFNS, npages=NPAGES, private=st.booleans())
    def set_attributes(self, base, npages, private):
        self.judge(SetAttributes(base, npages, private))

    @precondition(lambda self: self.tdx)
    @rule(data=st.data(), base=st.sampled_from([0x200, 0x400, 0x600]), huge=st.booleans())
    def convert_accept_use(self, data, base, huge):
        """The TD's usual sequence: convert a 2M range, accept, write privately, read back."""
        vcpu = self.vcpu(data)
        self.judge(SetAttributes(base, 0x200, True))
        gfn = base if huge else base + data.draw(st.sampled_from([0, 1, 0x1ff]))
        self.judge(Accept(vcpu, gfn << 12, 2 if huge else 1))
        write = Access(vcpu, gfn << 12, False, 1, AccessKind.WRITE, data.draw(VALUES), True)
        self.judge(write)
        self.judge(Access(self.vcpu(data), gfn << 12, False, 1, AccessKind.READ, None, True))

    @rule(base=GFNS, npages=st.sampled_from([0x1, 0x200]))
    def host_invalidate(self, base, npages):
        self.judge(HostInvalidate(base, npages))

    @rule()
    def zap_all(self):
        self.judge(ZapAll())

    @rule(slot=SLOTS)
    def split(self, slot):
        self.judge(Split(slot))

    @rule()
    def recover(self):
        self.judge(Recover())

    @rule(slot=SLOTS, data=st.data())
    def split_use_recover(self, slot, data):
        """Eager split, a guest access in between, then recovery (collapse or merge)."""
        self.judge(Split(slot))
        self.judge(self.access_op(data))
        self.judge(Recover())

    @precondition(lambda self: self.tdx)
    @rule(gfn=GFNS, to_private=st.booleans(), data=st.data())
    def flip_one_page(self, gfn, to_private, data):
        """Convert one page away and back: edges split, a table stays under a legal 2M range."""
        self.judge(SetAttributes(gfn, 1, to_private))
        self.judge(SetAttributes(gfn, 1, not to_private))
        self.judge(Access(self.vcpu(data), gfn << 12, False, 0, AccessKind.READ, None,
                          not to_private))

    @rule(slot=SLOTS)
    def get_dirty_log(self, slot):
        self.judge(GetDirtyLog(slot))

    @rule(data=st.data(), schedule=st.integers(0, 0xFFFF))
    def parallel(self, data, schedule):
        """An access against host work or another vCPU's access."""
        a = self.access_op(data, vcpu=0)
        b = data.draw(st.one_of(
            st.just(ZapAll()), st.just(Recover()),
            st.builds(HostInvalidate, GFNS, st.sampled_from([0x1, 0x200])),
            st.builds(Split, SLOTS), st.builds(MemslotDelete, SLOTS),
            st.builds(MemslotAdd, SLOTS, BASES, NPAGES, SLOT_FLAGS, HOST_OFFSETS)))
        if data.draw(st.booleans()):
            b = self.access_op(data, vcpu=1)
        self.judge(Parallel(a, b, schedule))


TdpVersusReference.TestCase.settings = settings(
    max_examples=2000, stateful_step_count=25, deadline=None, database=None,
    suppress_health_check=list(HealthCheck))
test_tdp_matches_reference = TdpVersusReference.TestCase

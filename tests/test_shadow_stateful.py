"""The shadow target against the reference, op by op, under Hypothesis' state machine.

Ops come from small pools chosen so that short programs build 4-level guest
tables that share tables between paths (with different permissions), use them,
rewrite them (tracked writes, unsync pages), flush them in every way (invlpg,
flush_tlb, CR3 loads, prev_roots), map MMIO, and mix in memslot changes,
dirty logging, host invalidations, zap_all and ``parallel`` pairs.  Every
outcome is judged by the reference and every invariant checked after every op.
"""

from __future__ import annotations

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, rule

from mmufuzz.fuzz.runner import Differential
from mmufuzz.harness.ops import (Access, AccessKind, FlushTlb, GetDirtyLog, HostInvalidate,
                                 Invlpg, MemslotAdd, MemslotDelete, MemslotFlag, MemslotMove,
                                 MemslotSetFlags, Paging, Parallel, PteFlag, Recover, Split,
                                 VmHeader, VmType, WritePte, ZapAll)
from mmufuzz.harness.shadow import ShadowTarget

# Slot 0 holds the tables and data [0x0, 0x40); 0x40.. has no slot (MMIO) until added.
TABLES = st.sampled_from([0x1, 0x2, 0x3, 0x4, 0x5, 0x6])
POINTEES = st.sampled_from([0x2, 0x3, 0x4, 0x5, 0x6, 0x10, 0x11, 0x40, 0x200])
INDICES = st.sampled_from([0, 1])
ROOTS = st.sampled_from([None, 0x1, 0x2])
# gvas whose walks use entries 0/1 at every level.
GVAS = st.sampled_from([0x0, 0x1000, 0x200000, 0x201000, 0x40000000, 0x8000000000])
PTE_FLAGS = st.sampled_from([PteFlag.P | PteFlag.RW, PteFlag.P, PteFlag.P | PteFlag.RW | PteFlag.NX,
                             PteFlag.P | PteFlag.NX, PteFlag(0)])
GFNS = st.sampled_from([0x1, 0x2, 0x4, 0x10, 0x11, 0x40, 0x201])
VALUES = st.integers(1, 0xFF)


class ShadowVersusReference(RuleBasedStateMachine):
    """Drive one VM on both sides; the reference judges every shadow outcome."""

    @initialize(vcpus=st.integers(1, 2), flags=st.sampled_from([MemslotFlag(0),
                                                               MemslotFlag.DIRTY_LOG]))
    def create_vm(self, vcpus, flags):
        self.header = VmHeader(VmType.DEFAULT, vcpus)
        self.differential = Differential(self.header, ShadowTarget())
        self.judge(MemslotAdd(0, 0x0, 0x40, flags, 0))
        # Slot 2 is one host 2M page: guest 2M pages and physical accesses map it huge.
        self.judge(MemslotAdd(2, 0x200, 0x200, flags | MemslotFlag.HOST_HUGE, 0))

    def judge(self, op):
        finding = self.differential.step(op)
        if finding is not None:
            raise AssertionError(finding.summary("shadow"))

    def vcpu(self, data):
        return data.draw(st.integers(0, self.header.vcpus - 1))

    def access_op(self, data, vcpu=None):
        kind = data.draw(st.sampled_from(list(AccessKind)))
        virtual = data.draw(st.booleans())
        addr = data.draw(GVAS) if virtual else data.draw(GFNS) << 12
        return Access(self.vcpu(data) if vcpu is None else vcpu, addr, virtual,
                      data.draw(st.sampled_from([0, 1])), kind,
                      data.draw(VALUES) if kind is AccessKind.WRITE else None, False)

    @rule(data=st.data())
    def access(self, data):
        self.judge(self.access_op(data))

    @rule(data=st.data(), table=TABLES, index=INDICES, pointee=POINTEES, flags=PTE_FLAGS)
    def write_pte(self, data, table, index, pointee, flags):
        self.judge(WritePte(self.vcpu(data), table, index, pointee, flags))

    @rule(table=TABLES, index=INDICES, pointee=POINTEES)
    def write_pte_2m(self, table, index, pointee):
        self.judge(WritePte(0, table, index, pointee & -512, PteFlag.P | PteFlag.RW | PteFlag.PS))

    @rule(data=st.data(), root=st.sampled_from([0x1, 0x2]), gva=GVAS, leaf=POINTEES,
          chain=st.permutations([0x2, 0x3, 0x4, 0x5, 0x6]), huge=st.booleans())
    def build_walk(self, data, root, gva, leaf, chain, huge):
        """Write the four entries of gva's walk from ``root`` (or three, the last a 2M
        page of slot 2): tables shared between walks (with their own permissions) are
        what shadow pages and roles are about."""
        tables = [root] + [t for t in chain if t != root][:2 if huge else 3]
        targets = tables[1:] + [0x200 if huge else leaf]
        for level, (table, target) in enumerate(zip(tables, targets)):
            index = (gva >> (39 - 9 * level)) & 511
            flags = data.draw(PTE_FLAGS)
            if huge and level == 2:
                flags |= PteFlag.P | PteFlag.PS
            self.judge(WritePte(self.vcpu(data), table, index, target, flags))
        if data.draw(st.booleans()):
            self.judge(Paging(0, root))
        self.judge(self.gva_access(data, gva))

    def gva_access(self, data, gva, vcpu=0):
        kind = data.draw(st.sampled_from(list(AccessKind)))
        return Access(vcpu, gva, True, data.draw(st.sampled_from([0, 1])), kind,
                      data.draw(VALUES) if kind is AccessKind.WRITE else None, False)

    @rule(data=st.data(), gva=GVAS)
    def gva_access_twice(self, data, gva):
        """vCPU 0 uses a gva: the shadow (and TLB) hit path the second time."""
        self.judge(self.gva_access(data, gva))
        self.judge(self.gva_access(data, gva))

    @rule(root=ROOTS)
    def paging(self, root):
        self.judge(Paging(0, root))

    @rule(data=st.data(), gva=GVAS)
    def invlpg(self, data, gva):
        self.judge(Invlpg(self.vcpu(data), gva))

    @rule(data=st.data())
    def flush_tlb(self, data):
        self.judge(FlushTlb(self.vcpu(data)))

    # Slot 1 comes and goes over the MMIO range; slot 0 (the tables) rarely moves.
    @rule(base=st.sampled_from([0x40, 0x80]))
    def memslot_add(self, base):
        self.judge(MemslotAdd(1, base, 0x40, MemslotFlag(0), 0))

    @rule()
    def memslot_delete(self):
        self.judge(MemslotDelete(1))

    @rule(slot=st.sampled_from([1, 1, 1, 0]), base=st.sampled_from([0x0, 0x40, 0x80]))
    def memslot_move(self, slot, base):
        self.judge(MemslotMove(slot, base))

    @rule(slot=st.sampled_from([0, 1, 2]), log=st.booleans())
    def memslot_set_flags(self, slot, log):
        flags = MemslotFlag.HOST_HUGE if slot == 2 else MemslotFlag(0)
        self.judge(MemslotSetFlags(slot, flags | MemslotFlag.DIRTY_LOG if log else flags))

    @rule(slot=st.sampled_from([0, 1, 2]))
    def get_dirty_log(self, slot):
        self.judge(GetDirtyLog(slot))

    @rule(slot=st.sampled_from([0, 2]))
    def split(self, slot):
        self.judge(Split(slot))

    @rule()
    def recover(self):
        self.judge(Recover())

    @rule(base=GFNS, npages=st.sampled_from([1, 0x10]))
    def host_invalidate(self, base, npages):
        self.judge(HostInvalidate(base, npages))

    @rule()
    def zap_all(self):
        self.judge(ZapAll())

    @rule(data=st.data(), schedule=st.integers(0, 0xFFFF))
    def parallel(self, data, schedule):
        """An access on vCPU 0 against host work or a page-table write of another vCPU."""
        a = self.access_op(data, vcpu=0)
        b = data.draw(st.one_of(
            st.just(ZapAll()), st.builds(HostInvalidate, GFNS, st.just(1)),
            st.builds(MemslotDelete, st.just(1)), st.builds(GetDirtyLog, st.just(0))))
        if self.header.vcpus > 1 and data.draw(st.booleans()):
            b = WritePte(1, data.draw(TABLES), data.draw(INDICES), data.draw(POINTEES),
                         data.draw(PTE_FLAGS))
        self.judge(Parallel(a, b, schedule))


ShadowVersusReference.TestCase.settings = settings(
    max_examples=300, stateful_step_count=30, deadline=None, database=None,
    suppress_health_check=list(HealthCheck))
test_shadow_matches_reference = ShadowVersusReference.TestCase

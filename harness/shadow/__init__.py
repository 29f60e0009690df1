"""The shadow-paging MMU under test: KVM's mmu.c + paging_tmpl.h without TDP.

``ShadowTarget`` turns ops into calls on a :class:`~harness.shadow.kvm.Kvm`;
each op is a generator drained to completion, and a ``parallel`` interleaves
its actors with tdp's scheduler.  The target runs default (non-TDX) VMs only: a TD's
private memory needs the TDP MMU's mirror root, which shadow paging has not.
"""

from __future__ import annotations

from mmufuzz.harness.ops import (OP_NAMES, PAGE_SHIFT, SIDE_NAMES, Accept, Access, FlushTlb,
                                 Invlpg, Parallel, Paging, SetAttributes, VmHeader, VmType,
                                 WritePte)
from mmufuzz.harness.shadow.events import EVENTS, SPTE_KINDS, spte_kind
from mmufuzz.harness.shadow.invariants import (check_invariants, check_postcondition,
                                               unsync_entry_agrees)
from mmufuzz.harness.shadow.kvm import Kvm
from mmufuzz.harness.shadow.paging_tmpl import DUMMY_ROOT
from mmufuzz.harness.shadow.spte import is_last_spte, is_mmio_spte, is_shadow_present_pte
from mmufuzz.harness.target import Capabilities
from mmufuzz.harness.tdp import TdpTarget
from mmufuzz.harness.tdp.pgalloc import used_entries

# The ops that sync unsync pages (a CR3 load, a guest TLB flush, invlpg): their feature says
# what a sync had to repair when they began (ShadowTarget._sync_debt).
_SYNCING = (FlushTlb, Invlpg, Paging)


class ShadowCapabilities(Capabilities):
    """Default VMs and no private ops: the shadow MMU has no TDX."""

    # The shadow MMU is built from the guest's own page tables: its work is done by CR3
    # loads, writes to guest PTEs, invlpg and guest TLB flushes, which the decoder's mix
    # (written for every target) draws 36 times in 256.  Each of the four is drawn as
    # often as the most frequent of them there (write_pte, 18), the rest as the decoder does.
    WEIGHTS = {"paging": 18, "write_pte": 18, "invlpg": 18, "flush_tlb": 18}

    def __init__(self):
        super().__init__(vm_types={VmType.DEFAULT},
                         ops=frozenset(OP_NAMES) - {SetAttributes, Accept}, weights=self.WEIGHTS)

    def op_refusal(self, op, header):
        reason = super().op_refusal(op, header)
        if reason is not None:
            return reason
        if type(op) is Access and op.private:
            return "private access is not supported by this target (no TDX)"
        return None


class ShadowTarget(TdpTarget):
    """The ``shadow`` target (harness.target.Target).

    The op loop, the fast path, ``parallel``, snapshots and the switch coverage
    are tdp's (:class:`~harness.tdp.TdpTarget`): only the VM and what the
    coverage looks at differ.
    """

    name = "shadow"
    capabilities = ShadowCapabilities()
    events = EVENTS

    def reset(self, header: VmHeader) -> None:
        super().reset(header)
        self.kvm = Kvm(header)
        self._debt = "none"

    def execute(self, op):
        """As tdp's; then the op must have kept its promise
        (:func:`~harness.shadow.invariants.check_postcondition`)."""
        if self.observed and any(type(side) in _SYNCING
                                 for side in (op.sides if type(op) is Parallel else (op,))):
            self._debt = self._sync_debt()
        outcome = super().execute(op)
        check_postcondition(self.kvm, op)
        return outcome

    def check_invariants(self) -> None:
        check_invariants(self.kvm)

    def _record_tables(self) -> None:
        """Its invariant checks keep no records of the tables between checks."""

    def features(self) -> list:
        """Coverage the guest cannot see: a parallel's context switches; the shadow-MMU
        events the op raised (:mod:`mmufuzz.harness.shadow.events`); the shadow state an
        access left for its address (the page's level, role and unsync state, and whether
        its entry is a leaf, an MMIO SPTE or nothing) or a PTE write left for its table
        (not shadowed, synced, unsync, write-tracked; what the shadow entry of the
        written index holds); and, for a guest flush, invlpg or CR3 load, what a sync
        had to repair when it began (:meth:`_sync_debt`) and whether unsync pages remain
        after it (what the sync did)."""
        features = sorted(self._switches)
        self._switches.clear()
        features += self.events.drain(self.kvm.events)
        op = self._last
        for prefix, side in (zip((f"{name}." for name in SIDE_NAMES), op.sides)
                             if type(op) is Parallel else (("", op),)):
            state = self._shadow_state(side)
            if state is not None:
                if type(side) in _SYNCING:
                    state += f":debt={self._debt}"
                features.append(prefix + state)
        return features

    def _sync_debt(self) -> str:
        """Which kinds of entry of the unsync pages (``leaf``, ``mmio``) kvm_sync_spte would
        now change, their guest PTEs having been rewritten since the entries were made
        (:func:`~harness.shadow.invariants.unsync_entry_agrees`); ``none``.

        Line coverage of the op that syncs is the same whether its sync repairs a stale
        entry or finds nothing to do, and only an op that finds such an entry on its way
        (an invlpg of its gva, a flush or CR3 load reaching its page) can get the repair
        wrong: this tells a campaign that an input ran one in that state, so that its
        mutants (another gva, another vCPU, another op) are tried from it.
        """
        vcpu = self.kvm.vcpus[0]  # guest memory is the VM's: any vCPU reads it
        kinds = set()
        for sp in self.kvm.mmu.active_mmu_pages:
            if not sp.unsync:
                continue
            spt = sp.spt
            for index in used_entries(spt):
                spte = spt[index]
                kind = "mmio" if is_mmio_spte(spte) else "leaf" if is_shadow_present_pte(spte) \
                    else None
                if kind and kind not in kinds and not unsync_entry_agrees(self.kvm, vcpu, sp,
                                                                          index, spte):
                    kinds.add(kind)
        return "+".join(sorted(kinds)) or "none"

    def _shadow_state(self, op, entry: bool = True):
        """This op's feature (see :meth:`features`), or None; without what the shadow
        entry holds unless ``entry``."""
        kind = type(op)
        if kind is WritePte:
            table = f"table:{self._table_state(op.table)}"
            return f"{table}:{self._entry_state(op.table, op.index)}" if entry else table
        if kind in (FlushTlb, Invlpg, Paging):
            unsync = sum(1 for sp in self.kvm.mmu.active_mmu_pages if sp.unsync)
            return f"{OP_NAMES[kind]}:unsync={min(unsync, 2)}"
        if kind is not Access or not op.virtual:
            return None
        vcpu = self.kvm.vcpus[op.vcpu]
        sp = vcpu.root if vcpu.cr3 is not None else vcpu.phys_root
        if sp is None or sp is DUMMY_ROOT:
            return "shadow:none"
        mmu = self.kvm.mmu
        level = sp.level
        while True:
            spte = sp.spt[(op.addr >> (PAGE_SHIFT + 9 * (level - 1))) & 511]
            if level == 1 or not is_shadow_present_pte(spte) or is_last_spte(spte, level):
                break
            sp, level = mmu.sp_of(spte), level - 1
        state = f"shadow:{level}:{'direct' if sp.direct else 'indirect'}:" \
                f"{'unsync' if sp.unsync else 'sync'}"
        return f"{state}:{SPTE_KINDS[spte_kind(spte, level)]}" if entry else state

    def _entry_state(self, gfn: int, index: int) -> str:
        """What entry ``index`` of guest table ``gfn``'s shadow pages holds (the most
        telling of them: a link, a leaf, an MMIO SPTE, nothing)."""
        return SPTE_KINDS[max((spte_kind(sp.spt[index], sp.level)
                               for sp in self.kvm.mmu.sps_with_gptes(gfn)), default=0)]

    def _table_state(self, gfn: int) -> str:
        """How the shadow MMU treats guest table ``gfn``: none, synced, unsync or tracked."""
        mmu = self.kvm.mmu
        if mmu.kvm_gfn_is_write_tracked(gfn):
            return "tracked"
        pages = mmu.sps_with_gptes(gfn)
        if not pages:
            return "none"
        return "unsync" if any(sp.unsync for sp in pages) else "synced"

    def _start_state(self, op) -> str:
        """One side's part of :attr:`pair_start`: its shadow state without the entry's
        content, so that the schedule explorer, which shares its time by the state a pair
        starts from, splits it no finer than before the entry features."""
        return self._shadow_state(op, False) or OP_NAMES[type(op)]


__all__ = ["ShadowTarget"]

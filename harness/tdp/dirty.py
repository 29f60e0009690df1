"""Dirty logging: arm on enable, log on writable installs and dirtying writes, re-arm on get.

A gfn is logged when a writable SPTE for it is installed (make_spte's
mark_page_dirty_in_slot, done here from handle_changed_spte), when the fast
path makes a write-protected one writable again, and, with PML, when the CPU
sets a leaf's Dirty bit.  So a write can only go unlogged through a writable
(write-protect mode) or dirty (PML mode) SPTE or TLB entry that predates the
last get or the enable: both re-arm the leaves and flush.
"""

from __future__ import annotations

from mmufuzz.harness import faults
from mmufuzz.harness.ops import EINVAL, PG_LEVEL_2M, PG_LEVEL_4K, DirtyLog, GetDirtyLog
from mmufuzz.harness.tdp.huge import split_range
from mmufuzz.harness.tdp.spte import ROOT_LEVEL


class DirtyLogger:
    """The VM's dirty-logging machinery; the bitmaps live on the slots."""

    def __init__(self, kvm):
        self.kvm = kvm

    def mark_page_dirty_in_slot(self, gfn: int, slot=None) -> None:
        """Log ``gfn`` if its slot logs: ``slot`` when the caller resolved it (a fault's
        fault->slot), else the one the gfn is in now (kvm_vcpu_mark_page_dirty)."""
        memslots = self.kvm.memslots
        if not memslots.logging:
            return
        if slot is None:
            slot = memslots.lookup(gfn)
        if slot is not None and slot.dirty is not None:
            slot.dirty.bitmap.add(gfn - slot.base_gfn)

    def note_guest_write(self, gfn: int) -> None:
        """Instrumentation: the guest completed a write to ``gfn`` (for the invariant)."""
        memslots = self.kvm.memslots
        if not memslots.logging:
            return
        slot = memslots.lookup(gfn)
        if slot is not None and slot.dirty is not None and slot.dirty.armed:
            slot.dirty.written.add(gfn - slot.base_gfn)

    def enable(self, slot):
        """Generator: kvm_mmu_slot_apply_flags on enable: eager split, then make every
        later write of the slot reach the log, then flush unconditionally (KVM commit
        b64d740ea7dd: stale TLB entries may exist where no SPTE changes).

        With PML (``cpu_dirty_log_size``) that is clearing the Dirty bits of the
        slot's leaves (kvm_mmu_slot_leaf_clear_dirty, mmu_lock for read) and
        write-protecting its huge leaves (kvm_mmu_slot_remove_write_access from
        PG_LEVEL_2M); without, write-protecting every leaf.
        """
        kvm = self.kvm
        mmu = kvm.mmu
        if faults.active("dirty-log-keeps-huge"):
            max_level = PG_LEVEL_4K  # no split, and only 4K leaves are write-protected
        else:
            max_level = ROOT_LEVEL
            yield from kvm.mmu_lock.read_lock()
            for root in mmu.held(mmu.direct_roots(only_valid=True)):
                yield from split_range(kvm, root, slot.base_gfn, slot.end_gfn)
            kvm.mmu_lock.read_unlock()
        pml = kvm.cpu_dirty_log_size != 0
        if pml:
            yield from kvm.mmu_lock.read_lock()
            for root in mmu.held(mmu.direct_roots(only_valid=True)):
                yield from mmu.clear_dirty(root, slot.base_gfn, slot.end_gfn,
                                           max_level=max_level)
            kvm.mmu_lock.read_unlock()
        yield from kvm.mmu_lock.write_lock()
        for root in mmu.held(mmu.direct_roots(only_valid=True)):
            yield from mmu.write_protect(root, slot.base_gfn, slot.end_gfn, max_level=max_level,
                                         min_level=PG_LEVEL_2M if pml else PG_LEVEL_4K)
        mmu.flush()
        kvm.mmu_lock.write_unlock()
        slot.dirty.armed = True

    def get(self, op: GetDirtyLog):
        """Generator: KVM_GET_DIRTY_LOG (kvm_get_dirty_log_protect): report and clear the
        bitmap, then re-arm each reported gfn's 4K leaf (kvm_arch_mmu_enable_log_dirty_pt_masked:
        clear its Dirty bit with PML, else write-protect it), and flush if anything was
        reported.  (The PML buffers need no kick first: see Vcpu._set_dirty.)"""
        kvm = self.kvm
        yield from kvm.slots_lock.write_lock()
        slot = kvm.memslots.by_id.get(op.slot)
        if slot is None or slot.dirty is None:
            kvm.slots_lock.write_unlock()
            return EINVAL
        yield from kvm.mmu_lock.write_lock()
        state = slot.dirty
        if faults.active("dirty-log-rearm-before-harvest"):
            return (yield from self._get_rearm_first(slot))
        pages = sorted(state.bitmap)
        state.bitmap = set()
        gfns = {slot.base_gfn + i for i in pages}
        yield from self._rearm(gfns)
        state.written = set()
        kvm.mmu_lock.write_unlock()
        kvm.slots_lock.write_unlock()
        return DirtyLog(tuple(slot.base_gfn + i for i in pages))

    def _rearm(self, gfns: set):
        """Generator: re-arm ``gfns`` in every valid root, then flush if there were any."""
        mmu = self.kvm.mmu
        for root in mmu.held(mmu.direct_roots(only_valid=True) if gfns else ()):
            yield from self.rearm_leaves(root, gfns)
        if gfns:
            mmu.flush()

    def rearm_leaves(self, root, gfns: set):
        """Generator: x86's kvm_arch_mmu_enable_log_dirty_pt_masked in ``root``: clear the
        Dirty bit of the 4K leaves of ``gfns`` with PML, else write-protect them."""
        mmu = self.kvm.mmu
        rearm = mmu.clear_dirty if self.kvm.cpu_dirty_log_size else mmu.write_protect
        yield from rearm(root, min(gfns), max(gfns) + 1, gfns, max_level=PG_LEVEL_4K)

    def _get_rearm_first(self, slot):
        """Generator: the fault's KVM_GET_DIRTY_LOG, in the order of KVM before commit
        edde99ce0529: re-arm the logged gfns under mmu_lock, then swap the bitmap out
        after the memslot update's synchronize_srcu, so whatever a fault or the CPU
        logged meanwhile is reported and its page left armed no more."""
        kvm = self.kvm
        state = slot.dirty
        yield from self._rearm({slot.base_gfn + i for i in state.bitmap})
        kvm.mmu_lock.write_unlock()
        yield from kvm.srcu.synchronize()
        pages, state.bitmap, state.written = sorted(state.bitmap), set(), set()
        kvm.slots_lock.write_unlock()
        return DirtyLog(tuple(slot.base_gfn + i for i in pages))

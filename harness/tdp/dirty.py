"""Dirty logging: write-protect on enable, log on writable installs, clear on get.

A gfn is logged when a writable SPTE for it is installed (make_spte's
mark_page_dirty_in_slot, done here from handle_changed_spte), so a write can
only go unlogged through a writable SPTE or TLB entry that predates the last
get or the enable: both re-write-protect and flush.
"""

from __future__ import annotations

from mmufuzz.harness import faults
from mmufuzz.harness.ops import EINVAL, PG_LEVEL_4K, DirtyLog, GetDirtyLog
from mmufuzz.harness.tdp.huge import split_range
from mmufuzz.harness.tdp.spte import ROOT_LEVEL


class DirtyLogger:
    """The VM's dirty-logging machinery; the bitmaps live on the slots."""

    def __init__(self, kvm):
        self.kvm = kvm

    def mark_page_dirty_in_slot(self, gfn: int) -> None:
        """Log ``gfn`` if its slot logs."""
        memslots = self.kvm.memslots
        if not memslots.logging:
            return
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
        """Generator: kvm_mmu_slot_apply_flags on enable: eager split, then write-protect."""
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
        yield from kvm.mmu_lock.write_lock()
        changed = False
        for root in mmu.held(mmu.direct_roots(only_valid=True)):
            changed |= yield from mmu.write_protect(root, slot.base_gfn, slot.end_gfn,
                                                    max_level=max_level)
        if changed:
            mmu.flush_memslot(slot)
        kvm.mmu_lock.write_unlock()
        slot.dirty.armed = True

    def get(self, op: GetDirtyLog):
        """Generator: KVM_GET_DIRTY_LOG: report and clear, re-write-protect, flush."""
        kvm = self.kvm
        yield from kvm.slots_lock.write_lock()
        slot = kvm.memslots.by_id.get(op.slot)
        if slot is None or slot.dirty is None:
            kvm.slots_lock.write_unlock()
            return EINVAL
        yield from kvm.mmu_lock.write_lock()
        state = slot.dirty
        pages = sorted(state.bitmap)
        state.bitmap = set()
        gfns = {slot.base_gfn + i for i in pages}
        changed = False
        for root in kvm.mmu.held(kvm.mmu.direct_roots(only_valid=True) if gfns else ()):
            changed |= yield from kvm.mmu.write_protect(root, min(gfns), max(gfns) + 1, gfns)
        if changed:
            kvm.mmu.flush_memslot(slot)
        state.written = set()
        kvm.mmu_lock.write_unlock()
        kvm.slots_lock.write_unlock()
        return DirtyLog(tuple(slot.base_gfn + i for i in pages))

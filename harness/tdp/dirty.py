"""Dirty logging: arm on enable, log on writable installs and dirtying writes, re-arm on get.

A gfn is logged when a writable SPTE for it is installed (make_spte's
mark_page_dirty_in_slot, done here from handle_changed_spte), when the fast
path makes a write-protected one writable again, and, with PML, when the CPU
sets a leaf's Dirty bit.  So a write can only go unlogged through a writable
(write-protect mode) or dirty (PML mode) SPTE or TLB entry that predates the
last get or the enable: both re-arm the leaves and flush.

With manual protect (KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2) a get only reports,
and KVM_CLEAR_DIRTY_LOG clears and re-protects; with initially-set bitmaps
logging starts with every bit set and nothing write-protected, huge mappings
included, so each clear must write-protect the huge mappings over its pages
(SEMANTICS §G).
"""

from __future__ import annotations

from mmufuzz.harness import faults
from mmufuzz.harness.ops import (EINVAL, OK, PAGES_PER_2M, PG_LEVEL_2M, PG_LEVEL_4K, ClearDirtyLog,
                                 DirtyLog, GetDirtyLog, ManualProtect)
from mmufuzz.harness.tdp.huge import split_range
from mmufuzz.harness.tdp.memslots import DirtyLogState
from mmufuzz.harness.tdp.spte import ROOT_LEVEL

# kvm_clear_dirty_log_protect works one unsigned long of the bitmap at a time.
BITS_PER_LONG = 64


class DirtyLogger:
    """The VM's dirty-logging machinery; the bitmaps live on the slots."""

    def __init__(self, kvm, manual_protect: ManualProtect = ManualProtect.OFF):
        self.kvm = kvm
        # kvm->manual_dirty_log_protect, fixed by the program header.
        self.manual_protect = manual_protect is not ManualProtect.OFF
        self.initially_set = manual_protect is ManualProtect.INIT_SET

    def new_state(self, npages: int, armed: bool = False) -> DirtyLogState:
        """kvm_prepare_memory_region's bitmap for a slot that starts logging: empty, or
        every bit set (kvm_dirty_log_manual_protect_and_init_set)."""
        return DirtyLogState(bitmap=set(range(npages)) if self.initially_set else set(),
                             armed=armed)

    def start_logging(self, slot):
        """Generator: what committing a slot that starts logging does to the MMU.

        With initially-set bitmaps nothing: kvm_mmu_slot_apply_flags returns
        ("Initially-all-set does not require write protecting any page, because
        they're all assumed to be dirty"), huge mappings stay; else :meth:`enable`.
        """
        if self.initially_set:
            slot.dirty.armed = True
            return
        yield from self.enable(slot)

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
        mmu.flush_memslot(slot)
        kvm.mmu_lock.write_unlock()
        slot.dirty.armed = True

    def get(self, op: GetDirtyLog):
        """Generator: KVM_GET_DIRTY_LOG (kvm_get_dirty_log_protect): report and clear the
        bitmap, then re-arm each reported gfn's 4K leaf (:meth:`enable_log_dirty_pt_masked`:
        clear its Dirty bit with PML, else write-protect it), and flush if anything was
        reported.  (The PML buffers need no kick first: see Vcpu._set_dirty.)"""
        kvm = self.kvm
        yield from kvm.slots_lock.write_lock()
        slot = kvm.memslots.by_id.get(op.slot)
        if slot is None or slot.dirty is None:
            kvm.slots_lock.write_unlock()
            return EINVAL
        if self.manual_protect:
            kvm.slots_lock.write_unlock()
            return self.report_only(slot)
        yield from kvm.mmu_lock.write_lock()
        state = slot.dirty
        if faults.active("dirty-log-rearm-before-harvest"):
            return (yield from self._get_rearm_first(slot))
        pages = sorted(state.bitmap)
        state.bitmap = set()
        yield from self._rearm(slot, pages)
        state.written = set()
        kvm.mmu_lock.write_unlock()
        kvm.slots_lock.write_unlock()
        return DirtyLog(tuple(slot.base_gfn + i for i in pages))

    def _rearm(self, slot, pages: list):
        """Generator: re-arm the slot pages ``pages`` (sorted) a 64-page word at a time, as
        kvm_get_dirty_log_protect hands them to kvm_arch_mmu_enable_log_dirty_pt_masked,
        then flush if there were any."""
        word = []
        for page in pages:
            if word and page // BITS_PER_LONG != word[0] // BITS_PER_LONG:
                yield from self.enable_log_dirty_pt_masked(slot, word)
                word = []
            word.append(page)
        if word:
            yield from self.enable_log_dirty_pt_masked(slot, word)
            self.flush_remote_tlbs_memslot(slot)

    def _get_rearm_first(self, slot):
        """Generator: the fault's KVM_GET_DIRTY_LOG, in the order of KVM before commit
        edde99ce0529: re-arm the logged gfns under mmu_lock, then swap the bitmap out
        after the memslot update's synchronize_srcu, so whatever a fault or the CPU
        logged meanwhile is reported and its page left armed no more."""
        kvm = self.kvm
        state = slot.dirty
        yield from self._rearm(slot, sorted(state.bitmap))
        kvm.mmu_lock.write_unlock()
        yield from kvm.srcu.synchronize()
        pages, state.bitmap, state.written = sorted(state.bitmap), set(), set()
        kvm.slots_lock.write_unlock()
        return DirtyLog(tuple(slot.base_gfn + i for i in pages))

    # --- manual protect: KVM_CLEAR_DIRTY_LOG ----------------------------------------

    @staticmethod
    def report_only(slot) -> DirtyLog:
        """kvm_get_dirty_log_protect with manual protect: the bitmap as it is, no clear, no
        write protection, no flush ("no flush is needed until KVM_CLEAR_DIRTY_LOG")."""
        return DirtyLog(tuple(slot.base_gfn + i for i in sorted(slot.dirty.bitmap)))

    def clear(self, op: ClearDirtyLog):
        """Generator: kvm_clear_dirty_log_protect of every page of [first, first+npages).

        Its checks, then, one 64-page word at a time, the bits that were set are
        cleared and exactly those pages re-protected
        (:meth:`enable_log_dirty_pt_masked`); one flush if any was.  The last word
        of a range that ends at the slot's end may be partial.
        """
        kvm = self.kvm
        yield from kvm.slots_lock.write_lock()
        slot = kvm.memslots.by_id.get(op.slot)
        first, end = op.first, op.first + op.npages
        if (first % BITS_PER_LONG or slot is None or slot.dirty is None or first > slot.npages
                or end > slot.npages or (end < slot.npages and op.npages % BITS_PER_LONG)):
            kvm.slots_lock.write_unlock()
            return EINVAL
        words = -(-op.npages // BITS_PER_LONG)
        if faults.active("clear-dirty-last-word"):
            words = op.npages // BITS_PER_LONG  # before 53eac7a8f8cf: the partial word is lost
        yield from kvm.mmu_lock.write_lock()
        state = slot.dirty
        cleared = set()
        for offset in range(first, first + words * BITS_PER_LONG, BITS_PER_LONG):
            mask = [page for page in range(offset, min(offset + BITS_PER_LONG, end))
                    if page in state.bitmap]  # atomic_long_fetch_andnot
            if mask:
                state.bitmap.difference_update(mask)
                cleared.update(mask)
                yield from self.enable_log_dirty_pt_masked(slot, mask)
        if cleared:
            self.flush_remote_tlbs_memslot(slot)
        state.written -= cleared
        kvm.mmu_lock.write_unlock()
        kvm.slots_lock.write_unlock()
        return OK

    def enable_log_dirty_pt_masked(self, slot, mask: list):
        """Generator: x86's kvm_arch_mmu_enable_log_dirty_pt_masked for the slot pages ``mask``
        (sorted, within one 64-page word; mmu_lock held for write).

        With initially-set bitmaps the huge mappings over the first and the last
        page are split (eager_page_split) and write-protected first
        (kvm_mmu_slot_gfn_write_protect from PG_LEVEL_2M): logging started
        without touching them ("Huge pages are NOT write protected when we start
        dirty logging in initially-all-set mode"); the two may lie in different
        2M pages, since a slot's base need not be 64-aligned.  Then the 4K
        leaves of ``mask``: their Dirty bits cleared with PML
        (kvm_mmu_clear_dirty_pt_masked), else write-protected.
        """
        kvm = self.kvm
        mmu = kvm.mmu
        gfns = {slot.base_gfn + page for page in mask}
        start, last = slot.base_gfn + mask[0], slot.base_gfn + mask[-1]
        huge = self.initially_set and not faults.active("clear-dirty-keeps-huge")
        rearm = mmu.clear_dirty if kvm.cpu_dirty_log_size else mmu.write_protect
        for root in mmu.held(mmu.direct_roots(only_valid=True)):
            if huge:
                yield from split_range(kvm, root, start, last + 1)
                yield from mmu.write_protect(root, start, start + 1, min_level=PG_LEVEL_2M)
                if start // PAGES_PER_2M != last // PAGES_PER_2M:  # "Cross two large pages?"
                    yield from mmu.write_protect(root, last, last + 1, min_level=PG_LEVEL_2M)
            yield from rearm(root, start, last + 1, gfns, max_level=PG_LEVEL_4K)

    def flush_remote_tlbs_memslot(self, slot) -> None:
        """kvm_flush_remote_tlbs_memslot, after a get or a clear re-armed anything."""
        self.kvm.mmu.flush_memslot(slot)

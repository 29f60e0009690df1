"""The VM of the shadow target: struct kvm with the shadow MMU, and op dispatch.

The generic pieces are tdp's (they are the same concept for either MMU):
host memory and memslot backings, the memslot array and its generation,
mmu_lock/slots_lock/SRCU and the dirty bitmap.  What differs is every path
into the MMU: the shadow MMU reaches SPTEs through rmaps and shadow-page
lists, never through a radix walk, and a default VM's memslot delete or move
zaps everything (KVM_X86_QUIRK_SLOT_ZAP_ALL: kvm_mmu_zap_all_fast).
"""

from __future__ import annotations

from mmufuzz.harness.ops import (
    EINVAL,
    OK,
    PAGES_PER_2M,
    Access,
    ClearDirtyLog,
    DirtyLog,
    FlushTlb,
    GetDirtyLog,
    HostInvalidate,
    Invlpg,
    MemslotAdd,
    MemslotDelete,
    MemslotFlag,
    MemslotMove,
    MemslotSetFlags,
    Paging,
    Recover,
    Split,
    VmHeader,
    WritePte,
    ZapAll,
)
from mmufuzz.harness.shadow.events import EVENTS
from mmufuzz.harness.shadow.hardware import Vcpu
from mmufuzz.harness.shadow.mmu import ShadowMmu
from mmufuzz.harness.tdp import notifier
from mmufuzz.harness.tdp.dirty import DirtyLogger
from mmufuzz.harness.tdp.hostmem import Backing
from mmufuzz.harness.tdp.huge import for_each_slot
from mmufuzz.harness.tdp.kvm import Kvm as TdpKvm
from mmufuzz.harness.tdp.memslots import Memslot, check_memory_region_flags
from mmufuzz.harness.tdp.pgalloc import PageTableAllocator


class Kvm:
    """One VM (struct kvm) whose vCPUs run on shadow paging."""

    def __init__(self, header: VmHeader):
        TdpKvm.init_common(self, header)  # the generic struct kvm
        self.events = EVENTS.counts()  # the shadow MMU's own (shadow.events)
        self.pgalloc = PageTableAllocator(self.host)
        self.vcpus = [Vcpu(self, i) for i in range(header.vcpus)]
        self.mmu = ShadowMmu(self)
        self.dirty_log = ShadowDirtyLogger(self, header.manual_protect)

    def request_free_obsolete_roots(self) -> None:
        """kvm_make_all_cpus_request(KVM_REQ_MMU_FREE_OBSOLETE_ROOTS)."""
        for vcpu in self.vcpus:
            vcpu.request_free_obsolete_roots = True

    # The mmu-notifier invalidation sequence is kvm_main.c's, the same for every MMU.
    invalidate_begin = TdpKvm.invalidate_begin
    invalidate_range_add = TdpKvm.invalidate_range_add
    invalidate_end = TdpKvm.invalidate_end
    invalidate_covers = TdpKvm.invalidate_covers
    _no_invalidation = TdpKvm._no_invalidation
    wait_for_invalidations = TdpKvm.wait_for_invalidations

    # --- ops --------------------------------------------------------------------------

    def run(self, op):
        """The generator that performs ``op`` and returns its Outcome."""
        kind = type(op)
        if kind in _VCPU_OPS:
            return _VCPU_OPS[kind](self.vcpus[op.vcpu], op)
        if kind is GetDirtyLog:
            return self.dirty_log.get(op)
        if kind is ClearDirtyLog:
            return self.dirty_log.clear(op)
        return _VM_OPS[kind](self, op)

    def quiesce(self) -> None:
        """Between steps: SRCU callbacks (none are queued by this MMU) would run here."""
        self.srcu.process()


class ShadowDirtyLogger(DirtyLogger):
    """tdp's dirty bitmap; write protection through the rmaps (mmu.c's slot_rmap_* paths)."""

    def enable(self, slot):
        """Generator: kvm_mmu_slot_remove_write_access from PG_LEVEL_4K: write-protect the
        slot's leaves of every level (no PML without EPT).  Eager splitting does not run:
        kvm_mmu_slot_try_split_huge_pages returns at once without the TDP MMU, so a 2M
        leaf stays, read-only, until a write fault maps that page 4K."""
        kvm = self.kvm
        yield from kvm.mmu_lock.write_lock()
        if kvm.mmu.slot_rmap_write_protect(range(slot.base_gfn, slot.end_gfn), True):
            kvm.mmu.kvm_flush_remote_tlbs()
        kvm.mmu_lock.write_unlock()
        slot.dirty.armed = True

    def get(self, op: GetDirtyLog):
        """Generator: KVM_GET_DIRTY_LOG: report and clear, re-protect those gfns, flush."""
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
        pages = sorted(slot.dirty.bitmap)
        slot.dirty.bitmap = set()
        if kvm.mmu.slot_rmap_write_protect((slot.base_gfn + i for i in pages), False):
            kvm.mmu.kvm_flush_remote_tlbs()
        slot.dirty.written = set()
        kvm.mmu_lock.write_unlock()
        kvm.slots_lock.write_unlock()
        return DirtyLog(tuple(slot.base_gfn + i for i in pages))

    def enable_log_dirty_pt_masked(self, slot, mask: list):
        """Generator: x86's kvm_arch_mmu_enable_log_dirty_pt_masked through the rmaps.

        With initially-set bitmaps the 2M leaves over the first and the last
        page are write-protected (kvm_mmu_slot_gfn_write_protect at PG_LEVEL_2M;
        no eager split without the TDP MMU), then the 4K leaves of ``mask``
        (kvm_mmu_write_protect_pt_masked).  The caller flushes.
        """
        mmu = self.kvm.mmu
        start, last = slot.base_gfn + mask[0], slot.base_gfn + mask[-1]
        if self.initially_set:
            mmu.slot_rmap_write_protect((start, last) if start // PAGES_PER_2M
                                        != last // PAGES_PER_2M else (start,), True)
            yield  # a step under mmu_lock, between the two walks, as the TDP MMU's
        mmu.slot_rmap_write_protect((slot.base_gfn + page for page in mask), False)
        yield

    def flush_remote_tlbs_memslot(self, slot) -> None:
        self.kvm.mmu.kvm_flush_remote_tlbs()


# --- kvm_set_memory_region ---------------------------------------------------------

def _begin(kvm):
    """Generator: slots_lock held, request valid: wait out invalidations, start the update."""
    yield from kvm.wait_for_invalidations()
    kvm.memslots.begin_update()
    yield


def _done(kvm, outcome):
    kvm.slots_lock.write_unlock()
    return outcome


def memslot_add(kvm, op: MemslotAdd):
    """KVM_MR_CREATE: nothing is mapped there yet; MMIO SPTEs age by the generation."""
    slots = kvm.memslots
    yield from kvm.slots_lock.write_lock()
    if (op.slot in slots.by_id or not check_memory_region_flags(op.flags, kvm.vm_type)
            or not slots.fits(op.base, op.npages)):
        return _done(kvm, EINVAL)
    yield from _begin(kvm)
    slot = Memslot(op.slot, op.base, op.npages, op.flags, op.host_offset,
                   Backing(kvm.host, op.npages, op.host_offset,
                           bool(op.flags & MemslotFlag.HOST_HUGE)), None)
    if op.flags & MemslotFlag.DIRTY_LOG:
        slot.dirty = kvm.dirty_log.new_state(op.npages, armed=True)
    slots.by_id[op.slot] = slot
    slots.end_update()
    return _done(kvm, OK)


def _invalidate_and_zap(kvm, slot: Memslot):
    """kvm_invalidate_memslot + kvm_arch_flush_shadow_memslot: with the slot-zap-all
    quirk (default VMs) every shadow page goes (kvm_mmu_zap_all_fast)."""
    slot.invalid = True
    yield from kvm.srcu.synchronize()
    yield from kvm.mmu_lock.write_lock()
    kvm.mmu.kvm_mmu_zap_all_fast()
    kvm.mmu_lock.write_unlock()


def memslot_delete(kvm, op: MemslotDelete):
    yield from kvm.slots_lock.write_lock()
    slot = kvm.memslots.by_id.get(op.slot)
    if slot is None:
        return _done(kvm, EINVAL)
    yield from _begin(kvm)
    yield from _invalidate_and_zap(kvm, slot)
    del kvm.memslots.by_id[op.slot]
    slot.backing.release()
    kvm.memslots.end_update()
    return _done(kvm, OK)


def memslot_move(kvm, op: MemslotMove):
    yield from kvm.slots_lock.write_lock()
    slot = kvm.memslots.by_id.get(op.slot)
    if slot is None or slot.private or not kvm.memslots.fits(op.base, slot.npages, exclude=slot):
        return _done(kvm, EINVAL)
    yield from _begin(kvm)
    yield from _invalidate_and_zap(kvm, slot)
    # kvm_activate_memslot's kvm_swap_active_memslots waits out the invalidations that
    # began since the first swap: one holds this slot's gfns (its range, its unmap).
    yield from kvm.wait_for_invalidations()
    slot.base_gfn = op.base
    slot.invalid = False
    kvm.memslots.end_update()
    return _done(kvm, OK)


def memslot_set_flags(kvm, op: MemslotSetFlags):
    """KVM_MR_FLAGS_ONLY: only dirty_log may change (kvm_mmu_slot_apply_flags)."""
    yield from kvm.slots_lock.write_lock()
    slot = kvm.memslots.by_id.get(op.slot)
    if slot is None or slot.private or (op.flags ^ slot.flags) & ~MemslotFlag.DIRTY_LOG:
        return _done(kvm, EINVAL)
    if op.flags == slot.flags:
        return _done(kvm, OK)
    yield from _begin(kvm)
    slot.flags = op.flags
    enable = bool(op.flags & MemslotFlag.DIRTY_LOG)
    slot.dirty = kvm.dirty_log.new_state(slot.npages) if enable else None
    kvm.memslots.end_update()
    # kvm_swap_active_memslots' synchronize_srcu: faults that saw the old flags finish first.
    yield from kvm.srcu.synchronize()
    if enable:
        yield from kvm.dirty_log.start_logging(slot)
    elif not slot.readonly:
        yield from _recover_slot(kvm, slot)  # kvm_mmu_slot_apply_flags
    return _done(kvm, OK)


# --- host events ---------------------------------------------------------------------

def host_invalidate(kvm, op: HostInvalidate):
    """Generator: the host migrates [base, base+npages): kvm_main.c's notifier bracket
    (tdp's, the same for every MMU) around the rmap zap."""
    return (yield from notifier.host_invalidate(kvm, op, _unmap_gfn_range))


def _unmap_gfn_range(kvm, ranges):
    """Generator that never yields (the rmap walk holds mmu_lock throughout):
    kvm_unmap_gfn_range through the rmaps, one flush for every range."""
    yield from ()
    flush = False
    for slot, a, b in ranges:
        flush |= kvm.mmu.kvm_zap_rmap_range(slot.base_gfn + a, slot.base_gfn + b)
    if flush:
        kvm.mmu.kvm_flush_remote_tlbs()


def zap_all(kvm, op: ZapAll):
    """Generator: kvm_mmu_zap_all_fast."""
    yield from kvm.mmu_lock.write_lock()
    kvm.mmu.kvm_mmu_zap_all_fast()
    kvm.mmu_lock.write_unlock()
    return OK


def split(kvm, op: Split):
    """Generator: eager page splitting (kvm_mmu_slot_try_split_huge_pages,
    kvm_mmu_try_split_huge_pages) returns at once when the TDP MMU is off: the shadow
    MMU splits a huge SPTE only for nested MMUs under TDP (shadow_mmu_try_split_huge_pages).
    Huge SPTEs here go 4K only on a fault that may not map them huge."""
    yield
    return OK if op.slot in kvm.memslots.by_id else EINVAL


def _recover_slot(kvm, slot):
    """Generator: kvm_mmu_recover_huge_pages, the rmap half (kvm_rmap_zap_collapsible_sptes)."""
    yield from kvm.mmu_lock.write_lock()
    if kvm.mmu.kvm_mmu_recover_huge_pages(slot):
        kvm.mmu.kvm_flush_remote_tlbs()
    kvm.mmu_lock.write_unlock()


def recover(kvm, op: Recover):
    """Generator: kvm_mmu_recover_huge_pages on every slot, in gfn order, under kvm->srcu
    (tdp's :func:`~harness.tdp.huge.for_each_slot`)."""
    yield from for_each_slot(kvm, _recover_slot)
    return OK


_VCPU_OPS = {Access: Vcpu.access, WritePte: Vcpu.write_pte, Paging: Vcpu.paging,
             Invlpg: Vcpu.invlpg, FlushTlb: Vcpu.flush_tlb}
_VM_OPS = {MemslotAdd: memslot_add, MemslotDelete: memslot_delete, MemslotMove: memslot_move,
           MemslotSetFlags: memslot_set_flags, HostInvalidate: host_invalidate,
           ZapAll: zap_all, Split: split, Recover: recover}

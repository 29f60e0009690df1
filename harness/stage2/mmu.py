"""arch/arm64/kvm/mmu.c: how KVM drives the stage-2 page tables.

- A stage-2 abort goes through ``kvm_handle_guest_abort`` to ``user_mem_abort``,
  which picks the mapping size (a 2M block where the THP and the memslot allow
  it, pages while dirty logging), snapshots ``mmu_invalidate_seq`` before
  looking up the pfn, and under mmu_lock for read either relaxes the
  permissions of the leaf that faulted (same size) or maps, both as shared walks.
- The MMU notifier (``kvm_unmap_gfn_range``), memslot removal
  (``kvm_arch_flush_shadow_memslot``) and ``stage2_unmap_vm`` unmap under
  mmu_lock for write, in 1G chunks that drop the lock for waiters.
- Dirty logging write-protects the slot and flushes (``kvm_mmu_wp_memory_region``);
  blocks are broken lazily by the next write fault, which maps a page; eager
  splitting (``kvm_mmu_split_huge_pages``) is the ``split`` op.

The generic KVM code the TDP target already models (memslot updates, the
mmu-notifier bracket, KVM_GET_DIRTY_LOG) is reused from ``harness.tdp``; it
calls the arch hooks by the TDP MMU's method names, which :class:`Stage2Mmu`
provides.
"""

from __future__ import annotations

from mmufuzz.harness import faults
from mmufuzz.harness.ops import (
    EINVAL,
    OK,
    PAGE_SHIFT,
    PAGES_PER_2M,
    PG_LEVEL_2M,
    AccessKind,
    MemslotFlag,
    MmioExit,
)
from mmufuzz.harness.stage2.pgtable import (
    EAGAIN,
    KVM_PGTABLE_WALK_HANDLE_FAULT,
    KVM_PGTABLE_WALK_SHARED,
    kvm_pgtable_get_leaf,
    kvm_pgtable_stage2_map,
    kvm_pgtable_stage2_relax_perms,
    kvm_pgtable_stage2_split,
    kvm_pgtable_stage2_unmap,
    kvm_pgtable_stage2_wrprotect,
)
from mmufuzz.harness.stage2.pte import (
    GRANULE_PAGES,
    KVM_PGTABLE_PROT_R,
    KVM_PGTABLE_PROT_W,
    KVM_PGTABLE_PROT_X,
    kvm_pte_table,
)
from mmufuzz.harness.tdp.dirty import DirtyLogger

# stage2_range_addr_end: work is chunked at the largest block size (1G).
_CHUNK_PAGES = GRANULE_PAGES[1]
# The stage-2 level of a 2M block (x86's PG_LEVEL_2M counts the other way).
PG_LEVEL_2M_S2 = 2


def memslot_is_logging(slot) -> bool:
    """Dirty logging is on and the slot is writable (a read-only slot logs nothing)."""
    return slot.dirty is not None and not slot.readonly


def _lock_for_fault(kvm):
    """Generator: kvm_fault_lock: mmu_lock for read, for write under pKVM."""
    if kvm.protected:
        yield from kvm.mmu_lock.write_lock()
    else:
        yield from kvm.mmu_lock.read_lock()


def mmu_invalidate_retry(kvm, mmu_seq: int) -> bool:
    """An invalidation is running or ran since ``mmu_seq``: a pfn looked up since may be stale."""
    return bool(kvm.mmu_invalidate_in_progress) or kvm.mmu_invalidate_seq != mmu_seq


def _fault_walk_flags(kvm) -> int:
    """A fault's walk stops on -EAGAIN; it is shared except under pKVM."""
    return KVM_PGTABLE_WALK_HANDLE_FAULT | (0 if kvm.protected else KVM_PGTABLE_WALK_SHARED)


def _unlock_for_fault(kvm) -> None:
    if kvm.protected:
        kvm.mmu_lock.write_unlock()
    else:
        kvm.mmu_lock.read_unlock()


def kvm_handle_guest_abort(kvm, vcpu, gpa: int, kind, fault_level: int, is_perm: bool):
    """Generator: a stage-2 abort at byte ``gpa``; None to retry the access, or its exit.

    Outside every memslot, and for a write to a read-only one, the access is
    emulated as MMIO (io_mem_abort).  A slot being deleted or moved makes the
    fault retry until the update is done, as the vocabulary's semantics
    linearize an access with a memslot change (arm64 would see an error hva).
    """
    gfn = gpa >> PAGE_SHIFT
    write = kind is AccessKind.WRITE
    token = kvm.srcu.read_lock()
    try:
        yield
        slot = vcpu.gfn_to_memslot(gfn)
        if slot is not None and slot.invalid:
            return None
        if slot is None or (write and slot.readonly):
            return MmioExit(gpa, write)
        yield from user_mem_abort(kvm, vcpu, gfn, slot, kind, fault_level, is_perm)
        return None
    finally:
        kvm.srcu.read_unlock(token)


def _huge_allowed(slot, gfn: int) -> bool:
    """fault_supports_stage2_huge_mapping and a THP behind it (transparent_hugepage_adjust)."""
    return (slot.hugepage_inside(gfn)
            and slot.backing.host_level(gfn - slot.base_gfn) == PG_LEVEL_2M)


def user_mem_abort(kvm, vcpu, gfn: int, slot, kind, fault_level: int, is_perm: bool):
    """Generator: resolve a stage-2 abort on a memslot gfn."""
    write, exec_ = kind is AccessKind.WRITE, kind is AccessKind.FETCH
    logging = memslot_is_logging(slot)
    fault_granule = GRANULE_PAGES[fault_level]
    mmu_seq = kvm.mmu_invalidate_seq
    yield
    pfn = slot.backing.pfn(gfn - slot.base_gfn)   # __kvm_faultin_pfn
    if faults.active("stage2-mmu-seq-after-pfn"):
        yield
        mmu_seq = kvm.mmu_invalidate_seq  # an invalidation since the lookup goes unseen
    # Logging maps a read fault read-only, so the first write faults and is logged.
    writable = not slot.readonly and not (logging and not write)
    yield from _lock_for_fault(kvm)
    try:
        if mmu_invalidate_retry(kvm, mmu_seq):
            return
        pages = 1
        if not logging:
            if is_perm and fault_granule > 1:
                pages = fault_granule
            elif _huge_allowed(slot, gfn):
                pages = PAGES_PER_2M
        prot = KVM_PGTABLE_PROT_R
        if writable:
            prot |= KVM_PGTABLE_PROT_W
        if exec_:
            prot |= KVM_PGTABLE_PROT_X
        flags = _fault_walk_flags(kvm)
        ipa = gfn & -pages
        if is_perm and pages == fault_granule:
            ret = yield from kvm_pgtable_stage2_relax_perms(kvm.pgt, vcpu, gfn, prot, flags)
        else:
            ret = yield from kvm_pgtable_stage2_map(kvm.pgt, ipa, pages, pfn - (gfn - ipa),
                                                    prot, flags)
        if writable and ret == 0:
            kvm.dirty_log.mark_page_dirty_in_slot(gfn)
    finally:
        _unlock_for_fault(kvm)


def stage2_apply_range(kvm, start: int, end: int, fn, resched: bool = True):
    """Generator: ``fn(pgt, addr, size)`` over [start, end) in 1G chunks; between
    chunks a waiter on mmu_lock (held for write) gets it (cond_resched_rwlock_write)."""
    addr = start
    while addr < end:
        nxt = min((addr + _CHUNK_PAGES) & -_CHUNK_PAGES, end)
        ret = yield from fn(kvm.pgt, addr, nxt - addr)
        if ret and ret != EAGAIN:
            return ret
        if resched and nxt != end and kvm.mmu_lock.needbreak():
            kvm.mmu_lock.write_unlock()
            yield
            yield from kvm.mmu_lock.write_lock()
        addr = nxt
    return 0


class Stage2Mmu:
    """struct kvm_s2_mmu, with the arch hooks the generic code in ``harness.tdp`` calls."""

    def __init__(self, kvm):
        self.kvm = kvm
        self.direct_root = kvm.pgt.root  # the one root the notifier unmaps in

    def direct_roots(self, only_valid: bool = False) -> list:
        """The roots the generic unmap and dirty-log code walks: stage 2 has just the one."""
        return [self.direct_root]

    def held(self, roots: list) -> list:
        """``roots`` as they are: the stage-2 pgd lives as long as the VM, no reference
        counts (the TDP MMU's roots take one while the generic code works on them)."""
        return roots

    def zap_leafs_all_roots(self, start: int, end: int):
        """Generator: kvm_arch_flush_shadow_memslot (mmu_lock held for write)."""
        return stage2_apply_range(self.kvm, start, end, kvm_pgtable_stage2_unmap)

    def zap_leafs(self, root, start: int, end: int):
        """Generator: kvm_unmap_gfn_range for an mmu-notifier invalidation."""
        return stage2_apply_range(self.kvm, start, end, kvm_pgtable_stage2_unmap)

    def write_protect(self, root, start: int, end: int, gfns=None):
        """Generator: kvm_mmu_write_protect_pt_masked: the span of the logged gfns.

        True: the caller flushes (kvm_flush_remote_tlbs_memslot, unconditional)."""
        yield from stage2_apply_range(self.kvm, start, end, kvm_pgtable_stage2_wrprotect)
        return True

    def flush(self) -> None:
        """kvm_flush_remote_tlbs."""
        self.kvm.tlbi.flush_vmid()

    def flush_memslot(self, slot) -> None:
        """kvm_flush_remote_tlbs_memslot, for the shared dirty-log code: the whole VMID, as
        this model has always flushed there (arm64's kvm_arch_flush_remote_tlbs_range would
        be kvm_tlb_flush_vmid_range over the slot: not modelled yet)."""
        self.flush()


class Stage2DirtyLogger(DirtyLogger):
    """Dirty logging as arm64 enables it: write-protect everything, blocks included."""

    def enable(self, slot):
        """Generator: kvm_mmu_wp_memory_region (eager splitting is off by default)."""
        kvm = self.kvm
        yield from kvm.mmu_lock.write_lock()
        yield from stage2_apply_range(kvm, slot.base_gfn, slot.end_gfn,
                                      kvm_pgtable_stage2_wrprotect)
        kvm.mmu_lock.write_unlock()
        kvm.tlbi.flush_vmid()
        slot.dirty.armed = True

    def enable_log_dirty_pt_masked(self, slot, mask: list):
        """Generator: arm64's kvm_arch_mmu_enable_log_dirty_pt_masked: stage2_wp_range over
        the span of ``mask``, every level, blocks included (so with initially-set bitmaps a
        block left by the enable is write-protected and split by its next write fault).
        kvm_mmu_split_huge_pages only runs with an eager-split chunk size
        (KVM_CAP_ARM_EAGER_SPLIT_CHUNK_SIZE), 0 by default.  The caller flushes."""
        kvm = self.kvm
        yield from stage2_apply_range(kvm, slot.base_gfn + mask[0], slot.base_gfn + mask[-1] + 1,
                                      kvm_pgtable_stage2_wrprotect)


def memslot_set_flags(kvm, op):
    """Generator: KVM_MR_FLAGS_ONLY, then kvm_arch_commit_memory_region.

    Enabling dirty logging write-protects the slot; disabling does nothing to
    the tables (no collapse: the next fault over a table maps a block again).
    """
    yield from kvm.slots_lock.write_lock()
    try:
        slot = kvm.memslots.by_id.get(op.slot)
        if slot is None or slot.private or (op.flags ^ slot.flags) & ~MemslotFlag.DIRTY_LOG:
            return EINVAL
        if op.flags == slot.flags:
            return OK
        yield from kvm.wait_for_invalidations()
        kvm.memslots.begin_update()
        yield
        slot.flags = op.flags
        enable = bool(op.flags & MemslotFlag.DIRTY_LOG)
        slot.dirty = kvm.dirty_log.new_state(slot.npages) if enable else None
        kvm.memslots.end_update()
        yield
        yield from kvm.srcu.synchronize()  # faults that saw the old flags are done
        if enable:
            yield from kvm.dirty_log.start_logging(slot)
        return OK
    finally:
        kvm.slots_lock.write_unlock()


def stage2_unmap_vm(kvm, op):
    """Generator: the ``zap_all`` op: unmap every memslot's range (stage2_unmap_vm)."""
    token = kvm.srcu.read_lock()
    try:
        yield from kvm.mmu_lock.write_lock()
        for slot in sorted(kvm.memslots.by_id.values(), key=lambda s: s.base_gfn):
            yield from stage2_apply_range(kvm, slot.base_gfn, slot.end_gfn,
                                          kvm_pgtable_stage2_unmap)
        kvm.mmu_lock.write_unlock()
    finally:
        kvm.srcu.read_unlock(token)
    return OK


def kvm_mmu_split_huge_pages(kvm, op):
    """Generator: the ``split`` op: eagerly split the blocks of a slot (mmu_lock for write)."""
    slot = kvm.memslots.by_id.get(op.slot)
    if slot is None:
        return EINVAL
    yield from kvm.mmu_lock.write_lock()
    yield from stage2_apply_range(kvm, slot.base_gfn, slot.end_gfn, kvm_pgtable_stage2_split)
    kvm.mmu_lock.write_unlock()
    return OK


def coalesce(kvm, op):
    """Generator: the ``recover`` op: map a block over every table a block may replace.

    arm64 has no collapse worker: a fault that maps a block where a table is
    coalesces it in the map walker's pre-order callback.  This op makes that
    fault for each legal 2M range of every slot (a modelling choice: the op is
    the fuzzer's), as shared walks under mmu_lock for read.
    """
    token = kvm.srcu.read_lock()
    try:
        for slot in sorted(kvm.memslots.by_id.values(), key=lambda s: s.base_gfn):
            if slot.invalid or memslot_is_logging(slot):
                continue
            first = -(-slot.base_gfn // PAGES_PER_2M) * PAGES_PER_2M
            for ipa in range(first, slot.end_gfn - PAGES_PER_2M + 1, PAGES_PER_2M):
                yield
                pte, level = kvm_pgtable_get_leaf(kvm.pgt, ipa, PG_LEVEL_2M_S2)
                if not (_huge_allowed(slot, ipa) and level == PG_LEVEL_2M_S2
                        and kvm_pte_table(pte, level)):
                    continue
                mmu_seq = kvm.mmu_invalidate_seq
                pfn = slot.backing.pfn(ipa - slot.base_gfn)
                prot = KVM_PGTABLE_PROT_R | (0 if slot.readonly else KVM_PGTABLE_PROT_W)
                yield from _lock_for_fault(kvm)
                try:
                    if not mmu_invalidate_retry(kvm, mmu_seq):
                        yield from kvm_pgtable_stage2_map(kvm.pgt, ipa, PAGES_PER_2M, pfn,
                                                          prot, _fault_walk_flags(kvm))
                finally:
                    _unlock_for_fault(kvm)
    finally:
        kvm.srcu.read_unlock(token)
    return OK


"""Memslots: the gfn -> host backing map, its generation, and KVM's update protocol.

Every update bumps the generation (kvm_swap_active_memslots) so that MMIO
SPTEs and the per-vCPU lookup cache made under an older layout are never
honoured.  Delete and move mark the slot invalid first (faults on it retry),
zap its range under mmu_lock, and only then drop or re-place it.
"""

from __future__ import annotations

from bisect import bisect_right
from dataclasses import dataclass, field

from mmufuzz.harness.ops import (
    EINVAL,
    GFN_LIMIT,
    OK,
    PAGES_PER_2M,
    MemslotAdd,
    MemslotDelete,
    MemslotFlag,
    MemslotMove,
    MemslotSetFlags,
    VmType,
)
from mmufuzz.harness.tdp import huge, lpage
from mmufuzz.harness.tdp.hostmem import Backing


# The flags as plain ints for the per-op tests: IntFlag's own ``&`` builds a new member.
_PRIVATE, _READONLY, _DIRTY_LOG, _HOST_HUGE = (int(f) for f in (
    MemslotFlag.PRIVATE, MemslotFlag.READONLY, MemslotFlag.DIRTY_LOG, MemslotFlag.HOST_HUGE))


@dataclass(eq=False)
class Memslot:
    """kvm_memory_slot: a gfn range, its flags, its shared and private (gmem) backing.

    ``accepted`` (slot-relative pages) is the private accept state kept apart
    from any leaf; ``dirty`` is the dirty log (slot-relative, follows moves);
    ``lpage_mixed`` holds the 2M ranges (gfn >> 9) whose attributes are mixed
    (KVM_LPAGE_MIXED_FLAG).
    """

    id: int
    base_gfn: int
    npages: int
    flags: MemslotFlag
    host_offset: int
    backing: Backing
    gmem: Backing | None
    accepted: set = field(default_factory=set)
    dirty: DirtyLogState | None = None
    lpage_mixed: set = field(default_factory=set)
    invalid: bool = False

    @property
    def end_gfn(self) -> int:
        return self.base_gfn + self.npages

    @property
    def private(self) -> bool:
        return int(self.flags) & _PRIVATE != 0

    @property
    def readonly(self) -> bool:
        return int(self.flags) & _READONLY != 0

    def contains(self, gfn: int) -> bool:
        return self.base_gfn <= gfn < self.end_gfn

    def hugepage_inside(self, gfn: int) -> bool:
        """The 2M range of ``gfn`` lies inside the slot and its host alignment allows 2M.

        KVM's lpage_info disallow_lpage: set for the head and tail 2M ranges the
        slot only partly covers, and for every range when the slot's gfn and
        host address differ in their offset inside a 2M page.
        """
        head = gfn - gfn % PAGES_PER_2M
        return (self.base_gfn <= head and head + PAGES_PER_2M <= self.end_gfn
                and (head - self.base_gfn + self.host_offset) % PAGES_PER_2M == 0)


@dataclass(eq=False)
class DirtyLogState:
    """A logging slot's dirty bitmap plus the guest writes seen since the last get.

    ``written`` is instrumentation for the invariant ``dirty_log_covers_writes``;
    it is armed only once enabling has write-protected the slot (writes racing
    the enable linearize before it).
    """

    bitmap: set = field(default_factory=set)
    written: set = field(default_factory=set)
    armed: bool = False


class Memslots:
    """The active memslots, sorted for lookup, with KVM's generation counter."""

    def __init__(self):
        self.by_id: dict[int, Memslot] = {}
        self._bases: list[int] = []
        self._sorted: list[Memslot] = []
        self.generation = 0
        self.update_in_progress = False
        self.logging = 0  # slots with dirty logging on: writes skip the lookup when 0

    def lookup(self, gfn: int) -> Memslot | None:
        """The slot covering ``gfn`` (search_memslots)."""
        i = bisect_right(self._bases, gfn) - 1
        if i >= 0:
            slot = self._sorted[i]
            if gfn < slot.end_gfn:
                return slot
        return None

    def overlapping(self, lo: int, hi: int) -> list[Memslot]:
        """The slots intersecting [lo, hi), in gfn order."""
        return [s for s in self._sorted if s.base_gfn < hi and lo < s.end_gfn]

    def fits(self, base: int, npages: int, exclude: Memslot | None = None) -> bool:
        """[base, base+npages) is below the gfn limit and overlaps no other slot."""
        if base + npages > GFN_LIMIT:
            return False
        return all(s is exclude for s in self.overlapping(base, base + npages))

    def begin_update(self) -> None:
        """KVM_MEMSLOT_GEN_UPDATE_IN_PROGRESS: MMIO SPTEs made now are born stale."""
        self.update_in_progress = True

    def end_update(self) -> None:
        """Publish the new layout under a new generation."""
        self._sorted = sorted(self.by_id.values(), key=lambda s: s.base_gfn)
        self._bases = [s.base_gfn for s in self._sorted]
        self.logging = sum(1 for s in self._sorted if s.dirty is not None)
        self.generation += 1
        self.update_in_progress = False


def check_memory_region_flags(flags: MemslotFlag, vm_type: VmType) -> bool:
    """The flag combinations KVM accepts for this VM type."""
    flags = int(flags)
    if flags & _PRIVATE:
        return vm_type is VmType.TDX and not flags & (_DIRTY_LOG | _READONLY)
    return not (flags & _READONLY and vm_type is VmType.TDX)


# --- kvm_set_memory_region ------------------------------------------------------
# Each op is a generator (see sched): slots_lock serializes updates, and an
# update waits for in-flight mmu-notifier invalidations (KVM commit 52ac8b358b0c).

def _lock(kvm):
    yield from kvm.slots_lock.write_lock()


def _begin(kvm):
    """Generator: with slots_lock held and the request validated, start the update."""
    yield from kvm.wait_for_invalidations()
    kvm.memslots.begin_update()
    yield


def _end(kvm):
    """Generator: publish the update (the caller still holds slots_lock)."""
    kvm.memslots.end_update()
    yield


def _reject(kvm):
    kvm.slots_lock.write_unlock()
    return EINVAL


def memslot_add(kvm, op: MemslotAdd):
    """KVM_MR_CREATE: a new slot with fresh zeroed backing."""
    slots = kvm.memslots
    yield from _lock(kvm)
    if (op.slot in slots.by_id or not check_memory_region_flags(op.flags, kvm.vm_type)
            or not slots.fits(op.base, op.npages)):
        return _reject(kvm)
    yield from _begin(kvm)
    flags = int(op.flags)
    huge = bool(flags & _HOST_HUGE)
    private = bool(flags & _PRIVATE)
    slot = Memslot(op.slot, op.base, op.npages, op.flags, op.host_offset,
                   Backing(kvm.host, op.npages, op.host_offset, huge),
                   Backing(kvm.host, op.npages, op.host_offset, huge) if private else None)
    if flags & _DIRTY_LOG:
        slot.dirty = kvm.dirty_log.new_state(op.npages, armed=True)
    lpage.init_memslot(kvm.attributes, slot)
    slots.by_id[op.slot] = slot
    yield from _end(kvm)
    kvm.slots_lock.write_unlock()
    return OK


def _invalidate_and_zap(kvm, slot: Memslot):
    """Mark ``slot`` invalid (faults retry) and zap its range in every root.

    synchronize_srcu between the two: a fault that resolved the slot before it
    went invalid installs its SPTE before the zap, which then removes it.
    """
    slot.invalid = True
    yield from kvm.srcu.synchronize()
    yield from kvm.mmu_lock.write_lock()
    yield from kvm.mmu.zap_leafs_all_roots(slot.base_gfn, slot.end_gfn)
    kvm.mmu_lock.write_unlock()


def memslot_delete(kvm, op: MemslotDelete):
    """KVM_MR_DELETE: zap the slot's range, then drop it and its backing."""
    yield from _lock(kvm)
    slot = kvm.memslots.by_id.get(op.slot)
    if slot is None:
        return _reject(kvm)
    yield from _begin(kvm)
    yield from _invalidate_and_zap(kvm, slot)
    del kvm.memslots.by_id[op.slot]
    slot.backing.release()
    if slot.gmem is not None:
        slot.gmem.release()
    yield from _end(kvm)
    kvm.slots_lock.write_unlock()
    return OK


def _modifiable(kvm, slot_id: int) -> Memslot | None:
    """The slot a move or flags change may touch: private slots are immutable."""
    slot = kvm.memslots.by_id.get(slot_id)
    return None if slot is None or slot.private else slot


def memslot_move(kvm, op: MemslotMove):
    """KVM_MR_MOVE: zap the old range, re-place the slot; backing and log follow it."""
    yield from _lock(kvm)
    slot = _modifiable(kvm, op.slot)
    if slot is None or not kvm.memslots.fits(op.base, slot.npages, exclude=slot):
        return _reject(kvm)
    yield from _begin(kvm)
    yield from _invalidate_and_zap(kvm, slot)
    # kvm_activate_memslot's kvm_swap_active_memslots waits out the invalidations that
    # began since the first swap: one holds this slot's gfns (its range, its unmap).
    yield from kvm.wait_for_invalidations()
    slot.base_gfn = op.base
    slot.invalid = False
    lpage.init_memslot(kvm.attributes, slot)
    yield from _end(kvm)
    kvm.slots_lock.write_unlock()
    return OK


def memslot_set_flags(kvm, op: MemslotSetFlags):
    """KVM_MR_FLAGS_ONLY: only dirty_log may change (kvm_mmu_slot_apply_flags)."""
    yield from _lock(kvm)
    slot = _modifiable(kvm, op.slot)
    if slot is None or (op.flags ^ slot.flags) & ~MemslotFlag.DIRTY_LOG:
        return _reject(kvm)
    if op.flags == slot.flags:
        kvm.slots_lock.write_unlock()
        return OK
    yield from _begin(kvm)
    slot.flags = op.flags
    enable = bool(op.flags & MemslotFlag.DIRTY_LOG)
    slot.dirty = kvm.dirty_log.new_state(slot.npages) if enable else None
    yield from _end(kvm)
    # kvm_swap_active_memslots' synchronize_srcu: a fault that saw the old flags
    # (and so may map huge and writable) finishes before the flags are applied.
    yield from kvm.srcu.synchronize()
    if enable:  # kvm_mmu_slot_apply_flags, still under slots_lock
        yield from kvm.dirty_log.start_logging(slot)
    else:
        yield from huge.recover_slot(kvm, slot)
    kvm.slots_lock.write_unlock()
    return OK

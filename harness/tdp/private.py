"""Private memory: the secure-EPT model, TDG.MEM.PAGE.ACCEPT, and conversions.

The secure EPT is what the TDX module holds and what a vCPU's private
accesses walk: leaves with a pfn, a level and an accept state.  KVM never
writes it directly; it changes only through the mirror root's hooks
(tdx_sept_set_private_spte, _remove_, _split_, _merge_), called from
handle_changed_spte, so a mirror/secure-EPT disagreement is a KVM bug.
Accept state and private contents are kept per (slot, gfn) apart from the
leaves (SEMANTICS §E); a leaf's state is that state when it was added.
"""

from __future__ import annotations

from dataclasses import dataclass

from mmufuzz.harness import faults
from mmufuzz.harness.ops import (
    ALREADY_ACCEPTED,
    EINVAL,
    OK,
    PAGE_SHIFT,
    PAGES_PER_2M,
    PG_LEVEL_2M,
    PG_LEVEL_4K,
    SIZE_MISMATCH,
    UNSUPPORTED,
    Accept,
    SetAttributes,
)
from mmufuzz.harness.target import InvariantViolation
from mmufuzz.harness.tdp import events, lpage
from mmufuzz.harness.tdp.fault import kvm_mmu_page_fault
from mmufuzz.harness.tdp.huge import split_range
from mmufuzz.harness.tdp.spte import pages_per_level


@dataclass
class SeptLeaf:
    """One secure-EPT leaf."""

    pfn: int
    level: int
    accepted: bool


class SecureEpt:
    """The TDX module's view of a TD's private mappings."""

    def __init__(self, kvm):
        self.kvm = kvm
        self.leaves: dict[tuple[int, int], SeptLeaf] = {}  # (level, first gfn) -> leaf
        self.blocked: set[int] = set()  # first gfns of 2M ranges blocked for a merge

    def lookup(self, gfn: int):
        """The usable leaf mapping ``gfn``, or None (an EPT violation)."""
        head = gfn - gfn % PAGES_PER_2M
        if head in self.blocked:
            return None
        return self.leaves.get((PG_LEVEL_4K, gfn)) or self.leaves.get((PG_LEVEL_2M, head))

    def _sync_error(self, what: str, gfn: int, level: int) -> InvariantViolation:
        return InvariantViolation("mirror_sept_mismatch", f"{what} gfn={gfn:#x} level={level}")

    def set(self, gfn: int, level: int, pfn: int) -> None:
        """TDH.MEM.PAGE.AUG: add a leaf in the pages' recorded accept state."""
        if (level, gfn) in self.leaves:
            raise self._sync_error("aug over existing leaf", gfn, level)
        slot = self.kvm.memslots.lookup(gfn)
        first = gfn - slot.base_gfn
        pages = range(first, first + pages_per_level(level))
        if faults.active("pending-access-maps"):
            slot.accepted.update(pages)  # TDH.MEM.PAGE.ADD, not AUG: mapped as accepted
        states = {i in slot.accepted for i in pages}
        if len(states) != 1:
            raise self._sync_error("aug over mixed accept states", gfn, level)
        accepted = states.pop()
        self.kvm.events[events.SEPT_AUG + 2 * (level - 1) + accepted] += 1
        self.leaves[(level, gfn)] = SeptLeaf(pfn, level, accepted)

    def remove(self, gfn: int, level: int) -> None:
        """TDH.MEM.RANGE.BLOCK + TRACK + PAGE.REMOVE of one leaf.

        The removed pages lose their contents and accept state: a later AUG
        brings them back zeroed and pending (why a merge must not zap).  TRACK
        kicks every vCPU out of the guest (tdx_track), so none keeps a private
        translation of the page when REMOVE clears it.
        """
        leaf = self.leaves.pop((level, gfn), None)
        if leaf is None:
            raise self._sync_error("remove of missing leaf", gfn, level)
        self.kvm.events[events.SEPT_REMOVE + level - 1] += 1
        for vcpu in self.kvm.vcpus:
            vcpu.flush_guest_physical()
        slot = self.kvm.memslots.lookup(gfn)
        first, n = gfn - slot.base_gfn, pages_per_level(level)
        slot.accepted.difference_update(range(first, first + n))
        self.kvm.host.clear(leaf.pfn, n)

    def split(self, gfn: int, level: int) -> None:
        """TDH.MEM.PAGE.DEMOTE: a 2M leaf becomes 512 4K leaves in its state."""
        leaf = self.leaves.pop((level, gfn), None)
        if leaf is None:
            raise self._sync_error("demote of missing leaf", gfn, level)
        self.kvm.events[events.SEPT_DEMOTE] += 1
        for i in range(PAGES_PER_2M):
            self.leaves[(PG_LEVEL_4K, gfn + i)] = SeptLeaf(leaf.pfn + i, PG_LEVEL_4K,
                                                           leaf.accepted)

    def block(self, head: int) -> None:
        """TDH.MEM.RANGE.BLOCK of a 2M range ahead of a merge."""
        self.kvm.events[events.SEPT_BLOCK] += 1
        self.blocked.add(head)

    def unblock(self, head: int) -> None:
        """TDH.MEM.RANGE.UNBLOCK after a merge the module refused."""
        self.kvm.events[events.SEPT_UNBLOCK] += 1
        self.blocked.discard(head)

    def merge(self, head: int) -> bool:
        """TDH.MEM.PAGE.PROMOTE: 512 contiguous 4K leaves in one accept state become 2M."""
        children = [self.leaves.get((PG_LEVEL_4K, head + i)) for i in range(PAGES_PER_2M)]
        if any(c is None for c in children):
            raise self._sync_error("promote with missing children", head, PG_LEVEL_2M)
        first = children[0]
        mixed_ok = faults.active("merge-partial-accept")
        if any(c.pfn != first.pfn + i or (c.accepted != first.accepted and not mixed_ok)
               for i, c in enumerate(children)):
            self.kvm.events[events.SEPT_PROMOTE_REFUSED] += 1
            return False
        self.kvm.events[events.SEPT_PROMOTE] += 1
        slot = self.kvm.memslots.lookup(head)
        pages = range(head - slot.base_gfn, head - slot.base_gfn + PAGES_PER_2M)
        if first.accepted:  # the merged leaf's state is the state of all 512 pages
            slot.accepted.update(pages)
        else:
            slot.accepted.difference_update(pages)
        for i in range(PAGES_PER_2M):
            del self.leaves[(PG_LEVEL_4K, head + i)]
        self.leaves[(PG_LEVEL_2M, head)] = SeptLeaf(first.pfn, PG_LEVEL_2M, first.accepted)
        self.blocked.discard(head)
        return True

    def accept(self, leaf: SeptLeaf, gfn: int) -> None:
        """TDG.MEM.PAGE.ACCEPT succeeded: zero the pages and record them accepted."""
        slot = self.kvm.memslots.lookup(gfn)
        n = pages_per_level(leaf.level)
        first = gfn - slot.base_gfn
        self.kvm.events[events.SEPT_ACCEPT + leaf.level - 1] += 1
        leaf.accepted = True
        slot.accepted.update(range(first, first + n))
        self.kvm.host.clear(leaf.pfn, n)


def accept(kvm, vcpu, op: Accept):
    """Generator: the guest's TDG.MEM.PAGE.ACCEPT of ``op.gpa`` at ``op.level``.

    An unmapped range (or one mapped below the accept level) is an EPT
    violation at that level: KVM maps it, merging 4K children if it can.  If
    the mapping is still smaller, the module reports TDX_PAGE_SIZE_MISMATCH.
    A 4K accept of a page under a pending 2M leaf makes KVM demote it first.
    """
    if not kvm.tdx:
        return UNSUPPORTED
    gfn = op.gpa >> PAGE_SHIFT
    while True:
        yield
        leaf = kvm.sept.lookup(gfn)
        if leaf is None or leaf.level < op.level:
            exit_ = yield from kvm_mmu_page_fault(kvm, vcpu, op.gpa, False, False, True,
                                                  op.level)
            if exit_ is not None:
                return exit_
            leaf = kvm.sept.lookup(gfn)
            if leaf is None:
                continue
            if leaf.level < op.level and not faults.active("accept-level-ignored"):
                return SIZE_MISMATCH
        if leaf.accepted:
            return ALREADY_ACCEPTED
        if leaf.level > op.level:
            exit_ = yield from kvm_mmu_page_fault(kvm, vcpu, op.gpa, False, False, True,
                                                  op.level)
            if exit_ is not None:
                return exit_
            continue
        kvm.sept.accept(leaf, gfn - gfn % pages_per_level(leaf.level))
        return OK


def set_memory_attributes(kvm, op: SetAttributes):
    """Generator: kvm_vm_set_mem_attributes; zap -> flush -> change -> recompute mixed flags.

    Runs as an mmu-notifier-style invalidation so racing faults retry.  The
    zap walks memslots only (a cached MMIO SPTE of a slot-less gfn survives),
    and huge private leaves that cross the range's edges are split first so
    the zap never takes accepted neighbours with it.
    """
    if not kvm.tdx:
        return UNSUPPORTED
    if op.npages == 0:
        return EINVAL
    lo, hi, private = op.base, op.base + op.npages, op.private
    attributes = kvm.attributes
    if not attributes.ranges_in_state(lo, hi, not private):
        return OK  # "Nothing to do if the entire range has the desired attributes"
    yield from kvm.slots_lock.write_lock()
    yield from kvm.mmu_lock.write_lock()
    kvm.invalidate_begin(lo, hi)
    mmu = kvm.mmu
    zapped = [] if faults.active("convert-no-zap") else kvm.memslots.overlapping(lo, hi)
    for slot in zapped:
        a, b = max(lo, slot.base_gfn), min(hi, slot.end_gfn)
        if private:
            for root in mmu.held(mmu.direct_roots()):
                yield from mmu.zap_leafs(root, a, b)
        else:
            for edge in (a, b - 1):
                yield from split_range(kvm, mmu.mirror_root, edge, edge + 1)
            yield from mmu.zap_leafs(mmu.mirror_root, a, b)
    changed = attributes.ranges_in_state(lo, hi, not private)
    attributes.set(lo, hi, private)
    for slot in kvm.memslots.overlapping(lo, hi):
        if not faults.active("mixed-attr-stale"):
            lpage.update_mixed(attributes, slot, lo, hi)
        if slot.private and not private:
            for a, b in changed:
                _drop_private_state(kvm, slot, max(a, slot.base_gfn), min(b, slot.end_gfn))
    kvm.invalidate_end()
    kvm.mmu_lock.write_unlock()
    kvm.slots_lock.write_unlock()
    return OK


def _drop_private_state(kvm, slot, lo: int, hi: int) -> None:
    """Conversion to shared discards private contents and accept state of [lo, hi)."""
    if lo >= hi:
        return
    first, last = lo - slot.base_gfn, hi - slot.base_gfn
    slot.accepted.difference_update([i for i in slot.accepted if first <= i < last])
    kvm.host.clear(slot.gmem.pfn(first), last - first)  # gmem never migrates: contiguous

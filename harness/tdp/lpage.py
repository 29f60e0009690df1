"""Huge-page legality: KVM's lpage_info rules (SEMANTICS §G).

A 2M leaf at 512-aligned G is legal iff the host backs it with one unbroken
2M page, [G, G+512) lies in the slot with matching host alignment, dirty
logging is off, and the range has one attribute.  The attribute part is the
per-2M "mixed" flag (KVM_LPAGE_MIXED_FLAG), which must be recomputed on every
conversion: the fault path trusts the flag, not the attributes.
"""

from __future__ import annotations

from mmufuzz.harness.ops import PAGES_PER_2M, PG_LEVEL_4K


def max_mapping_level(slot, gfn: int, private: bool) -> int:
    """kvm_mmu_max_mapping_level: the largest leaf level allowed over ``gfn``."""
    if (not slot.hugepage_inside(gfn) or slot.dirty is not None
            or gfn // PAGES_PER_2M in slot.lpage_mixed):
        return PG_LEVEL_4K
    backing = slot.gmem if private else slot.backing
    return backing.host_level(gfn - slot.base_gfn)


def update_mixed(attributes, slot, lo: int, hi: int) -> None:
    """kvm_arch_post_set_memory_attributes: recompute the mixed flags over [lo, hi).

    Only the 2M ranges wholly inside the slot have a flag.  A range is mixed
    iff the attribute changes strictly inside it, so the ranges to flag are
    found from the private ranges' bounds (:meth:`MemoryAttributes.boundaries`)
    rather than by asking each of up to 512 ranges of a slot in turn.
    """
    first = max(lo, slot.base_gfn, slot.base_gfn + PAGES_PER_2M - 1) // PAGES_PER_2M
    last = min((hi - 1) // PAGES_PER_2M, slot.end_gfn // PAGES_PER_2M - 1)
    if first > last:
        return
    mixed = slot.lpage_mixed
    if mixed:
        mixed.difference_update(range(first, last + 1))
    for gfn in attributes.boundaries(first * PAGES_PER_2M, (last + 1) * PAGES_PER_2M):
        if gfn % PAGES_PER_2M:
            mixed.add(gfn // PAGES_PER_2M)


def pre_set_hugepage_ranges(slot, lo: int, hi: int) -> list[tuple[int, int]]:
    """The 2M ranges a conversion of [lo, hi) adds to its invalidation.

    kvm_arch_pre_set_memory_attributes, since 9129633d568e ("KVM: x86/mmu:
    Prevent installing hugepages when mem attributes are changing"): the
    mixed flags are recomputed only after the attributes change, so while a
    conversion runs, a fault on a gfn *outside* [lo, hi) could still map 2M
    over it.  The head and tail 2M ranges that the conversion only partly
    covers, lie in the slot and are not already mixed join the invalidation,
    so such faults retry; ranges wholly covered are already zapped and retry.
    ``lo``/``hi`` are the conversion's range clamped to the slot.
    """
    start = lo // PAGES_PER_2M * PAGES_PER_2M
    end = (hi - 1) // PAGES_PER_2M * PAGES_PER_2M
    ranges = []
    if ((start != lo or start + PAGES_PER_2M > hi) and start >= slot.base_gfn
            and start + PAGES_PER_2M <= slot.end_gfn
            and start // PAGES_PER_2M not in slot.lpage_mixed):
        ranges.append((start, start + PAGES_PER_2M))
    if (end != start and end + PAGES_PER_2M > hi and end + PAGES_PER_2M <= slot.end_gfn
            and end // PAGES_PER_2M not in slot.lpage_mixed):
        ranges.append((end, end + PAGES_PER_2M))
    return ranges


def init_memslot(attributes, slot) -> None:
    """kvm_mmu_init_memslot_memory_attributes: the mixed flags of a new or moved slot."""
    slot.lpage_mixed = set()
    update_mixed(attributes, slot, slot.base_gfn, slot.end_gfn)


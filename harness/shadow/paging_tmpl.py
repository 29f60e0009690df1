"""paging_tmpl.h for 64-bit guest tables (PTTYPE 64): walk, page fault, fetch, sync.

KVM walks the guest's tables in software (``FNAME(walk_addr_generic)``),
reading guest memory through the memslots, and turns the walk into shadow
pages (``FNAME(fetch)``): one indirect page per guest table on the path, each
with the access the path down to it allows (its role's ``access``: the
inherited permissions of CVE-2021-38198), then the leaf with the walk's full
access.  A guest 2M page is mapped by a 2M SPTE where the host page and
lpage_info allow one, else by a direct page of 4K leaves.
``FNAME(sync_spte)`` re-reads one guest PTE of an unsync page.

The guest runs in one CPU mode (docs/semantics.md): CPL 0, CR0.WP=1,
EFER.NXE=1, 4-level paging, no PGE/PCID/SMEP/SMAP/PKE, no 1G pages.  The
walker sets A/D bits as KVM's does (``FNAME(update_accessed_dirty_bits)``),
and a clean guest PTE is shadowed read-only (``FNAME(protect_clean_gpte)``)
so that the first write faults and sets D.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from itertools import compress

from mmufuzz.harness import faults
from mmufuzz.harness.ops import (
    PAGE_SHIFT,
    PFERR_FETCH_MASK,
    PFERR_PRESENT_MASK,
    PFERR_RSVD_MASK,
    PFERR_WRITE_MASK,
    PG_LEVEL_2M,
    PG_LEVEL_4K,
    PTE_ACCESSED,
    PTE_ADDR_MASK,
    PTE_DIRTY,
    AccessKind,
    PageFault,
)
from mmufuzz.harness.shadow.events import (SYNC_INVALID_GPTE, SYNC_MMIO_CLEARED, SYNC_MMIO_KEPT,
                                           SYNC_NARROWED, SYNC_NO_GPTE, SYNC_OTHER_GFN,
                                           SYNC_SAME)
from mmufuzz.harness.shadow.mmu import (
    EEXIST,
    RET_PF_RETRY,
    RET_PF_SPURIOUS,
    KvmMmuPage,
    kvm_mmu_page_get_access,
    kvm_mmu_page_get_gfn,
)
from mmufuzz.harness.shadow.spte import (
    ACC_ALL,
    ACC_EXEC_MASK,
    ACC_WRITE_MASK,
    PT64_NX_MASK,
    PT64_ROOT_4LEVEL,
    PT_PAGE_SIZE_MASK,
    PT_PRESENT_MASK,
    PT_USER_MASK,
    PT_WRITABLE_MASK,
    ROLE_ACCESS_MASK,
    ROLE_LEVEL_MASK,
    ROLE_PASSTHROUGH,
    ROLE_QUADRANT_SHIFT,
    SHADOW_HOST_WRITABLE_MASK,
    SHADOW_NONPRESENT_VALUE,
    check_mmio_spte,
    get_mmio_spte_gfn,
    is_large_pte,
    is_mmio_spte,
    is_shadow_present_pte,
    is_writable_pte,
    make_mmio_spte,
    role_access,
    spte_to_pfn,
)
from mmufuzz.harness.tdp.spte import pages_per_level

class _DummyRoot:
    """A root whose gfn had no memslot (mmu_alloc_dummy_root): every access faults.

    One object, compared by identity; it pickles as a reference to :data:`DUMMY_ROOT`, so a
    restored snapshot (``ShadowTarget.restore``) still holds that very object.
    """

    def __reduce__(self) -> str:
        return "DUMMY_ROOT"

    def __repr__(self) -> str:
        return "DUMMY_ROOT"


DUMMY_ROOT = _DummyRoot()

# Address bits 13..20 of a 2M PDE are reserved (bit 12 is PAT).
_PDE_2M_RSVD_MASK = ((1 << 21) - 1) & ~((1 << 13) - 1)


def level_shift(level: int) -> int:
    return PAGE_SHIFT + 9 * (level - 1)


def gpte_access(gpte: int) -> int:
    """FNAME(gpte_access): W, U and P (as exec) from the entry, exec cleared by NX."""
    access = gpte & (PT_WRITABLE_MASK | PT_USER_MASK | PT_PRESENT_MASK)
    if gpte & PT64_NX_MASK:
        access &= ~ACC_EXEC_MASK
    return access


def is_rsvd_bits_set(gpte: int, level: int) -> bool:
    """guest_rsvd_check: PS in a PML4E/PDPTE (no 1G pages), address bits 13..20 of a 2M PDE."""
    if not gpte & PT_PAGE_SIZE_MASK:
        return False
    return level > PG_LEVEL_2M or (level == PG_LEVEL_2M and gpte & _PDE_2M_RSVD_MASK != 0)


def access_error_bits(kind: AccessKind) -> int:
    if kind is AccessKind.WRITE:
        return PFERR_WRITE_MASK
    return PFERR_FETCH_MASK if kind is AccessKind.FETCH else 0


def permission_fault(pte_access: int, kind: AccessKind) -> int:
    """permission_fault for CPL 0 with CR0.WP=1: the #PF error code, or 0."""
    if kind is AccessKind.WRITE and not pte_access & ACC_WRITE_MASK:
        return PFERR_PRESENT_MASK | PFERR_WRITE_MASK
    if kind is AccessKind.FETCH and not pte_access & ACC_EXEC_MASK:
        return PFERR_PRESENT_MASK | PFERR_FETCH_MASK
    return 0


@dataclass
class GuestWalker:
    """struct guest_walker: per level (index level-1) the table, its entry and the access
    the path above it allows; then the final gfn and access."""

    level: int = PT64_ROOT_4LEVEL
    gfn: int = 0
    pte_access: int = ACC_ALL
    table_gfn: list = field(default_factory=lambda: [0] * PT64_ROOT_4LEVEL)
    pte_gpa: list = field(default_factory=lambda: [0] * PT64_ROOT_4LEVEL)
    ptes: list = field(default_factory=lambda: [0] * PT64_ROOT_4LEVEL)
    pt_access: list = field(default_factory=lambda: [ACC_ALL] * PT64_ROOT_4LEVEL)

    @property
    def gpa_page(self) -> int:
        return self.gfn << PAGE_SHIFT


def protect_clean_gpte(access: int, gpte: int) -> int:
    """FNAME(protect_clean_gpte): no write access through a guest PTE whose D is clear."""
    if gpte & PTE_DIRTY:
        return access
    return access & ~ACC_WRITE_MASK


def walk_addr_generic(vcpu, addr: int, kind: AccessKind):
    """Generator: walk the guest tables under CR3 for byte address ``addr``.

    Returns a :class:`GuestWalker`, the one-outcome tuple that ends the access
    (the #PF to inject: a table outside every memslot is one too, as KVM's
    error hva is ``goto error``), or RET_PF_RETRY when a table is in a slot
    being deleted or moved: the instruction re-executes once the update is
    done, so no walk mixes both layouts.
    """
    while True:
        walker = yield from _walk_once(vcpu, addr, kind)
        if type(walker) is not GuestWalker or not update_accessed_dirty_bits(
                vcpu, walker, kind is AccessKind.WRITE):
            return walker
        # An entry changed under the walk (the cmpxchg failed): retry_walk.


def _walk_once(vcpu, addr: int, kind: AccessKind):
    """Generator: one pass of FNAME(walk_addr_generic), up to its A/D update."""
    walker = GuestWalker()
    table, level = vcpu.cr3, PT64_ROOT_4LEVEL
    pte_access = ACC_ALL
    while True:
        pte_gpa = (table << PAGE_SHIFT) + 8 * ((addr >> level_shift(level)) & 511)
        walker.table_gfn[level - 1], walker.pte_gpa[level - 1] = table, pte_gpa
        yield
        if vcpu.in_invalid_slot(pte_gpa):
            return RET_PF_RETRY
        pte = vcpu.read_guest(pte_gpa)
        if pte is None:
            return (PageFault(addr, access_error_bits(kind)),)
        pt_access = pte_access
        pte_access = pt_access & gpte_access(pte)
        if not pte & PT_PRESENT_MASK:
            return (PageFault(addr, access_error_bits(kind)),)
        if is_rsvd_bits_set(pte, level):
            return (PageFault(addr, PFERR_RSVD_MASK | PFERR_PRESENT_MASK
                              | access_error_bits(kind)),)
        walker.ptes[level - 1] = pte
        walker.pt_access[level - 1] = pt_access
        if level == PG_LEVEL_4K or pte & PT_PAGE_SIZE_MASK:
            break
        table, level = (pte & PTE_ADDR_MASK) >> PAGE_SHIFT, level - 1
    walker.level, walker.pte_access = level, pte_access
    code = permission_fault(pte_access, kind)
    if code:
        return (PageFault(addr, code),)
    size = pages_per_level(level)
    walker.gfn = ((pte & PTE_ADDR_MASK) >> PAGE_SHIFT & -size) + (
        (addr >> PAGE_SHIFT) & (size - 1))
    if kind is not AccessKind.WRITE:
        walker.pte_access = protect_clean_gpte(pte_access, pte)
    return walker


def update_accessed_dirty_bits(vcpu, walker: GuestWalker, write_fault: bool) -> bool:
    """FNAME(update_accessed_dirty_bits): set A in every entry of the walk, D in the
    leaf of a write, each by a cmpxchg on the guest's memory (kvm_vcpu_mark_page_dirty
    logs the table).  True if an entry no longer holds what the walk read: walk again.

    The store goes to the host page directly (``__try_cmpxchg_user``), not through
    page tracking: only A/D change, which no shadow page depends on.  An entry in a
    read-only slot is left alone (``!walker->pte_writable``).
    """
    for level in range(PT64_ROOT_4LEVEL, walker.level - 1, -1):
        orig = walker.ptes[level - 1]
        pte = orig | PTE_ACCESSED
        if level == walker.level and write_fault:
            pte |= PTE_DIRTY
        if pte == orig:
            continue
        gpa = walker.pte_gpa[level - 1]
        if vcpu.read_guest(gpa) != orig:
            return True
        if vcpu.write_guest(gpa, pte):
            walker.ptes[level - 1] = pte
    return False


def gpte_changed(vcpu, walker: GuestWalker, level: int) -> bool:
    """FNAME(gpte_changed): the entry at ``level`` no longer reads as it did in the walk."""
    return vcpu.read_guest(walker.pte_gpa[level - 1]) != walker.ptes[level - 1]


def fetch(vcpu, fault, walker: GuestWalker) -> int:
    """FNAME(fetch), with mmu_lock held: shadow the walk, then set the leaf SPTE."""
    kvm = vcpu.kvm
    mmu = kvm.mmu
    if gpte_changed(vcpu, walker, PT64_ROOT_4LEVEL):
        return RET_PF_RETRY
    root = vcpu.root
    if root is None or root is DUMMY_ROOT:  # its gfn had no slot when it was loaded
        vcpu.request_free_obsolete_roots = True
        return RET_PF_RETRY
    sp, level = root, PT64_ROOT_4LEVEL
    addr = fault.addr
    while True:
        sp.write_flooding_count = 0  # clear_sp_write_flooding_count
        if level == walker.level:
            break
        index = (addr >> level_shift(level)) & 511
        table_gfn = walker.table_gfn[level - 2]
        if faults.active("inherited-perms"):
            # Before b1bd5cba3306 the walker kept one pt_access, the last level's.
            access = walker.pt_access[walker.level - 1]
        else:
            access = walker.pt_access[level - 2]
        child = mmu.kvm_mmu_get_child_sp(vcpu, sp, index, table_gfn, False, access)
        if child is not EEXIST and child.unsync_children:
            mmu.mmu_sync_children(vcpu, child)
        if gpte_changed(vcpu, walker, level - 1):
            return RET_PF_RETRY
        if child is not EEXIST:
            mmu.link_shadow_page(sp, index, child)
        sp, level = mmu.sp_of(sp.spt[index]), level - 1
    # Only now the huge-page size: the shadow pages just made may disallow it.  Below a
    # guest huge page mapped smaller, direct pages down to the goal level.
    mmu.kvm_mmu_hugepage_adjust(fault)
    direct_access = walker.pte_access
    while level > fault.goal_level:
        index = (addr >> level_shift(level)) & 511
        base_gfn = fault.gfn & -pages_per_level(level)
        validate_direct_spte(kvm, sp, index, direct_access)
        child = mmu.kvm_mmu_get_child_sp(vcpu, sp, index, base_gfn, True, direct_access)
        if child is not EEXIST:
            mmu.link_shadow_page(sp, index, child)
        sp, level = mmu.sp_of(sp.spt[index]), level - 1
    index = (addr >> level_shift(level)) & 511
    ret = mmu.mmu_set_spte(sp, index, walker.pte_access, fault)
    if ret != RET_PF_SPURIOUS:
        pte_prefetch(vcpu, fault, sp, index)
    return ret


# PTE_PREFETCH_NUM: the aligned group of entries around a new leaf that a fault prefetches.
PTE_PREFETCH_NUM = 8


def pte_prefetch(vcpu, fault, sp: KvmMmuPage, index: int) -> None:
    """FNAME(pte_prefetch): map the non-present neighbours of the 4K leaf just set.

    An indirect page is prefetched from its guest table (what FNAME(gpte_changed) re-read
    under mmu_lock as gw->prefetch_ptes), a direct one from the memslot.
    """
    if sp.level > PG_LEVEL_4K or vcpu.kvm.mmu_invalidate_in_progress:
        return
    if sp.direct:
        direct_pte_prefetch(vcpu, fault, sp, index)
        return
    base = index & -PTE_PREFETCH_NUM
    for i in range(base, base + PTE_PREFETCH_NUM):
        if i == index or is_shadow_present_pte(sp.spt[i]):
            continue
        if not prefetch_gpte(vcpu, fault, sp, i, vcpu.read_guest((sp.gfn << PAGE_SHIFT) + 8 * i)):
            break


def gfn_to_memslot_dirty_bitmap(vcpu, gfn: int, no_dirty_log: bool):
    """The slot a prefetch may map ``gfn`` from: none for a slot going away, or a
    dirty-logged one when the SPTE would be writable (its write must fault to be logged)."""
    slot = vcpu.gfn_to_memslot(gfn)
    if slot is None or slot.invalid or (no_dirty_log and slot.dirty is not None):
        return None
    return slot


def _prefetched(fault, slot, gfn: int):
    """The fault-less mmu_set_spte of a prefetch (``fault == NULL``: prefetch, host-writable)."""
    return dataclasses.replace(fault, gfn=gfn, slot=slot, pfn=slot.backing.pfn(gfn - slot.base_gfn),
                               map_writable=True, write=False, prefetch=True)


def prefetch_gpte(vcpu, fault, sp: KvmMmuPage, index: int, gpte) -> bool:
    """FNAME(prefetch_gpte): shadow one more guest PTE; False stops the prefetch.

    A read-only slot is not prefetched: KVM's atomic gfn-to-pfn asks for a writable page.
    """
    kvm = vcpu.kvm
    if gpte is None or prefetch_invalid_gpte(kvm, sp, index, gpte):
        return False
    gfn = (gpte & PTE_ADDR_MASK) >> PAGE_SHIFT
    pte_access = protect_clean_gpte(role_access(sp.role) & gpte_access(gpte), gpte)
    slot = gfn_to_memslot_dirty_bitmap(vcpu, gfn, bool(pte_access & ACC_WRITE_MASK))
    if slot is None or slot.readonly:
        return False
    kvm.mmu.mmu_set_spte(sp, index, pte_access, _prefetched(fault, slot, gfn))
    return True


def direct_pte_prefetch(vcpu, fault, sp: KvmMmuPage, index: int) -> None:
    """__direct_pte_prefetch: each run of non-present entries in the group, from the slot."""
    start = None
    base = index & -PTE_PREFETCH_NUM
    for i in range(base, base + PTE_PREFETCH_NUM):
        if i == index or is_shadow_present_pte(sp.spt[i]):
            if start is None:
                continue
            if not direct_pte_prefetch_many(vcpu, fault, sp, start, i):
                return
            start = None
        elif start is None:
            start = i
    if start is not None:
        direct_pte_prefetch_many(vcpu, fault, sp, start, base + PTE_PREFETCH_NUM)


def direct_pte_prefetch_many(vcpu, fault, sp: KvmMmuPage, start: int, end: int) -> bool:
    """Map entries [start, end) of a direct page from the first one's slot; False (KVM: -1)
    if that slot may not be prefetched or does not hold the whole run."""
    access = role_access(sp.role)
    gfn = kvm_mmu_page_get_gfn(sp, start)
    slot = gfn_to_memslot_dirty_bitmap(vcpu, gfn, bool(access & ACC_WRITE_MASK))
    if slot is None or slot.readonly or gfn + (end - start) > slot.end_gfn:
        return False
    for i in range(start, end):
        vcpu.kvm.mmu.mmu_set_spte(sp, i, access, _prefetched(fault, slot, gfn + i - start))
    return True


def validate_direct_spte(kvm, sp: KvmMmuPage, index: int, direct_access: int) -> None:
    """Unlink a direct child made for other access bits (the guest PDE's changed)."""
    spte = sp.spt[index]
    if is_shadow_present_pte(spte) and not is_large_pte(spte):
        child = kvm.mmu.sp_of(spte)
        if role_access(child.role) == direct_access:
            return
        kvm.mmu.drop_parent_pte(child, sp, index)
        kvm.mmu.kvm_flush_remote_tlbs()


def prefetch_invalid_gpte(kvm, sp: KvmMmuPage, index: int, gpte: int) -> bool:
    """Drop the SPTE if the guest PTE can no longer be shadowed (not present, no A, rsvd)."""
    if (not gpte & PT_PRESENT_MASK or not gpte & PTE_ACCESSED
            or is_rsvd_bits_set(gpte, PG_LEVEL_4K)):
        kvm.mmu.drop_spte(sp, index)
        return True
    return False


def _empty_spte() -> int:
    """The value kvm_sync_spte treats as an empty entry (see the sync-zero-check fault)."""
    return 0 if faults.active("sync-zero-check") else SHADOW_NONPRESENT_VALUE


def kvm_sync_spte(vcpu, sp: KvmMmuPage, index: int) -> int:
    """kvm_sync_spte: skip an empty entry, else FNAME(sync_spte).

    With sync-zero-check (thread [003]) "empty" is 0, the pre-TDX initial
    value: a non-present SHADOW_NONPRESENT_VALUE entry is synced as if it were
    a present one.
    """
    if sp.spt[index] == _empty_spte():
        return 0
    return sync_spte(vcpu, sp, index)


def sync_spte(vcpu, sp: KvmMmuPage, index: int) -> int:
    """FNAME(sync_spte): re-read one guest PTE; 1 if a flush is due, -1 to zap the page."""
    kvm = vcpu.kvm
    if sp.spt[index] == _empty_spte():
        return 0
    events = kvm.events
    gpte = vcpu.read_guest((sp.gfn << PAGE_SHIFT) + 8 * index)
    if gpte is None:
        events[SYNC_NO_GPTE] += 1
        return -1
    if prefetch_invalid_gpte(kvm, sp, index, gpte):
        events[SYNC_INVALID_GPTE] += 1
        return 1
    gfn = (gpte & PTE_ADDR_MASK) >> PAGE_SHIFT
    pte_access = protect_clean_gpte(role_access(sp.role) & gpte_access(gpte), gpte)
    if sync_mmio_spte(kvm, sp, index, gfn, pte_access):
        events[SYNC_MMIO_CLEARED if sp.spt[index] == SHADOW_NONPRESENT_VALUE
               else SYNC_MMIO_KEPT] += 1
        return 0
    if gfn != kvm_mmu_page_get_gfn(sp, index):
        events[SYNC_OTHER_GFN] += 1
        kvm.mmu.drop_spte(sp, index)
        return 1
    if kvm_mmu_page_get_access(sp, index) == pte_access:
        events[SYNC_SAME] += 1
        return 0
    events[SYNC_NARROWED] += 1
    sp.shadowed_translation[index] = (gfn << PAGE_SHIFT) | pte_access
    spte = sp.spt[index]
    if not is_writable_pte(spte):
        # KVM's comment holds that a sync never turns a read-only SPTE writable; mainline's
        # make_spte can (a dirty-log-protected one), logging a gfn nobody touched
        # (docs/shadow.md): here the next write fault restores W.
        pte_access &= ~ACC_WRITE_MASK
    _, new = kvm.mmu.make_spte(sp, vcpu.gfn_to_memslot(gfn), pte_access, gfn, spte_to_pfn(spte),
                               spte, False, True, bool(spte & SHADOW_HOST_WRITABLE_MASK))
    return int(kvm.mmu.mmu_spte_update(sp, index, new))


def sync_mmio_spte(kvm, sp: KvmMmuPage, index: int, gfn: int, access: int) -> bool:
    """An MMIO SPTE is kept (with the current generation) for the same gfn, else cleared.

    Not mainline: one made in an older memslot generation is cleared too, since
    a slot may cover its gfn now.  Mainline re-marks it with the current
    generation, and the next access exits as MMIO although the gfn has a slot
    (the sync-mmio-refresh fault; docs/shadow.md).
    """
    spte = sp.spt[index]
    if not is_mmio_spte(spte):
        return False
    memslots = kvm.memslots
    stale = memslots.update_in_progress or not check_mmio_spte(spte, memslots.generation)
    if gfn != get_mmio_spte_gfn(spte) or (stale and not faults.active("sync-mmio-refresh")):
        sp.spt[index] = SHADOW_NONPRESENT_VALUE
        return True
    sp.spt[index] = make_mmio_spte(gfn, access, memslots.generation)
    return True


# kvm_sync_page_check's sync_role_ign: the role bits a page may differ in from the root.
SYNC_ROLE_IGN = ROLE_LEVEL_MASK | ROLE_ACCESS_MASK | (3 << ROLE_QUADRANT_SHIFT) | ROLE_PASSTHROUGH


def sync_page(vcpu, sp: KvmMmuPage) -> int:
    """__kvm_sync_page: sync every entry; 1 if a flush is due, -1 if the page must go.

    As KVM, an entry whose guest PTE cannot be read (-1) only asks for a flush.
    """
    if sp.direct or (sp.role ^ vcpu.root_role) & ~SYNC_ROLE_IGN:
        return -1
    flush = 0
    # kvm_sync_spte skips the empty entries: look only at the others (tables are sparse).
    for index in compress(range(512), map(_empty_spte().__ne__, sp.spt)):
        flush |= kvm_sync_spte(vcpu, sp, index) != 0
    return flush

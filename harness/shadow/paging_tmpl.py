"""paging_tmpl.h for 64-bit guest tables (PTTYPE 64): walk, page fault, fetch, sync.

KVM walks the guest's tables in software (``FNAME(walk_addr_generic)``),
reading guest memory through the memslots, and turns the walk into shadow
pages (``FNAME(fetch)``): one indirect page per guest table on the path, each
with the access the path down to it allows (its role's ``access``: the
inherited permissions of CVE-2021-38198), then the leaf with the walk's full
access.  A guest 2M page is shadowed by a direct page of 4K leaves.
``FNAME(sync_spte)`` re-reads one guest PTE of an unsync page.

The guest runs in one CPU mode (docs/semantics.md): CPL 0, CR0.WP=1,
EFER.NXE=1, 4-level paging, no PGE/PCID/SMEP/SMAP/PKE, no 1G pages.  The
walker sets A/D bits as KVM's does (``FNAME(update_accessed_dirty_bits)``),
and a clean guest PTE is shadowed read-only (``FNAME(protect_clean_gpte)``)
so that the first write faults and sets D.
"""

from __future__ import annotations

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
from mmufuzz.harness.shadow.mmu import (
    EEXIST,
    RET_PF_RETRY,
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
    is_mmio_spte,
    is_writable_pte,
    make_mmio_spte,
    role_access,
    spte_to_pfn,
)
from mmufuzz.harness.tdp.spte import pages_per_level

# A root whose gfn had no memslot (mmu_alloc_dummy_root): every access faults.
DUMMY_ROOT = "dummy"

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
    # Only 4K SPTEs: below a guest huge page, direct pages down to the 4K leaf.
    direct_access = walker.pte_access
    while level > PG_LEVEL_4K:
        index = (addr >> level_shift(level)) & 511
        base_gfn = fault.gfn & -pages_per_level(level)
        validate_direct_spte(kvm, sp, index, direct_access)
        child = mmu.kvm_mmu_get_child_sp(vcpu, sp, index, base_gfn, True, direct_access)
        if child is not EEXIST:
            mmu.link_shadow_page(sp, index, child)
        sp, level = mmu.sp_of(sp.spt[index]), level - 1
    index = (addr >> PAGE_SHIFT) & 511
    return mmu.mmu_set_spte(sp, index, walker.pte_access, fault)


def validate_direct_spte(kvm, sp: KvmMmuPage, index: int, direct_access: int) -> None:
    """Unlink a direct child made for other access bits (the guest PDE's changed)."""
    spte = sp.spt[index]
    if spte & PT_PRESENT_MASK and not is_mmio_spte(spte):
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
    gpte = vcpu.read_guest((sp.gfn << PAGE_SHIFT) + 8 * index)
    if gpte is None:
        return -1
    if prefetch_invalid_gpte(kvm, sp, index, gpte):
        return 1
    gfn = (gpte & PTE_ADDR_MASK) >> PAGE_SHIFT
    pte_access = protect_clean_gpte(role_access(sp.role) & gpte_access(gpte), gpte)
    if sync_mmio_spte(kvm, sp, index, gfn, pte_access):
        return 0
    if gfn != kvm_mmu_page_get_gfn(sp, index):
        kvm.mmu.drop_spte(sp, index)
        return 1
    if kvm_mmu_page_get_access(sp, index) == pte_access:
        return 0
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

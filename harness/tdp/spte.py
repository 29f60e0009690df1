"""SPTEs as ints in KVM's EPT bit layout, with spte.h-style helpers.

Bugs in real MMUs are bit-level: a zap that writes 0 instead of the
non-present value, an MMIO SPTE honoured with a stale generation, a split
child with the wrong pfn.  Keeping KVM's encoding (arch/x86/kvm/mmu/spte.h)
keeps those bugs expressible.  All helpers are pure functions of ints.
"""

from __future__ import annotations

from mmufuzz.harness.ops import PAGE_SHIFT, PG_LEVEL_4K

# EPT permission bits (VMX_EPT_{READABLE,WRITABLE,EXECUTABLE}_MASK).
PT_READABLE_MASK = 1 << 0
PT_WRITABLE_MASK = 1 << 1
PT_EXECUTABLE_MASK = 1 << 2
VMX_EPT_RWX_MASK = PT_READABLE_MASK | PT_WRITABLE_MASK | PT_EXECUTABLE_MASK
# Write+execute without read is an EPT misconfiguration: KVM's MMIO marker.
VMX_EPT_MISCONFIG_WX_VALUE = PT_WRITABLE_MASK | PT_EXECUTABLE_MASK
VMX_EPT_MEMTYPE_WB = 6 << 3
PT_PAGE_SIZE_MASK = 1 << 7
# EPT A/D bits (VMX_EPT_ACCESS_BIT, VMX_EPT_DIRTY_BIT): shadow_accessed_mask and
# shadow_dirty_mask when EPT A/D bits are enabled (kvm_mmu_set_ept_masks with has_ad_bits).
SPTE_ACCESSED_MASK = 1 << 8
SPTE_DIRTY_MASK = 1 << 9
SPTE_MMU_PRESENT_MASK = 1 << 11
EPT_SPTE_HOST_WRITABLE = 1 << 57
EPT_SPTE_MMU_WRITABLE = 1 << 58
# Suppress-#VE: set in every non-present entry so a TDX guest never sees #VE for it.
VMX_EPT_SUPPRESS_VE_BIT = 1 << 63

SPTE_BASE_ADDR_MASK = ((1 << 52) - 1) & ~((1 << PAGE_SHIFT) - 1)

SHADOW_NONPRESENT_VALUE = VMX_EPT_SUPPRESS_VE_BIT
# An entry some thread is changing; non-present, never MMIO, never a valid leaf.
FROZEN_SPTE = SHADOW_NONPRESENT_VALUE | 0x5A0

# MMIO SPTE generation: 8 low bits at 3..10, 11 high bits at 52..62 (spte.h).
MMIO_SPTE_GEN_LOW_START, MMIO_SPTE_GEN_LOW_BITS = 3, 8
MMIO_SPTE_GEN_HIGH_START, MMIO_SPTE_GEN_HIGH_BITS = 52, 11
MMIO_SPTE_GEN_LOW_MASK = ((1 << MMIO_SPTE_GEN_LOW_BITS) - 1) << MMIO_SPTE_GEN_LOW_START
MMIO_SPTE_GEN_HIGH_MASK = ((1 << MMIO_SPTE_GEN_HIGH_BITS) - 1) << MMIO_SPTE_GEN_HIGH_START
MMIO_SPTE_GEN_MASK = (1 << (MMIO_SPTE_GEN_LOW_BITS + MMIO_SPTE_GEN_HIGH_BITS)) - 1
# Matched against (spte & SHADOW_MMIO_MASK); EPT keeps no access bits in MMIO SPTEs
# (kvm_mmu_set_ept_masks passes access_mask 0), so shadow_mmio_access_mask is 0.
SHADOW_MMIO_MASK = VMX_EPT_RWX_MASK | VMX_EPT_SUPPRESS_VE_BIT
SHADOW_MMIO_ACCESS_MASK = 0
# tdx_vm_init: MMIO SPTEs with suppress-#VE clear so the TD gets #VE and does TDVMCALL.
TDX_MMIO_VALUE = 0

SPTE_LEVEL_BITS = 9
SPTE_ENT_PER_PAGE = 1 << SPTE_LEVEL_BITS
ROOT_LEVEL = 4
# kvm_mmu_max_gfn(): the last gfn the TDP MMU can map.  Mainline derives it from the host's
# MAXPHYADDR and picks a 5-level root when the guest's exceeds 48 bits
# (kvm_mmu_get_max_tdp_level); the model's root is 4-level, so its reach is 48 bits.  A guest
# PTE may still point above it: the EPT walk cannot translate such a gpa.
TDP_MAX_GFN = (1 << (48 - 12)) - 1

ACC_EXEC_MASK = 1
ACC_WRITE_MASK = PT_WRITABLE_MASK
ACC_ALL = ACC_EXEC_MASK | ACC_WRITE_MASK


def pages_per_level(level: int) -> int:
    """KVM_PAGES_PER_HPAGE: 4K pages an entry at ``level`` maps."""
    return 1 << (SPTE_LEVEL_BITS * (level - 1))


# pages_per_level by level (index 0 unused) and the gfn shift of an entry at each level:
# table lookups for the walks that step entry by entry.
PAGES_PER_LEVEL = (0,) + tuple(pages_per_level(level) for level in range(1, ROOT_LEVEL + 1))
LEVEL_SHIFT = (0,) + tuple(SPTE_LEVEL_BITS * (level - 1) for level in range(1, ROOT_LEVEL + 1))


def gfn_round_for_level(gfn: int, level: int) -> int:
    """The first gfn of the ``level`` entry covering ``gfn``."""
    return gfn & -pages_per_level(level)


def spte_index(gfn: int, level: int) -> int:
    """SPTE_INDEX: the entry of ``gfn`` in its table at ``level``."""
    return (gfn >> (SPTE_LEVEL_BITS * (level - 1))) & (SPTE_ENT_PER_PAGE - 1)


def is_frozen_spte(spte: int) -> bool:
    """The entry is frozen by a thread that is changing it."""
    return spte == FROZEN_SPTE


def is_shadow_present_pte(spte: int) -> bool:
    """Present to KVM's MMU (bit 11); MMIO, frozen and non-present entries are not."""
    return spte & SPTE_MMU_PRESENT_MASK != 0


def is_large_pte(spte: int) -> bool:
    """The page-size bit: a leaf above 4K."""
    return spte & PT_PAGE_SIZE_MASK != 0


def is_last_spte(spte: int, level: int) -> bool:
    """A leaf: at 4K, or a huge page."""
    return level == PG_LEVEL_4K or is_large_pte(spte)


def is_writable_pte(spte: int) -> bool:
    """Hardware-writable."""
    return spte & PT_WRITABLE_MASK != 0


def is_mmu_writable_spte(spte: int) -> bool:
    """KVM may make the SPTE writable without mmu_lock (shadow_mmu_writable_mask): it was
    made with write access and is write-protected only for dirty logging."""
    return spte & EPT_SPTE_MMU_WRITABLE != 0


def is_dirty_spte(spte: int) -> bool:
    """The CPU (or make_spte) set the EPT dirty bit: a write may have gone through it."""
    return spte & SPTE_DIRTY_MASK != 0


def is_access_allowed(spte: int, write: bool, exec_: bool) -> bool:
    """spte.h's is_access_allowed: would the faulting access succeed on this leaf now?"""
    if exec_:
        return spte & PT_EXECUTABLE_MASK != 0
    if write:
        return spte & PT_WRITABLE_MASK != 0
    return spte & PT_READABLE_MASK != 0


def spte_to_pfn(spte: int) -> int:
    """The pfn a present SPTE points at (a child table or a data page)."""
    return (spte & SPTE_BASE_ADDR_MASK) >> PAGE_SHIFT


def make_spte(pfn: int, level: int, access: int, host_writable: bool = True) -> int:
    """A leaf SPTE for ``pfn`` at ``level``; writable iff ACC_WRITE and the host allows it.

    A writable SPTE is made MMU-writable and, with EPT A/D bits, dirty
    (make_spte: ``spte |= spte_shadow_dirty_mask(spte)`` for ACC_WRITE; KVM commit
    f4e1b3c8bd2a "KVM: MMU: Explicitly set D-bit for writable spte"), so the
    CPU logs no PML entry for the write the fault serves.  That is safe only
    because make_spte also marks the gfn dirty when it installs a writable
    SPTE; here that happens in the one choke point, handle_changed_spte.
    """
    spte = (SPTE_MMU_PRESENT_MASK | PT_READABLE_MASK | VMX_EPT_MEMTYPE_WB | SPTE_ACCESSED_MASK
            | (pfn << PAGE_SHIFT))
    if access & ACC_EXEC_MASK:
        spte |= PT_EXECUTABLE_MASK
    if level > PG_LEVEL_4K:
        spte |= PT_PAGE_SIZE_MASK
    if host_writable:
        spte |= EPT_SPTE_HOST_WRITABLE
        if access & ACC_WRITE_MASK:
            spte |= PT_WRITABLE_MASK | EPT_SPTE_MMU_WRITABLE | SPTE_DIRTY_MASK
    return spte


def make_nonleaf_spte(child_pfn: int) -> int:
    """An SPTE linking a child table; non-leaf entries are fully permissive (as KVM's)."""
    return (SPTE_MMU_PRESENT_MASK | VMX_EPT_RWX_MASK | SPTE_ACCESSED_MASK
            | (child_pfn << PAGE_SHIFT))


def make_huge_page_split_spte(huge_spte: int, level: int, index: int) -> int:
    """Child ``index`` of a huge leaf at ``level``: same permissions, pfn + index pages."""
    child_level = level - 1
    spte = huge_spte + ((index * pages_per_level(child_level)) << PAGE_SHIFT)
    if child_level == PG_LEVEL_4K:
        spte &= ~PT_PAGE_SIZE_MASK
    return spte


def make_huge_spte(small_spte: int, level: int) -> int:
    """KVM's make_huge_spte: the huge leaf at ``level`` that leaf ``small_spte`` lies in.

    The small leaf's bits and permissions, the page-size bit, and its address
    with the bits below the huge page cleared (KVM_HPAGE_MASK | ~PAGE_MASK).
    """
    huge = small_spte | PT_PAGE_SIZE_MASK
    return huge & ~(((pages_per_level(level) - 1) << PAGE_SHIFT) & SPTE_BASE_ADDR_MASK)


def leaf_permissions(spte: int) -> int:
    """The permission and software bits two leaves must share to merge."""
    return spte & ~(SPTE_BASE_ADDR_MASK | PT_PAGE_SIZE_MASK)


# --- MMIO SPTEs ---------------------------------------------------------------

def generation_mmio_spte_mask(gen: int) -> int:
    """Scatter the low bits of a memslot generation into the MMIO SPTE gen fields."""
    gen &= MMIO_SPTE_GEN_MASK
    low = gen & ((1 << MMIO_SPTE_GEN_LOW_BITS) - 1)
    high = gen >> MMIO_SPTE_GEN_LOW_BITS
    return (low << MMIO_SPTE_GEN_LOW_START) | (high << MMIO_SPTE_GEN_HIGH_START)


def get_mmio_spte_generation(spte: int) -> int:
    """The memslot generation an MMIO SPTE was made in (masked to its 19 bits)."""
    low = (spte & MMIO_SPTE_GEN_LOW_MASK) >> MMIO_SPTE_GEN_LOW_START
    high = (spte & MMIO_SPTE_GEN_HIGH_MASK) >> MMIO_SPTE_GEN_HIGH_START
    return low | (high << MMIO_SPTE_GEN_LOW_BITS)


def make_mmio_spte(gfn: int, access: int, gen: int, mmio_value: int) -> int:
    """An MMIO SPTE: the VM's MMIO marker, the gfn, access bits and the generation."""
    return (mmio_value | generation_mmio_spte_mask(gen) | (access & SHADOW_MMIO_ACCESS_MASK)
            | (gfn << PAGE_SHIFT))


def is_mmio_spte(spte: int, mmio_value: int) -> bool:
    """The entry carries the VM's MMIO marker (checked before any present bit)."""
    return spte & SHADOW_MMIO_MASK == mmio_value


def get_mmio_spte_gfn(spte: int) -> int:
    """The gfn an MMIO SPTE caches."""
    return (spte & SPTE_BASE_ADDR_MASK) >> PAGE_SHIFT


def get_mmio_spte_access(spte: int) -> int:
    """The access bits an MMIO SPTE caches (none for EPT)."""
    return spte & SHADOW_MMIO_ACCESS_MASK


def check_mmio_spte(spte: int, gen: int) -> bool:
    """The MMIO SPTE's generation is the current memslot generation."""
    return get_mmio_spte_generation(spte) == gen & MMIO_SPTE_GEN_MASK



def leaf_spte_change_needs_tlb_flush(old: int, new: int) -> bool:
    """Mainline's (spte.h): the change takes MMU-writable away, so a TLB entry made from
    ``old`` may still allow a write KVM now wants to see."""
    return is_mmu_writable_spte(old) and not is_mmu_writable_spte(new)


def leaf_spte_change_narrows(old: int, new: int) -> bool:
    """A TLB entry made from leaf ``old`` would grant more than ``new`` does: another pfn,
    nothing, or no write where ``old`` allowed one."""
    if not is_shadow_present_pte(new) or spte_to_pfn(old) != spte_to_pfn(new):
        return True
    return is_writable_pte(old) and not is_writable_pte(new)

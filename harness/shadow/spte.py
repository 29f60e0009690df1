"""Shadow-paging SPTEs and shadow-page roles as ints, in KVM's bit layouts.

Without EPT the shadow tables are ordinary x86-64 page tables that the CPU
walks with the guest's own CR3 replaced by a shadow root, so an SPTE uses the
x86 PTE bits (arch/x86/kvm/mmu/spte.h, kvm_mmu_reset_all_pte_masks for the
non-EPT case): P/W/U/A/D/PS/NX in hardware positions, KVM's software bits
host-writable (9), MMU-writable (10) and MMU-present (11).  MMIO SPTEs set
reserved physical-address bit 51 plus P, so the CPU faults on them with
PFERR_RSVD and KVM takes its MMIO fast path.  The non-present value is
SHADOW_NONPRESENT_VALUE (bit 63) on 64-bit hosts, as mainline's spte.h: bugs
that assume 0 stay expressible.

The role is ``union kvm_mmu_page_role`` (arch/x86/include/asm/kvm_host.h):
two shadow pages shadow the same guest table only if their role words match.
"""

from __future__ import annotations

from mmufuzz.harness.ops import PAGE_SHIFT, PG_LEVEL_4K
from mmufuzz.harness.tdp.spte import (  # noqa: F401  (spte.h helpers shared by both MMUs)
    MMIO_SPTE_GEN_MASK,
    PT_PAGE_SIZE_MASK,
    PT_WRITABLE_MASK,
    SPTE_BASE_ADDR_MASK,
    SPTE_MMU_PRESENT_MASK,
    generation_mmio_spte_mask,
    get_mmio_spte_generation,
    is_large_pte,
    is_last_spte,
    is_shadow_present_pte,
    is_writable_pte,
    spte_to_pfn,
)

# --- x86 PTE bits (arch/x86/kvm/mmu/mmu.h) -------------------------------------
PT_PRESENT_MASK = 1 << 0
PT_USER_MASK = 1 << 2
PT_ACCESSED_MASK = 1 << 5
PT_DIRTY_MASK = 1 << 6
PT64_NX_SHIFT = 63
PT64_NX_MASK = 1 << PT64_NX_SHIFT
PT64_ROOT_4LEVEL = 4

# KVM's software bits for non-EPT SPTEs (spte.h DEFAULT_SPTE_*).
SHADOW_HOST_WRITABLE_MASK = 1 << 9
SHADOW_MMU_WRITABLE_MASK = 1 << 10

SHADOW_NONPRESENT_VALUE = 1 << 63

# The host's MAXPHYADDR: below 52, so bit 51 is reserved and marks MMIO SPTEs.
SHADOW_PHYS_BITS = 46
SHADOW_MMIO_VALUE = (1 << 51) | PT_PRESENT_MASK
SHADOW_MMIO_MASK = SHADOW_MMIO_VALUE
# ACC_WRITE_MASK | ACC_USER_MASK: the access bits an MMIO SPTE caches.
SHADOW_MMIO_ACCESS_MASK = PT_WRITABLE_MASK | PT_USER_MASK


def kvm_mmu_max_gfn() -> int:
    """The largest gfn KVM creates an MMIO SPTE for (host MAXPHYADDR)."""
    return (1 << (SHADOW_PHYS_BITS - PAGE_SHIFT)) - 1


# --- ACC_* access bits (mmu.h): exec is bit 0 so that P gives it ---------------
ACC_EXEC_MASK = 1
ACC_WRITE_MASK = PT_WRITABLE_MASK
ACC_USER_MASK = PT_USER_MASK
ACC_ALL = ACC_EXEC_MASK | ACC_WRITE_MASK | ACC_USER_MASK


# --- predicates (the others are spte.h's, imported above) -------------------------

def is_mmio_spte(spte: int) -> bool:
    """The entry carries the MMIO marker (reserved bit 51 plus P)."""
    return spte & SHADOW_MMIO_MASK == SHADOW_MMIO_VALUE


def is_mmu_writable_spte(spte: int) -> bool:
    return spte & SHADOW_MMU_WRITABLE_MASK != 0


def make_nonleaf_spte(child_pfn: int) -> int:
    """make_nonleaf_spte: P|W|U|A, no NX: permissions are enforced at the leaves only."""
    return (SPTE_MMU_PRESENT_MASK | PT_PRESENT_MASK | PT_WRITABLE_MASK | PT_USER_MASK
            | PT_ACCESSED_MASK | (child_pfn << PAGE_SHIFT))


def make_leaf_spte(pfn: int, pte_access: int, host_writable: bool, level: int) -> int:
    """The bits make_spte builds for a leaf (PS above 4K) before the unsync/write-protect
    decision.

    Writability is the caller's (make_spte in mmu): it may drop it.
    """
    spte = SPTE_MMU_PRESENT_MASK | PT_PRESENT_MASK | PT_ACCESSED_MASK | (pfn << PAGE_SHIFT)
    if level > PG_LEVEL_4K:
        spte |= PT_PAGE_SIZE_MASK
    if not pte_access & ACC_EXEC_MASK:
        spte |= PT64_NX_MASK
    if pte_access & ACC_USER_MASK:
        spte |= PT_USER_MASK
    if host_writable:
        spte |= SHADOW_HOST_WRITABLE_MASK
    return spte


def spte_make_writable(spte: int) -> int:
    """W plus MMU-writable plus D (spte_shadow_dirty_mask)."""
    return spte | PT_WRITABLE_MASK | SHADOW_MMU_WRITABLE_MASK | PT_DIRTY_MASK


def spte_write_protect(spte: int) -> int:
    """spte_write_protect: clear W (keep MMU-writable: a later fault may restore it)."""
    return spte & ~PT_WRITABLE_MASK


def spte_clear_mmu_writable(spte: int) -> int:
    """Write-protect for shadowing: neither W nor MMU-writable (kvm_mmu_slot_gfn_write_protect)."""
    return spte & ~(PT_WRITABLE_MASK | SHADOW_MMU_WRITABLE_MASK)


# --- MMIO SPTEs -----------------------------------------------------------------

def make_mmio_spte(gfn: int, access: int, gen: int) -> int:
    """mark_mmio_spte: marker, generation, cached access (W|U) and the gfn."""
    return (SHADOW_MMIO_VALUE | generation_mmio_spte_mask(gen)
            | (access & SHADOW_MMIO_ACCESS_MASK) | (gfn << PAGE_SHIFT))


def get_mmio_spte_gfn(spte: int) -> int:
    return (spte & SPTE_BASE_ADDR_MASK & ~(1 << 51)) >> PAGE_SHIFT


def get_mmio_spte_access(spte: int) -> int:
    return spte & SHADOW_MMIO_ACCESS_MASK


def check_mmio_spte(spte: int, generation: int) -> bool:
    """The MMIO SPTE was made in the current memslot generation."""
    return get_mmio_spte_generation(spte) == generation & MMIO_SPTE_GEN_MASK


# --- union kvm_mmu_page_role ------------------------------------------------------
ROLE_LEVEL_MASK = 0xF                 # level:4
ROLE_HAS_4_BYTE_GPTE = 1 << 4         # has_4_byte_gpte:1
ROLE_QUADRANT_SHIFT = 5               # quadrant:2
ROLE_DIRECT = 1 << 7                  # direct:1
ROLE_ACCESS_SHIFT = 8                 # access:3
ROLE_ACCESS_MASK = 0x7 << ROLE_ACCESS_SHIFT
ROLE_INVALID = 1 << 11                # invalid:1
ROLE_EFER_NX = 1 << 12                # efer_nx:1
ROLE_CR0_WP = 1 << 13                 # cr0_wp:1
ROLE_SMEP_ANDNOT_WP = 1 << 14
ROLE_SMAP_ANDNOT_WP = 1 << 15
ROLE_AD_DISABLED = 1 << 16
ROLE_GUEST_MODE = 1 << 17             # guest_mode:1
ROLE_PASSTHROUGH = 1 << 18
ROLE_IS_MIRROR = 1 << 19
ROLE_SMM_SHIFT = 24                   # smm:8, at the top for kvm_memslots_for_spte_role


def role_level(role: int) -> int:
    return role & ROLE_LEVEL_MASK


def role_direct(role: int) -> bool:
    return role & ROLE_DIRECT != 0


def role_access(role: int) -> int:
    return (role & ROLE_ACCESS_MASK) >> ROLE_ACCESS_SHIFT


def make_role(level: int, direct: bool, access: int, efer_nx: bool, cr0_wp: bool,
              smm: int = 0, guest_mode: bool = False) -> int:
    """A role word from its fields (the others are 0 in the one CPU mode modelled)."""
    return (level | (ROLE_DIRECT if direct else 0) | (access << ROLE_ACCESS_SHIFT)
            | (ROLE_EFER_NX if efer_nx else 0) | (ROLE_CR0_WP if cr0_wp else 0)
            | (ROLE_GUEST_MODE if guest_mode else 0) | (smm << ROLE_SMM_SHIFT))


def kvm_mmu_child_role(parent_role: int, direct: bool, access: int) -> int:
    """kvm_mmu_child_role: the parent's role one level down, with its own direct/access."""
    role = parent_role & ~(ROLE_LEVEL_MASK | ROLE_DIRECT | ROLE_ACCESS_MASK | ROLE_PASSTHROUGH)
    return role | (role_level(parent_role) - 1) | (ROLE_DIRECT if direct else 0) | (
        access << ROLE_ACCESS_SHIFT)


def describe_role(role: int) -> str:
    """``level=.. direct=.. access=..`` for invariant details."""
    return (f"role={role:#x}(level={role_level(role)} direct={int(role_direct(role))} "
            f"access={role_access(role)})")


"""Stage-2 descriptors as ints in the architecture's VMSAv8-64 layout, 4K granule.

Bugs in stage-2 code are bit-level (a lock value mistaken for a valid entry, a
level hint off by one, a table bit read as a block), so descriptors keep the
layout arch/arm64/kvm/hyp/pgtable.c and asm/kvm_pgtable.h use, with their
names.  Addresses here are in pages: an IPA is ``gfn << 12`` and an output
address ``pfn << 12``.

Levels follow arm64's numbering, the reverse of x86's: level 3 holds 4K pages,
level 2 2M blocks, level 1 1G blocks, level 0 (the start level for a 48-bit
IPA space) only tables.  All helpers are pure functions of ints.
"""

from __future__ import annotations

from mmufuzz.harness.ops import PAGE_SHIFT

KVM_PGTABLE_FIRST_LEVEL = 0
KVM_PGTABLE_LAST_LEVEL = 3
# 4K granule: 1G blocks at level 1 are the largest (KVM_PGTABLE_MIN_BLOCK_LEVEL).
KVM_PGTABLE_MIN_BLOCK_LEVEL = 1
PTRS_PER_PTE = 512
LEVEL_BITS = 9
# The VM's IPA size, 48 bits (start level 0, VTCR_EL2.T0SZ = 16): a larger IPA is outside
# every table and faults at the start level.
KVM_IPA_BITS = 48
IPA_MAX_GFN = (1 << (KVM_IPA_BITS - PAGE_SHIFT)) - 1

KVM_PTE_VALID = 1 << 0
KVM_PTE_TYPE = 1 << 1             # 1: table (levels 0-2) or page (level 3); 0: block
KVM_PTE_ADDR_MASK = ((1 << 48) - 1) & ~((1 << PAGE_SHIFT) - 1)

KVM_PTE_LEAF_ATTR_LO_S2_MEMATTR = 0xF << 2
KVM_PTE_LEAF_ATTR_LO_S2_S2AP_R = 1 << 6
KVM_PTE_LEAF_ATTR_LO_S2_S2AP_W = 1 << 7
KVM_PTE_LEAF_ATTR_LO_S2_SH = 3 << 8
KVM_PTE_LEAF_ATTR_LO_S2_SH_IS = 3
KVM_PTE_LEAF_ATTR_LO_S2_AF = 1 << 10
KVM_PTE_LEAF_ATTR_LO = ((1 << 12) - 1) & ~((1 << 2) - 1)      # GENMASK(11, 2)
KVM_PTE_LEAF_ATTR_HI_S2_XN = 1 << 54
KVM_PTE_LEAF_ATTR_HI_SW = 0xF << 55                           # GENMASK(58, 55)
KVM_PTE_LEAF_ATTR_HI = ((1 << 64) - 1) & ~((1 << 50) - 1)     # GENMASK(63, 50)
KVM_PTE_LEAF_ATTR_S2_PERMS = (KVM_PTE_LEAF_ATTR_LO_S2_S2AP_R | KVM_PTE_LEAF_ATTR_LO_S2_S2AP_W
                              | KVM_PTE_LEAF_ATTR_HI_S2_XN)

# An invalid entry a shared walker owns while it breaks and remakes it.
KVM_INVALID_PTE_LOCKED = 1 << 10

# MemAttr[3:0] with FEAT_S2FWB (the host forces cacheability): Normal WB, Device-nGnRE.
MT_S2_FWB_NORMAL = 6
MT_S2_FWB_DEVICE_nGnRE = 1

# enum kvm_pgtable_prot
KVM_PGTABLE_PROT_X = 1 << 0
KVM_PGTABLE_PROT_W = 1 << 1
KVM_PGTABLE_PROT_R = 1 << 2
KVM_PGTABLE_PROT_DEVICE = 1 << 3

# The level hint of a TLBI that does not know the level of the entry it evicts.
TLBI_TTL_UNKNOWN = -1


def kvm_granule_shift(level: int) -> int:
    """The lowest gfn bit a level's index covers (0, 9, 18, 27 for levels 3..0)."""
    return LEVEL_BITS * (KVM_PGTABLE_LAST_LEVEL - level)


def kvm_granule_pages(level: int) -> int:
    """Pages one entry at ``level`` maps (kvm_granule_size in pages)."""
    return 1 << kvm_granule_shift(level)


GRANULE_PAGES = tuple(kvm_granule_pages(level) for level in range(KVM_PGTABLE_LAST_LEVEL + 1))


def kvm_pgtable_idx(gfn: int, level: int) -> int:
    """The entry of ``gfn`` in its table at ``level``."""
    return (gfn >> kvm_granule_shift(level)) & (PTRS_PER_PTE - 1)


def kvm_level_supports_block_mapping(level: int) -> bool:
    return level >= KVM_PGTABLE_MIN_BLOCK_LEVEL


def kvm_pte_valid(pte: int) -> bool:
    return pte & KVM_PTE_VALID != 0


def kvm_pte_table(pte: int, level: int) -> bool:
    """A valid table descriptor (never at the last level, where the type bit means page)."""
    return (level != KVM_PGTABLE_LAST_LEVEL and pte & (KVM_PTE_VALID | KVM_PTE_TYPE)
            == KVM_PTE_VALID | KVM_PTE_TYPE)


def kvm_pte_leaf(pte: int, level: int) -> bool:
    """A valid block or page descriptor."""
    return kvm_pte_valid(pte) and not kvm_pte_table(pte, level)


def kvm_pte_to_pfn(pte: int) -> int:
    return (pte & KVM_PTE_ADDR_MASK) >> PAGE_SHIFT


def kvm_init_table_pte(child_pfn: int) -> int:
    return (child_pfn << PAGE_SHIFT) | KVM_PTE_TYPE | KVM_PTE_VALID


def kvm_init_valid_leaf_pte(pfn: int, attr: int, level: int) -> int:
    """A block (levels 1-2) or page (level 3) descriptor for ``pfn`` with ``attr``."""
    pte = (pfn << PAGE_SHIFT) | (attr & (KVM_PTE_LEAF_ATTR_LO | KVM_PTE_LEAF_ATTR_HI))
    if level == KVM_PGTABLE_LAST_LEVEL:
        pte |= KVM_PTE_TYPE
    return pte | KVM_PTE_VALID


def stage2_set_prot_attr(prot: int) -> int:
    """The leaf attributes of ``prot`` (FWB: MemAttr forces Normal WB or Device)."""
    if prot & KVM_PGTABLE_PROT_DEVICE:
        if prot & KVM_PGTABLE_PROT_X:
            raise ValueError("executable device mapping")
        attr = MT_S2_FWB_DEVICE_nGnRE << 2
    else:
        attr = MT_S2_FWB_NORMAL << 2
    if not prot & KVM_PGTABLE_PROT_X:
        attr |= KVM_PTE_LEAF_ATTR_HI_S2_XN
    if prot & KVM_PGTABLE_PROT_R:
        attr |= KVM_PTE_LEAF_ATTR_LO_S2_S2AP_R
    if prot & KVM_PGTABLE_PROT_W:
        attr |= KVM_PTE_LEAF_ATTR_LO_S2_S2AP_W
    attr |= KVM_PTE_LEAF_ATTR_LO_S2_SH_IS << 8
    return attr | KVM_PTE_LEAF_ATTR_LO_S2_AF


def kvm_pgtable_stage2_pte_prot(pte: int) -> int:
    """The kvm_pgtable_prot a valid leaf grants, its software bits included."""
    prot = pte & KVM_PTE_LEAF_ATTR_HI_SW
    if not kvm_pte_valid(pte):
        return prot
    if pte & KVM_PTE_LEAF_ATTR_LO_S2_S2AP_R:
        prot |= KVM_PGTABLE_PROT_R
    if pte & KVM_PTE_LEAF_ATTR_LO_S2_S2AP_W:
        prot |= KVM_PGTABLE_PROT_W
    if not pte & KVM_PTE_LEAF_ATTR_HI_S2_XN:
        prot |= KVM_PGTABLE_PROT_X
    return prot


def stage2_pte_needs_update(old: int, new: int) -> bool:
    """Anything but the permissions differs: same mapping, so a fault only relaxes."""
    if not kvm_pte_valid(old) or not kvm_pte_valid(new):
        return True
    return (old ^ new) & ~KVM_PTE_LEAF_ATTR_S2_PERMS != 0


def stage2_pte_is_counted(pte: int) -> bool:
    """Non-zero entries hold a reference on the table page that contains them."""
    return pte != 0


def stage2_pte_is_locked(pte: int) -> bool:
    return not kvm_pte_valid(pte) and pte & KVM_INVALID_PTE_LOCKED != 0


def leaf_memattr(pte: int) -> int:
    return pte & KVM_PTE_LEAF_ATTR_LO_S2_MEMATTR


def leaf_perms(pte: int) -> int:
    """The access a leaf grants as READ/WRITE/EXEC bits (the hardware's check)."""
    return ((S2_READ if pte & KVM_PTE_LEAF_ATTR_LO_S2_S2AP_R else 0)
            | (S2_WRITE if pte & KVM_PTE_LEAF_ATTR_LO_S2_S2AP_W else 0)
            | (0 if pte & KVM_PTE_LEAF_ATTR_HI_S2_XN else S2_EXEC))


# What an access needs from a stage-2 leaf.
S2_READ, S2_WRITE, S2_EXEC = 1, 2, 4

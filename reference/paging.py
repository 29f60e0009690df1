"""The guest's 4-level page walk and the translations a vCPU's TLB may cache.

This mirrors KVM's software walker (``FNAME(walk_addr_generic)`` in
arch/x86/kvm/mmu/paging_tmpl.h) for the one CPU mode the fuzzer uses
(SEMANTICS §F): CPL 0, CR0.WP=1, EFER.NXE=1, no PGE/PCID/SMEP/SMAP/PKE,
MAXPHYADDR 52, no 1G pages.  Table reads are the caller's business (they are
shared physical reads that can exit), so the walk takes a ``read_pte``
callback.  Setting the Accessed and Dirty bits of a completed walk is the
caller's business too (:func:`accessed_dirty_bits` says which), because it
writes guest memory (SEMANTICS §F).
"""

from __future__ import annotations

from dataclasses import dataclass

from mmufuzz.harness.ops import (PFERR_FETCH_MASK, PFERR_PRESENT_MASK, PFERR_RSVD_MASK,
                         PFERR_WRITE_MASK, PG_LEVEL_2M, PG_LEVEL_4K, PTE_ACCESSED, PTE_ADDR_MASK,
                         PTE_DIRTY, AccessKind, PageFault)

PT_PRESENT_MASK = 1 << 0
PT_WRITABLE_MASK = 1 << 1
PT_PAGE_SIZE_MASK = 1 << 7
PT64_NX_MASK = 1 << 63
PT64_ROOT_4LEVEL = 4

# Address bits 13..20 of a 2M PDE are reserved (bit 12 is PAT).
PDE_2M_RSVD_MASK = ((1 << 21) - 1) & ~((1 << 13) - 1)


def level_shift(level: int) -> int:
    """Bit position of the lowest gva bit a level's index covers (12, 21, 30, 39)."""
    return 12 + 9 * (level - 1)


def level_size(level: int) -> int:
    """Bytes a leaf at ``level`` maps."""
    return 1 << level_shift(level)


@dataclass(frozen=True, order=True)
class Translation:
    """One completed walk: what a TLB entry caches.

    ``writable``/``executable`` combine every level (RW all set, NX none set).
    ``dirty``: the leaf's Dirty bit as the walk left it (set by a write walk).
    A write may use a cached translation only if it is dirty: a CPU sets D
    with a walk of the tables in memory, and shadow-paging KVM write-protects
    the SPTE of a clean guest PTE (``FNAME(protect_clean_gpte)``) so that the
    write faults and walks.  Ordered so that a TLB set can be iterated
    deterministically.
    """

    gva_base: int
    level: int
    gpa_base: int
    writable: bool
    executable: bool
    dirty: bool

    def covers(self, gva: int) -> bool:
        """The entry's page (at its level) contains ``gva``."""
        return self.gva_base <= gva < self.gva_base + level_size(self.level)

    def gpa(self, gva: int) -> int:
        """The byte gpa this entry translates ``gva`` (which it covers) to."""
        return self.gpa_base + (gva - self.gva_base)


def access_error_bits(kind: AccessKind) -> int:
    """The W and I/D bits every #PF error code of this access carries."""
    if kind is AccessKind.WRITE:
        return PFERR_WRITE_MASK
    if kind is AccessKind.FETCH:
        return PFERR_FETCH_MASK
    return 0


def accessed_dirty_bits(leaf: bool, kind: AccessKind) -> int:
    """The bits a completed, permitted walk sets in an entry it used: A in every
    entry, D too in the leaf of a write.

    ``FNAME(update_accessed_dirty_bits)`` (paging_tmpl.h) after
    ``permission_fault``; the CPU (SDM vol. 3 §4.8) likewise.
    """
    if leaf and kind is AccessKind.WRITE:
        return PTE_ACCESSED | PTE_DIRTY
    return PTE_ACCESSED


def permission_fault(translation: Translation, kind: AccessKind):
    """The #PF error code if ``translation`` denies ``kind`` (CR0.WP=1, NXE=1), else None."""
    if kind is AccessKind.WRITE and not translation.writable:
        return PFERR_PRESENT_MASK | PFERR_WRITE_MASK
    if kind is AccessKind.FETCH and not translation.executable:
        return PFERR_PRESENT_MASK | PFERR_FETCH_MASK
    return None


def is_rsvd_bits_set(pte: int, level: int) -> bool:
    """PS in a PML4E or PDPTE (no 1G pages), or a 2M PDE with address bits 13..20 set."""
    if not pte & PT_PAGE_SIZE_MASK:
        return False
    return level > PG_LEVEL_2M or (level == PG_LEVEL_2M and pte & PDE_2M_RSVD_MASK != 0)


def walk_addr(root: int, gva: int, kind: AccessKind, read_pte):
    """Walk the tables under PML4 gfn ``root`` for byte address ``gva``.

    ``read_pte(table_gfn, index)`` returns the entry as an int, or a tuple of
    the outcomes the table read may have (a #PF or an exit).  A completed walk
    read exactly one entry per level, the last one its leaf.  Returns a completed
    :class:`Translation` (permissions not yet checked: see
    :func:`permission_fault`) or a tuple of outcomes: the #PF of a not-present
    or reserved entry, or the table read's exit.
    """
    table, level = root, PT64_ROOT_4LEVEL
    writable = executable = True
    while True:
        pte = read_pte(table, (gva >> level_shift(level)) & 511)
        if isinstance(pte, tuple):
            return pte
        if not pte & PT_PRESENT_MASK:
            return (PageFault(gva, access_error_bits(kind)),)
        if is_rsvd_bits_set(pte, level):
            return (PageFault(gva, PFERR_PRESENT_MASK | PFERR_RSVD_MASK
                              | access_error_bits(kind)),)
        writable = writable and bool(pte & PT_WRITABLE_MASK)
        executable = executable and not pte & PT64_NX_MASK
        if level == PG_LEVEL_4K or pte & PT_PAGE_SIZE_MASK:
            size = level_size(level)
            return Translation(gva & -size, level, pte & PTE_ADDR_MASK & -size, writable,
                               executable, kind is AccessKind.WRITE or bool(pte & PTE_DIRTY))
        table, level = (pte & PTE_ADDR_MASK) >> 12, level - 1

"""page_track.c and kvm_mmu_track_write: what a guest write to a shadowed table does.

The write itself has been done by the emulator; KVM then zaps the SPTEs that
shadowed the written guest PTE in every page of that gfn, so the next access
re-walks the table.  A page written this way three times without being used
by a fault in between is zapped whole (write flooding): the guest has
probably stopped using it as a page table.  Last-level pages are exempt:
they can go unsync instead.
"""

from __future__ import annotations

from mmufuzz.harness.ops import PAGE_SHIFT, PG_LEVEL_4K

# detect_write_flooding's threshold.
WRITE_FLOODING_LIMIT = 3


def detect_write_misaligned(gpa: int, nbytes: int) -> bool:
    """A write that does not cover exactly one 8-byte guest PTE (the op writes whole words)."""
    offset = gpa & ((1 << PAGE_SHIFT) - 1)
    if not offset & 7 and nbytes == 1:
        return False
    return bool((offset ^ (offset + nbytes - 1)) & ~7) or nbytes < 4


def detect_write_flooding(sp) -> bool:
    if sp.level == PG_LEVEL_4K:
        return False
    sp.write_flooding_count += 1
    return sp.write_flooding_count >= WRITE_FLOODING_LIMIT


def kvm_mmu_track_write(vcpu, gpa: int, nbytes: int = 8):
    """Generator: zap the SPTEs shadowing the guest PTE at ``gpa`` (mmu_lock for write)."""
    kvm = vcpu.kvm
    mmu = kvm.mmu
    if not mmu.indirect_shadow_pages:
        return
    yield from kvm.mmu_lock.write_lock()
    gfn = gpa >> PAGE_SHIFT
    index = (gpa & ((1 << PAGE_SHIFT) - 1)) >> 3
    invalid_list: list = []
    flush = False
    for sp in mmu.sps_with_gptes(gfn):
        if detect_write_misaligned(gpa, nbytes) or detect_write_flooding(sp):
            mmu.kvm_mmu_prepare_zap_page(sp, invalid_list)
            continue
        flush |= mmu.mmu_page_zap_pte(sp, index)
    mmu.kvm_mmu_remote_flush_or_zap(invalid_list, flush)
    kvm.mmu_lock.write_unlock()


def kvm_page_track_write(vcpu, gpa: int):
    """Generator: the emulator wrote guest memory at ``gpa``: tell the write trackers."""
    yield from kvm_mmu_track_write(vcpu, gpa)

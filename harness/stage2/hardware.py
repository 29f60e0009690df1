"""The hardware model: a vCPU's stage-2 TLB and walk cache, its walker, and TLBI.

Stage 1 (gva -> ipa) is the guest's own paging in the vocabulary's format; the
vCPU reuses the TDP target's guest walker and linear TLB for it unchanged.
Stage 2 (ipa -> pa) is what this target models, as the architecture caches it:

- the TLB holds leaf translations keyed by (level, first gfn), each with its
  output pfn, permissions and MemAttr, usable until a TLBI removes them;
- the walk cache holds table descriptors (which table translates a range at a
  level), and a hardware walk starts from the deepest one that covers the IPA,
  so a table unlinked without invalidation is still walked;
- a walk reads one descriptor per step and fills the caches only from values
  read after the last TLBI (a TLBI that overtakes a walk restarts it, as the
  re-executed instruction does).

TLBI follows the architecture: ``ipas2e1is`` with a level hint removes the leaf
entries of that level covering the IPA (any level for TLBI_TTL_UNKNOWN) and
the walk-cache entries that translate it; the range form removes what overlaps
a range; ``vmalls12e1is`` removes everything of the VMID.  KVM pairs each
stage-2 invalidation by IPA with ``vmalle1is`` (combined stage-1+2 entries are
tagged by VA, not IPA), so every stage-2 TLBI also drops stage-1 entries.

Two live translations of one IPA that differ in output address, memory
attributes or size are the architecture's break-before-make violation (a TLB
conflict): the TLB lookup raises ``break_before_make`` when it finds them.
"""

from __future__ import annotations

from mmufuzz.harness import faults
from mmufuzz.harness.ops import PAGE_SHIFT, AccessKind
from mmufuzz.harness.stage2.mmu import kvm_handle_guest_abort
from mmufuzz.harness.stage2.pte import (
    GRANULE_PAGES,
    IPA_MAX_GFN,
    KVM_PGTABLE_FIRST_LEVEL,
    S2_EXEC,
    S2_READ,
    S2_WRITE,
    TLBI_TTL_UNKNOWN,
    kvm_pgtable_idx,
    kvm_pte_table,
    kvm_pte_to_pfn,
    kvm_pte_valid,
    leaf_memattr,
    leaf_perms,
)
from mmufuzz.harness.target import InvariantViolation
from mmufuzz.harness.tdp.hardware import Vcpu as GuestWalkerVcpu

READ, WRITE, FETCH = AccessKind.READ, AccessKind.WRITE, AccessKind.FETCH
_LEAF_LEVELS = (3, 2, 1)  # the levels a stage-2 leaf can be at, smallest first


def access_needs(kind) -> int:
    """The stage-2 permission an access of ``kind`` needs."""
    if kind is WRITE:
        return S2_WRITE
    return S2_EXEC if kind is FETCH else S2_READ


class Vcpu(GuestWalkerVcpu):
    """One vCPU: the guest's stage-1 state (inherited) plus stage-2 TLB and walk cache."""

    # A stage-1 walk into no memslot is not emulated: KVM re-injects the abort into the
    # guest (mmu.c, kvm_handle_guest_abort: kvm_vcpu_abt_iss1tw() -> kvm_inject_sea_dabt()),
    # in this vocabulary the not-present #PF of the access.  Stage 1 keeps x86's format
    # and x86's A/D rules (hardware-managed, as with FEAT_HAFDBS), as the walker is shared.
    emulates_walk_exits = False

    def __init__(self, kvm, index: int):
        super().__init__(kvm, index)
        self.s2_tlb: dict[tuple[int, int], tuple[int, int, int]] = {}  # (level, gfn) -> (pfn, perms, memattr)
        self.s2_walk: dict[tuple[int, int], object] = {}  # (table level, first gfn) -> S2Table

    # --- invalidation (called by the Tlbi broadcast) -----------------------------------

    def tlbi_all(self) -> None:
        self.s2_tlb.clear()
        self.s2_walk.clear()
        self.flush_linear()
        self.flush_epoch += 1

    def tlbi_range(self, gfn: int, pages: int, level: int) -> None:
        """Drop leaf entries of ``level`` (any for TLBI_TTL_UNKNOWN) overlapping
        [gfn, gfn+pages) and the walk-cache entries that translate any of it."""
        end = gfn + pages
        for key in [k for k in self.s2_tlb if (level == TLBI_TTL_UNKNOWN or k[0] == level)
                    and k[1] < end and gfn < k[1] + GRANULE_PAGES[k[0]]]:
            del self.s2_tlb[key]
        for key in [k for k in self.s2_walk
                    if k[1] < end and gfn < k[1] + GRANULE_PAGES[k[0] - 1]]:
            del self.s2_walk[key]
        self.flush_linear()  # vmalle1is: combined entries are tagged by VA
        self.flush_epoch += 1

    # --- the stage-2 TLB ----------------------------------------------------------------

    def s2_lookup(self, gfn: int):
        """``(level, (pfn, perms, memattr))`` of the TLB entry translating ``gfn``, or None.

        More than one hit is a TLB conflict: entries of different sizes for one
        IPA exist only if a block and a table were swapped without break-before-make.
        """
        tlb = self.s2_tlb
        found = None
        for level in _LEAF_LEVELS:
            entry = tlb.get((level, gfn & -GRANULE_PAGES[level]))
            if entry is None:
                continue
            if found is not None:
                raise InvariantViolation(
                    "break_before_make", f"gfn={gfn:#x} vcpu={self.index} TLB holds level "
                    f"{found[0]} pfn={found[1][0]:#x} and level {level} pfn={entry[0]:#x}")
            found = (level, entry)
        return found

    def _physical_hit(self, gpa: int, kind, value, private: bool, tag: bool):
        """Do the access through a cached stage-2 translation that permits it, else None."""
        gfn = gpa >> PAGE_SHIFT
        hit = self.s2_lookup(gfn)
        if hit is None:
            return None
        level, (pfn, perms, _) = hit
        if not perms & access_needs(kind):
            return None
        return self._do_access(pfn + (gfn & (GRANULE_PAGES[level] - 1)), gpa, kind, value,
                               False, tag)

    # --- the hardware walk ------------------------------------------------------------------

    def _walk_start(self, gfn: int):
        """The deepest cached table translating ``gfn``: ``(table, level)``, else the root."""
        for level in (3, 2, 1):
            table = self.s2_walk.get((level, gfn & -GRANULE_PAGES[level - 1]))
            if table is not None:
                return table, level
        return self.kvm.pgt.root, KVM_PGTABLE_FIRST_LEVEL

    def walk_s2(self, gfn: int, kind):
        """Generator: walk stage 2 for ``gfn``; None when a usable leaf is now cached,
        else ``(fault level, is_permission_fault)`` for the abort KVM handles."""
        if gfn > IPA_MAX_GFN:
            return KVM_PGTABLE_FIRST_LEVEL, False  # outside the IPA space: nothing to walk
        needs = access_needs(kind)
        hit = self.s2_lookup(gfn)
        if hit is not None and not hit[1][1] & needs:
            return hit[0], True  # the TLB entry itself faults; no walk
        while True:
            epoch = self.flush_epoch
            table, level = self._walk_start(gfn)
            walked = []
            while True:
                pte = table.ptes[kvm_pgtable_idx(gfn, level)]
                yield
                if self.flush_epoch != epoch:
                    break  # a TLBI overtook the walk: walk again
                if not kvm_pte_valid(pte):
                    return level, False
                if kvm_pte_table(pte, level):
                    table = self.kvm.pgt.follow(pte)
                    level += 1
                    walked.append(((level, gfn & -GRANULE_PAGES[level - 1]), table))
                    continue
                perms = leaf_perms(pte)
                if not perms & needs:
                    return level, True
                # This implementation fills its caches from walks that complete only.
                self.s2_walk.update(walked)
                base = gfn & -GRANULE_PAGES[level]
                self.s2_tlb[(level, base)] = (kvm_pte_to_pfn(pte), perms, leaf_memattr(pte))
                self.s2_lookup(gfn)  # a conflict with what the TLB already held
                return None

    def physical(self, gpa: int, kind, value, private: bool, tag: bool):
        """Generator: a physical access at byte ``gpa``; stage-2 aborts go to KVM."""
        gfn = gpa >> PAGE_SHIFT
        while True:
            done = self._physical_hit(gpa, kind, value, private, tag)
            if done is not None:
                return done
            abort = yield from self.walk_s2(gfn, kind)
            if abort is None:
                continue
            exit_ = yield from kvm_handle_guest_abort(self.kvm, self, gpa, kind, *abort)
            if exit_ is not None:
                return exit_


class Tlbi:
    """The hypervisor's TLB maintenance for one VMID (arch/arm64/kvm/hyp/*/tlb.c).

    Every operation is broadcast (inner shareable) and complete when it
    returns (the DSB), except ``flush_vmid_ipa_nsh``, which is local.
    """

    def __init__(self, vcpus: list):
        self.vcpus = vcpus

    def flush_vmid(self) -> None:
        """__kvm_tlb_flush_vmid: vmalls12e1is."""
        for vcpu in self.vcpus:
            vcpu.tlbi_all()

    def flush_vmid_ipa(self, gfn: int, level: int) -> None:
        """__kvm_tlb_flush_vmid_ipa: ipas2e1is with a level hint, then vmalle1is."""
        for vcpu in self.vcpus:
            vcpu.tlbi_range(gfn, 1, level)

    def flush_vmid_ipa_nsh(self, vcpu, gfn: int, level: int) -> None:
        """__kvm_tlb_flush_vmid_ipa_nsh: the same on the faulting CPU only."""
        vcpu.tlbi_range(gfn, 1, level)

    def flush_vmid_range(self, gfn: int, pages: int) -> None:
        """kvm_tlb_flush_vmid_range with FEAT_TLBIRANGE: range ipas2e1is, level unknown."""
        level = 0 if faults.active("stage2-range-tlbi-level-zero") else TLBI_TTL_UNKNOWN
        for vcpu in self.vcpus:
            vcpu.tlbi_range(gfn, pages, level)


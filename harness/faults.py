"""The fault switch: injectable real-world MMU bugs (``--inject NAME``).

Each catalog entry names a bug from KVM history (``../shared/FAULTS.md``) and
is switched on by a tiny local branch in a target, ``if faults.active(NAME):``.
The active set is the project's only global mutable state: targets consult it
on their hot paths, so it is a plain frozenset lookup.  Nothing in ``fuzz/``
may consult the catalog to steer generation.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass


@dataclass(frozen=True)
class Fault:
    """One injectable bug: where it lives, where it comes from, what goes wrong."""

    name: str
    target: str
    source: str
    description: str
    concurrent: bool = False


_TDP_FAULTS = (
    Fault("merge-frozen-child", "tdp",
          "thread [000]: RFC PATCH v4 13/16 KVM: x86/tdp_mmu: Try to merge pages into a large page",
          "the private 4K->2M merge in the fault path does not retry on a child another "
          "vCPU has frozen (mirror install: freeze, AUG, write) and populates over it",
          concurrent=True),
    Fault("merge-partial-accept", "tdp", "thread [000]",
          "the private merge goes ahead although some subpages are accepted and some "
          "pending; the 2M leaf takes the first page's state"),
    Fault("merge-by-zap", "tdp", "thread [000]",
          "the private merge zaps the 4K leaves and refaults at 2M, zeroing accepted contents"),
    Fault("free-before-flush", "tdp",
          "thread [001]: arm64 stage-2 break-before-make, freeing an unlinked table",
          "a removed table page is freed at once, not after the TLB flush and the RCU grace "
          "period", concurrent=True),
    Fault("huge-without-break", "tdp", "thread [001]",
          "a huge leaf replaces a table without freeze -> flush -> write (break-before-make)"),
    Fault("mmio-stale-generation", "tdp", "thread [002]: MMIO SPTE caching",
          "MMIO SPTEs are honoured without comparing the memslot generation"),
    Fault("nonpresent-zero", "tdp", "thread [003]: SHADOW_NONPRESENT_VALUE",
          "tdp_mmu_zap_spte_atomic writes 0 instead of SHADOW_NONPRESENT_VALUE after the "
          "flush (suppress-#VE clear)"),
    Fault("convert-no-zap", "tdp",
          "KVM memory attributes: kvm_vm_set_mem_attributes zaps before changing attributes",
          "set_attributes updates the attributes but does not zap existing leaves"),
    Fault("mixed-attr-stale", "tdp", "KVM lpage_info KVM_LPAGE_MIXED_FLAG handling",
          "the mixed-attributes flag of a 2M range is not recomputed after a conversion"),
    Fault("accept-level-ignored", "tdp", "TDX accept size vs mapping level "
          "(TDX_PAGE_SIZE_MISMATCH)",
          "a 2m accept over a range mapped at 4K reports ok and accepts only the first page"),
    Fault("pending-access-maps", "tdp", "TDX: an access to a pending page must not be mapped "
          "as accepted",
          "the fault path adds a pending private page with PAGE.ADD semantics (accepted) "
          "instead of AUG (pending)"),
    Fault("slot-delete-leaf-only", "tdp",
          "KVM commit 4e103134b862 (zap only the removed slot's pages) and its revert",
          "deleting a slot zaps its 4K leaves but not a huge leaf covering it"),
    Fault("dirty-log-keeps-huge", "tdp", "KVM commit 7c8a4742c4ab (write-protection skipped)",
          "enabling dirty logging skips the eager split and write-protects 4K leaves only, "
          "leaving writable huge leaves in place"),
    Fault("lost-flush-on-yield", "tdp", "KVM TDP MMU yield/flush ordering fixes",
          "a long zap that yields (contention or need_resched) drops its pending TLB flush"),
    Fault("invalidate-vs-memslot-race", "tdp",
          "KVM commit 52ac8b358b0c (block memslot updates across invalidation)",
          "a fault installs an SPTE between invalidation start and end (mmu_invalidate_seq "
          "not checked)", concurrent=True),
)

_STAGE2_FAULTS = (
    Fault("stage2-block-before-break", "stage2",
          "thread [001]: Re: [PATCH 02/14] KVM: arm64: Tear down unlinked stage-2 subtree after "
          "break-before-make (Ricardo Koller's review, 2022-09-13)",
          "the map walker's pre-order callback installs the block over a table by cmpxchg, "
          "before the old subtree is made unreachable (locked) and its range invalidated"),
    Fault("stage2-teardown-before-break", "stage2-pkvm",
          "thread [001]: [PATCH 02/14] KVM: arm64: Tear down unlinked stage-2 subtree after "
          "break-before-make (the teardown must follow the break; pKVM frees at once)",
          "the map walker's pre-order callback tears the old subtree down before it breaks the "
          "table entry and invalidates its range: hardware walkers still reach freed pages",
          concurrent=True),
    Fault("stage2-table-break-tlbi-ipa", "stage2",
          "thread [001] (the removed code's own comment: a table has 'numerous leaf entries "
          "below us which would otherwise need invalidating individually'); mainline "
          "stage2_try_break_pte invalidates a table's whole range (kvm_tlb_flush_vmid_range)",
          "breaking a table entry invalidates by IPA only the page the walk is at, leaving the "
          "other leaves of the old table in the TLBs beside the new block"),
    Fault("stage2-range-tlbi-level-zero", "stage2",
          "KVM commit 'KVM: arm64: Use TLBI_TTL_UNKNOWN in __kvm_tlb_flush_vmid_range()' "
          "(after FEAT_LPA2 made level 0 a valid TTL hint)",
          "the range TLBI passes 0 as 'level unknown', which the hardware reads as a level-0 "
          "hint: the page and block entries of the range survive"),
    Fault("stage2-no-reload-after-pre", "stage2-pkvm",
          "KVM/arm64 fixes for 6.4, take #2: 'KVM: arm64: Reload PTE after invoking walker "
          "callback on preorder traversal' (the walker freed a subtree, then walked it)",
          "__kvm_pgtable_visit descends into the table it read before the TABLE_PRE callback, "
          "which just replaced it by a block and (pKVM: at once) freed it"),
    Fault("stage2-mmu-seq-after-pfn", "stage2",
          "KVM/arm64 fixes for 6.3, part #2: 'KVM: arm64: Retry fault if vma_lookup() results "
          "become invalid' (read the MMU notifier seq before the lookup)",
          "user_mem_abort snapshots mmu_invalidate_seq after looking up the pfn, so an "
          "invalidation in between goes unseen and the stale pfn is mapped", concurrent=True),
)

CATALOG: dict[str, Fault] = {fault.name: fault for fault in _TDP_FAULTS + _STAGE2_FAULTS}

_active: frozenset = frozenset()


class UnknownFault(ValueError):
    """A fault name not in :data:`CATALOG`."""


def active(name: str) -> bool:
    """True while fault ``name`` is injected."""
    return name in _active


def check(names) -> frozenset:
    """Validate fault names against the catalog; return them as a set."""
    names = frozenset(n for n in names if n)
    unknown = sorted(names - CATALOG.keys())
    if unknown:
        known = ", ".join(sorted(CATALOG)) or "none"
        raise UnknownFault(f"unknown fault {', '.join(unknown)!s} (known: {known})")
    return names


@contextlib.contextmanager
def injected(names):
    """Inject the named faults for the duration of the ``with`` block."""
    global _active
    previous, _active = _active, check(names)
    try:
        yield
    finally:
        _active = previous

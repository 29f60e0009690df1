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

_SHADOW_FAULTS = (
    Fault("invlpg-keeps-mmio", "shadow",
          "thread [002] (Marcelo Tosatti on [PATCH v2 21/22] KVM: MMU: mmio page fault support, "
          "\"for shadow you need to remove mmio sptes on invlpg\"), fixed before merge as "
          "KVM commit ce88decffd17",
          "invlpg syncs the shadow-present SPTEs of the gva but skips an MMIO SPTE, so a gva "
          "the guest remapped from MMIO to RAM keeps exiting as MMIO"),
    Fault("sync-zero-check", "shadow",
          "thread [003] (SHADOW_NONPRESENT_VALUE replaces the hardcoded 0 initial SPTE)",
          "kvm_sync_spte tests spt[i] == 0 for an empty entry instead of "
          "SHADOW_NONPRESENT_VALUE, so a non-present entry is synced as if present: "
          "make_spte takes its pfn from the non-present value"),
    Fault("unsync-role-mismatch", "shadow",
          "thread [004] (kvm_mmu_find_shadow_page: \"Unsync pages must not be left as is, "
          "because the new upper-level page will be write-protected\")",
          "creating an upper-level shadow page for a gfn does not zap the unsync pages of "
          "that gfn with another role: an unsync page outlives its gfn's write protection"),
    Fault("shadow-hash-gfn-only", "shadow", "thread [004] (kvm_mmu_find_shadow_page)",
          "kvm_mmu_find_shadow_page matches on gfn alone, not gfn + role word: a shadow page "
          "of another level, directness or access is reused"),
    Fault("inherited-perms", "shadow",
          "KVM commit b1bd5cba3306 (CVE-2021-38198, \"KVM: X86: MMU: Use the correct "
          "inherited permissions to get shadow page\")",
          "FNAME(fetch) gets every intermediate shadow page with the access of the last "
          "non-leaf level instead of the access inherited down to that page"),
    Fault("guest-flush-no-sync", "shadow",
          "KVM commit b53e84eed08b (kvm_vcpu_flush_tlb_guest syncs the shadow roots)",
          "a guest TLB flush does not sync unsync shadow pages (kvm_mmu_sync_roots / "
          "kvm_mmu_sync_prev_roots skipped)"),
    Fault("sync-mmio-refresh", "shadow",
          "mainline arch/x86/kvm/mmu/paging_tmpl.h FNAME(sync_spte) -> sync_mmio_spte (found "
          "while building the shadow target; a candidate bug, not reported upstream)",
          "syncing an unsync page re-marks an MMIO SPTE of an older memslot generation with "
          "the current one, so a gfn a new memslot covers keeps exiting as MMIO"),
    Fault("mmio-spte-writable", "shadow",
          "mainline arch/x86/kvm/mmu/spte.c make_spte, the \"old SPTE was writable\" shortcut "
          "(is_last_spte(old_spte, level) && is_writable_pte(old_spte)); found by the shadow "
          "soak (seed 9148), a candidate bug, not reported upstream",
          "a 4K MMIO SPTE caching ACC_WRITE counts as a writable leaf, so the SPTE that replaces "
          "it (the gfn got a memslot) skips mmu_try_to_unsync_pages and is writable although "
          "the gfn is a write-tracked guest page table"),
)

CATALOG: dict[str, Fault] = {fault.name: fault for fault in _TDP_FAULTS + _SHADOW_FAULTS}

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

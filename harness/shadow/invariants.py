"""Structural invariants of the shadow MMU, one named function each.

The function name is the InvariantViolation name (part of a finding's
signature).  They are checked between ops, when no walk is in flight: they
read the live shadow pages (the hash), not what a root reaches, because
mmu.c keeps unreachable pages (still shadowing, still write-protecting).
"""

from __future__ import annotations

from mmufuzz.harness.ops import (PAGE_SHIFT, PAGES_PER_2M, PG_LEVEL_2M, PG_LEVEL_4K,
                                 PTE_ACCESSED, FlushTlb, Invlpg, Paging)
from mmufuzz.harness.shadow.mmu import kvm_mmu_page_get_gfn
from mmufuzz.harness.shadow.paging_tmpl import DUMMY_ROOT, gpte_access, is_rsvd_bits_set
from mmufuzz.harness.shadow.spte import (
    ACC_WRITE_MASK,
    PT64_ROOT_4LEVEL,
    PT_PAGE_SIZE_MASK,
    PT_PRESENT_MASK,
    SHADOW_NONPRESENT_VALUE,
    check_mmio_spte,
    describe_role,
    get_mmio_spte_gfn,
    is_last_spte,
    is_mmio_spte,
    is_shadow_present_pte,
    is_writable_pte,
    role_access,
    spte_to_pfn,
)
from mmufuzz.harness.target import InvariantViolation
from mmufuzz.harness.tdp.invariants import dirty_log_covers_writes, writable_leaf_logged
from mmufuzz.harness.tdp.pgalloc import used_entries
from mmufuzz.harness.tdp.spte import pages_per_level

_GFN_MASK = ((1 << 52) - 1) >> PAGE_SHIFT


def _fail(name: str, sp, detail: str):
    raise InvariantViolation(name, f"gfn={sp.gfn:#x} level={sp.level} "
                                   f"{describe_role(sp.role)} {detail}")


def _live(kvm) -> list:
    """``(sp, [(index, spte)...])`` of the valid shadow pages, hash order (roots being torn
    down are not live), with the entries that are not SHADOW_NONPRESENT_VALUE: read once
    for every invariant."""
    mmu = kvm.mmu
    return [(sp, [(i, sp.spt[i]) for i in used_entries(sp.spt)])
            for gfn in sorted(mmu.mmu_page_hash) for sp in mmu.mmu_page_hash[gfn]
            if not mmu.is_obsolete_sp(sp)]


def unique_gfn_role(kvm, pages: list) -> None:
    """No two live shadow pages share gfn + role (kvm_mmu_get_shadow_page reuses, never
    duplicates)."""
    seen = {}
    for sp, _ in pages:
        other = seen.setdefault((sp.gfn, sp.role), sp)
        if other is not sp:
            _fail("unique_gfn_role", sp, f"pfns={other.pfn:#x},{sp.pfn:#x}")


def nonpresent_value(kvm, pages: list) -> None:
    """Every non-present entry is SHADOW_NONPRESENT_VALUE or a last-level MMIO SPTE; no
    entry links a freed page."""
    for sp, entries in pages:
        for index, spte in entries:
            if is_shadow_present_pte(spte):
                if not is_last_spte(spte, sp.level) and kvm.mmu.sp_of(spte).freed:
                    _fail("nonpresent_value", sp, f"index={index} links a freed page")
            elif not (is_mmio_spte(spte) and sp.level == PG_LEVEL_4K):
                _fail("nonpresent_value", sp, f"index={index} spte={spte:#x}")


def rmaps_and_parents_match(kvm, pages: list) -> None:
    """The rmaps hold exactly the present leaves (under the gfn each maps, in the rmap of
    the leaf's level), and each page's parent_ptes exactly the present entries linking it."""
    mmu = kvm.mmu
    leaves, links = {}, {}
    for sp, entries in pages:
        for index, spte in entries:
            if not is_shadow_present_pte(spte):
                continue
            if is_last_spte(spte, sp.level):
                leaves[(sp, index)] = (sp.level, kvm_mmu_page_get_gfn(sp, index))
            else:
                links.setdefault(mmu.sp_of(spte), {})[(sp, index)] = None
    rmapped = {key: (level, gfn) for level in (PG_LEVEL_4K, PG_LEVEL_2M)
               for gfn, head in mmu.rmaps(level).items() for key in head}
    for (sp, index), (level, gfn) in leaves.items():
        if rmapped.get((sp, index)) != (level, gfn):
            found = rmapped.get((sp, index))
            _fail("rmaps_and_parents_match", sp, f"index={index} leaf for gfn={gfn:#x} "
                                                 f"rmapped as {found and found[1]}")
    for (sp, index), (_, gfn) in rmapped.items():
        if (sp, index) not in leaves:
            _fail("rmaps_and_parents_match", sp, f"index={index} rmap gfn={gfn:#x} "
                                                 "names no present leaf")
    for sp, _ in pages:
        if sp.parent_ptes.keys() != links.get(sp, {}).keys():
            _fail("rmaps_and_parents_match", sp, f"parent_ptes={len(sp.parent_ptes)} "
                                                 f"links={len(links.get(sp, {}))}")


def unsync_bits_agree(kvm, pages: list) -> None:
    """Only last-level indirect pages on untracked gfns are unsync; unsync_children counts
    the bitmap; every present link to a page that is (or leads to) unsync has its bit."""
    mmu = kvm.mmu
    for sp, entries in pages:
        if sp.unsync and (sp.direct or sp.level != PG_LEVEL_4K
                          or mmu.kvm_gfn_is_write_tracked(sp.gfn)):
            _fail("unsync_bits_agree", sp, "unsync but not an untracked last-level page")
        if sp.unsync_children != bin(sp.unsync_child_bitmap).count("1"):
            _fail("unsync_bits_agree", sp, f"unsync_children={sp.unsync_children} "
                                           f"bitmap={sp.unsync_child_bitmap:#x}")
        for index, spte in entries:
            if not is_shadow_present_pte(spte) or is_last_spte(spte, sp.level):
                continue
            child = mmu.sp_of(spte)
            if (child.unsync or child.unsync_children) and not sp.unsync_child_bitmap >> index & 1:
                _fail("unsync_bits_agree", sp, f"index={index} leads to unsync pages, bit clear")


def synced_gfn_write_protected(kvm, pages: list) -> None:
    """The gfn of every synced indirect page is mapped read-only everywhere, and an
    upper-level page's gfn is write-tracked."""
    mmu = kvm.mmu
    for sp, _ in pages:
        if sp.direct or sp.unsync:
            continue
        if sp.level > PG_LEVEL_4K and not mmu.kvm_gfn_is_write_tracked(sp.gfn):
            _fail("synced_gfn_write_protected", sp, "upper-level page, gfn not tracked")
        for other, index in mmu.gfn_rmap_entries(sp.gfn):
            if is_writable_pte(other.spt[index]):
                _fail("synced_gfn_write_protected", sp,
                      f"writable SPTE in gfn={other.gfn:#x} index={index}")


def synced_shadow_matches_guest(kvm, pages: list) -> None:
    """Every entry of a synced indirect page agrees with the guest PTE it shadows: a leaf
    maps that PTE's gfn with at most its access; a link goes to the page of that table
    with the access inherited down the path (role.access)."""
    vcpu = kvm.vcpus[0]
    for sp, entries in pages:
        if sp.direct or sp.unsync:
            continue
        for index, spte in entries:
            gpte = vcpu.read_guest((sp.gfn << PAGE_SHIFT) + 8 * index)
            if gpte is None or not gpte & PT_PRESENT_MASK or is_rsvd_bits_set(gpte, sp.level):
                _fail("synced_shadow_matches_guest", sp, f"index={index} shadows an "
                                                         f"absent guest PTE {gpte}")
            gfn = (gpte >> PAGE_SHIFT) & _GFN_MASK
            access = role_access(sp.role) & gpte_access(gpte)
            if is_mmio_spte(spte):
                ok = get_mmio_spte_gfn(spte) == gfn
            elif is_last_spte(spte, sp.level):
                ok = (kvm_mmu_page_get_gfn(sp, index) == gfn
                      and (sp.level == PG_LEVEL_4K or gpte & PT_PAGE_SIZE_MASK)
                      and (access & ACC_WRITE_MASK or not is_writable_pte(spte)))
            else:
                child = kvm.mmu.sp_of(spte)
                if gpte & PT_PAGE_SIZE_MASK:
                    gfn &= -pages_per_level(sp.level)
                ok = (child.gfn == gfn and role_access(child.role) == access
                      and child.direct == bool(gpte & PT_PAGE_SIZE_MASK))
            if not ok:
                _fail("synced_shadow_matches_guest", sp,
                      f"index={index} spte={spte:#x} gpte={gpte:#x}")


def leaf_pfn_matches_backing(kvm, pages: list) -> None:
    """Every present leaf maps its gfn to the slot's current page, writable only if allowed;
    every TLB entry too (only the guest's part of a translation may be stale)."""
    def check(what, gfn, pfn, writable):
        slot = kvm.memslots.lookup(gfn)
        if slot is None or slot.backing.pfn(gfn - slot.base_gfn) != pfn or (
                writable and slot.readonly):
            raise InvariantViolation("leaf_pfn_matches_backing",
                                     f"{what} gfn={gfn:#x} pfn={pfn:#x}")

    for sp, entries in pages:
        for index, spte in entries:
            if is_shadow_present_pte(spte) and is_last_spte(spte, sp.level):
                gfn = kvm_mmu_page_get_gfn(sp, index)
                for offset in ((0, PAGES_PER_2M - 1) if sp.level > PG_LEVEL_4K else (0,)):
                    check(f"sp gfn={sp.gfn:#x} index={index}", gfn + offset,
                          spte_to_pfn(spte) + offset, is_writable_pte(spte))
    for vcpu in kvm.vcpus:
        for tlb in (vcpu.tlb_linear, vcpu.tlb_phys):
            for page, (pfn, writable, _, gpa_page) in sorted(tlb.items()):
                check(f"vcpu={vcpu.index} tlb page={page:#x}", gpa_page >> PAGE_SHIFT, pfn,
                      writable)


def huge_leaf_allowed(kvm, pages: list) -> None:
    """A 2M leaf was allowed when it was made (one host 2M page inside its slot, no
    shadowed gfn in it, no dirty logging) and stays writable only while that holds:
    shadowing a gfn in it or starting dirty logging write-protects it, and an
    invalidation or a memslot change zaps it."""
    mmu = kvm.mmu
    for sp, entries in pages:
        if sp.level == PG_LEVEL_4K:
            continue
        for index, spte in entries:
            if not is_shadow_present_pte(spte) or not is_last_spte(spte, sp.level):
                continue
            gfn = kvm_mmu_page_get_gfn(sp, index)
            slot = kvm.memslots.lookup(gfn)
            if slot is None or not slot.hugepage_inside(gfn) or (
                    slot.backing.host_level(gfn - slot.base_gfn) < PG_LEVEL_2M):
                _fail("huge_leaf_allowed", sp, f"index={index} gfn={gfn:#x} not one host 2M "
                                               "page in one slot")
            # With initially-set bitmaps a writable 2M leaf may stay in a logging slot;
            # dirty_log_write_protected checks it cannot take unlogged writes.
            logged = slot.dirty is not None and not kvm.dirty_log.initially_set
            if is_writable_pte(spte) and (logged or gfn // PAGES_PER_2M in mmu.lpage_disallowed):
                _fail("huge_leaf_allowed", sp, f"index={index} gfn={gfn:#x} writable over a "
                                               "shadowed or dirty-logged 2M range")


def flushed_roots_synced(kvm, pages: list) -> None:
    """A guest TLB flush leaves no unsync page under the vCPU's current and previous roots
    (kvm_vcpu_flush_tlb_guest: kvm_mmu_sync_roots, kvm_mmu_sync_prev_roots), a CR3 load none
    under the new current root (KVM_REQ_MMU_SYNC), unless a page went unsync under a root
    (an unsync_child_bitmap bit was set) since that flush or load began: the guest's
    flush must make every later write it did to its tables visible."""
    mmu = kvm.mmu
    for vcpu in kvm.vcpus:
        if vcpu.synced_since is None or vcpu.synced_since[0] != mmu.unsync_marks:
            continue
        roots = [vcpu.root] + ([root for _, root in vcpu.prev_roots] if vcpu.synced_since[1]
                               else [])
        for root in roots:
            if (root is not None and root is not DUMMY_ROOT and not mmu.is_obsolete_sp(root)
                    and (root.unsync or root.unsync_children)):
                _fail("flushed_roots_synced", root, f"vcpu={vcpu.index} unsync_children="
                                                    f"{root.unsync_children} after its flush")


def unsync_entry_agrees(kvm, vcpu, sp, index: int, spte: int) -> bool:
    """Whether entry ``index`` (not SHADOW_NONPRESENT_VALUE) of unsync page ``sp`` is what
    kvm_sync_spte leaves for the guest PTE now in memory: a leaf maps that PTE's gfn with
    at most its access, an MMIO SPTE names that gfn in the current generation, and an
    invalid guest PTE has no SPTE."""
    gpte = vcpu.read_guest((sp.gfn << PAGE_SHIFT) + 8 * index)
    if gpte is None:
        gpte = 0  # no slot: sync zaps the entry as for a non-present PTE
    valid = (gpte and gpte & PT_PRESENT_MASK and gpte & PTE_ACCESSED
             and not is_rsvd_bits_set(gpte, sp.level))
    gfn = (gpte >> PAGE_SHIFT) & _GFN_MASK if valid else None
    if is_mmio_spte(spte):
        return gfn == get_mmio_spte_gfn(spte) and check_mmio_spte(spte, kvm.memslots.generation)
    access = role_access(sp.role) & gpte_access(gpte) if valid else 0
    return gfn == kvm_mmu_page_get_gfn(sp, index) and bool(
        access & ACC_WRITE_MASK or not is_writable_pte(spte))


def invalidated_gva_synced(kvm, invlpg) -> None:
    """Right after an ``invlpg`` (not one half of a ``parallel``: the other half may write
    the tables), every unsync page on the gva's path in the vCPU's current and previous
    roots agrees with the guest at the gva's entry: kvm_mmu_invalidate_addr syncs it
    (kvm_sync_spte): :func:`unsync_entry_agrees`."""
    vcpu = kvm.vcpus[invlpg.vcpu]
    if vcpu.cr3 is None:
        return
    mmu, gva = kvm.mmu, invlpg.gva
    for root in [vcpu.root] + [root for _, root in vcpu.prev_roots]:
        if root is None or root is DUMMY_ROOT or mmu.is_obsolete_sp(root):
            continue
        sp, level = root, PT64_ROOT_4LEVEL
        while True:
            index = (gva >> (PAGE_SHIFT + 9 * (level - 1))) & 511
            spte = sp.spt[index]
            if (sp.unsync and spte != SHADOW_NONPRESENT_VALUE
                    and not unsync_entry_agrees(kvm, vcpu, sp, index, spte)):
                gpte = vcpu.read_guest((sp.gfn << PAGE_SHIFT) + 8 * index) or 0
                _fail("invalidated_gva_synced", sp, f"vcpu={vcpu.index} gva={gva:#x} "
                                                    f"index={index} spte={spte:#x} gpte={gpte:#x}")
            if not is_shadow_present_pte(spte) or is_last_spte(spte, level):
                break
            sp, level = mmu.sp_of(spte), level - 1


def mmio_current_gen_has_no_slot(kvm, pages: list) -> None:
    """An MMIO SPTE or a vCPU's MMIO cache of the current memslot generation names a gfn
    no memslot covers: the generation is what keeps a cached "no slot here" from
    outliving a memslot update (check_mmio_spte, vcpu_match_mmio_gen)."""
    memslots = kvm.memslots
    if memslots.update_in_progress:
        return
    for sp, entries in pages:
        for index, spte in entries:
            if (is_mmio_spte(spte) and check_mmio_spte(spte, memslots.generation)
                    and memslots.lookup(get_mmio_spte_gfn(spte)) is not None):
                _fail("mmio_current_gen_has_no_slot", sp, f"index={index} spte={spte:#x} "
                                                          "names a gfn with a memslot")
    for vcpu in kvm.vcpus:
        if ((vcpu.mmio_gva or vcpu.mmio_gfn) and vcpu.mmio_gen == memslots.generation
                and memslots.lookup(vcpu.mmio_gfn) is not None):
            raise InvariantViolation("mmio_current_gen_has_no_slot",
                                     f"vcpu={vcpu.index} mmio cache gfn={vcpu.mmio_gfn:#x} "
                                     "has a memslot")


def dirty_log_write_protected(kvm, pages: list) -> None:
    """No writable leaf of a logging slot maps a page whose dirty bit is clear (tdp's)."""
    if not kvm.memslots.logging:
        return
    for sp, entries in pages:
        for index, spte in entries:
            if (is_shadow_present_pte(spte) and is_last_spte(spte, sp.level)
                    and is_writable_pte(spte)):
                writable_leaf_logged(kvm, kvm_mmu_page_get_gfn(sp, index),
                                     pages_per_level(sp.level),
                                     f"{describe_role(sp.role)} index={index}")


INVARIANTS = (unique_gfn_role, nonpresent_value, rmaps_and_parents_match, unsync_bits_agree,
              synced_gfn_write_protected, synced_shadow_matches_guest, leaf_pfn_matches_backing,
              huge_leaf_allowed, flushed_roots_synced, mmio_current_gen_has_no_slot,
              dirty_log_write_protected)


def check_invariants(kvm) -> None:
    """Raise InvariantViolation for the first invariant that does not hold."""
    pages = _live(kvm)
    for invariant in INVARIANTS:
        invariant(kvm, pages)
    dirty_log_covers_writes(kvm, None)


def newly_tracked_gfns_synced(kvm) -> None:
    """No gfn an upper-level page began to write-track during the op has an unsync page
    (unsync_bits_agree for those gfns): kvm_mmu_find_shadow_page zaps them, "Unsync pages
    must not be left as is, because the new upper-level page will be write-protected"."""
    mmu = kvm.mmu
    gfns, mmu.newly_tracked = mmu.newly_tracked, []
    for gfn in gfns:
        if mmu.kvm_gfn_is_write_tracked(gfn):
            for sp in mmu.sps_with_gptes(gfn):
                if sp.unsync:
                    _fail("unsync_bits_agree", sp, "unsync but not an untracked last-level page")


def check_postcondition(kvm, op) -> None:
    """Raise InvariantViolation if ``op``, which just returned, broke what it promised.

    The target checks this at the end of every op, not when the campaign samples its
    invariants: the next op may legitimately undo what this one promised (write the
    guest table again, make a page unsync, zap the page), so a check after a program's
    last op would see the broken promise only where the op came last.  Any op: a gfn
    that became write-tracked keeps no unsync page (:func:`newly_tracked_gfns_synced`).
    An ``invlpg`` (:func:`invalidated_gva_synced`), a guest TLB flush or a CR3 load
    (:func:`flushed_roots_synced`) that is not one side of a ``parallel`` (another side
    may undo it at once): what it promises the guest.
    """
    newly_tracked_gfns_synced(kvm)
    kind = type(op)
    if kind is Invlpg:
        invalidated_gva_synced(kvm, op)
    elif kind is FlushTlb or kind is Paging:
        flushed_roots_synced(kvm, ())

"""mmu.c's shadow MMU: shadow pages in a gfn hash, rmaps, parent pointers, zap, unsync/sync.

A shadow page (``struct kvm_mmu_page``) is identified by the guest frame it
shadows plus its role word; :meth:`ShadowMmu.kvm_mmu_get_shadow_page` finds
one with exactly that pair or makes one.  Every present leaf SPTE is in the
rmap of the gfn it maps, and every SPTE linking a child is in the child's
``parent_ptes``: zap, write protection and unsync all navigate by these, as
mmu.c does, never by walking from the roots.

A guest page table that has a shadow page is write-protected (every SPTE
mapping its gfn loses W) so that KVM sees the guest change it.  An upper-level
table stays protected (gfn write tracking: guest writes are emulated and
reach ``kvm_mmu_track_write``); a last-level table may go *unsync*: the guest
writes it freely and KVM re-reads it (``kvm_sync_page``) when the guest
flushes its TLB, loads CR3 or invlpgs.

The shadow MMU runs under ``mmu_lock`` held for write; only the hardware walk
of the shadow tables is lockless, so zapped pages are freed after the TLB
flush that follows the zap (``kvm_mmu_commit_zap_page``) and a walk in flight
is aborted by that flush.
"""

from __future__ import annotations

from mmufuzz.harness import faults
from mmufuzz.harness.ops import PAGES_PER_2M, PG_LEVEL_4K
from mmufuzz.harness.shadow.events import (FIND_OTHER_ROLE, MMIO_SPTE_DIRECT, MMIO_SPTE_SYNC,
                                           MMIO_SPTE_UNSYNC, UNSYNC_HELD_LEAVES,
                                           UNSYNC_HELD_MMIO)
from mmufuzz.harness.shadow.spte import (
    ACC_WRITE_MASK,
    ROLE_INVALID,
    SHADOW_NONPRESENT_VALUE,
    is_last_spte,
    is_mmio_spte,
    is_mmu_writable_spte,
    is_shadow_present_pte,
    is_writable_pte,
    kvm_mmu_child_role,
    make_leaf_spte,
    make_mmio_spte,
    make_nonleaf_spte,
    role_access,
    role_direct,
    role_level,
    spte_clear_mmu_writable,
    spte_make_writable,
    spte_to_pfn,
    spte_write_protect,
)
from mmufuzz.harness.tdp.lpage import max_mapping_level
from mmufuzz.harness.tdp.pgalloc import TablePage, used_entries
from mmufuzz.harness.tdp.spte import pages_per_level

# KVM's RET_PF_* values the shadow paths return.
RET_PF_CONTINUE, RET_PF_RETRY, RET_PF_EMULATE, RET_PF_WRITE_PROTECTED = 0, 1, 2, 3
RET_PF_INVALID, RET_PF_FIXED, RET_PF_SPURIOUS = 4, 5, 6

# kvm_mmu_get_child_sp's ERR_PTR(-EEXIST): the entry already links a table.
EEXIST = "eexist"


class KvmMmuPage(TablePage):
    """struct kvm_mmu_page: a table of SPTEs (the TablePage) plus the shadow MMU's books.

    ``shadowed_translation``: index -> ``gfn << 12 | access`` of each leaf of an
    indirect page (what the guest PTE said when the SPTE was made).
    ``parent_ptes``: the ``(parent page, index)`` entries linking this page,
    as an insertion-ordered dict (determinism: never iterate a set of objects).
    ``unsync_child_bitmap``: bit i set when entry i leads to unsync pages.
    """

    __slots__ = ("mmu_valid_gen", "parent_ptes", "role", "root_count", "shadowed_translation",
                 "unsync", "unsync_child_bitmap", "unsync_children", "write_flooding_count")

    def __init__(self, pfn: int, gfn: int, role: int, gen: int):
        super().__init__(pfn, role_level(role), gfn, False)
        self.role = role
        self.mmu_valid_gen = gen
        self.shadowed_translation: dict[int, int] = {}
        self.parent_ptes: dict = {}
        self.root_count = 0
        self.unsync = False
        self.unsync_children = 0
        self.unsync_child_bitmap = 0
        self.write_flooding_count = 0

    @property
    def direct(self) -> bool:
        return role_direct(self.role)

    @property
    def invalid(self) -> bool:
        return self.role & ROLE_INVALID != 0

    def __getstate__(self) -> tuple:
        return (super().__getstate__(), self.role, self.mmu_valid_gen, self.shadowed_translation,
                self.parent_ptes, self.root_count, self.unsync, self.unsync_children,
                self.unsync_child_bitmap, self.write_flooding_count)

    def __setstate__(self, state: tuple) -> None:
        (table, self.role, self.mmu_valid_gen, self.shadowed_translation, self.parent_ptes,
         self.root_count, self.unsync, self.unsync_children, self.unsync_child_bitmap,
         self.write_flooding_count) = state
        super().__setstate__(table)

    def __repr__(self) -> str:
        return f"KvmMmuPage(gfn={self.gfn:#x} role={self.role:#x} pfn={self.pfn:#x})"


def kvm_mmu_page_get_gfn(sp: KvmMmuPage, index: int) -> int:
    """The gfn entry ``index`` of ``sp`` maps (direct: computed; indirect: shadowed)."""
    if sp.direct:
        return sp.gfn + index * pages_per_level(sp.level)
    return sp.shadowed_translation.get(index, 0) >> 12


def kvm_mmu_page_get_access(sp: KvmMmuPage, index: int) -> int:
    if sp.direct:
        return role_access(sp.role)
    return sp.shadowed_translation.get(index, 0) & 0x7


class ShadowMmu:
    """The VM-wide shadow MMU state of struct kvm_arch and the mmu.c functions on it."""

    def __init__(self, kvm):
        self.kvm = kvm
        self.alloc = kvm.pgalloc
        # mmu_page_hash, one chain per gfn (KVM hashes gfns into 4096 buckets and
        # compares sp->gfn first; the chains' contents are the same).
        self.mmu_page_hash: dict[int, list[KvmMmuPage]] = {}
        self.active_mmu_pages: dict[KvmMmuPage, None] = {}
        self.mmu_valid_gen = 0
        # The rmaps: gfn -> {(sp, index): None} of present 4K leaves (slot->arch.rmap[0]),
        # and 2M-aligned gfn -> the same of present 2M leaves (slot->arch.rmap[1]).
        self.rmap: dict[int, dict] = {}
        self.rmap_2m: dict[int, dict] = {}
        # lpage_info's disallow_lpage counts that shadowing adds: 2M frame (gfn >> 9) ->
        # indirect pages shadowing a gfn in it (kvm_mmu_gfn_disallow_lpage).
        self.lpage_disallowed: dict[int, int] = {}
        # gfn_write_track: upper-level pages shadowing each gfn (page_track.c).
        self.gfn_write_track: dict[int, int] = {}
        self.indirect_shadow_pages = 0
        # How many unsync_child_bitmap bits were ever set (not KVM: the invariant
        # flushed_roots_synced asks whether a page went unsync under a root since a flush).
        self.unsync_marks = 0
        # Not KVM: the gfns an upper-level page began to write-track during the current op,
        # for the op's postcondition (harness.shadow.invariants.check_postcondition).
        self.newly_tracked: list = []

    # --- lookup ---------------------------------------------------------------

    def sp_of(self, spte: int) -> KvmMmuPage:
        """spte_to_child_sp: the shadow page a non-leaf SPTE links."""
        return self.alloc.pages[spte_to_pfn(spte)]

    def is_obsolete_sp(self, sp: KvmMmuPage) -> bool:
        return sp.invalid or sp.mmu_valid_gen != self.mmu_valid_gen

    def valid_sps(self, gfn: int) -> list:
        """for_each_valid_sp on gfn's chain (a copy: zapping may change it)."""
        return [sp for sp in self.mmu_page_hash.get(gfn, ()) if not self.is_obsolete_sp(sp)]

    def sps_with_gptes(self, gfn: int) -> list:
        """for_each_gfn_valid_sp_with_gptes: the indirect pages shadowing gfn."""
        return [sp for sp in self.valid_sps(gfn) if not sp.direct]

    def kvm_mmu_find_shadow_page(self, vcpu, gfn: int, role: int, invalid_list: list):
        """The live page for ``gfn`` + ``role``, synced if it was unsync; else None.

        Unsync pages of the gfn with another role are zapped when an upper-level
        page is wanted: that page write-protects the gfn, and an unsync page must
        not outlive its gfn's protection.
        """
        found = None
        for sp in self.valid_sps(gfn):
            if sp.role != role and not faults.active("shadow-hash-gfn-only"):
                if not (sp.direct or role_direct(role)):
                    self.kvm.events[FIND_OTHER_ROLE + 8 * (role_level(role) - 1)
                                    + 2 * (sp.level - 1) + sp.unsync] += 1
                if (role_level(role) > PG_LEVEL_4K and sp.unsync
                        and not faults.active("unsync-role-mismatch")):
                    self.kvm_mmu_prepare_zap_page(sp, invalid_list)
                continue
            if sp.direct:
                found = sp
                break
            if sp.unsync:
                # Synced for this use but left unsync (and writable) until the guest
                # flushes: kvm_sync_page, unlike mmu_sync_children, protects nothing.
                ret = vcpu.kvm_sync_page(sp, invalid_list)
                if ret < 0:
                    break  # zapped: make a new one
                if ret > 0:
                    self.kvm_flush_remote_tlbs()
            sp.write_flooding_count = 0
            found = sp
            break
        self.kvm_mmu_commit_zap_page(invalid_list)
        return found

    def kvm_mmu_alloc_shadow_page(self, gfn: int, role: int) -> KvmMmuPage:
        sp = KvmMmuPage(self.kvm.host.alloc(1), gfn, role, self.mmu_valid_gen)
        self.alloc.pages[sp.pfn] = sp
        self.active_mmu_pages[sp] = None
        self.mmu_page_hash.setdefault(gfn, []).insert(0, sp)
        if not sp.direct:
            self.account_shadowed(sp)
        return sp

    def kvm_mmu_get_shadow_page(self, vcpu, gfn: int, role: int) -> KvmMmuPage:
        sp = self.kvm_mmu_find_shadow_page(vcpu, gfn, role, [])
        return sp if sp is not None else self.kvm_mmu_alloc_shadow_page(gfn, role)

    def kvm_mmu_get_child_sp(self, vcpu, parent: KvmMmuPage, index: int, gfn: int,
                             direct: bool, access: int):
        """The page entry ``index`` of ``parent`` should link, or EEXIST if it links one."""
        spte = parent.spt[index]
        if is_shadow_present_pte(spte) and not is_last_spte(spte, parent.level):
            return EEXIST
        role = kvm_mmu_child_role(parent.role, direct, access)
        return self.kvm_mmu_get_shadow_page(vcpu, gfn, role)

    def link_shadow_page(self, parent: KvmMmuPage, index: int, sp: KvmMmuPage) -> None:
        """__link_shadow_page: point entry ``index`` at ``sp``; propagate its unsync state."""
        old = parent.spt[index]
        if is_shadow_present_pte(old):  # a leaf being replaced by a table: drop it first
            self.drop_spte(parent, index)
            self.kvm_flush_remote_tlbs()
        elif is_mmio_spte(old):
            parent.spt[index] = SHADOW_NONPRESENT_VALUE
        parent.spt[index] = make_nonleaf_spte(sp.pfn)
        sp.parent_ptes[(parent, index)] = None
        if sp.unsync_children or sp.unsync:
            self.mark_unsync(parent, index)

    # --- rmaps and single SPTEs -----------------------------------------------

    def rmaps(self, level: int) -> dict:
        """The rmap heads of one level (gfn_to_rmap): 4K, or 2M keyed by the aligned gfn."""
        return self.rmap if level == PG_LEVEL_4K else self.rmap_2m

    def rmap_add(self, sp: KvmMmuPage, index: int, gfn: int, access: int) -> None:
        if not sp.direct:
            sp.shadowed_translation[index] = (gfn << 12) | access
        self.rmaps(sp.level).setdefault(gfn, {})[(sp, index)] = None

    def rmap_remove(self, sp: KvmMmuPage, index: int) -> None:
        gfn = kvm_mmu_page_get_gfn(sp, index)
        rmaps = self.rmaps(sp.level)
        head = rmaps[gfn]
        del head[(sp, index)]
        if not head:
            del rmaps[gfn]

    def gfn_rmap_entries(self, gfn: int) -> list:
        """Every present leaf mapping ``gfn``: its 4K rmap, then its 2M frame's."""
        return [*self.rmap.get(gfn, ()), *self.rmap_2m.get(gfn & -PAGES_PER_2M, ())]

    def drop_spte(self, sp: KvmMmuPage, index: int) -> None:
        """mmu_spte_clear_track_bits + rmap_remove."""
        old = sp.spt[index]
        sp.spt[index] = SHADOW_NONPRESENT_VALUE
        if is_shadow_present_pte(old):
            self.rmap_remove(sp, index)

    def drop_parent_pte(self, child: KvmMmuPage, parent: KvmMmuPage, index: int) -> None:
        del child.parent_ptes[(parent, index)]
        parent.spt[index] = SHADOW_NONPRESENT_VALUE

    def mmu_page_zap_pte(self, sp: KvmMmuPage, index: int) -> bool:
        """Clear one entry of ``sp``: a leaf, a link (unlinking the child) or an MMIO SPTE.

        Returns whether a present entry was cleared (a TLB flush is due).
        """
        spte = sp.spt[index]
        if is_shadow_present_pte(spte):
            if is_last_spte(spte, sp.level):
                self.drop_spte(sp, index)
            else:
                self.drop_parent_pte(self.sp_of(spte), sp, index)
            return True
        if is_mmio_spte(spte):
            sp.spt[index] = SHADOW_NONPRESENT_VALUE
        return False

    def make_spte(self, sp: KvmMmuPage, slot, pte_access: int, gfn: int, pfn: int,
                  old_spte: int, prefetch: bool, synchronizing: bool, host_writable: bool,
                  level: int = PG_LEVEL_4K):
        """spte.c make_spte: ``(wrprot, spte)``; a shadowed gfn is mapped read-only.

        Asking for W on a gfn that has shadow pages either unsyncs them (last-level
        ones only) or, if the gfn is write-tracked, drops W (``wrprot``): the write
        that wanted it will be emulated.
        """
        if not host_writable:
            pte_access &= ~ACC_WRITE_MASK
        spte = make_leaf_spte(pfn, pte_access, host_writable, level)
        wrprot = False
        if pte_access & ACC_WRITE_MASK:
            spte = spte_make_writable(spte)
            if not self._old_leaf_writable(old_spte) and self.mmu_try_to_unsync_pages(
                    gfn, synchronizing, prefetch):
                wrprot = True
                spte = spte_clear_mmu_writable(spte)
        if is_writable_pte(spte):
            self.kvm.dirty_log.mark_page_dirty_in_slot(gfn)
        return wrprot, spte

    @staticmethod
    def _old_leaf_writable(old_spte: int) -> bool:
        """make_spte's shortcut: overwriting a writable leaf needs no unsync check.

        Not mainline: an MMIO SPTE is no leaf.  Mainline tests
        ``is_last_spte(old, level) && is_writable_pte(old)``, true for a 4K MMIO
        SPTE that caches ACC_WRITE (bit 1), so the leaf replacing it is made
        writable even on a write-tracked gfn (the mmio-spte-writable fault).
        """
        if faults.active("mmio-spte-writable"):
            return is_writable_pte(old_spte)
        return is_shadow_present_pte(old_spte) and is_writable_pte(old_spte)

    def mmu_spte_update(self, sp: KvmMmuPage, index: int, new: int) -> bool:
        """Write a leaf; True if the change needs a TLB flush (lost W or another pfn)."""
        old = sp.spt[index]
        sp.spt[index] = new
        if not is_shadow_present_pte(old):
            return False
        return spte_to_pfn(old) != spte_to_pfn(new) or (
            is_writable_pte(old) and not is_writable_pte(new))

    def mmu_set_spte(self, sp: KvmMmuPage, index: int, pte_access: int, fault) -> int:
        """Install the leaf of ``fault`` (a KvmPageFault; ``pfn`` None: an MMIO SPTE) at
        ``sp``'s level: a huge one maps the aligned gfn and pfn (kvm_mmu_hugepage_adjust)."""
        slot, gfn, pfn = fault.slot, fault.gfn & -pages_per_level(sp.level), fault.pfn
        old = sp.spt[index]
        flush = False
        was_rmapped = False
        if pfn is None:
            if is_shadow_present_pte(old):  # KVM would WARN in mmu_spte_set
                self.drop_spte(sp, index)
                self.kvm_flush_remote_tlbs()
            sp.spt[index] = make_mmio_spte(gfn, pte_access, fault.gen)
            self.kvm.events[MMIO_SPTE_DIRECT if sp.direct else
                            MMIO_SPTE_UNSYNC if sp.unsync else MMIO_SPTE_SYNC] += 1
            return RET_PF_EMULATE
        if is_shadow_present_pte(old):
            if not is_last_spte(old, sp.level):
                self.drop_parent_pte(self.sp_of(old), sp, index)
                flush = True
            elif pfn != spte_to_pfn(old):
                self.drop_spte(sp, index)
                flush = True
            else:
                was_rmapped = True
        wrprot, spte = self.make_spte(sp, slot, pte_access, gfn, pfn, sp.spt[index],
                                      fault.prefetch, False, fault.map_writable, sp.level)
        ret = RET_PF_FIXED
        if sp.spt[index] == spte:
            ret = RET_PF_SPURIOUS
        else:
            flush |= self.mmu_spte_update(sp, index, spte)
        if wrprot and fault.write:
            ret = RET_PF_WRITE_PROTECTED
        if flush:
            self.kvm_flush_remote_tlbs()
        if not was_rmapped:
            self.rmap_add(sp, index, gfn, pte_access)
        elif not sp.direct:
            sp.shadowed_translation[index] = (gfn << 12) | pte_access
        return ret

    # --- write protection and tracking (page_track.c) ----------------------------

    def kvm_gfn_is_write_tracked(self, gfn: int) -> bool:
        return self.gfn_write_track.get(gfn, 0) > 0

    def rmap_write_protect(self, gfn: int, pt_protect: bool) -> bool:
        """Write-protect every SPTE mapping ``gfn``; True if one changed (flush due).

        ``pt_protect`` (shadowing a table) also clears MMU-writable, so no fast
        path restores W; dirty logging keeps it.
        """
        changed = False
        for sp, index in self.gfn_rmap_entries(gfn):
            spte = sp.spt[index]
            if not (is_writable_pte(spte) or (pt_protect and is_mmu_writable_spte(spte))):
                continue
            new = spte_clear_mmu_writable(spte) if pt_protect else spte_write_protect(spte)
            changed |= self.mmu_spte_update(sp, index, new)
        return changed

    def account_shadowed(self, sp: KvmMmuPage) -> None:
        """A guest table gained a shadow page: no huge page may map its gfn
        (kvm_mmu_gfn_disallow_lpage), its gfn is write-protected at every level (a huge
        SPTE over it too: kvm_mmu_slot_gfn_write_protect) and tracked if upper."""
        self.indirect_shadow_pages += 1
        frame = sp.gfn // PAGES_PER_2M
        self.lpage_disallowed[frame] = self.lpage_disallowed.get(frame, 0) + 1
        if sp.level > PG_LEVEL_4K:
            if not self.kvm_gfn_is_write_tracked(sp.gfn):
                self.newly_tracked.append(sp.gfn)
            self.gfn_write_track[sp.gfn] = self.gfn_write_track.get(sp.gfn, 0) + 1
        if self.rmap_write_protect(sp.gfn, True):
            self.kvm_flush_remote_tlbs()

    def unaccount_shadowed(self, sp: KvmMmuPage) -> None:
        self.indirect_shadow_pages -= 1
        frame = sp.gfn // PAGES_PER_2M
        count = self.lpage_disallowed[frame] - 1
        if count:
            self.lpage_disallowed[frame] = count
        else:
            del self.lpage_disallowed[frame]
        if sp.level > PG_LEVEL_4K:
            count = self.gfn_write_track[sp.gfn] - 1
            if count:
                self.gfn_write_track[sp.gfn] = count
            else:
                del self.gfn_write_track[sp.gfn]

    # --- unsync ---------------------------------------------------------------

    def mark_unsync(self, parent: KvmMmuPage, index: int) -> None:
        bit = 1 << index
        if parent.unsync_child_bitmap & bit:
            return
        parent.unsync_child_bitmap |= bit
        parent.unsync_children += 1
        self.unsync_marks += 1
        if parent.unsync_children == 1:
            self.kvm_mmu_mark_parents_unsync(parent)

    def kvm_mmu_mark_parents_unsync(self, sp: KvmMmuPage) -> None:
        for parent, index in list(sp.parent_ptes):
            self.mark_unsync(parent, index)

    def kvm_unsync_page(self, sp: KvmMmuPage) -> None:
        """Let the guest write ``sp``'s table freely until its next flush.

        The page keeps its entries, as KVM's does: they matched the guest PTEs
        when it went unsync (it was write-protected until then), and once the
        guest rewrites a PTE they are translations that were valid since the
        vCPU's last flush, which x86 lets a TLB keep (docs/semantics.md §F).
        """
        sp.unsync = True
        self.kvm_mmu_mark_parents_unsync(sp)
        events = self.kvm.events
        for index in used_entries(sp.spt):
            events[UNSYNC_HELD_LEAVES if is_shadow_present_pte(sp.spt[index])
                   else UNSYNC_HELD_MMIO] += 1

    def kvm_unlink_unsync_page(self, sp: KvmMmuPage) -> None:
        sp.unsync = False

    def mmu_try_to_unsync_pages(self, gfn: int, synchronizing: bool, prefetch: bool) -> bool:
        """True (KVM: -EPERM/-EEXIST) if ``gfn`` must stay read-only; else unsync its pages."""
        if self.kvm_gfn_is_write_tracked(gfn):
            return True
        for sp in self.sps_with_gptes(gfn):
            if synchronizing:
                return True
            if sp.unsync:
                continue
            if prefetch:
                return True
            self.kvm_unsync_page(sp)
        return False

    def mmu_unsync_walk(self, parent: KvmMmuPage, pages: list) -> int:
        """__mmu_unsync_walk: collect the unsync pages below ``parent`` (stale bits cleared)."""
        found = 0
        bitmap = parent.unsync_child_bitmap
        while bitmap:
            low = bitmap & -bitmap
            bitmap ^= low
            index = low.bit_length() - 1
            ent = parent.spt[index]
            if not is_shadow_present_pte(ent) or is_last_spte(ent, parent.level):
                self.clear_unsync_child_bit(parent, index)
                continue
            child = self.sp_of(ent)
            if child.unsync_children:
                below = self.mmu_unsync_walk(child, pages)
                if not below:
                    self.clear_unsync_child_bit(parent, index)
                found += below
            elif child.unsync:
                # mmu_pages_add: a page two entries name (a table linked twice) goes in once,
                # or the zap of unsync children would free it twice.
                if child not in pages:
                    pages.append(child)
                found += 1
            else:
                self.clear_unsync_child_bit(parent, index)
        return found

    def clear_unsync_child_bit(self, sp: KvmMmuPage, index: int) -> None:
        sp.unsync_children -= 1
        sp.unsync_child_bitmap &= ~(1 << index)

    def mmu_pages_clear_parents(self, sp: KvmMmuPage) -> None:
        """After ``sp`` was synced or zapped: clear the bits that led to it, upward."""
        for parent, index in list(sp.parent_ptes):
            if parent.unsync_child_bitmap >> index & 1 and not (sp.unsync or sp.unsync_children):
                self.clear_unsync_child_bit(parent, index)
                if not parent.unsync_children:
                    self.mmu_pages_clear_parents(parent)

    def mmu_sync_children(self, vcpu, parent: KvmMmuPage) -> None:
        """Sync every unsync page below ``parent``: protect their gfns again, re-read them."""
        invalid_list: list = []
        flush = False
        pages: list = []
        while self.mmu_unsync_walk(parent, pages):
            protected = False
            for sp in pages:
                protected |= self.rmap_write_protect(sp.gfn, True)
            if protected:
                self.kvm_mmu_remote_flush_or_zap(invalid_list, True)
                flush = False
            for sp in pages:
                self.kvm_unlink_unsync_page(sp)
                flush |= vcpu.kvm_sync_page(sp, invalid_list) > 0
                self.mmu_pages_clear_parents(sp)
            pages = []
        self.kvm_mmu_remote_flush_or_zap(invalid_list, flush)

    # --- zap ------------------------------------------------------------------

    def mmu_zap_unsync_children(self, parent: KvmMmuPage, invalid_list: list) -> int:
        if parent.level == PG_LEVEL_4K:
            return 0
        zapped = 0
        pages: list = []
        while self.mmu_unsync_walk(parent, pages):
            for sp in pages:
                self.kvm_mmu_prepare_zap_page(sp, invalid_list)
                self.mmu_pages_clear_parents(sp)
                zapped += 1
            pages = []
        return zapped

    def kvm_mmu_prepare_zap_page(self, sp: KvmMmuPage, invalid_list: list) -> bool:
        """__kvm_mmu_prepare_zap_page: unlink ``sp`` from everything; free it at commit.

        A page still used as a root is only marked invalid: its vCPUs drop it
        (KVM_REQ_MMU_FREE_OBSOLETE_ROOTS) and the last one frees it.
        """
        zapped = self.mmu_zap_unsync_children(sp, invalid_list)
        for index in used_entries(sp.spt):
            self.mmu_page_zap_pte(sp, index)
        for parent, index in list(sp.parent_ptes):
            self.drop_parent_pte(sp, parent, index)
        if not sp.invalid and not sp.direct:
            self.unaccount_shadowed(sp)
        if sp.unsync:
            self.kvm_unlink_unsync_page(sp)
        if not sp.root_count:
            zapped += 1
            invalid_list.append(sp)
        self.active_mmu_pages.pop(sp, None)
        if sp.root_count and not self.is_obsolete_sp(sp):
            self.kvm.request_free_obsolete_roots()
        sp.role |= ROLE_INVALID
        return zapped > 0

    def kvm_flush_remote_tlbs(self) -> None:
        """Every vCPU drops its hardware translations (and any walk in flight restarts)."""
        for vcpu in self.kvm.vcpus:
            vcpu.flush_hardware_tlb()

    def kvm_mmu_commit_zap_page(self, invalid_list: list) -> None:
        """Flush, then free the zapped pages: no walker can hold them after the flush."""
        if not invalid_list:
            return
        self.kvm_flush_remote_tlbs()
        for sp in invalid_list:
            self.kvm_mmu_free_shadow_page(sp)
        invalid_list.clear()

    def kvm_mmu_free_shadow_page(self, sp: KvmMmuPage) -> None:
        chain = self.mmu_page_hash[sp.gfn]
        chain.remove(sp)
        if not chain:
            del self.mmu_page_hash[sp.gfn]
        self.active_mmu_pages.pop(sp, None)
        self.alloc.free(sp)

    def kvm_mmu_remote_flush_or_zap(self, invalid_list: list, flush: bool) -> None:
        if invalid_list:
            self.kvm_mmu_commit_zap_page(invalid_list)
        elif flush:
            self.kvm_flush_remote_tlbs()

    def kvm_mmu_put_root(self, sp: KvmMmuPage, invalid_list: list) -> None:
        """mmu_free_root_page: drop a vCPU's reference; an invalid root goes with the last."""
        sp.root_count -= 1
        if not sp.root_count and sp.invalid:
            self.kvm_mmu_prepare_zap_page(sp, invalid_list)

    # --- range operations through the rmaps ----------------------------------------

    def kvm_zap_rmap_range(self, lo: int, hi: int) -> bool:
        """kvm_unmap_gfn_range via kvm_zap_rmap: drop every leaf mapping [lo, hi), of
        every level (a 2M leaf overlapping the range goes whole)."""
        flush = False
        for rmaps, first in ((self.rmap, lo), (self.rmap_2m, lo & -PAGES_PER_2M)):
            for gfn in sorted(g for g in rmaps if first <= g < hi):
                for sp, index in list(rmaps[gfn]):
                    self.drop_spte(sp, index)
                    flush = True
        return flush

    def kvm_mmu_zap_all_fast(self) -> None:
        """Make every page obsolete (new generation), zap them all, have vCPUs reload roots."""
        self.mmu_valid_gen ^= 1
        self.kvm.request_free_obsolete_roots()
        invalid_list: list = []
        for sp in list(self.active_mmu_pages):
            if not sp.invalid:
                self.kvm_mmu_prepare_zap_page(sp, invalid_list)
        self.kvm_mmu_commit_zap_page(invalid_list)

    def slot_rmap_write_protect(self, gfns, huge: bool) -> bool:
        """Dirty logging's write protection of ``gfns``: 4K leaves only
        (kvm_mmu_write_protect_pt_masked, after a get), or the 2M ones over them too
        (kvm_mmu_slot_remove_write_access from PG_LEVEL_4K, when logging starts)."""
        changed = False
        gfns = list(gfns)
        for gfn in sorted(g for g in gfns if g in self.rmap):
            for sp, index in self.rmap[gfn]:
                spte = sp.spt[index]
                if is_writable_pte(spte):
                    changed |= self.mmu_spte_update(sp, index, spte_write_protect(spte))
        if huge:
            for frame in sorted({g & -PAGES_PER_2M for g in gfns} & self.rmap_2m.keys()):
                for sp, index in self.rmap_2m[frame]:
                    spte = sp.spt[index]
                    if is_writable_pte(spte):
                        changed |= self.mmu_spte_update(sp, index, spte_write_protect(spte))
        return changed

    # --- huge pages -----------------------------------------------------------------

    def kvm_mmu_max_mapping_level(self, slot, gfn: int) -> int:
        """The largest leaf over ``gfn``: lpage_info (slot bounds, host alignment, the
        gfns shadowing disallows) and the host mapping (host_pfn_mapping_level)."""
        if gfn // PAGES_PER_2M in self.lpage_disallowed:
            return PG_LEVEL_4K
        return max_mapping_level(slot, gfn, False)

    def kvm_mmu_hugepage_adjust(self, fault) -> None:
        """The fault's goal level: at most its max_level (the guest's page size), 4K for
        MMIO or a slot being dirty-logged, else what the lpage rules allow."""
        fault.goal_level = PG_LEVEL_4K
        if fault.max_level == PG_LEVEL_4K or fault.pfn is None or fault.slot.dirty is not None:
            return
        level = min(fault.max_level, self.kvm_mmu_max_mapping_level(fault.slot, fault.gfn))
        if level > PG_LEVEL_4K:
            fault.goal_level = level
            fault.pfn &= -pages_per_level(level)

    def kvm_mmu_recover_huge_pages(self, slot) -> bool:
        """kvm_mmu_zap_collapsible_spte over the slot's 4K rmaps: drop each leaf of a
        direct page that is smaller than the slot now allows there (the next fault maps
        it huge); indirect pages shadow 4K guest tables and stay.  True if a flush is due."""
        flush = False
        for gfn in sorted(g for g in self.rmap if slot.base_gfn <= g < slot.end_gfn):
            for sp, index in list(self.rmap[gfn]):
                if sp.direct and sp.level < self.kvm_mmu_max_mapping_level(slot, sp.gfn):
                    self.drop_spte(sp, index)
                    flush = True
        return flush

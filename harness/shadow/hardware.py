"""One vCPU: its MMU roots, the CPU's TLB and walk of the shadow tables, its guest ops.

With shadow paging the CPU walks KVM's shadow tables from the vCPU's root
(CR3 points at the shadow root, not the guest's PML4) and caches gva ->
host pfn in its TLB.  So one TLB entry holds both the guest's translation
(dropped by invlpg, flushes and CR3 loads, which KVM intercepts) and KVM's
(dropped by every KVM flush: kvm_flush_remote_tlbs).  A physical access
(``access gpa=``, ``write_pte``) runs on a direct (nonpaging) root of its
own, with its own TLB entries.

The vCPU also keeps KVM's per-vCPU MMU state: the current root and its
prev_roots cache (fast CR3 switch), the MMIO cache (mmio_gva / mmio_gfn /
mmio_gen), and the request to drop obsolete roots.
"""

from __future__ import annotations

from mmufuzz.harness import faults
from mmufuzz.harness.ops import (
    OK,
    PAGE_SHIFT,
    PFERR_FETCH_MASK,
    PFERR_PRESENT_MASK,
    PFERR_RSVD_MASK,
    PFERR_WRITE_MASK,
    WORDS_PER_PAGE,
    Access,
    AccessKind,
    Ok,
    PageFault,
    Paging,
)
from mmufuzz.harness.shadow import paging_tmpl
from mmufuzz.harness.shadow.events import INVLPG_UNSYNC, SPTE_KINDS, spte_kind
from mmufuzz.harness.shadow.fault import RET_PF_EMULATE, emulate, kvm_mmu_page_fault
from mmufuzz.harness.shadow.mmu import kvm_mmu_page_get_gfn
from mmufuzz.harness.shadow.paging_tmpl import DUMMY_ROOT
from mmufuzz.harness.tdp.hardware import Vcpu as TdpVcpu
from mmufuzz.harness.tdp.spte import pages_per_level
from mmufuzz.harness.shadow.spte import (
    ACC_ALL,
    PT64_NX_MASK,
    PT64_ROOT_4LEVEL,
    PT_PRESENT_MASK,
    PT_WRITABLE_MASK,
    SHADOW_NONPRESENT_VALUE,
    is_last_spte,
    is_mmio_spte,
    is_shadow_present_pte,
    make_role,
    spte_to_pfn,
)

READ, WRITE, FETCH = AccessKind.READ, AccessKind.WRITE, AccessKind.FETCH
KVM_MMU_NUM_PREV_ROOTS = 3
# The roles of the two kinds of root (CPU mode: CR0.WP=1, EFER.NXE=1, 4-level; or paging off).
PAGING_ROOT_ROLE = make_role(PT64_ROOT_4LEVEL, False, ACC_ALL, efer_nx=True, cr0_wp=True)
NONPAGING_ROOT_ROLE = make_role(PT64_ROOT_4LEVEL, True, ACC_ALL, efer_nx=False, cr0_wp=False)
MMIO_GVA_ANY = -1


def _pf_bits(kind) -> int:
    if kind is WRITE:
        return PFERR_WRITE_MASK
    return PFERR_FETCH_MASK if kind is FETCH else 0


class Vcpu:
    """struct kvm_vcpu's MMU half plus the CPU's TLB."""

    def __init__(self, kvm, index: int):
        self.kvm, self.index = kvm, index
        self.cr3 = None
        self.root = None            # KvmMmuPage, DUMMY_ROOT, or None (INVALID_PAGE)
        self.root_pgd = None
        self.prev_roots: list = [(None, None)] * KVM_MMU_NUM_PREV_ROOTS  # (pgd, root)
        self.phys_root = None       # the direct root physical accesses run on
        self.root_role = PAGING_ROOT_ROLE
        # The TLB: gva page -> (pfn, writable, executable, gpa page), gfn -> same for
        # physical accesses.
        self.tlb_linear: dict = {}
        self.tlb_phys: dict = {}
        self.flush_epoch = 0
        self.mmio_gva = 0
        self.mmio_access = 0
        self.mmio_gfn = 0
        self.mmio_gen = 0
        self.request_free_obsolete_roots = False
        self._last_used_slot = (-1, None)
        # Not KVM: (mmu.unsync_marks, prev_roots too) when the guest's last TLB flush or CR3
        # load began, for the invariant flushed_roots_synced; None before the first.
        self.synced_since = None

    # --- guest memory through the memslots (kvm_vcpu_read_guest & co) ---------------

    gfn_to_memslot = TdpVcpu.gfn_to_memslot  # kvm_vcpu_gfn_to_memslot, kvm_main.c's

    def _hva(self, gpa: int, write: bool):
        """The host pfn and word of ``gpa``, or None (no usable slot: KVM_HVA_ERR_BAD)."""
        gfn = gpa >> PAGE_SHIFT
        slot = self.gfn_to_memslot(gfn)
        if slot is None or slot.invalid or (write and slot.readonly):
            return None
        return slot.backing.pfn(gfn - slot.base_gfn), (gpa >> 3) & (WORDS_PER_PAGE - 1)

    def in_invalid_slot(self, gpa: int) -> bool:
        """``gpa`` is in a slot being deleted or moved (KVM_MEMSLOT_INVALID)."""
        slot = self.gfn_to_memslot(gpa >> PAGE_SHIFT)
        return slot is not None and slot.invalid

    def read_guest(self, gpa: int):
        """One word of guest memory, or None if no slot backs it."""
        where = self._hva(gpa, False)
        return None if where is None else self.kvm.host.read(*where)

    def write_guest(self, gpa: int, value: int) -> bool:
        """kvm_vcpu_write_guest: store and mark dirty; False if no writable slot."""
        where = self._hva(gpa, True)
        if where is None:
            return False
        self.kvm.host.write(*where, value)
        self.kvm.dirty_log.mark_page_dirty_in_slot(gpa >> PAGE_SHIFT)
        self.kvm.dirty_log.note_guest_write(gpa >> PAGE_SHIFT)
        return True

    # --- the MMIO cache ------------------------------------------------------------

    def _mmio_gen_ok(self) -> bool:
        memslots = self.kvm.memslots
        return not memslots.update_in_progress and self.mmio_gen == memslots.generation

    def vcpu_cache_mmio_info(self, gva: int, gfn: int, access: int) -> None:
        if self.kvm.memslots.update_in_progress:
            return
        self.mmio_gva = gva & ~((1 << PAGE_SHIFT) - 1)
        self.mmio_access, self.mmio_gfn = access, gfn
        self.mmio_gen = self.kvm.memslots.generation

    def vcpu_clear_mmio_info(self, gva: int) -> None:
        if gva != MMIO_GVA_ANY and self.mmio_gva != gva & ~((1 << PAGE_SHIFT) - 1):
            return
        self.mmio_gva = 0

    def vcpu_match_mmio_gva(self, gva: int) -> bool:
        return (self._mmio_gen_ok() and self.mmio_gva != 0
                and self.mmio_gva == gva & ~((1 << PAGE_SHIFT) - 1))

    def vcpu_match_mmio_gpa(self, gpa: int) -> bool:
        return self._mmio_gen_ok() and self.mmio_gfn != 0 and self.mmio_gfn == gpa >> PAGE_SHIFT

    def mmio_info_in_cache(self, addr: int, direct: bool) -> bool:
        return self.vcpu_match_mmio_gpa(addr) if direct else self.vcpu_match_mmio_gva(addr)

    # --- roots ------------------------------------------------------------------------

    def flush_hardware_tlb(self) -> None:
        """KVM flushed: forget every translation, abort any walk in flight."""
        self.tlb_linear.clear()
        self.tlb_phys.clear()
        self.flush_epoch += 1

    def flush_tlb_current(self) -> None:
        """The guest's translations go (invlpg-all, CR3 load): the current context's TLB."""
        self.tlb_linear.clear()

    def _put_root(self, root, invalid_list: list) -> None:
        if root is not None and root is not DUMMY_ROOT:
            self.kvm.mmu.kvm_mmu_put_root(root, invalid_list)

    def kvm_mmu_free_roots(self, current: bool, prev_mask: int) -> None:
        """Drop the current root and/or the prev_roots in ``prev_mask`` (bit i: entry i)."""
        invalid_list: list = []
        if current:
            self._put_root(self.root, invalid_list)
            self.root = self.root_pgd = None
        for i in range(KVM_MMU_NUM_PREV_ROOTS):
            if prev_mask >> i & 1:
                self._put_root(self.prev_roots[i][1], invalid_list)
                self.prev_roots[i] = (None, None)
        self.kvm.mmu.kvm_mmu_commit_zap_page(invalid_list)

    def _is_obsolete_root(self, root) -> bool:
        return root is not None and root is not DUMMY_ROOT and self.kvm.mmu.is_obsolete_sp(root)

    def kvm_mmu_free_obsolete_roots(self) -> None:
        """KVM_REQ_MMU_FREE_OBSOLETE_ROOTS: drop the roots a zap made invalid or obsolete."""
        self.request_free_obsolete_roots = False
        prev_mask = sum(1 << i for i in range(KVM_MMU_NUM_PREV_ROOTS)
                        if self._is_obsolete_root(self.prev_roots[i][1]))
        current = self._is_obsolete_root(self.root) or self.root is DUMMY_ROOT
        self.kvm_mmu_free_roots(current, prev_mask)
        if self._is_obsolete_root(self.phys_root):
            invalid_list: list = []
            self._put_root(self.phys_root, invalid_list)
            self.phys_root = None
            self.kvm.mmu.kvm_mmu_commit_zap_page(invalid_list)

    def kvm_mmu_reload(self):
        """Generator: before entering the guest: drop obsolete roots, load missing ones."""
        if not (self.request_free_obsolete_roots or (self.cr3 is not None and self.root is None)
                or self.phys_root is None):
            return
        kvm = self.kvm
        yield from kvm.mmu_lock.write_lock()
        if self.request_free_obsolete_roots:
            self.kvm_mmu_free_obsolete_roots()
        if self.phys_root is None:
            self.phys_root = kvm.mmu.kvm_mmu_get_shadow_page(self, 0, NONPAGING_ROOT_ROLE)
            self.phys_root.root_count += 1
        loaded = self.cr3 is not None and self.root is None
        if loaded:
            self.mmu_alloc_shadow_roots()
        kvm.mmu_lock.write_unlock()
        if loaded:
            yield from self.kvm_mmu_sync_roots()
            self.flush_tlb_current()

    def mmu_alloc_shadow_roots(self) -> None:
        """The root of CR3's table, or the dummy root if no memslot holds it."""
        self.root_pgd = self.cr3
        if self.gfn_to_memslot(self.cr3) is None:
            self.root = DUMMY_ROOT
            return
        self.root = self.kvm.mmu.kvm_mmu_get_shadow_page(self, self.cr3, self.root_role)
        self.root.root_count += 1

    def _is_root_usable(self, pgd, root, new_pgd: int) -> bool:
        return (root is not None and root is not DUMMY_ROOT and pgd == new_pgd
                and root.role == self.root_role)

    def fast_pgd_switch(self, new_pgd: int) -> bool:
        """cached_root_find_and_keep_current / _without_current (the LRU rotation)."""
        if self.root is DUMMY_ROOT:
            self.kvm_mmu_free_roots(True, 0)
        if self.root is not None:
            if self._is_root_usable(self.root_pgd, self.root, new_pgd):
                return True
            for i in range(KVM_MMU_NUM_PREV_ROOTS):
                current = (self.root_pgd, self.root)
                self.root_pgd, self.root = self.prev_roots[i]
                self.prev_roots[i] = current
                if self._is_root_usable(self.root_pgd, self.root, new_pgd):
                    return True
            self.kvm_mmu_free_roots(True, 0)
            return False
        for i in range(KVM_MMU_NUM_PREV_ROOTS):
            if self._is_root_usable(*self.prev_roots[i], new_pgd):
                self.root_pgd, self.root = self.prev_roots[i]
                self.prev_roots[i:] = self.prev_roots[i + 1:] + [(None, None)]
                return True
        return False

    def kvm_mmu_sync_roots(self):
        """Generator: sync the unsync pages reachable from the current root."""
        self.vcpu_clear_mmio_info(MMIO_GVA_ANY)
        root = self.root
        if root is None or root is DUMMY_ROOT or not (root.unsync or root.unsync_children):
            return
        kvm = self.kvm
        yield from kvm.mmu_lock.write_lock()
        kvm.mmu.mmu_sync_children(self, root)
        kvm.mmu_lock.write_unlock()

    def kvm_mmu_sync_prev_roots(self) -> None:
        """Free the prev_roots that have unsync pages (that is how they are synced)."""
        mask = 0
        for i, (_, root) in enumerate(self.prev_roots):
            if root is not None and root is not DUMMY_ROOT and (root.unsync
                                                                 or root.unsync_children):
                mask |= 1 << i
        if mask:
            self.kvm_mmu_free_roots(False, mask)

    def kvm_sync_page(self, sp, invalid_list: list) -> int:
        """kvm_sync_page: sync ``sp`` in this vCPU's context; zap it if that fails."""
        ret = paging_tmpl.sync_page(self, sp)
        if ret < 0:
            self.kvm.mmu.kvm_mmu_prepare_zap_page(sp, invalid_list)
        return ret

    def kvm_mmu_reset_context(self) -> None:
        """CR0.PG changed: unload every paging root (kvm_mmu_unload)."""
        self.kvm_mmu_free_roots(True, (1 << KVM_MMU_NUM_PREV_ROOTS) - 1)
        self.vcpu_clear_mmio_info(MMIO_GVA_ANY)

    # --- guest ops --------------------------------------------------------------------

    def paging(self, op: Paging):
        """Generator: MOV CR3 (kvm_set_cr3), or CR0.PG toggled (paging on/off)."""
        kvm = self.kvm
        if op.root is not None:
            self.synced_since = (kvm.mmu.unsync_marks, False)
        yield from kvm.mmu_lock.write_lock()
        old = self.cr3
        toggled = (old is None) != (op.root is None)
        if toggled:
            self.kvm_mmu_reset_context()
        self.cr3 = op.root
        if not toggled and op.root is not None and op.root != old:
            self.fast_pgd_switch(op.root)
        kvm.mmu_lock.write_unlock()
        self.flush_tlb_current()
        if op.root is not None:
            # KVM_REQ_MMU_SYNC + KVM_REQ_TLB_FLUSH_CURRENT, served before the next entry.
            yield from self.kvm_mmu_reload()
            yield from self.kvm_mmu_sync_roots()
        return OK

    def flush_tlb(self, op):
        """Generator: the guest flushes its TLB (kvm_vcpu_flush_tlb_guest)."""
        self.synced_since = (self.kvm.mmu.unsync_marks, True)
        yield
        if not faults.active("guest-flush-no-sync"):
            yield from self.kvm_mmu_reload()
            yield from self.kvm_mmu_sync_roots()
            self.kvm_mmu_sync_prev_roots()
        self.flush_tlb_current()
        return OK

    def invlpg(self, op):
        """Generator: kvm_mmu_invlpg: sync the gva's SPTEs in every root, drop its TLB entry."""
        yield
        self.tlb_linear.pop(op.gva >> PAGE_SHIFT, None)
        if self.cr3 is None:
            return OK  # no sync_spte in nonpaging mode
        yield from self.kvm_mmu_reload()
        kvm = self.kvm
        yield from kvm.mmu_lock.write_lock()
        self.vcpu_clear_mmio_info(op.gva)
        for root in [self.root] + [root for _, root in self.prev_roots]:
            if root is not None and root is not DUMMY_ROOT:
                self._invalidate_addr(root, op.gva)
        kvm.mmu_lock.write_unlock()
        return OK

    def _invalidate_addr(self, root, gva: int) -> None:
        """__kvm_mmu_invalidate_addr: sync the SPTEs on gva's path in unsync pages."""
        mmu = self.kvm.mmu
        sp, level = root, PT64_ROOT_4LEVEL
        while True:
            index = (gva >> paging_tmpl.level_shift(level)) & 511
            if sp.unsync:
                self.kvm.events[INVLPG_UNSYNC + len(SPTE_KINDS) * (level - 1)
                                + spte_kind(sp.spt[index], level)] += 1
            if sp.unsync and not (faults.active("invlpg-keeps-mmio")
                                  and is_mmio_spte(sp.spt[index])):
                ret = paging_tmpl.kvm_sync_spte(self, sp, index)
                if ret < 0:
                    mmu.mmu_page_zap_pte(sp, index)
                if ret:
                    mmu.kvm_flush_remote_tlbs()
            if not sp.unsync_children:
                break
            spte = sp.spt[index]
            if not is_shadow_present_pte(spte) or is_last_spte(spte, level):
                break
            sp, level = mmu.sp_of(spte), level - 1

    def kvm_inject_emulated_page_fault(self, fault: PageFault):
        """Generator: inject a #PF; first invalidate the faulting address (see docs/shadow.md:
        KVM does this only for a protection fault, mmufuzz's semantics for every #PF)."""
        self.tlb_linear.pop(fault.gva >> PAGE_SHIFT, None)
        kvm = self.kvm
        yield from kvm.mmu_lock.write_lock()
        self.vcpu_clear_mmio_info(fault.gva)
        root = self.root
        if root is not None and root is not DUMMY_ROOT:
            self._invalidate_addr(root, fault.gva)
        kvm.mmu_lock.write_unlock()

    def shadow_page_table_clear_flood(self, gva: int) -> None:
        """The shadow pages on gva's path are in use: reset their write-flooding counts."""
        sp, level = self.root, PT64_ROOT_4LEVEL
        if sp is None or sp is DUMMY_ROOT:
            return
        while True:
            sp.write_flooding_count = 0
            spte = sp.spt[(gva >> paging_tmpl.level_shift(level)) & 511]
            if not is_shadow_present_pte(spte) or is_last_spte(spte, level):
                return
            sp, level = self.kvm.mmu.sp_of(spte), level - 1

    def write_pte(self, op):
        """Generator: a physical write of an encoded guest PTE."""
        gpa = (op.table << PAGE_SHIFT) + 8 * op.index
        return (yield from self.access_at(gpa, WRITE, op.pte, False, False))

    def access(self, op: Access):
        """Generator: a guest load/store/fetch (a gva access when ``op.virtual``)."""
        addr = op.addr + 8 * op.word
        return (yield from self.access_at(addr, op.kind, op.value, op.virtual, op.virtual))

    # --- the CPU ------------------------------------------------------------------------

    def try_fast(self, op: Access):
        """The access's outcome if the TLB holds its translation and nothing needs
        reloading, else None: the sequential hot path, no generator."""
        if self.request_free_obsolete_roots or self.phys_root is None:
            return None
        linear = op.virtual and self.cr3 is not None
        if linear and self.root is None:
            return None
        addr = op.addr + 8 * op.word
        entry = (self.tlb_linear if linear else self.tlb_phys).get(addr >> PAGE_SHIFT)
        if entry is None or not self._permits(entry, op.kind):
            return None
        return self._do_access(entry, addr, op.kind, op.value, op.virtual)

    def access_at(self, addr: int, kind, value, virtual: bool, tag: bool):
        """Generator: one access: TLB, else walk the shadow tables, else #PF to KVM.

        ``virtual`` with paging on translates through the current root; anything
        else is a physical access on the direct root.  A retried access starts
        over from the TLB.
        """
        linear = virtual and self.cr3 is not None
        page = addr >> PAGE_SHIFT
        while True:
            yield from self.kvm_mmu_reload()
            tlb = self.tlb_linear if linear else self.tlb_phys
            entry = tlb.get(page)
            if entry is None or not self._permits(entry, kind):
                root = self.root if linear else self.phys_root
                result = yield from self._walk_shadow(root, addr, kind, tlb)
                if type(result) is int:  # the #PF error code
                    outcome = yield from self._page_fault(addr, kind, value, virtual, tag,
                                                          result, not linear)
                    if outcome is None:
                        continue
                    return outcome
                entry = result
            return self._do_access(entry, addr, kind, value, tag)

    @staticmethod
    def _permits(entry, kind) -> bool:
        return not ((kind is WRITE and not entry[1]) or (kind is FETCH and not entry[2]))

    def _do_access(self, entry, addr: int, kind, value, tag: bool):
        pfn, _, _, gpa_page = entry
        gpa = gpa_page | (addr & ((1 << PAGE_SHIFT) - 1))
        host = self.kvm.host
        word = (addr >> 3) & (WORDS_PER_PAGE - 1)
        if kind is WRITE:
            host.write(pfn, word, value)
            self.kvm.dirty_log.note_guest_write(gpa >> PAGE_SHIFT)
            return Ok(None, gpa) if tag else OK
        return Ok(host.read(pfn, word), gpa if tag else None)

    def _walk_shadow(self, root, addr: int, kind, tlb: dict):
        """Generator: the CPU's walk of the shadow tables; a TLB entry or a #PF error code.

        A KVM flush while the walk is in flight aborts it (the IPI forced an
        exit): it starts over from the root.
        """
        while True:
            epoch = self.flush_epoch
            if root is None or root is DUMMY_ROOT:
                return _pf_bits(kind)
            sp, level = root, PT64_ROOT_4LEVEL
            while True:
                index = (addr >> paging_tmpl.level_shift(level)) & 511
                spte = sp.spt[index]
                yield
                if self.flush_epoch != epoch:
                    break
                if not spte & PT_PRESENT_MASK:
                    return _pf_bits(kind)
                if is_mmio_spte(spte):
                    return PFERR_PRESENT_MASK | PFERR_RSVD_MASK | _pf_bits(kind)
                if is_last_spte(spte, level):
                    offset = (addr >> PAGE_SHIFT) & (pages_per_level(level) - 1)
                    entry = (spte_to_pfn(spte) + offset, bool(spte & PT_WRITABLE_MASK),
                             not spte & PT64_NX_MASK,
                             (kvm_mmu_page_get_gfn(sp, index) + offset) << PAGE_SHIFT)
                    if not self._permits(entry, kind):
                        return PFERR_PRESENT_MASK | _pf_bits(kind)
                    tlb[addr >> PAGE_SHIFT] = entry
                    return entry
                sp, level = self.kvm.mmu.sp_of(spte), level - 1

    def _page_fault(self, addr: int, kind, value, virtual: bool, tag: bool, error: int,
                    direct: bool):
        """Generator: KVM handles the #PF; None to retry the access, else its outcome.

        The vCPU holds kvm->srcu meanwhile (vcpu_run drops it only to enter the
        guest), so a memslot delete or move waits for it after marking the slot
        invalid, before zapping.
        """
        srcu = self.kvm.srcu
        token = srcu.read_lock()
        try:
            r = yield from kvm_mmu_page_fault(self, addr, kind, error, direct)
            if r == RET_PF_EMULATE:
                return (yield from emulate(self, addr, kind, value, virtual and not direct, tag))
            return r
        finally:
            srcu.read_unlock(token)

    def get_mmio_spte(self, addr: int, direct: bool) -> int:
        """get_mmio_spte: the leaf SPTE on addr's path (lockless walk), or non-present."""
        root = self.phys_root if direct else self.root
        if root is None or root is DUMMY_ROOT:
            return SHADOW_NONPRESENT_VALUE
        sp, level = root, PT64_ROOT_4LEVEL
        while True:
            spte = sp.spt[(addr >> paging_tmpl.level_shift(level)) & 511]
            if not is_shadow_present_pte(spte) or is_last_spte(spte, level):
                return spte
            sp, level = self.kvm.mmu.sp_of(spte), level - 1

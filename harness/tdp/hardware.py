"""The hardware model: one vCPU's TLBs, EPT walker, secure-EPT walker and guest walker.

A vCPU caches two kinds of translations, as real TLBs do: guest translations
(gva -> gpa, from walking the guest's page tables, dropped by invlpg,
flush_tlb and CR3 loads) and guest-physical ones (gpa -> host pfn, from
walking the SPTEs, dropped only when the MMU flushes: everything, or with
ranged flushes the gfns of a range).  A missed or too narrow flush therefore
leaves a stale pfn or table in use, which shows as stale data, as a touch of a
poisoned host page, or as a failed invariant.  The guest walker reads page
tables through the vCPU's own physical path, so every table read can EPT-fault
into the MMU.
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
    PG_LEVEL_2M,
    PG_LEVEL_4K,
    PTE_ACCESSED,
    PTE_ADDR_MASK,
    PTE_DIRTY,
    UNSUPPORTED,
    WORDS_PER_PAGE,
    Access,
    AccessKind,
    Invlpg,
    MmioExit,
    Ok,
    PageFault,
    Paging,
    PteFlag,
    VePending,
    VeUnexpected,
    WritePte,
)
from mmufuzz.harness.target import InvariantViolation
from mmufuzz.harness.tdp import events
from mmufuzz.harness.tdp.fault import kvm_mmu_page_fault
from mmufuzz.harness.tdp.spte import (
    PT_EXECUTABLE_MASK,
    PT_READABLE_MASK,
    PT_WRITABLE_MASK,
    ROOT_LEVEL,
    SPTE_DIRTY_MASK,
    TDP_MAX_GFN,
    VMX_EPT_MISCONFIG_WX_VALUE,
    VMX_EPT_RWX_MASK,
    VMX_EPT_SUPPRESS_VE_BIT,
    check_mmio_spte,
    get_mmio_spte_gfn,
    is_last_spte,
    is_mmio_spte,
    is_shadow_present_pte,
    pages_per_level,
    spte_index,
    spte_to_pfn,
)

READ, WRITE, FETCH = AccessKind.READ, AccessKind.WRITE, AccessKind.FETCH
_PF_ACCESS_BITS = {READ: 0, WRITE: PFERR_WRITE_MASK, FETCH: PFERR_FETCH_MASK}
# Address bits 13..20 of a 2M PDE are reserved (bit 12 is PAT).
_PDE_2M_RSVD_MASK = ((1 << 21) - 1) & ~((1 << 13) - 1)
_SHIFT_2M = PAGE_SHIFT + 9
# The guest walk's PTE bits as plain ints: ``int & IntFlag`` goes through IntFlag's
# ``__rand__``, which builds an enum member each time.
_PTE_P, _PTE_PS, _PTE_RW, _PTE_NX = (int(f) for f in (PteFlag.P, PteFlag.PS, PteFlag.RW,
                                                      PteFlag.NX))

# The gfn shift that keys a cached table at each level: a table at level L covers 512**L gfns.
_CACHE_SHIFT = (0,) + tuple(9 * level for level in range(1, ROOT_LEVEL + 1))
# With ranged flushes an entry is cached per gfn (the walk that made it): see Vcpu.__init__.
_PER_GFN = (0,) * (ROOT_LEVEL + 1)

# Outcomes of one hardware EPT walk besides a usable leaf.
_VIOLATION, _MMIO, _VE, _PENDING = "violation", "mmio", "ve", "pending"
# An EPT violation on a present leaf that lacks the permission (PFERR_PRESENT).
_PERMISSION = "permission"


class SetBits:
    """The value of the guest walker's write of A/D bits into a guest PTE: a locked OR
    (the CPU's atomic update of the entry), done when the write lands."""

    __slots__ = ("bits",)

    def __init__(self, bits: int):
        self.bits = bits


def _ept_needs(kind) -> int:
    """The EPT permission bit an access of ``kind`` needs (no enum hashing: hot path)."""
    if kind is WRITE:
        return PT_WRITABLE_MASK
    return PT_EXECUTABLE_MASK if kind is FETCH else PT_READABLE_MASK


class Vcpu:
    """One vCPU: CR3, its TLBs, and the memslot lookup cache (last_used_slot)."""

    # x86 KVM emulates the instruction whose guest walk exited (table_without_slot).
    emulates_walk_exits = True

    def __init__(self, kvm, index: int):
        self.kvm, self.index = kvm, index
        self.cr3 = None
        self.tlb_shared: dict[int, tuple[int, int]] = {}   # gfn -> (pfn, EPT permission bits)
        self.tlb_private: dict[int, int] = {}              # gfn -> pfn (accepted pages only)
        self.tlb_4k: dict[int, tuple[int, bool, bool]] = {}  # gva >> 12 -> (gpa, w, x)
        self.tlb_2m: dict[int, tuple[int, bool, bool]] = {}  # gva >> 21 -> (gpa, w, x)
        # The EPT paging-structure caches (SDM vol. 3 §29.4.2): (level, gfn >> shift[level])
        # -> the table at ``level`` the walk reached through a cached upper-level entry.
        # A full flush (INVEPT) drops them all, so one entry serves every gfn the table
        # covers (shift 9*level).  A ranged flush promises to drop only what translates
        # the gfns of its range, so with ranged flushes the entry a walk made serves that
        # walk's gfn alone (shift 0): the most an implementation may keep (docs/semantics.md
        # §J), and what makes a flush range too narrow for a removed table visible.
        self.walk_cache: dict[tuple[int, int], object] = {}
        self.cache_shift = _PER_GFN if kvm.range_flush else _CACHE_SHIFT
        self.walking = None  # the gfn of the EPT walk in flight, if any
        self.flush_epoch = 0
        self._last_used_slot = (-1, None)
        # mmu->root.hpa, a reference to a direct root, loaded on entry; and whether
        # KVM_REQ_MMU_FREE_OBSOLETE_ROOTS is pending.
        self.root = None
        self.obsolete_roots_request = False

    # --- roots ------------------------------------------------------------------

    def request_free_obsolete_roots(self) -> None:
        """kvm_make_all_cpus_request(KVM_REQ_MMU_FREE_OBSOLETE_ROOTS), mmu_lock held for
        write: the vCPU is kicked out of the guest (a walk in flight aborts) and enters
        again only on a freshly loaded root, whose load flushes its translations
        (kvm_mmu_load's flush_tlb_current; dropped here at the kick, as nothing can use
        them in between)."""
        self.obsolete_roots_request = True
        self.flush_guest_physical()

    def mmu_reload(self):
        """The root this vCPU runs on: vcpu_enter_guest handles the request
        (kvm_mmu_free_obsolete_roots puts an invalid root), then kvm_mmu_reload loads one
        (kvm_tdp_mmu_alloc_root takes a reference)."""
        if self.obsolete_roots_request:
            self.obsolete_roots_request = False
            if self.root is not None and self.kvm.mmu.is_invalid(self.root):
                self.kvm.mmu.put_root(self.root)
                self.root = None
        if self.root is None:
            self.root = self.kvm.mmu.alloc_root()
        return self.root

    # --- flushes ----------------------------------------------------------------

    def flush_guest_physical(self) -> None:
        """INVEPT: forget gpa translations and cached upper-level entries, and abort any
        walk in flight."""
        self.kvm.events[events.TLB_FLUSH_HELD if self.tlb_shared or self.tlb_private
                        else events.TLB_FLUSH_EMPTY] += 1
        self.tlb_shared.clear()
        self.tlb_private.clear()
        self.walk_cache.clear()
        self.flush_epoch += 1

    def flush_guest_physical_range(self, start: int, end: int) -> None:
        """The host's ranged flush of gfns [start, end) (KVM on Hyper-V:
        HvCallFlushGuestPhysicalAddressList, from hv_flush_remote_tlbs_range): forget
        their gpa translations and the cached entries their walks made, and abort a
        walk in flight of one of them.  What translates other gfns stays, a walk of
        one included: the hypercall promises no more."""
        for cache in (self.tlb_shared, self.tlb_private):
            for gfn in [gfn for gfn in cache if start <= gfn < end]:
                del cache[gfn]
        cache = self.walk_cache
        for key in [key for key in cache if start <= key[1] < end]:
            del cache[key]
        kept = self.tlb_shared or self.tlb_private or cache
        self.kvm.events[events.TLB_RANGE_KEPT if kept else events.TLB_RANGE_DROPPED_ALL] += 1
        if self.walking is not None and start <= self.walking < end:
            self.flush_epoch += 1

    def flush_linear(self) -> None:
        """Forget every gva translation (flush_tlb, CR3 load)."""
        self.tlb_4k.clear()
        self.tlb_2m.clear()

    def _drop_linear(self, gva: int) -> None:
        """Forget the translations covering ``gva`` at any level (invlpg, #PF)."""
        self.tlb_4k.pop(gva >> PAGE_SHIFT, None)
        self.tlb_2m.pop(gva >> _SHIFT_2M, None)

    def gfn_to_memslot(self, gfn: int):
        """kvm_vcpu_gfn_to_memslot with the vCPU's last-used-slot cache."""
        memslots = self.kvm.memslots
        generation, slot = self._last_used_slot
        if generation == memslots.generation and slot is not None and slot.contains(gfn):
            return slot
        slot = memslots.lookup(gfn)
        self._last_used_slot = (memslots.generation, slot)
        return slot

    # --- guest ops --------------------------------------------------------------

    def paging(self, op: Paging):
        """Generator: load CR3 (or turn paging off); flushes this vCPU's gva translations."""
        yield
        self.cr3 = op.root
        self.flush_linear()
        return OK

    def invlpg(self, op: Invlpg):
        """Generator: drop the translations of the page containing ``op.gva``."""
        yield
        if self.cr3 is not None:
            self._drop_linear(op.gva)
        return OK

    def flush_tlb(self, op):
        """Generator: the guest flushes its TLB."""
        yield
        self.flush_linear()
        return OK

    def write_pte(self, op: WritePte):
        """Generator: an ordinary physical write of an encoded PTE."""
        gpa = (op.table << PAGE_SHIFT) + 8 * op.index
        return (yield from self.physical(gpa, WRITE, op.pte, False, False))

    def try_fast(self, op: Access):
        """The access's outcome if every translation it needs is cached, else None.

        The sequential hot path: no generator, no walk.
        """
        if op.private and not self.kvm.tdx:
            return None
        addr = op.addr + 8 * op.word
        if op.virtual and self.cr3 is not None:
            addr = self._linear_hit(addr, op.kind)
            if addr is None:
                return None
        return self._physical_hit(addr, op.kind, op.value, op.private, op.virtual)

    def access(self, op: Access):
        """Generator: a guest load/store/fetch at ``op.addr`` (a gva when ``op.virtual``).

        The instruction is atomic to a flush as a whole, as :meth:`translate`
        says of its walk: if a flush came after the walk and the data access
        then exits, the re-executed instruction walks again (the flush took the
        translation the walk cached), so no exit comes of a half-old, half-new
        access.
        """
        addr = op.addr + 8 * op.word
        if not op.virtual:
            if op.private and not self.kvm.tdx:
                return UNSUPPORTED
            return (yield from self.physical(addr, op.kind, op.value, op.private, False))
        while True:
            epoch = self.flush_epoch
            gpa = yield from self.translate(addr, op.kind)
            if type(gpa) is not int:
                return gpa
            if op.private and not self.kvm.tdx:
                return UNSUPPORTED
            out = yield from self.physical(gpa, op.kind, op.value, op.private, True)
            if type(out) is Ok or self.flush_epoch == epoch:
                return out
            self._drop_linear(addr)  # INVEPT took the combined mapping the walk made

    # --- physical accesses --------------------------------------------------------

    def _physical_hit(self, gpa: int, kind, value, private: bool, tag: bool):
        """Do the access through a cached gpa translation, or return None."""
        gfn = gpa >> PAGE_SHIFT
        if private:
            pfn = self.tlb_private.get(gfn)
        else:
            entry = self.tlb_shared.get(gfn)
            if entry is None or not entry[1] & _ept_needs(kind):
                return None
            pfn = entry[0]
        if pfn is None:
            return None
        return self._do_access(pfn, gpa, kind, value, private, tag)

    def _do_access(self, pfn: int, gpa: int, kind, value, private: bool, tag: bool):
        host = self.kvm.host
        word = (gpa >> 3) & (WORDS_PER_PAGE - 1)
        if kind is WRITE:
            if type(value) is SetBits:
                value = host.read(pfn, word) | value.bits
            host.write(pfn, word, value)
            if not private:
                self.kvm.dirty_log.note_guest_write(gpa >> PAGE_SHIFT)
            return Ok(None, gpa) if tag else OK
        return Ok(host.read(pfn, word), gpa if tag else None)

    def physical(self, gpa: int, kind, value, private: bool, tag: bool):
        """Generator: a physical access at byte ``gpa``; EPT violations go to the MMU."""
        gfn = gpa >> PAGE_SHIFT
        while True:
            done = self._physical_hit(gpa, kind, value, private, tag)
            if done is not None:
                return done
            if private:
                result = yield from self._walk_sept(gfn)
            else:
                result = yield from self._walk_ept(gfn, kind)
            if result is _MMIO:
                return MmioExit(gpa, kind is WRITE)
            if result is _VE:
                return VeUnexpected(gpa)
            if result is _PENDING:
                return VePending(gpa)
            if result is not _VIOLATION and result is not _PERMISSION:
                continue  # a translation was cached: the retry hits it
            exit_ = yield from kvm_mmu_page_fault(self.kvm, self, gpa, kind is WRITE,
                                                  kind is FETCH, private,
                                                  present=result is _PERMISSION)
            if exit_ is not None:
                return exit_

    def _walk_ept(self, gfn: int, kind):
        """Generator: the hardware walk of the direct root; caches a usable leaf.

        The walk starts at the deepest table its paging-structure caches hold
        for ``gfn`` and caches every table it steps into: an entry that
        unlinked a table is used until a flush drops it, which is why KVM must
        flush before a removed table can be freed.  An EPT violation drops the
        cached entries for its gpa (SDM vol. 3 §29.4.3.1).  A flush while the
        walk is in flight aborts it (the IPI forced an exit), so it restarts; a
        ranged flush does so only if the range holds the walk's gfn.
        """
        kvm = self.kvm
        if gfn > TDP_MAX_GFN:
            return _VIOLATION  # beyond what a 4-level EPT translates: nothing to walk or cache
        cache, shift = self.walk_cache, self.cache_shift
        self.walking = gfn
        while True:
            epoch = self.flush_epoch
            page, level = self._walk_start(gfn)
            while True:
                spte = page.spt[spte_index(gfn, level)]
                yield
                if self.flush_epoch != epoch:
                    kvm.events[events.WALK_ABORTED] += 1
                    break
                if not is_shadow_present_pte(spte):
                    kvm.events[events.WALK_ABSENT + level] += 1
                    self.walking = None
                    self._drop_walk_cache(gfn)
                    return self._nonpresent(spte, gfn)
                if is_last_spte(spte, level):
                    self.walking = None
                    if not spte & _ept_needs(kind):
                        kvm.events[events.WALK_PERMISSION + level] += 1
                        self._drop_walk_cache(gfn)
                        return _PERMISSION
                    if kind is WRITE and not spte & SPTE_DIRTY_MASK:
                        spte = self._set_dirty(page, spte_index(gfn, level), spte, gfn)
                        if spte is None:
                            break  # the entry changed under the walk: walk again
                    kvm.events[events.WALK_FILL + level] += 1
                    pfn = spte_to_pfn(spte) + (gfn & (pages_per_level(level) - 1))
                    # A translation caches Writable only with Dirty set: a write through a
                    # clean one walks again to set it (SDM vol. 3 §29.3.5).
                    perms = spte & (PT_READABLE_MASK | PT_EXECUTABLE_MASK)
                    if spte & SPTE_DIRTY_MASK:
                        perms |= spte & PT_WRITABLE_MASK
                    self.tlb_shared[gfn] = (pfn, perms)
                    return None
                page, level = kvm.mmu.alloc.child(spte), level - 1
                cache[(level, gfn >> shift[level])] = page

    def _set_dirty(self, page, index: int, spte: int, gfn: int):
        """The CPU's locked update of a leaf's EPT Dirty bit for a write (EPT A/D bits are
        on, enable_ept_ad_bits): the new value, or None if the entry is no longer
        ``spte``.  With PML on for the VM (``cpu_dirty_log_size``, while any slot logs:
        vmx_update_cpu_dirty_logging), the 0 -> 1 transition logs the gpa; the PML
        buffer is drained into the dirty bitmap as the entry is written (KVM drains it
        on every VM-exit, and KVM_GET_DIRTY_LOG kicks every vCPU first:
        kvm_arch_sync_dirty_log)."""
        kvm = self.kvm
        if page.spt[index] != spte:
            return None
        spte |= SPTE_DIRTY_MASK
        page.spt[index] = spte
        if kvm.cpu_dirty_log_size and kvm.memslots.logging:
            kvm.events[events.WALK_SET_DIRTY_PML] += 1
            kvm.dirty_log.mark_page_dirty_in_slot(gfn)
        else:
            kvm.events[events.WALK_SET_DIRTY] += 1
        return spte

    def _walk_start(self, gfn: int):
        """(table, level) an EPT walk of ``gfn`` starts at: the deepest cached table, else
        the root."""
        root = self.mmu_reload()
        cache, shift = self.walk_cache, self.cache_shift
        if cache:
            for level in (PG_LEVEL_4K, PG_LEVEL_2M, ROOT_LEVEL - 1):
                page = cache.get((level, gfn >> shift[level]))
                if page is not None:
                    return page, level
        return root, ROOT_LEVEL

    def _drop_walk_cache(self, gfn: int) -> None:
        """An EPT violation (or misconfiguration) at ``gfn`` invalidates the cached entries
        that would translate it."""
        cache, shift = self.walk_cache, self.cache_shift
        if cache:
            for level in (PG_LEVEL_4K, PG_LEVEL_2M, ROOT_LEVEL - 1):
                cache.pop((level, gfn >> shift[level]), None)

    def _nonpresent(self, spte: int, gfn: int):
        """What hardware does with a non-present EPT entry (SEMANTICS §E).

        In a default VM an MMIO SPTE is a misconfiguration KVM handles
        (handle_mmio_page_fault): its generation is checked, a stale one takes
        the fault path.  In a TD it has suppress-#VE clear and RWX 0, so the CPU
        delivers #VE to the guest, whose handler asks for the MMIO with
        TDVMCALL<MMIO>; tdx_emulate_mmio checks no generation and no memslot, so
        a stale one still exits to userspace.  A TD never has misconfigured
        entries: the TDX module reports one as an EPT-misconfig TD exit, which
        tdx_handle_exit answers with KVM_BUG_ON.
        """
        kvm = self.kvm
        if kvm.tdx:
            if spte & VMX_EPT_RWX_MASK == VMX_EPT_MISCONFIG_WX_VALUE:
                raise InvariantViolation("td_ept_misconfig",
                                         f"gfn={gfn:#x} spte={spte:#x}: EPT misconfig TD exit")
            if is_mmio_spte(spte, kvm.mmio_value) and get_mmio_spte_gfn(spte) == gfn:
                kvm.events[events.WALK_MMIO_TD_VE] += 1
                return _MMIO
            if not spte & VMX_EPT_SUPPRESS_VE_BIT:
                kvm.events[events.WALK_VE] += 1
                return _VE
            return _VIOLATION
        if is_mmio_spte(spte, kvm.mmio_value) and get_mmio_spte_gfn(spte) == gfn:
            memslots = kvm.memslots
            if faults.active("mmio-stale-generation") or (
                    not memslots.update_in_progress
                    and check_mmio_spte(spte, memslots.generation)):
                kvm.events[events.WALK_MMIO_CURRENT] += 1
                return _MMIO
            kvm.events[events.WALK_MMIO_STALE] += 1
            return _VIOLATION  # handle_mmio_page_fault: stale, take the full fault path
        return _VIOLATION

    def _walk_sept(self, gfn: int):
        """Generator: a private access walks the secure EPT (the TDX module's tables)."""
        leaf = self.kvm.sept.lookup(gfn)
        yield
        if leaf is None or leaf is not self.kvm.sept.lookup(gfn):
            if leaf is not None:
                self.kvm.events[events.SEPT_WALK_RACED] += 1
            return _VIOLATION
        if not leaf.accepted:
            self.kvm.events[events.SEPT_WALK_PENDING] += 1
            return _PENDING
        self.tlb_private[gfn] = leaf.pfn + (gfn & (pages_per_level(leaf.level) - 1))
        return None

    # --- guest page walk ----------------------------------------------------------

    def _linear_hit(self, gva: int, kind):
        """The gpa of a cached translation of ``gva`` that permits ``kind``, else None.

        A cached entry that denies the access is dropped: the access re-walks.
        """
        for tlb, key, size in ((self.tlb_4k, gva >> PAGE_SHIFT, 1 << PAGE_SHIFT),
                               (self.tlb_2m, gva >> _SHIFT_2M, 1 << _SHIFT_2M)):
            entry = tlb.get(key)
            if entry is None:
                continue
            gpa_base, writable, executable = entry
            if (kind is WRITE and not writable) or (kind is FETCH and not executable):
                del tlb[key]
                continue
            return gpa_base + (gva & (size - 1))
        return None

    def translate(self, gva: int, kind):
        """Generator: gva -> byte gpa (an int), or the Outcome that ends the access.

        A guest walk is atomic to the flush IPI: the instruction either walks
        before it or, having exited mid-walk (an EPT violation), re-executes
        and walks again from CR3 after it.  So a walk that a flush overtook
        (a memslot change, a zap) starts over, and its outcome never mixes
        table reads from both sides of the change.
        """
        if self.cr3 is None:
            return gva
        while True:
            epoch = self.flush_epoch
            out = yield from self._walk_guest(gva, kind)
            if self.flush_epoch == epoch:
                return out

    def _walk_guest(self, gva: int, kind):
        """Generator: one walk of the guest's tables (or a TLB hit) for ``translate``.

        A completed walk that permits the access sets A in every entry it used
        and D in the leaf of a write (SEMANTICS §F), after the permission check
        as KVM's walker does.  The TLB caches a translation writable only if
        its leaf is dirty: a write through a clean one walks again to set D.
        """
        gpa = self._linear_hit(gva, kind)
        if gpa is not None:
            return gpa
        access_bits = _PF_ACCESS_BITS[kind]
        table, level = self.cr3, ROOT_LEVEL
        writable = executable = True
        used = []  # (entry gpa, entry) per level, root first
        while True:
            shift = PAGE_SHIFT + 9 * (level - 1)
            pte_gpa = (table << PAGE_SHIFT) + 8 * ((gva >> shift) & 511)
            out = yield from self.physical(pte_gpa, READ, None, False, False)
            if type(out) is not Ok:
                if type(out) is MmioExit and not self.kvm.tdx:
                    out = self.table_without_slot(gva, kind, pte_gpa)
                    if type(out) is PageFault:
                        self._drop_linear(gva)
                return out
            pte = out.value
            if not pte & _PTE_P:
                self._drop_linear(gva)
                return PageFault(gva, access_bits)
            if pte & _PTE_PS and (level > PG_LEVEL_2M
                                   or level == PG_LEVEL_2M and pte & _PDE_2M_RSVD_MASK):
                self._drop_linear(gva)
                return PageFault(gva, PFERR_PRESENT_MASK | PFERR_RSVD_MASK | access_bits)
            writable = writable and bool(pte & _PTE_RW)
            executable = executable and not pte & _PTE_NX
            used.append((pte_gpa, pte))
            if level == PG_LEVEL_4K or pte & _PTE_PS:
                break
            table, level = (pte & PTE_ADDR_MASK) >> PAGE_SHIFT, level - 1
        size = 1 << shift
        if (kind is WRITE and not writable) or (kind is FETCH and not executable):
            self._drop_linear(gva)
            return PageFault(gva, PFERR_PRESENT_MASK | access_bits)
        for index, (pte_gpa, entry) in enumerate(used):
            bits = PTE_ACCESSED | (PTE_DIRTY if kind is WRITE and index == len(used) - 1 else 0)
            if entry & bits != bits:
                yield from self.physical(pte_gpa, WRITE, SetBits(bits), False, False)
        gpa_base = pte & PTE_ADDR_MASK & -size
        tlb = self.tlb_4k if level == PG_LEVEL_4K else self.tlb_2m
        tlb[gva >> shift] = (gpa_base, writable and (kind is WRITE or bool(pte & PTE_DIRTY)),
                             executable)
        return gpa_base + (gva & (size - 1))

    def table_without_slot(self, gva: int, kind, pte_gpa: int):
        """What the walk gives when the guest table entry at ``pte_gpa`` has no memslot.

        The CPU's walk exits (an EPT violation, an MMIO SPTE), and KVM emulates
        the instruction: its walker faults on the table (an error hva is a
        not-present #PF), unless the data operand's page offset equals the
        entry's: the emulator then takes the exit's gpa for the operand's
        (x86.c, ``emulator_read_write_onepage``, ``gpa_available``; the
        instruction fetch never does) and exits to userspace there.
        """
        if (self.emulates_walk_exits and kind is not FETCH
                and not (gva ^ pte_gpa) & ((1 << PAGE_SHIFT) - 1)):
            return MmioExit(pte_gpa, kind is WRITE)
        return PageFault(gva, _PF_ACCESS_BITS[kind])

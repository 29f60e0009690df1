"""kvm_pgtable: the stage-2 tables, the generic walker, and the stage-2 walkers.

This mirrors arch/arm64/kvm/hyp/pgtable.c.  ``kvm_pgtable_walk`` visits the
entries of a range in pre-order with KVM's visitor flags (TABLE_PRE on the way
down, LEAF, TABLE_POST on the way up) and re-reads an entry after its callback
so that the walk descends into a table the callback just installed.  A walk
with ``KVM_PGTABLE_WALK_SHARED`` runs beside other shared walkers (faults hold
mmu_lock for read): it changes entries by cmpxchg, and replaces a valid entry
only through break-before-make: ``stage2_try_break_pte`` swaps in
``KVM_INVALID_PTE_LOCKED`` (other walkers back off with -EAGAIN), invalidates
the TLBs for the old entry, and ``stage2_make_pte`` stores the new one.

Every function that touches an entry is a generator with a yield point before
each read and each store, so ``parallel`` interleaves two walkers, or a walker
and a vCPU's hardware walk, at the same points as the kernel could.

Table pages are refcounted as the kernel's struct page: one reference for the
page itself plus one per non-zero entry.  The last ``put_page`` frees it, and a
freed page is poison: any later read or write raises ``walker_read_freed_table``.
Freeing a page that a live entry still links is ``reachable_freed_table`` at once.
"""

from __future__ import annotations

from dataclasses import dataclass

from mmufuzz.harness import faults
from mmufuzz.harness.stage2.pte import (
    GRANULE_PAGES,
    KVM_INVALID_PTE_LOCKED,
    KVM_PGTABLE_FIRST_LEVEL,
    KVM_PGTABLE_LAST_LEVEL,
    KVM_PGTABLE_PROT_R,
    KVM_PGTABLE_PROT_W,
    KVM_PGTABLE_PROT_X,
    KVM_PTE_LEAF_ATTR_HI,
    KVM_PTE_LEAF_ATTR_HI_S2_XN,
    KVM_PTE_LEAF_ATTR_HI_SW,
    KVM_PTE_LEAF_ATTR_LO,
    KVM_PTE_LEAF_ATTR_LO_S2_S2AP_R,
    KVM_PTE_LEAF_ATTR_LO_S2_S2AP_W,
    PTRS_PER_PTE,
    TLBI_TTL_UNKNOWN,
    kvm_init_table_pte,
    kvm_init_valid_leaf_pte,
    kvm_level_supports_block_mapping,
    kvm_pgtable_idx,
    kvm_pgtable_stage2_pte_prot,
    kvm_pte_table,
    kvm_pte_to_pfn,
    kvm_pte_valid,
    stage2_pte_is_counted,
    stage2_pte_is_locked,
    stage2_pte_needs_update,
    stage2_set_prot_attr,
)
from mmufuzz.harness.target import InvariantViolation

# enum kvm_pgtable_walk_flags
KVM_PGTABLE_WALK_LEAF = 1 << 0
KVM_PGTABLE_WALK_TABLE_PRE = 1 << 1
KVM_PGTABLE_WALK_TABLE_POST = 1 << 2
KVM_PGTABLE_WALK_SHARED = 1 << 3
KVM_PGTABLE_WALK_HANDLE_FAULT = 1 << 4
KVM_PGTABLE_WALK_SKIP_BBM_TLBI = 1 << 5
KVM_PGTABLE_WALK_SKIP_CMO = 1 << 6

EAGAIN, E2BIG, EINVAL = -11, -7, -22


class _FreedTable:
    """The entries of a freed table page: every read or write is a violation."""

    __slots__ = ("page",)

    def __init__(self, page: S2Table):
        self.page = page

    def _violation(self, index) -> InvariantViolation:
        page = self.page
        return InvariantViolation("walker_read_freed_table",
                                  f"gfn={page.gfn:#x} level={page.level} index={index} "
                                  f"pfn={page.pfn:#x}")

    def __getitem__(self, index):
        raise self._violation(index)

    def __setitem__(self, index, value):
        raise self._violation(index)


class S2Table:
    """One table page: 512 descriptors at ``level`` covering gfns from ``gfn``.

    ``gfn`` is where the table was linked when it was made; an unlinked table
    (a subtree built by ``create_unlinked``) gets its gfn when it is linked.
    ``refcount`` is the struct page count.  Pickles with its non-zero entries only.
    """

    __slots__ = ("freed", "gfn", "level", "pfn", "ptes", "refcount")

    def __init__(self, pfn: int, level: int, gfn: int):
        self.pfn, self.level, self.gfn = pfn, level, gfn
        self.ptes = [0] * PTRS_PER_PTE
        self.refcount = 1
        self.freed = False

    def used(self) -> list:
        """The indices of the non-zero entries."""
        return [i for i, pte in enumerate(self.ptes) if pte]

    def __getstate__(self) -> tuple:
        entries = None if self.freed else [(i, self.ptes[i]) for i in self.used()]
        return self.pfn, self.level, self.gfn, self.refcount, entries

    def __setstate__(self, state: tuple) -> None:
        self.pfn, self.level, self.gfn, self.refcount, entries = state
        self.freed = entries is None
        if self.freed:
            self.ptes = _FreedTable(self)
            return
        self.ptes = [0] * PTRS_PER_PTE
        for i, pte in entries:
            self.ptes[i] = pte

    def __repr__(self) -> str:
        return f"S2Table(pfn={self.pfn:#x} level={self.level} gfn={self.gfn:#x})"


@dataclass
class VisitCtx:
    """struct kvm_pgtable_visit_ctx: the entry a callback is looking at, and the walk."""

    table: S2Table
    index: int
    old: int
    arg: object
    start: int
    addr: int
    end: int
    level: int
    flags: int

    @property
    def shared(self) -> bool:
        return self.flags & KVM_PGTABLE_WALK_SHARED != 0


@dataclass
class Walker:
    """struct kvm_pgtable_walker: a generator callback ``cb(ctx, visit)``, flags, argument."""

    cb: object
    flags: int
    arg: object = None


@dataclass
class _WalkData:
    walker: Walker
    start: int
    addr: int
    end: int


class KvmPgtable:
    """struct kvm_pgtable of one stage-2 MMU: the root, the table pages, mm_ops.

    ``tlbi`` is the hypervisor's TLB maintenance (``__kvm_tlb_flush_vmid*``),
    ``free_unlinked_table`` is ``mm_ops->free_unlinked_table`` (deferred by RCU
    in a normal VM, immediate under pKVM) and ``rcu`` the lock shared walks hold.
    """

    def __init__(self, host, tlbi, rcu):
        self._host, self.tlbi, self.rcu = host, tlbi, rcu
        self.tables: dict[int, S2Table] = {}   # pfn -> page, freed ones included
        self.free_unlinked_table = self.free_unlinked_table_rcu
        self.root = self.zalloc_page(KVM_PGTABLE_FIRST_LEVEL, 0)

    # --- mm_ops -------------------------------------------------------------------

    def zalloc_page(self, level: int, gfn: int) -> S2Table:
        page = S2Table(self._host.alloc(1), level, gfn)
        self.tables[page.pfn] = page
        return page

    def follow(self, pte: int) -> S2Table:
        """kvm_pte_follow: the table a table descriptor points at."""
        return self.tables[kvm_pte_to_pfn(pte)]

    @staticmethod
    def get_page(table: S2Table) -> None:
        table.refcount += 1

    def put_page(self, table: S2Table) -> None:
        """Drop a reference; the last one frees the page (it becomes poison).

        A table page may be freed only once no hardware walker can reach it: the
        entry that linked it was changed first (and the change's TLBI completed,
        which ``stale_tlb_entry`` checks).  Freeing one that a live entry still
        links is ``reachable_freed_table`` at once, whether or not a walker
        happens to read it before the entry changes.
        """
        table.refcount -= 1
        if table.refcount == 0:
            level = self.linked_at(table)
            if level is not None:
                raise InvariantViolation("reachable_freed_table", f"gfn={table.gfn:#x} "
                                         f"level={table.level} pfn={table.pfn:#x} freed while "
                                         f"the level {level} entry links it")
            table.freed = True
            table.ptes = _FreedTable(table)
        elif table.refcount < 0:
            raise InvariantViolation("double_free_table", f"gfn={table.gfn:#x} "
                                     f"level={table.level} pfn={table.pfn:#x}")

    def linked_at(self, table: S2Table):
        """The level of the live entry that still links ``table``, or None.

        The entry a walk from the root for the table's gfn reaches one level up;
        a subtree unlinked as a whole is not reached (the walk never enters it).
        A walk cache holding an unlinked table is ``stale_tlb_entry``'s business.
        """
        parent, level = self.root, KVM_PGTABLE_FIRST_LEVEL
        while level < table.level - 1 and not parent.freed:
            pte = parent.ptes[kvm_pgtable_idx(table.gfn, level)]
            if not kvm_pte_table(pte, level):
                return None
            parent, level = self.follow(pte), level + 1
        if parent.freed or level != table.level - 1:
            return None
        pte = parent.ptes[kvm_pgtable_idx(table.gfn, level)]
        return level if kvm_pte_table(pte, level) and kvm_pte_to_pfn(pte) == table.pfn else None

    def free_unlinked_table_rcu(self, table: S2Table, level: int) -> None:
        """stage2_free_unlinked_table (mmu.c): free the subtree after a grace period."""
        self.rcu.call_rcu(lambda: self.free_unlinked(table, level))

    def free_unlinked(self, table: S2Table, level: int) -> None:
        """kvm_pgtable_stage2_free_unlinked: drop every reference the subtree holds.

        Runs outside any walk (an RCU callback, or pKVM's exclusive path), so it
        is plain code, not a generator.
        """
        walker = Walker(_stage2_free_walker,
                        KVM_PGTABLE_WALK_LEAF | KVM_PGTABLE_WALK_TABLE_POST, self)
        run_to_end(_walk(self, _WalkData(walker, 0, 0, GRANULE_PAGES[level]), table, level + 1))
        if table.refcount != 1:
            raise InvariantViolation("leaked_table_page", f"gfn={table.gfn:#x} level={level + 1}"
                                     f" refcount={table.refcount} after free_unlinked")
        self.put_page(table)


def run_to_end(gen):
    """Drain a walk that no other thread can see (an unlinked subtree)."""
    try:
        while True:
            next(gen)
    except StopIteration as stop:
        return stop.value


# --- the generic walker (kvm_pgtable_walk) -------------------------------------------

def _continue(walker: Walker, ret: int) -> bool:
    """kvm_pgtable_walk_continue: -EAGAIN stops only a fault handler's walk."""
    if ret == EAGAIN:
        return not walker.flags & KVM_PGTABLE_WALK_HANDLE_FAULT
    return ret == 0


def _visit(pgt: KvmPgtable, data: _WalkData, table: S2Table, index: int, level: int):
    """Generator: __kvm_pgtable_visit."""
    walker = data.walker
    flags = walker.flags
    yield
    old = table.ptes[index]
    ctx = VisitCtx(table, index, old, walker.arg, data.start, data.addr, data.end, level, flags)
    ret, reload = 0, False
    is_table = kvm_pte_table(old, level)
    if is_table and flags & KVM_PGTABLE_WALK_TABLE_PRE:
        ret = yield from walker.cb(ctx, KVM_PGTABLE_WALK_TABLE_PRE)
        reload = True
    if not is_table and flags & KVM_PGTABLE_WALK_LEAF:
        ret = yield from walker.cb(ctx, KVM_PGTABLE_WALK_LEAF)
        reload = True
    # Re-read after the callback: it may have installed a table to descend into, or
    # (pre-order) replaced the table by a block and handed the old one to teardown.
    if reload and not (is_table and faults.active("stage2-no-reload-after-pre")):
        ctx.old = table.ptes[index]
        is_table = kvm_pte_table(ctx.old, level)
    if _continue(walker, ret):
        if not is_table:
            granule = GRANULE_PAGES[level]
            data.addr = (data.addr & -granule) + granule
        else:
            ret = yield from _walk(pgt, data, pgt.follow(ctx.old), level + 1)
            if _continue(walker, ret) and flags & KVM_PGTABLE_WALK_TABLE_POST:
                ret = yield from walker.cb(ctx, KVM_PGTABLE_WALK_TABLE_POST)
    return 0 if _continue(walker, ret) else ret


def _walk(pgt: KvmPgtable, data: _WalkData, table: S2Table, level: int):
    """Generator: __kvm_pgtable_walk over one table from the walk's current address."""
    ret = 0
    for index in range(kvm_pgtable_idx(data.addr, level), PTRS_PER_PTE):
        if data.addr >= data.end:
            break
        ret = yield from _visit(pgt, data, table, index, level)
        if ret:
            break
    return ret


def kvm_pgtable_walk(pgt: KvmPgtable, addr: int, size: int, walker: Walker):
    """Generator: walk [addr, addr+size) (pages); a shared walk holds RCU throughout."""
    shared = walker.flags & KVM_PGTABLE_WALK_SHARED
    token = pgt.rcu.read_lock() if shared else None
    try:
        return (yield from _walk(pgt, _WalkData(walker, addr, addr, addr + size), pgt.root,
                                 KVM_PGTABLE_FIRST_LEVEL))
    finally:
        if shared:
            pgt.rcu.read_unlock(token)


def kvm_pgtable_get_leaf(pgt: KvmPgtable, gfn: int, level: int = KVM_PGTABLE_LAST_LEVEL):
    """``(pte, level)`` where a walk for ``gfn`` stops: at a non-table entry, or at
    ``level`` (a lookup between ops: no yield)."""
    table, at = pgt.root, KVM_PGTABLE_FIRST_LEVEL
    while True:
        pte = table.ptes[kvm_pgtable_idx(gfn, at)]
        if at == level or not kvm_pte_table(pte, at):
            return pte, at
        table, at = pgt.follow(pte), at + 1


# --- PTE updates: the shared-walk locking protocol ---------------------------------------

def stage2_try_set_pte(ctx: VisitCtx, new: int):
    """Generator: store ``new``; a shared walker cmpxchg's against the value it read."""
    yield
    ptes = ctx.table.ptes
    if ctx.shared and ptes[ctx.index] != ctx.old:
        return False
    ptes[ctx.index] = new
    return True


def stage2_try_break_pte(ctx: VisitCtx, pgt: KvmPgtable):
    """Generator: lock the entry invalid, then invalidate the TLBs for its old value.

    A table's whole range is invalidated (its leaves and walk-cache entries
    anywhere in it may be cached); a leaf by IPA with its level as the hint.
    """
    if stage2_pte_is_locked(ctx.old):
        return False  # another shared walker owns it
    if not (yield from stage2_try_set_pte(ctx, KVM_INVALID_PTE_LOCKED)):
        return False
    if not ctx.flags & KVM_PGTABLE_WALK_SKIP_BBM_TLBI:
        if kvm_pte_table(ctx.old, ctx.level):
            granule = GRANULE_PAGES[ctx.level]
            if faults.active("stage2-table-break-tlbi-ipa"):
                pgt.tlbi.flush_vmid_ipa(ctx.addr, ctx.level)  # one page of the old table
            else:
                pgt.tlbi.flush_vmid_range(ctx.addr & -granule, granule)
        elif kvm_pte_valid(ctx.old):
            pgt.tlbi.flush_vmid_ipa(ctx.addr, ctx.level)
        yield
    if stage2_pte_is_counted(ctx.old):
        pgt.put_page(ctx.table)
    return True


def stage2_make_pte(ctx: VisitCtx, pgt: KvmPgtable, new: int):
    """Generator: publish ``new`` over the locked entry (smp_store_release)."""
    if not stage2_pte_is_locked(ctx.table.ptes[ctx.index]):
        raise InvariantViolation("make_pte_not_locked", f"gfn={ctx.addr:#x} level={ctx.level}")
    if stage2_pte_is_counted(new):
        pgt.get_page(ctx.table)
    yield
    ctx.table.ptes[ctx.index] = new


# --- map -----------------------------------------------------------------------------------

@dataclass
class Stage2MapData:
    """struct stage2_map_data (``phys`` is a pfn)."""

    pgt: KvmPgtable
    phys: int
    attr: int
    force_pte: bool = False


def kvm_block_mapping_supported(ctx: VisitCtx, phys: int) -> bool:
    granule = GRANULE_PAGES[ctx.level]
    return (kvm_level_supports_block_mapping(ctx.level) and granule <= ctx.end - ctx.addr
            and phys % granule == 0 and ctx.addr % granule == 0)


def stage2_leaf_mapping_allowed(ctx: VisitCtx, data: Stage2MapData) -> bool:
    if data.force_pte and ctx.level < KVM_PGTABLE_LAST_LEVEL:
        return False
    return (ctx.level == KVM_PGTABLE_LAST_LEVEL
            or kvm_block_mapping_supported(ctx, data.phys + ctx.addr - ctx.start))


def stage2_map_walker_try_leaf(ctx: VisitCtx, data: Stage2MapData):
    """Generator: install the leaf at this level, by break-before-make."""
    if not stage2_leaf_mapping_allowed(ctx, data):
        return E2BIG
    new = kvm_init_valid_leaf_pte(data.phys + ctx.addr - ctx.start, data.attr, ctx.level)
    # The same mapping, or only the permissions differ: the vCPU faults again if it
    # still needs to, and then takes the relax-permissions path.
    if not stage2_pte_needs_update(ctx.old, new):
        return EAGAIN
    # Only software bits change: no break needed, and only outside a shared walk.
    if not ctx.shared and not (ctx.old ^ new) & ~KVM_PTE_LEAF_ATTR_HI_SW:
        yield from stage2_try_set_pte(ctx, new)
        return 0
    if not (yield from stage2_try_break_pte(ctx, data.pgt)):
        return EAGAIN
    yield from stage2_make_pte(ctx, data.pgt, new)
    return 0


def stage2_map_walk_table_pre(ctx: VisitCtx, data: Stage2MapData):
    """Generator: coalesce: replace a table by a block, then tear the table down.

    The block goes in first (try_leaf breaks the table entry and invalidates
    its range), and only then is the unlinked subtree handed to
    ``free_unlinked_table``: no hardware walker can reach it after the TLBI,
    and shared software walkers still inside it are what the RCU deferral waits for.
    """
    childp = data.pgt.follow(ctx.old)
    if not stage2_leaf_mapping_allowed(ctx, data):
        return 0
    if faults.active("stage2-block-before-break"):
        # The block replaces the table by cmpxchg, with no break and no TLBI.
        new = kvm_init_valid_leaf_pte(data.phys + ctx.addr - ctx.start, data.attr, ctx.level)
        if not (yield from stage2_try_set_pte(ctx, new)):
            return EAGAIN
        data.pgt.free_unlinked_table(childp, ctx.level)
        return 0
    if faults.active("stage2-teardown-before-break"):
        # The subtree goes first, while the entry still links it and the TLBs still
        # cache it (pKVM frees it at once: hardware walkers read a freed page).
        data.pgt.free_unlinked_table(childp, ctx.level)
        return (yield from stage2_map_walker_try_leaf(ctx, data))
    ret = yield from stage2_map_walker_try_leaf(ctx, data)
    if ret:
        return ret
    data.pgt.free_unlinked_table(childp, ctx.level)
    return 0


def stage2_map_walk_leaf(ctx: VisitCtx, data: Stage2MapData):
    """Generator: map here, or (-E2BIG) put a table where the leaf cannot go."""
    ret = yield from stage2_map_walker_try_leaf(ctx, data)
    if ret != E2BIG:
        return ret
    if ctx.level == KVM_PGTABLE_LAST_LEVEL:
        return EINVAL
    pgt = data.pgt
    childp = pgt.zalloc_page(ctx.level + 1, ctx.addr & -GRANULE_PAGES[ctx.level])
    if not (yield from stage2_try_break_pte(ctx, pgt)):
        pgt.put_page(childp)
        return EAGAIN
    # A block replaced by an empty table: the rest of its range faults back lazily.
    yield from stage2_make_pte(ctx, pgt, kvm_init_table_pte(childp.pfn))
    return 0


def _stage2_map_walker(ctx: VisitCtx, visit: int):
    if visit == KVM_PGTABLE_WALK_TABLE_PRE:
        return (yield from stage2_map_walk_table_pre(ctx, ctx.arg))
    return (yield from stage2_map_walk_leaf(ctx, ctx.arg))


def kvm_pgtable_stage2_map(pgt: KvmPgtable, addr: int, size: int, phys: int, prot: int,
                           flags: int = 0):
    """Generator: map [addr, addr+size) to pfns from ``phys`` with ``prot``."""
    data = Stage2MapData(pgt, phys, stage2_set_prot_attr(prot))
    walker = Walker(_stage2_map_walker,
                    flags | KVM_PGTABLE_WALK_TABLE_PRE | KVM_PGTABLE_WALK_LEAF, data)
    return (yield from kvm_pgtable_walk(pgt, addr, size, walker))


# --- unmap -----------------------------------------------------------------------------------

def _stage2_unmap_walker(ctx: VisitCtx, visit: int):
    """Generator: stage2_unmap_walker (exclusive: mmu_lock held for write).

    Leaves are cleared and their TLB invalidation deferred to one range TLBI
    after the walk (FEAT_TLBIRANGE with FWB).  A table left with no entries is
    cleared, invalidated by IPA with an unknown level, and freed at once: no
    shared walker can be inside it, and the TLBI took it from hardware walkers.
    """
    pgt = ctx.arg
    if not kvm_pte_valid(ctx.old):
        if stage2_pte_is_counted(ctx.old):
            yield from stage2_try_set_pte(ctx, 0)
            pgt.put_page(ctx.table)
        return 0
    childp = None
    if kvm_pte_table(ctx.old, ctx.level):
        childp = pgt.follow(ctx.old)
        if childp.refcount != 1:
            return 0
    yield from stage2_try_set_pte(ctx, 0)
    if childp is not None:
        pgt.tlbi.flush_vmid_ipa(ctx.addr, TLBI_TTL_UNKNOWN)
    pgt.put_page(ctx.table)
    if childp is not None:
        pgt.put_page(childp)
    return 0


def kvm_pgtable_stage2_unmap(pgt: KvmPgtable, addr: int, size: int):
    """Generator: unmap [addr, addr+size), then the deferred range TLBI."""
    walker = Walker(_stage2_unmap_walker, KVM_PGTABLE_WALK_LEAF | KVM_PGTABLE_WALK_TABLE_POST,
                    pgt)
    ret = yield from kvm_pgtable_walk(pgt, addr, size, walker)
    pgt.tlbi.flush_vmid_range(addr, size)
    return ret


# --- attributes: write-protect, relax permissions ---------------------------------------------

@dataclass
class Stage2AttrData:
    attr_set: int
    attr_clr: int
    pte: int = 0
    level: int = TLBI_TTL_UNKNOWN


def _stage2_attr_walker(ctx: VisitCtx, visit: int):
    data = ctx.arg
    if not kvm_pte_valid(ctx.old):
        return EAGAIN
    data.level, data.pte = ctx.level, ctx.old
    pte = (ctx.old & ~data.attr_clr) | data.attr_set
    if pte != ctx.old and not (yield from stage2_try_set_pte(ctx, pte)):
        return EAGAIN
    return 0


def stage2_update_leaf_attrs(pgt: KvmPgtable, addr: int, size: int, attr_set: int,
                             attr_clr: int, flags: int = 0):
    """Generator: set/clear leaf attribute bits over a range; returns (ret, data)."""
    mask = KVM_PTE_LEAF_ATTR_LO | KVM_PTE_LEAF_ATTR_HI
    data = Stage2AttrData(attr_set & mask, attr_clr & mask)
    walker = Walker(_stage2_attr_walker, flags | KVM_PGTABLE_WALK_LEAF, data)
    ret = yield from kvm_pgtable_walk(pgt, addr, size, walker)
    return ret, data


def kvm_pgtable_stage2_wrprotect(pgt: KvmPgtable, addr: int, size: int):
    """Generator: clear S2AP_W on the leaves of a range (the caller flushes)."""
    ret, _ = yield from stage2_update_leaf_attrs(pgt, addr, size, 0,
                                                 KVM_PTE_LEAF_ATTR_LO_S2_S2AP_W)
    return ret


def kvm_pgtable_stage2_relax_perms(pgt: KvmPgtable, vcpu, addr: int, prot: int, flags: int):
    """Generator: add ``prot``'s permissions to the leaf at ``addr``, no break needed.

    A permission fault came from a TLB entry of this vCPU, so the local TLBI
    (``__kvm_tlb_flush_vmid_ipa_nsh``) follows both on success and on -EAGAIN:
    without it the vCPU would fault on its stale entry forever.  On -EAGAIN the
    walk stopped before recording the leaf's level (mainline passes its
    uninitialised ``level`` to the TLBI then); the model passes TLBI_TTL_UNKNOWN.
    """
    set_, clr = 0, 0
    if prot & KVM_PGTABLE_PROT_R:
        set_ |= KVM_PTE_LEAF_ATTR_LO_S2_S2AP_R
    if prot & KVM_PGTABLE_PROT_W:
        set_ |= KVM_PTE_LEAF_ATTR_LO_S2_S2AP_W
    if prot & KVM_PGTABLE_PROT_X:
        clr |= KVM_PTE_LEAF_ATTR_HI_S2_XN
    ret, data = yield from stage2_update_leaf_attrs(pgt, addr, 1, set_, clr, flags)
    if ret in (0, EAGAIN):
        pgt.tlbi.flush_vmid_ipa_nsh(vcpu, addr, data.level)
    return ret


# --- eager split -----------------------------------------------------------------------------------

def kvm_pgtable_stage2_create_unlinked(pgt: KvmPgtable, phys: int, level: int, prot: int,
                                       force_pte: bool) -> S2Table:
    """A detached table mapping one ``level`` entry's worth from ``phys``, built with the
    map walker (no BBM TLBI: nothing can have cached an entry of a table nobody sees)."""
    data = Stage2MapData(pgt, phys, stage2_set_prot_attr(prot), force_pte)
    walker = Walker(_stage2_map_walker, KVM_PGTABLE_WALK_LEAF | KVM_PGTABLE_WALK_SKIP_BBM_TLBI
                    | KVM_PGTABLE_WALK_SKIP_CMO, data)
    table = pgt.zalloc_page(level + 1, 0)
    run_to_end(_walk(pgt, _WalkData(walker, 0, 0, GRANULE_PAGES[level]), table, level + 1))
    return table


def _relocate(pgt: KvmPgtable, table: S2Table, gfn: int) -> None:
    """Give an unlinked subtree the gfns of the entry it is about to replace."""
    table.gfn = gfn
    for i in table.used():
        pte = table.ptes[i]
        if kvm_pte_table(pte, table.level):
            _relocate(pgt, pgt.follow(pte), gfn + i * GRANULE_PAGES[table.level])


def _stage2_split_walker(ctx: VisitCtx, visit: int):
    """Generator: replace a valid block by a table of pages with its permissions."""
    pgt = ctx.arg
    level, pte = ctx.level, ctx.old
    if level == KVM_PGTABLE_LAST_LEVEL or not kvm_pte_valid(pte):
        return 0
    prot = kvm_pgtable_stage2_pte_prot(pte)
    childp = kvm_pgtable_stage2_create_unlinked(pgt, kvm_pte_to_pfn(pte), level, prot, True)
    _relocate(pgt, childp, ctx.addr & -GRANULE_PAGES[level])
    if not (yield from stage2_try_break_pte(ctx, pgt)):
        pgt.free_unlinked(childp, level)
        return EAGAIN
    yield from stage2_make_pte(ctx, pgt, kvm_init_table_pte(childp.pfn))
    return 0


def kvm_pgtable_stage2_split(pgt: KvmPgtable, addr: int, size: int, flags: int = 0):
    """Generator: split every block of [addr, addr+size) down to pages."""
    return (yield from kvm_pgtable_walk(pgt, addr, size,
                                        Walker(_stage2_split_walker,
                                               flags | KVM_PGTABLE_WALK_LEAF, pgt)))


def _stage2_free_walker(ctx: VisitCtx, visit: int):
    """Generator: stage2_free_walker: drop the references an entry holds."""
    if stage2_pte_is_counted(ctx.old):
        pgt = ctx.arg
        pgt.put_page(ctx.table)
        if kvm_pte_table(ctx.old, ctx.level):
            pgt.put_page(pgt.follow(ctx.old))
    return 0
    yield  # a generator, as every walker callback

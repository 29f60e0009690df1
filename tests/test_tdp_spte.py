"""The tdp building blocks in isolation: SPTE bits, tdp_iter, table pages, the scheduler."""

from __future__ import annotations

import pickle

import pytest

from mmufuzz.harness.ops import PG_LEVEL_2M, PG_LEVEL_4K
from mmufuzz.harness.target import InvariantViolation
from mmufuzz.harness.tdp import checkpoint
from mmufuzz.harness.tdp.hostmem import Backing, HostMemory
from mmufuzz.harness.tdp.iter import TdpIter
from mmufuzz.harness.tdp.pgalloc import PageTableAllocator, used_entries
from mmufuzz.harness.tdp.sched import Hang, Rcu, RwLock, interleave, run
from mmufuzz.harness.tdp.spte import (
    PT_WRITABLE_MASK,
    ACC_ALL,
    ACC_EXEC_MASK,
    FROZEN_SPTE,
    MMIO_SPTE_GEN_MASK,
    SHADOW_NONPRESENT_VALUE,
    TDX_MMIO_VALUE,
    VMX_EPT_MISCONFIG_WX_VALUE,
    check_mmio_spte,
    get_mmio_spte_access,
    get_mmio_spte_generation,
    get_mmio_spte_gfn,
    is_frozen_spte,
    is_large_pte,
    is_last_spte,
    is_mmio_spte,
    is_shadow_present_pte,
    is_writable_pte,
    leaf_spte_change_narrows,
    leaf_spte_change_needs_tlb_flush,
    make_huge_page_split_spte,
    make_mmio_spte,
    make_nonleaf_spte,
    make_spte,
    spte_to_pfn,
)

# --- SPTE encoding -------------------------------------------------------------

def test_nonpresent_and_frozen_values_are_not_present_and_keep_suppress_ve():
    for spte in (SHADOW_NONPRESENT_VALUE, FROZEN_SPTE):
        assert not is_shadow_present_pte(spte)
        assert spte >> 63 == 1
        assert not is_mmio_spte(spte, VMX_EPT_MISCONFIG_WX_VALUE)
        assert not is_mmio_spte(spte, TDX_MMIO_VALUE)
    assert is_frozen_spte(FROZEN_SPTE) and not is_frozen_spte(SHADOW_NONPRESENT_VALUE)


def test_make_spte_sets_kvm_bits():
    spte = make_spte(0x1234, PG_LEVEL_2M, ACC_ALL)
    assert spte & (1 << 11) and spte & (1 << 7)          # present-to-MMU, large
    assert spte_to_pfn(spte) == 0x1234
    assert is_writable_pte(spte) and spte & (1 << 57) and spte & (1 << 58)
    assert is_last_spte(spte, PG_LEVEL_2M)
    readonly = make_spte(0x1234, PG_LEVEL_4K, ACC_EXEC_MASK)
    assert not is_writable_pte(readonly) and not is_large_pte(readonly)
    no_host_write = make_spte(5, PG_LEVEL_4K, ACC_ALL, host_writable=False)
    assert not is_writable_pte(no_host_write) and not no_host_write & (1 << 58)
    table = make_nonleaf_spte(7)
    assert is_shadow_present_pte(table) and not is_last_spte(table, PG_LEVEL_2M)


def test_split_child_i_maps_pfn_plus_i_at_4k():
    huge = make_spte(0x400, PG_LEVEL_2M, ACC_ALL)
    for i in (0, 1, 511):
        child = make_huge_page_split_spte(huge, PG_LEVEL_2M, i)
        assert spte_to_pfn(child) == 0x400 + i
        assert not is_large_pte(child) and is_writable_pte(child)


def test_write_protect_keeps_mmu_writable_and_narrows():
    spte = make_spte(9, PG_LEVEL_4K, ACC_ALL)
    wp = spte & ~PT_WRITABLE_MASK  # what write_protect installs
    assert not is_writable_pte(wp) and wp & (1 << 58)
    assert leaf_spte_change_narrows(spte, wp)
    assert not leaf_spte_change_narrows(wp, spte)
    assert leaf_spte_change_narrows(spte, make_spte(10, PG_LEVEL_4K, ACC_ALL))
    # Mainline's test asks only whether MMU-writable goes: write protection keeps it.
    assert not leaf_spte_change_needs_tlb_flush(spte, wp)
    assert not leaf_spte_change_needs_tlb_flush(wp, spte)
    assert leaf_spte_change_needs_tlb_flush(wp, wp & ~(1 << 58))


@pytest.mark.parametrize("mmio_value", [VMX_EPT_MISCONFIG_WX_VALUE, TDX_MMIO_VALUE])
def test_mmio_spte_round_trips_gfn_and_generation(mmio_value):
    gen = 0x5A5A5
    spte = make_mmio_spte(0x12345, ACC_ALL, gen, mmio_value)
    assert is_mmio_spte(spte, mmio_value) and not is_shadow_present_pte(spte)
    assert get_mmio_spte_gfn(spte) == 0x12345
    assert get_mmio_spte_generation(spte) == gen & MMIO_SPTE_GEN_MASK
    assert get_mmio_spte_access(spte) == 0  # EPT keeps no access bits (access mask 0)
    assert check_mmio_spte(spte, gen) and not check_mmio_spte(spte, gen + 1)


def test_tdx_mmio_spte_has_suppress_ve_clear_and_default_has_misconfig_pattern():
    tdx = make_mmio_spte(1, ACC_ALL, 3, TDX_MMIO_VALUE)
    assert tdx >> 63 == 0 and tdx & 7 == 0
    vmx = make_mmio_spte(1, ACC_ALL, 3, VMX_EPT_MISCONFIG_WX_VALUE)
    assert vmx & 7 == VMX_EPT_MISCONFIG_WX_VALUE


# --- table pages and tdp_iter ---------------------------------------------------

def _tree():
    """A root with one 2M leaf at gfn 0x200 and one 4K leaf at gfn 0x401."""
    alloc = PageTableAllocator(HostMemory())
    root = alloc.alloc(4, 0, False)
    l3 = alloc.alloc(3, 0, False)
    l2 = alloc.alloc(2, 0, False)
    l1 = alloc.alloc(1, 0x400, False)
    root.spt[0] = make_nonleaf_spte(l3.pfn)
    l3.spt[0] = make_nonleaf_spte(l2.pfn)
    l2.spt[1] = make_spte(0x9000, PG_LEVEL_2M, ACC_ALL)
    l2.spt[2] = make_nonleaf_spte(l1.pfn)
    l1.spt[1] = make_spte(0x777, PG_LEVEL_4K, ACC_ALL)
    return alloc, root, l1


def test_iter_walks_pre_order_steps_down_side_and_up():
    alloc, root, _ = _tree()
    seen = []
    it = TdpIter(alloc, root, 0x200, 0x402)
    while it.valid:
        if it.old_spte != SHADOW_NONPRESENT_VALUE:
            seen.append((it.level, it.gfn))
        it.next()
    assert seen == [(4, 0), (3, 0), (2, 0x200), (2, 0x400), (1, 0x401)]


def test_iter_min_level_stops_descent():
    alloc, root, _ = _tree()
    it = TdpIter(alloc, root, 0x400, 0x401, min_level=PG_LEVEL_2M)
    levels = []
    while it.valid:
        levels.append(it.level)
        it.next()
    assert levels == [4, 3, 2]


def test_reading_a_freed_table_is_walker_read_freed_table():
    alloc, root, l1 = _tree()
    alloc.free(l1)
    with pytest.raises(InvariantViolation) as error:
        it = TdpIter(alloc, root, 0x401, 0x402)
        while it.valid:
            it.next()
    assert error.value.name == "walker_read_freed_table"
    assert l1 not in alloc.live_pages()


def test_used_entries_are_the_entries_not_shadow_nonpresent_in_order():
    spt = [SHADOW_NONPRESENT_VALUE] * 512
    for i in (511, 0, 64, 63, 200):
        spt[i] = FROZEN_SPTE if i == 200 else make_nonleaf_spte(0x1000 + i)
    assert used_entries(spt) == [0, 63, 64, 200, 511]
    assert used_entries([SHADOW_NONPRESENT_VALUE] * 512) == []
    assert used_entries(list(range(512))) == list(range(512))


def test_table_pages_pickle_with_their_entries_refcounts_and_poison():
    """A pickled tree of tables is the same tree."""
    alloc, root, l1 = _tree()
    root.refcount = 1
    alloc.free(l1)
    copy = pickle.loads(pickle.dumps(alloc, pickle.HIGHEST_PROTOCOL))
    for pfn, page in alloc.pages.items():
        twin = copy.pages[pfn]
        assert (twin.level, twin.gfn, twin.mirror, twin.refcount, twin.freed) == \
            (page.level, page.gfn, page.mirror, page.refcount, page.freed)
        if not page.freed:
            assert twin.spt == page.spt
    with pytest.raises(InvariantViolation) as error:
        copy.pages[l1.pfn].spt[0]
    assert error.value.name == "walker_read_freed_table"



def test_a_checkpoint_copies_entry_lists_and_shares_only_shared_values():
    """Each restore is a new graph: its tables' entries are fresh lists holding the very
    SHADOW_NONPRESENT_VALUE object (scans count it by identity), an object reached twice
    is one object, and a Shared value is the snapshot's own."""
    class Record(checkpoint.Shared):
        __slots__ = ("value",)

        def __init__(self, value):
            self.value = value
    alloc, root, l1 = _tree()
    record = Record([1, 2])
    graph = {"alloc": alloc, "again": root, "record": record, "counts": [0] * 100}
    snapshot = checkpoint.dumps(graph)
    root.spt[5] = 0x1234  # what happens to the original after the snapshot is not in it
    first, second = checkpoint.loads(snapshot), checkpoint.loads(snapshot)
    for copy in (first, second):
        twin = copy["alloc"].pages[root.pfn]
        assert twin is copy["again"] and twin.spt[5] is SHADOW_NONPRESENT_VALUE
        assert copy["alloc"].pages[l1.pfn].spt == l1.spt
        assert copy["record"] is record and copy["counts"] == [0] * 100
    first["counts"][0] = 1
    first["again"].spt[7] = 1
    assert second["counts"][0] == 0 and second["again"].spt[7] is SHADOW_NONPRESENT_VALUE
    assert checkpoint.loads(snapshot)["alloc"].pages[root.pfn].spt[7] is SHADOW_NONPRESENT_VALUE


# --- host memory -------------------------------------------------------------------

def test_backing_keeps_2m_offsets_and_migration_poisons_old_pages():
    host = HostMemory()
    backing = Backing(host, 0x400, 3, huge=True)
    assert backing.pfn(0) % 512 == 3 and backing.pfn(509) % 512 == 0
    old = backing.pfn(600)
    host.write(old, 5, 0xAB)
    assert backing.host_page_range(600, 601) == (509, 1021)  # one whole 2M host page
    backing.migrate(509, 1021)
    new = backing.pfn(600)
    assert new != old and new % 512 == old % 512
    assert host.read(new, 5) == 0xAB
    assert backing.host_level(600) == PG_LEVEL_4K
    assert backing.host_level(0) == backing.host_level(1021) == PG_LEVEL_2M
    with pytest.raises(InvariantViolation) as error:
        host.read(old, 5)
    assert error.value.name == "stale_host_page_access"


# --- scheduler -----------------------------------------------------------------------

def _steps(log, name, n):
    for i in range(n):
        log.append(f"{name}{i}")
        yield
    return name


def test_interleave_follows_schedule_bits_then_round_robin():
    log = []
    assert interleave([_steps(log, "a", 3), _steps(log, "b", 3)], 0b110) == ("a", "b")
    assert log[:3] == ["a0", "b0", "b1"]
    assert sorted(log) == ["a0", "a1", "a2", "b0", "b1", "b2"]


def test_blocked_side_lets_the_other_run_and_deadlock_is_a_hang():
    lock = RwLock()

    def writer():
        yield from lock.write_lock()
        yield
        lock.write_unlock()
        return "w"

    def reader():
        yield from lock.read_lock()
        lock.read_unlock()
        return "r"

    assert interleave([writer(), reader()], 0b10) == ("w", "r")
    held = RwLock()
    held.writer = True
    with pytest.raises(Hang):
        run(held.read_lock())


def test_a_waiting_writer_queues_new_readers_behind_it():
    """qrwlock: a reader that retries cannot starve a writer that waits for the lock."""
    lock, order = RwLock(), []
    lock.readers = 1  # a reader holds the lock when the writer arrives

    def writer():
        yield from lock.write_lock()
        order.append("w")
        lock.write_unlock()

    def reader():
        yield from lock.read_lock()
        order.append("r")
        lock.read_unlock()

    waiting = writer()
    next(waiting)  # the writer spins: readers present
    assert lock.writers_waiting == 1
    late = reader()
    assert next(late) is not None  # blocked behind the waiting writer, not admitted
    lock.readers = 0  # the first reader leaves
    assert interleave([late, waiting], 0) == (None, None)
    assert order == ["w", "r"] and lock.writers_waiting == 0


def test_lock_waiters_are_served_in_arrival_order():
    """qrwlock's wait_lock queue: a writer that comes later never passes one that waits,
    and a reader queued before a writer gets in before it, whatever the schedule picks."""
    lock, order = RwLock(), []
    lock.writer = True  # held when everyone arrives

    def writer(name):
        yield from lock.write_lock()
        order.append(name)
        yield
        lock.write_unlock()

    def reader(name):
        yield from lock.read_lock()
        order.append(name)
        yield
        lock.read_unlock()

    first, middle, last = writer("w1"), reader("r"), writer("w2")
    for side in (first, middle, last):
        assert next(side) is not None  # all three queue behind the holder
    lock.writer = False
    # The schedule always picks the latest arrival first; the queue decides anyway.
    assert interleave([last, middle, first], 0) == (None, None, None)
    assert order == ["w1", "r", "w2"]
    fresh = writer("w3")
    lock.readers = 1
    assert next(fresh) is not None and lock.needbreak()
    lock.readers = 0
    late = writer("w4")
    assert next(late) is not None  # the lock is free, but w3 waits: no fast path
    assert interleave([late, fresh], 0) == (None, None)
    assert order[-2:] == ["w3", "w4"] and not lock.needbreak()


def test_rcu_callback_waits_for_older_readers_only():
    rcu, freed = Rcu(), []
    old = rcu.read_lock()
    rcu.call_rcu(lambda: freed.append(1))
    young = rcu.read_lock()
    rcu.process()
    assert freed == [] and rcu.pending()
    rcu.read_unlock(old)
    rcu.process()
    assert freed == [1] and not rcu.pending()
    rcu.read_unlock(young)


def test_interleave_of_n_sides_reads_the_schedule_in_base_n_then_takes_turns():
    log = []
    # Base 3, least significant digit first: 0x15 = 21 = 2*9 + 1*3 + 0 -> a b c, then
    # step i goes to side i mod 3.
    sides = [_steps(log, name, 3) for name in "abc"]
    assert interleave(sides, 0x15) == ("a", "b", "c")
    assert log[:4] == ["a0", "b0", "c0", "a1"]
    # Base 4: 0x1b = 0b00_01_10_11 -> d c b, then step 3 to d (3 mod 4), step 4 to a.
    log.clear()
    interleave([_steps(log, name, 2) for name in "abcd"], 0x1b)
    assert log[:5] == ["d0", "c0", "b0", "d1", "a0"]


def test_a_finished_side_passes_its_step_to_the_next_one_after_it():
    log = []
    # c c c c c c: c finishes after two steps, then its picks go to a (after c, cyclically).
    assert interleave([_steps(log, n, s) for n, s in (("a", 2), ("b", 1), ("c", 2))],
                      sum(2 * 3 ** i for i in range(6))) == ("a", "b", "c")
    assert log == ["c0", "c1", "a0", "a1", "b0"]

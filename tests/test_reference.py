"""The reference model, one scenario per rule of SEMANTICS.md (and docs/semantics.md).

Each test states what KVM (or the modelled CPU/TDX module) does and checks the
reference's allowed outcomes through ``run`` (the canonical outcome) and
``step`` (accepting or rejecting a given outcome).
"""

from __future__ import annotations

import pytest

from mmufuzz.harness.ops import (ALREADY_ACCEPTED, EINVAL, FLAG_NAMES, OK, PG_LEVEL_2M, PG_LEVEL_4K,
                         SIZE_MISMATCH, UNSUPPORTED, Accept, Access, AccessKind, DirtyLog,
                         FlushTlb, GetDirtyLog, HostInvalidate, Invlpg, MemoryFaultExit,
                         MemslotAdd, MemslotDelete, MemslotFlag, MemslotMove, MemslotSetFlags,
                         MmioExit, Ok, PageFault, Paging, PteFlag, Recover, SetAttributes, Split,
                         VePending, VmHeader, VmType, WritePte, ZapAll)
from mmufuzz.reference.model import Reference

# --- helpers ------------------------------------------------------------------


def vm(kind: str = "default", vcpus: int = 2) -> Reference:
    return Reference(VmHeader(VmType(kind), vcpus))


def _flags(cls, text: str):
    value = cls(0)
    for name in filter(None, text.split(",")):
        value |= FLAG_NAMES[cls][name]
    return value


def add(slot, base, npages, flags="", host_offset=0):
    return MemslotAdd(slot, base, npages, _flags(MemslotFlag, flags), host_offset)


def set_flags(slot, flags):
    return MemslotSetFlags(slot, _flags(MemslotFlag, flags))


def access(kind, addr, value=None, word=0, vcpu=0, private=False, gva=False):
    return Access(vcpu, addr, gva, word, AccessKind(kind), value, private)


def read(addr, **kw):
    return access("read", addr, **kw)


def write(addr, value, **kw):
    return access("write", addr, value, **kw)


def fetch(addr, **kw):
    return access("fetch", addr, **kw)


def pte(table, index, target, flags="p,rw", vcpu=0):
    return WritePte(vcpu, table, index, target, _flags(PteFlag, flags))


def to_private(base, npages):
    return SetAttributes(base, npages, True)


def to_shared(base, npages):
    return SetAttributes(base, npages, False)


def accept(gpa, level=PG_LEVEL_4K, vcpu=0):
    return Accept(vcpu, gpa, level)


def run(ref, *ops):
    """Run ``ops`` in order; return the last canonical outcome."""
    outcome = None
    for op in ops:
        outcome = ref.run(op)
    return outcome


def allows(ref, op, outcome) -> bool:
    """``outcome`` is allowed for ``op`` (checked on a copy: ``ref`` is unchanged)."""
    return ref.copy().step(op, outcome) is None


def probe(ref, gfns):
    """What shared reads of word 0 of ``gfns`` return now, without changing ``ref``."""
    return [ref.copy().run(read(gfn << 12)) for gfn in gfns]


# --- §C memslots -----------------------------------------------------------------


def test_access_without_slot_gives_mmio_exit_at_exact_byte():
    ref = vm()
    assert ref.run(read(0x300000, word=4)) == MmioExit(0x300020, False)
    assert ref.run(write(0x300000, 1, word=4)) == MmioExit(0x300020, True)
    assert ref.run(fetch(0x300000, word=511)) == MmioExit(0x300ff8, False)


def test_readonly_slot_write_gives_mmio_exit_but_read_and_fetch_complete():
    ref = vm()
    run(ref, add(2, 0x300, 0x10, "readonly"))
    assert ref.run(write(0x301000, 5, word=3)) == MmioExit(0x301018, True)
    assert ref.run(read(0x301000, word=3)) == Ok(0)
    assert ref.run(fetch(0x301000, word=3)) == Ok(0)


def test_write_then_read_returns_value_and_never_written_word_reads_zero():
    ref = vm()
    run(ref, add(0, 0x100, 0x10), write(0x100000, 0x1122, word=7))
    assert ref.run(read(0x100000, word=7, vcpu=1)) == Ok(0x1122)
    assert ref.run(read(0x100000, word=6)) == Ok(0)


def test_delete_then_access_gives_mmio_exit():
    ref = vm()
    run(ref, add(0, 0x100, 0x10), write(0x100000, 7), MemslotDelete(0))
    assert ref.run(read(0x100000)) == MmioExit(0x100000, False)


def test_slot_added_after_delete_starts_zeroed():
    ref = vm()
    run(ref, add(0, 0x100, 0x10), write(0x100000, 7), MemslotDelete(0), add(0, 0x100, 0x10))
    assert ref.run(read(0x100000)) == Ok(0)


def test_moved_slot_keeps_contents_and_old_range_becomes_mmio():
    ref = vm()
    run(ref, add(0, 0x100, 0x100), write(0x105000, 0xab, word=2), MemslotMove(0, 0x400))
    assert ref.run(read(0x405000, word=2)) == Ok(0xab)
    assert ref.run(read(0x105000, word=2)) == MmioExit(0x105010, False)


def test_move_may_overlap_its_own_old_range():
    ref = vm()
    run(ref, add(0, 0x100, 0x10), write(0x100000, 3))
    assert ref.run(MemslotMove(0, 0x108)) == OK
    assert ref.run(read(0x108000)) == Ok(3)


@pytest.mark.parametrize("kind, setup, op", [
    ("default", [add(0, 0x100, 0x10)], add(0, 0x200, 0x10)),                # duplicate id
    ("default", [add(0, 0x100, 0x10)], add(1, 0x10f, 0x10)),                # overlap
    ("default", [add(0, 0x100, 0x10)], add(1, 0xf1, 0x10)),                 # overlap from below
    ("default", [], add(1, (1 << 35) - 8, 0x10)),                           # past the gfn limit
    ("default", [], add(1, 0x100, 0x10, "private")),                        # private, default VM
    ("tdx", [], add(1, 0x100, 0x10, "private,dirty_log")),
    ("tdx", [], add(1, 0x100, 0x10, "private,readonly")),
    ("tdx", [], add(1, 0x100, 0x10, "readonly")),                           # readonly in a TD
    ("default", [], MemslotDelete(3)),                                      # missing slot
    ("default", [], MemslotMove(3, 0x100)),
    ("default", [], set_flags(3, "")),
    ("default", [add(0, 0x100, 0x10), add(1, 0x200, 0x10)], MemslotMove(0, 0x1f8)),
    ("default", [add(0, 0x100, 0x10)], MemslotMove(0, (1 << 35) - 8)),
    ("default", [add(0, 0x100, 0x10)], set_flags(0, "readonly")),          # only dirty_log
    ("default", [add(0, 0x100, 0x10, "host_huge")], set_flags(0, "")),
    ("tdx", [add(0, 0x100, 0x10, "private")], MemslotMove(0, 0x400)),      # private: immutable
    ("tdx", [add(0, 0x100, 0x10, "private")], set_flags(0, "private")),
    ("tdx", [add(0, 0x100, 0x10, "private")], set_flags(0, "private,dirty_log")),
])
def test_invalid_memslot_request_gives_einval_and_changes_nothing(kind, setup, op):
    ref = vm(kind)
    run(ref, *setup, write(0x100000, 9))
    gfns = [0x100, 0x108, 0x1f8, 0x200, 0x400]
    before = probe(ref, gfns)
    assert ref.run(op) == EINVAL
    assert probe(ref, gfns) == before


def test_set_flags_with_the_same_set_is_ok():
    ref = vm()
    run(ref, add(0, 0x100, 0x10, "host_huge"))
    assert ref.run(set_flags(0, "host_huge")) == OK


def test_valid_slot_flag_combinations_are_accepted():
    assert vm().run(add(0, 0x100, 0x10, "readonly,dirty_log,host_huge")) == OK
    assert vm("tdx").run(add(0, 0x100, 0x10, "private,host_huge")) == OK
    assert vm("tdx").run(add(0, 0x100, 0x10, "dirty_log")) == OK


# --- §D / §E private memory ----------------------------------------------------------


def tdx_with_private_slot(npages=0x400):
    ref = vm("tdx")
    run(ref, add(0, 0x200, npages, "private,host_huge"))
    return ref


def test_default_vm_private_ops_are_unsupported():
    ref = vm()
    run(ref, add(0, 0x100, 0x10))
    assert ref.run(read(0x100000, private=True)) == UNSUPPORTED
    assert ref.run(accept(0x100000)) == UNSUPPORTED
    assert ref.run(to_private(0x100, 1)) == UNSUPPORTED
    assert ref.run(read(0x100000)) == Ok(0)


def test_set_attributes_of_zero_pages_is_einval():
    assert vm("tdx").run(SetAttributes(0x100, 0, True)) == EINVAL


def test_set_attributes_is_ok_without_any_slot():
    ref = vm("tdx")
    assert ref.run(to_private(0x5000, 0x10)) == OK
    assert ref.run(read(0x5000000, private=True)) == MemoryFaultExit(0x5000000, True)


def test_attribute_and_intent_mismatch_gives_memory_fault_exit():
    ref = tdx_with_private_slot()
    run(ref, to_private(0x200, 1))
    assert ref.run(read(0x200000, word=5)) == MemoryFaultExit(0x200000, False)
    assert ref.run(write(0x201000, 1, word=5, private=True)) == MemoryFaultExit(0x201000, True)


def test_private_access_outside_a_private_slot_gives_memory_fault_exit():
    ref = vm("tdx")
    run(ref, add(0, 0x100, 0x10), to_private(0x100, 0x20))
    assert ref.run(read(0x100000, private=True)) == MemoryFaultExit(0x100000, True)
    assert ref.run(read(0x110000, private=True)) == MemoryFaultExit(0x110000, True)


def test_shared_access_to_slotless_private_gfn_exits_to_mmio_only_if_an_mmio_spte_is_cached():
    ref = vm("tdx")
    run(ref, to_private(0x300, 1))
    op = read(0x300000, word=1)
    assert ref.run(op) == MemoryFaultExit(0x300000, False)
    assert not allows(ref, op, MmioExit(0x300008, False))  # no shared access cached one
    ref = vm("tdx")
    assert run(ref, read(0x300000), to_private(0x300, 2), op) == MemoryFaultExit(0x300000, False)
    assert allows(ref, op, MmioExit(0x300008, False))  # the attribute zap walks slots only
    assert not allows(ref, op, MmioExit(0x300000, False))
    assert not allows(ref, read(0x301000), MmioExit(0x301000, False))  # another gfn


def test_td_mmio_spte_outlives_a_memslot_and_only_a_fast_zap_drops_it():
    # In a TD the CPU delivers #VE for an MMIO SPTE and the guest's TDVMCALL<MMIO> exits:
    # no generation check, so a slot added later does not stop it.
    ref = vm("tdx")
    assert run(ref, write(0x300000, 5), add(0, 0x300, 1)) == OK
    op = read(0x300000, word=2)
    assert ref.run(op) == Ok(0)
    assert allows(ref, op, MmioExit(0x300010, False))
    assert allows(ref, write(0x300000, 1), MmioExit(0x300000, True))
    run(ref, ZapAll())
    assert not allows(ref, op, MmioExit(0x300010, False))


def test_default_vm_mmio_spte_is_generation_checked():
    ref = vm()
    run(ref, read(0x300000), add(0, 0x300, 1))
    assert not allows(ref, read(0x300000), MmioExit(0x300000, False))


def test_td_private_access_never_meets_an_mmio_spte():
    ref = tdx_with_private_slot()
    assert run(ref, read(0x700000), to_private(0x700, 1)) == OK  # an MMIO SPTE at 0x700
    op = read(0x700000, private=True)
    assert ref.run(op) == MemoryFaultExit(0x700000, True)
    assert not allows(ref, op, MmioExit(0x700000, False))


def test_td_walk_table_read_may_meet_a_stale_mmio_spte():
    ref = vm("tdx", vcpus=1)
    run(ref, Paging(0, 1))
    assert ref.run(read(0x0, gva=True)) == MmioExit(0x1000, False)  # the PML4 read
    run(ref, add(0, 0x0, 0x10))
    assert ref.run(read(0x0, gva=True)) == PageFault(0x0, 0)
    assert allows(ref, read(0x0, gva=True), MmioExit(0x1000, False))


def test_pending_page_gives_ve_pending_and_accepted_page_reads_zero():
    ref = tdx_with_private_slot()
    run(ref, to_private(0x200, 1))
    assert ref.run(read(0x200000, word=2, private=True)) == VePending(0x200010)
    assert ref.run(accept(0x200000)) == OK
    assert ref.run(read(0x200000, word=2, private=True)) == Ok(0)
    run(ref, write(0x200000, 0x55, word=2, private=True))
    assert ref.run(read(0x200000, word=2, private=True)) == Ok(0x55)


def test_shared_contents_survive_a_private_round_trip_private_contents_come_back_zero():
    ref = tdx_with_private_slot()
    run(ref, write(0x201000, 0x77), to_private(0x200, 0x200), accept(0x201000),
        write(0x201000, 0x99, private=True))
    assert ref.run(read(0x201000, private=True)) == Ok(0x99)
    run(ref, to_shared(0x200, 0x200))
    assert ref.run(read(0x201000)) == Ok(0x77)
    run(ref, to_private(0x201, 1))
    assert ref.run(read(0x201000, private=True)) == VePending(0x201000)
    run(ref, accept(0x201000))
    assert ref.run(read(0x201000, private=True)) == Ok(0)


def test_setting_the_same_attribute_again_keeps_contents_and_accept_state():
    ref = tdx_with_private_slot()
    run(ref, write(0x202000, 4), to_private(0x200, 2), accept(0x200000),
        write(0x200000, 0x31, private=True))
    run(ref, to_private(0x200, 2), to_shared(0x202, 1))
    assert ref.run(read(0x200000, private=True)) == Ok(0x31)
    assert ref.run(read(0x201000, private=True)) == VePending(0x201000)
    assert ref.run(read(0x202000)) == Ok(4)


def test_slot_readded_over_private_gfns_starts_zeroed_and_pending():
    ref = tdx_with_private_slot()
    run(ref, to_private(0x200, 1), accept(0x200000), write(0x200000, 8, private=True),
        write(0x201000, 9), MemslotDelete(0), add(1, 0x200, 0x10, "private"))
    assert ref.run(read(0x200000, private=True)) == VePending(0x200000)
    assert ref.run(read(0x201000)) == Ok(0)


def test_accept_4k_then_again_gives_already_accepted():
    ref = tdx_with_private_slot()
    run(ref, to_private(0x200, 1))
    assert ref.run(accept(0x200000)) == OK
    assert ref.run(accept(0x200000)) == ALREADY_ACCEPTED
    assert not allows(ref, accept(0x200000), SIZE_MISMATCH)


def test_accept_of_a_page_that_is_not_private_gives_memory_fault_exit():
    ref = tdx_with_private_slot()
    assert ref.run(accept(0x200000)) == MemoryFaultExit(0x200000, True)
    run(ref, add(1, 0x800, 0x10), to_private(0x800, 1))
    assert ref.run(accept(0x800000)) == MemoryFaultExit(0x800000, True)
    assert ref.run(accept(0x900000)) == MemoryFaultExit(0x900000, True)


def test_accept_2m_all_pending_allows_ok_or_size_mismatch():
    ref = tdx_with_private_slot()
    run(ref, to_private(0x200, 0x200))
    op = accept(0x200000, PG_LEVEL_2M)
    assert str(ref.allowed(op)) == "ok | size_mismatch"
    mismatch = ref.copy()
    assert mismatch.step(op, SIZE_MISMATCH) is None
    assert mismatch.run(read(0x3ff000, private=True)) == VePending(0x3ff000)
    assert ref.step(op, OK) is None
    assert ref.run(read(0x3ff000, word=1, private=True)) == Ok(0)
    assert ref.run(accept(0x3ff000)) == ALREADY_ACCEPTED


def test_accept_2m_all_accepted_allows_already_accepted_or_size_mismatch():
    ref = tdx_with_private_slot()
    run(ref, to_private(0x200, 0x200), accept(0x200000, PG_LEVEL_2M))
    assert str(ref.allowed(accept(0x200000, PG_LEVEL_2M))) == "already_accepted | size_mismatch"


def test_accept_2m_with_some_pages_accepted_gives_size_mismatch():
    ref = tdx_with_private_slot()
    run(ref, to_private(0x200, 0x200), accept(0x205000))
    assert str(ref.allowed(accept(0x200000, PG_LEVEL_2M))) == "size_mismatch"
    assert ref.run(accept(0x204000)) == OK


@pytest.mark.parametrize("setup", [
    [to_private(0x200, 0x1ff)],                              # last page shared
    [to_private(0x200, 0x200), to_shared(0x300, 1)],         # a page in the middle shared
])
def test_accept_2m_over_a_shared_page_gives_size_mismatch(setup):
    ref = tdx_with_private_slot()
    run(ref, *setup)
    assert str(ref.allowed(accept(0x200000, PG_LEVEL_2M))) == "size_mismatch"


@pytest.mark.parametrize("flags, host_offset", [
    ("private", 0),                 # no host_huge: guest_memfd maps 4K pages only
    ("private,host_huge", 0x10),    # the range does not start a host 2M page
])
def test_accept_2m_where_no_2m_leaf_can_map_the_range_gives_size_mismatch(flags, host_offset):
    ref = vm("tdx")
    run(ref, add(0, 0x200, 0x400, flags, host_offset), to_private(0x200, 0x200))
    op = accept(0x200000, PG_LEVEL_2M)
    assert str(ref.allowed(op)) == "size_mismatch"
    for page in range(0x200, 0x400):
        run(ref, accept(page << 12))
    assert str(ref.allowed(op)) == "size_mismatch"   # all accepted, yet at 4K


def test_accept_2m_of_a_range_a_private_fault_touched_may_meet_its_table_first():
    ref = tdx_with_private_slot()
    run(ref, to_private(0x400, 0x200))
    op = accept(0x400000, PG_LEVEL_2M)
    run(ref, to_shared(0x400, 1))
    assert str(ref.allowed(op)) == "memory_fault_exit(0x400000, private)"
    run(ref, read(0x401000, private=True))            # ve_pending: faulted in at 4K
    assert str(ref.allowed(op)) == "memory_fault_exit(0x400000, private) | size_mismatch"
    run(ref, to_shared(0x400, 0x200))                 # the S-EPT table stays with the TD
    assert str(ref.allowed(op)) == "memory_fault_exit(0x400000, private) | size_mismatch"
    assert str(ref.allowed(accept(0x400000))) == "memory_fault_exit(0x400000, private)"


def test_accept_2m_past_the_slot_or_into_another_slot_gives_size_mismatch():
    ref = tdx_with_private_slot(npages=0x100)
    run(ref, add(1, 0x300, 0x100, "private"), to_private(0x200, 0x200))
    assert str(ref.allowed(accept(0x200000, PG_LEVEL_2M))) == "size_mismatch"
    alone = tdx_with_private_slot(npages=0x100)
    run(alone, to_private(0x200, 0x200))
    assert str(alone.allowed(accept(0x200000, PG_LEVEL_2M))) == "size_mismatch"


# --- §F guest paging ----------------------------------------------------------------

# PML4 at gfn 1 -> PDPT gfn 2 -> PD gfn 3; PD[1] -> PT gfn 4 (gva 0x200000.. 4K pages),
# PD[2] is a 2M leaf for gva 0x400000 -> gpa 0x200000.
TABLES = (pte(1, 0, 2), pte(2, 0, 3), pte(3, 1, 4), pte(4, 0, 0x10),
          pte(3, 2, 0x200, "p,rw,ps"))


def paged(vcpus=2, slot_flags="host_huge"):
    ref = vm(vcpus=vcpus)
    run(ref, add(0, 0x0, 0x400, slot_flags), *TABLES, *(Paging(v, 1) for v in range(vcpus)))
    return ref


def test_gva_access_through_a_4k_mapping_reports_the_gpa():
    ref = paged()
    assert ref.run(write(0x200000, 0x1234, word=3, gva=True)) == Ok(None, 0x10018)
    assert ref.run(read(0x10000, word=3)) == Ok(0x1234)
    assert ref.run(read(0x200000, word=3, gva=True, vcpu=1)) == Ok(0x1234, 0x10018)


def test_gva_access_through_a_2m_mapping_reports_the_gpa():
    ref = paged()
    assert ref.run(write(0x5ff000, 0x42, word=1, gva=True)) == Ok(None, 0x3ff008)
    assert ref.run(read(0x3ff000, word=1)) == Ok(0x42)


def test_paging_off_uses_the_gva_as_gpa():
    ref = vm()
    run(ref, add(0, 0x100, 0x10), write(0x100000, 6))
    assert ref.run(read(0x100000, gva=True)) == Ok(6, 0x100000)
    assert allows(ref, read(0x100000, gva=True), Ok(6))


@pytest.mark.parametrize("op, code", [
    (read(0x600000, gva=True, word=1), 0x0),      # PD[3] not present
    (write(0x600000, 1, gva=True, word=1), 0x2),
    (fetch(0x600000, gva=True, word=1), 0x10),
])
def test_not_present_entry_gives_page_fault_without_p(op, code):
    assert paged().run(op) == PageFault(0x600008, code)


def test_write_to_a_read_only_mapping_gives_page_fault_p_w():
    ref = paged()
    run(ref, pte(4, 1, 0x11, "p"))
    assert ref.run(write(0x201000, 1, gva=True)) == PageFault(0x201000, 0x3)
    assert ref.run(read(0x201000, gva=True)) == Ok(0, 0x11000)


def test_read_only_upper_level_denies_writes_below_it():
    ref = paged()
    run(ref, pte(2, 0, 3, "p"))
    assert ref.run(write(0x200000, 1, gva=True)) == PageFault(0x200000, 0x3)


def test_fetch_from_an_nx_mapping_gives_page_fault_p_id():
    ref = paged()
    run(ref, pte(3, 2, 0x200, "p,rw,ps,nx"))
    assert ref.run(fetch(0x400000, gva=True, word=2)) == PageFault(0x400010, 0x11)
    assert ref.run(write(0x400000, 1, gva=True)) == Ok(None, 0x200000)


@pytest.mark.parametrize("entry, op, code", [
    (pte(1, 1, 0x20, "p,rw,ps"), read(0x8000000000, gva=True), 0x9),             # PS in PML4E
    (pte(2, 1, 0x40000, "p,rw,ps"), write(0x40000000, 1, gva=True), 0xb),        # PS in PDPTE
    (pte(3, 4, 0x202, "p,rw,ps"), fetch(0x800000, gva=True), 0x19),              # 2M bits 13-20
])
def test_reserved_bits_give_page_fault_p_rsvd(entry, op, code):
    ref = paged()
    run(ref, entry)
    assert ref.run(op) == PageFault(op.addr, code)


def test_ps_bit_in_a_4k_pte_is_pat_not_reserved():
    ref = paged()
    run(ref, pte(4, 2, 0x12, "p,rw,ps"))
    assert ref.run(read(0x202000, gva=True)) == Ok(0, 0x12000)


def test_bits_52_to_62_of_an_entry_are_ignored():
    ref = paged()
    run(ref, write(0x4000, 0x7ff0000000011003 | (1 << 5), word=3))   # PT[3] -> gfn 0x11
    assert ref.run(read(0x203000, gva=True)) == Ok(0, 0x11000)


def test_table_gfn_without_slot_faults_not_present():
    # KVM's walker: an error hva for the table is `goto error`, a not-present #PF.
    ref = paged()
    run(ref, pte(3, 5, 0x500))                       # PD[5] -> PT at gfn 0x500: no slot
    assert ref.run(write(0xa07000, 1, gva=True)) == PageFault(0xa07000, 0x2)
    assert not allows(ref, write(0xa07000, 1, gva=True), MmioExit(0x500038, False))
    assert ref.run(fetch(0xa00000, gva=True)) == PageFault(0xa00000, 0x10)


def test_table_gfn_without_slot_may_exit_where_the_operand_offset_matches():
    # With TDP, KVM emulates after the walk's exit and takes the exit's gpa for the
    # operand's when their page offsets agree (emulator_read_write_onepage, gpa_available).
    ref = paged()
    run(ref, pte(3, 5, 0x500))
    op = read(0xa00000, gva=True)                    # PT index 0: entry byte 0x500000
    assert ref.run(op) == PageFault(0xa00000, 0)
    assert allows(ref, op, MmioExit(0x500000, False))
    assert allows(ref, write(0xa07000, 1, word=7, gva=True), MmioExit(0x500038, True))
    assert not allows(ref, write(0xa07000, 1, word=7, gva=True), MmioExit(0x500038, False))
    assert not allows(ref, fetch(0xa00000, gva=True), MmioExit(0x500000, False))


def test_root_without_slot_faults_not_present():
    # mmu_alloc_shadow_roots gives a dummy root; the walk's first read faults.
    ref = vm(vcpus=1)
    run(ref, add(0, 0x0, 0x10), Paging(0, 0x100))
    assert ref.run(read(0x8, gva=True)) == PageFault(0x8, 0)


def test_private_table_gfn_gives_memory_fault_exit():
    ref = vm("tdx", vcpus=1)
    run(ref, add(0, 0x0, 0x400, "private"), *TABLES[:3], to_private(0x4, 1), Paging(0, 1))
    assert ref.run(read(0x200000, gva=True)) == MemoryFaultExit(0x4000, False)


def test_walk_reads_tables_through_a_readonly_slot():
    ref = vm(vcpus=1)
    run(ref, add(0, 0x0, 0x10), add(1, 0x10, 0x10, "readonly"), pte(1, 0, 0x12), Paging(0, 1))
    assert ref.run(read(0x0, gva=True)) == PageFault(0x0, 0x0)    # PDPT read: all zero


def test_write_pte_is_a_physical_write():
    ref = vm()
    assert ref.run(pte(0x50, 3, 0x10)) == MmioExit(0x50018, True)
    run(ref, add(0, 0x50, 1), pte(0x50, 3, 0x10, "p,rw,nx"))
    assert ref.run(read(0x50000, word=3)) == Ok((1 << 63) | 0x10000 | 0x63)


# --- §F the TLB ----------------------------------------------------------------------


def remapped():
    """gva 0x200000 cached by vCPU 0 (-> gfn 0x10, value 1), then remapped to gfn 0x11 (value 2)."""
    ref = paged()
    run(ref, write(0x10000, 1), write(0x11000, 2), read(0x200000, gva=True),
        pte(4, 0, 0x11))
    return ref


def test_stale_translation_stays_allowed_until_invalidated():
    ref = remapped()
    op = read(0x200000, gva=True)
    assert ref.run(op) == Ok(2, 0x11000)
    assert str(ref.allowed(op)) == "ok(0x2, gpa=0x11000) | ok(0x1, gpa=0x10000)"
    assert ref.step(op, Ok(1, 0x10000)) is None
    assert allows(ref, op, Ok(1, 0x10000))          # the entry used stays cached


@pytest.mark.parametrize("flush", [Invlpg(0, 0x200000), FlushTlb(0), Paging(0, 1)])
def test_stale_translation_is_rejected_after_invlpg_flush_or_cr3_load(flush):
    ref = remapped()
    run(ref, flush)
    expect = ref.copy().step(read(0x200000, gva=True), Ok(1, 0x10000))
    assert str(expect) == "ok(0x2, gpa=0x11000)"


def test_invlpg_of_another_page_keeps_the_stale_translation():
    ref = remapped()
    run(ref, Invlpg(0, 0x201000))
    assert allows(ref, read(0x200000, gva=True), Ok(1, 0x10000))


def test_tlb_is_per_vcpu():
    # vCPU 1 never read gva 0x200000, but it paged while the old translation was valid, and
    # x86 may cache a translation speculatively.  Its flush is its own.
    ref = remapped()
    assert allows(ref, read(0x200000, gva=True, vcpu=1), Ok(1, 0x10000))
    run(ref, FlushTlb(1))
    assert not allows(ref, read(0x200000, gva=True, vcpu=1), Ok(1, 0x10000))
    assert allows(ref, read(0x200000, gva=True), Ok(1, 0x10000))


def data(ref):
    """Distinct values at gfns 0x10, 0x11, 0x12: a read's value names the gfn it reached."""
    run(ref, write(0x10000, 1), write(0x11000, 2), write(0x12000, 3))
    return ref


def test_a_translation_valid_since_the_flush_may_be_used_unwalked():
    # x86 may cache any translation valid at some moment since the flush (SDM §4.10.2):
    # gva 0x201000 was never accessed while it mapped gfn 0x10.
    ref = data(paged())
    run(ref, pte(4, 1, 0x10), pte(4, 1, 0x11))
    assert str(ref.allowed(read(0x201000, gva=True))) == (
        "ok(0x2, gpa=0x11000) | ok(0x1, gpa=0x10000)")


def test_a_translation_valid_only_before_the_flush_may_not():
    ref = data(paged())
    run(ref, pte(4, 1, 0x10), pte(4, 1, 0x11), FlushTlb(0))
    assert str(ref.allowed(read(0x201000, gva=True))) == "ok(0x2, gpa=0x11000)"


def test_a_past_walk_reads_every_level_as_of_one_moment():
    # PD[1] moves from PT 4 (-> 0x10) to PT 5 (-> 0x12), then PT 4's entry moves to 0x11:
    # no moment had PD[1] -> PT 4 -> 0x11 (paging-structure caches are not modelled).
    ref = data(paged())
    run(ref, pte(5, 0, 0x12), pte(3, 1, 5), pte(4, 0, 0x11))
    assert str(ref.allowed(read(0x200000, gva=True))) == (
        "ok(0x3, gpa=0x12000) | ok(0x1, gpa=0x10000)")


def test_a_past_walk_may_read_a_table_whose_slot_is_gone():
    ref = data(paged())
    run(ref, add(1, 0x500, 1), pte(0x500, 0, 0x10), pte(3, 1, 0x500), MemslotDelete(1))
    op = read(0x200000, gva=True)
    assert allows(ref, op, Ok(1, 0x10000))
    run(ref, FlushTlb(0))
    assert not allows(ref, op, Ok(1, 0x10000))


def test_invlpg_of_any_gva_in_a_2m_entry_drops_it():
    ref = paged()
    run(ref, read(0x400000, gva=True), pte(3, 2, 0x0, "p,rw,ps"))
    op = read(0x5ff000, gva=True)
    assert allows(ref, op, Ok(0, 0x3ff000))
    run(ref, Invlpg(0, 0x5ff000))
    assert not allows(ref, op, Ok(0, 0x3ff000))


def test_stale_translation_write_lands_at_the_old_gpa():
    ref = remapped()
    assert ref.step(write(0x200000, 0x99, gva=True), Ok(None, 0x10000)) is None
    assert ref.run(read(0x10000)) == Ok(0x99)
    assert ref.run(read(0x11000)) == Ok(2)


def test_stale_writable_entry_may_succeed_or_fault_after_write_protect():
    ref = paged()
    run(ref, write(0x200000, 1, gva=True), pte(4, 0, 0x10, "p"))
    op = write(0x200000, 5, gva=True)
    assert str(ref.allowed(op)) == "page_fault(0x200000, 0x3) | ok(gpa=0x10000)"


def test_stale_non_present_mapping_may_still_be_used():
    ref = paged()
    run(ref, read(0x200000, gva=True), pte(4, 0, 0x10, ""))
    assert str(ref.allowed(read(0x200000, gva=True))) == (
        "page_fault(0x200000, 0x0) | ok(0x0, gpa=0x10000)")


def test_page_fault_drops_the_entries_covering_the_gva():
    ref = paged()
    run(ref, read(0x200000, gva=True), pte(4, 0, 0x10, ""))
    assert ref.step(read(0x200000, gva=True), PageFault(0x200000, 0)) is None
    assert str(ref.allowed(read(0x200000, gva=True))) == "page_fault(0x200000, 0x0)"


def test_ok_without_gpa_is_resolved_from_the_value():
    ref = remapped()
    op = read(0x200000, gva=True)
    assert allows(ref, op, Ok(1))
    assert allows(ref, op, Ok(2))
    assert not allows(ref, op, Ok(3))
    after = ref.copy()
    assert after.step(write(0x200000, 7, gva=True), Ok()) is None
    assert after.run(read(0x11000)) == Ok(7)         # ambiguous: the fresh walk first


def test_physical_access_must_not_report_a_gpa():
    ref = vm()
    run(ref, add(0, 0x100, 0x10))
    assert not allows(ref, read(0x100000), Ok(0, 0x100000))


# --- §G host operations and dirty logging --------------------------------------------------


def test_host_operations_are_ok_and_guest_invisible():
    ref = vm()
    run(ref, add(0, 0x100, 0x200, "host_huge"), write(0x100000, 3))
    for op in (HostInvalidate(0x100, 0x200), HostInvalidate(0x9000, 1), ZapAll(), Split(0),
               Recover()):
        assert ref.run(op) == OK
    assert ref.run(read(0x100000)) == Ok(3)


def test_split_of_a_missing_slot_is_einval():
    assert vm().run(Split(4)) == EINVAL


def logging(flags="dirty_log"):
    ref = vm()
    run(ref, add(0, 0x100, 0x10, flags))
    return ref


def test_dirty_log_equals_the_written_set_and_clears():
    ref = logging()
    run(ref, write(0x103000, 1), write(0x101000, 2, word=9), write(0x103000, 3))
    assert ref.run(GetDirtyLog(0)) == DirtyLog((0x101, 0x103))
    assert ref.run(GetDirtyLog(0)) == DirtyLog(())
    assert not allows(ref, GetDirtyLog(0), DirtyLog((0x101,)))


def test_dirty_log_may_include_touched_but_not_untouched_gfns():
    ref = logging()
    run(ref, write(0x101000, 1), read(0x102000), fetch(0x104000))
    op = GetDirtyLog(0)
    assert str(ref.allowed(op)) == "dirty_log(0x101) ⊆ R ⊆ dirty_log(0x101, 0x102, 0x104)"
    assert allows(ref, op, DirtyLog((0x101, 0x102)))
    assert allows(ref, op, DirtyLog((0x101, 0x102, 0x104)))
    assert not allows(ref, op, DirtyLog((0x101, 0x103)))     # untouched
    assert not allows(ref, op, DirtyLog((0x102,)))           # a written gfn missing
    assert not allows(ref, op, DirtyLog((0x102, 0x101)))     # not sorted
    assert not allows(ref, op, OK)
    assert ref.step(op, DirtyLog((0x101, 0x102))) is None
    assert not allows(ref, op, DirtyLog((0x102,)))          # touched set cleared too


def test_failed_accesses_are_not_logged():
    ref = logging("dirty_log,readonly")
    run(ref, write(0x101000, 1))
    assert str(ref.allowed(GetDirtyLog(0))) == "dirty_log()"


def test_guest_page_walk_reads_count_as_touched():
    ref = paged(vcpus=1, slot_flags="dirty_log")
    run(ref, GetDirtyLog(0), read(0x200000, gva=True))
    assert str(ref.allowed(GetDirtyLog(0))) == "dirty_log() ⊆ R ⊆ dirty_log(0x1, 0x2, 0x3, 0x4, 0x10)"


def test_write_pte_is_dirty_logged():
    ref = paged(vcpus=1, slot_flags="dirty_log")
    run(ref, GetDirtyLog(0), pte(4, 9, 0x30))
    assert ref.run(GetDirtyLog(0)) == DirtyLog((0x4,))


def test_get_dirty_log_is_einval_without_slot_or_logging():
    assert vm().run(GetDirtyLog(0)) == EINVAL
    assert logging("").run(GetDirtyLog(0)) == EINVAL


def test_enabling_starts_empty_and_disabling_discards():
    ref = logging("")
    run(ref, write(0x101000, 1), set_flags(0, "dirty_log"), write(0x102000, 1))
    assert ref.run(GetDirtyLog(0)) == DirtyLog((0x102,))
    run(ref, write(0x103000, 1), set_flags(0, ""), set_flags(0, "dirty_log"))
    assert ref.run(GetDirtyLog(0)) == DirtyLog(())


def test_dirty_log_is_slot_relative_and_follows_a_move():
    ref = logging()
    run(ref, write(0x105000, 1), MemslotMove(0, 0x800))
    assert ref.run(GetDirtyLog(0)) == DirtyLog((0x805,))


# --- the step interface ------------------------------------------------------------------


def test_step_rejects_a_wrong_outcome_and_prints_the_allowed_set():
    ref = vm()
    run(ref, add(0, 0x100, 0x10), write(0x100000, 7))
    expect = ref.step(read(0x100000), Ok(0))
    assert str(expect) == "ok(0x7)" and expect.canonical == Ok(7)
    assert ref.step(read(0x100000), Ok(7)) is None
    tdx = tdx_with_private_slot()
    run(tdx, to_private(0x200, 0x200))
    expect = tdx.step(accept(0x200000, PG_LEVEL_2M), ALREADY_ACCEPTED)
    assert str(expect) == "ok | size_mismatch" and expect.canonical == OK


def test_rejected_step_changes_nothing():
    ref = vm()
    run(ref, add(0, 0x100, 0x10))
    assert ref.step(write(0x100000, 7), MmioExit(0x100000, True)) is not None
    assert ref.run(read(0x100000)) == Ok(0)


def test_copy_is_independent():
    ref = paged()
    run(ref, read(0x200000, gva=True))
    twin = ref.copy()
    run(twin, write(0x10000, 5), pte(4, 0, 0x11), FlushTlb(0), MemslotMove(0, 0x1000),
        add(1, 0x0, 0x10))
    assert ref.run(read(0x10000)) == Ok(0)
    assert ref.run(read(0x200000, gva=True)) == Ok(0, 0x10000)
    assert twin.run(read(0x1010000)) == Ok(5)


# --- §F Accessed and Dirty bits -------------------------------------------------------------

A, D = 1 << 5, 1 << 6


def plain_tables(flags="", rw=True):
    """Tables built by plain stores, no A/D: gva 0x200000 -> gfn 0x10 (PML4 at gfn 1)."""
    ref = vm(vcpus=1)
    bits = 0x3 if rw else 0x1
    run(ref, add(0, 0x0, 0x40, flags), write(0x1000, 0x2000 | 0x3), write(0x2000, 0x3000 | 0x3),
        write(0x3000, 0x4000 | 0x3, word=1), write(0x4000, 0x10000 | bits), Paging(0, 1))
    return ref


def entries(ref):
    return [ref.copy().run(read(gpa)).value for gpa in (0x1000, 0x2000, 0x3008, 0x4000)]


def test_a_read_walk_sets_accessed_in_every_entry_it_used():
    ref = plain_tables()
    assert ref.run(read(0x200000, gva=True)) == Ok(0, 0x10000)
    assert entries(ref) == [0x2003 | A, 0x3003 | A, 0x4003 | A, 0x10003 | A]


def test_a_write_walk_also_sets_dirty_in_the_leaf():
    ref = plain_tables()
    assert ref.run(write(0x200000, 5, gva=True)) == Ok(None, 0x10000)
    assert entries(ref) == [0x2003 | A, 0x3003 | A, 0x4003 | A, 0x10003 | A | D]


def test_a_faulting_walk_sets_nothing():
    # update_accessed_dirty_bits runs after permission_fault, only for a walk that succeeds.
    ref = plain_tables(rw=False)
    assert ref.run(write(0x200000, 5, gva=True)) == PageFault(0x200000, 0x3)
    assert entries(ref) == [0x2003, 0x3003, 0x4003, 0x10001]


def test_the_data_access_sees_the_bits_its_own_walk_set():
    # corpus/regressions: a PML4 entry pointing at its own page is every level of the walk.
    ref = vm(vcpus=1)
    run(ref, add(0, 0x0, 0x2), write(0x1000, 0x1803), Paging(0, 1))
    assert ref.run(read(0x0, gva=True)) == Ok(0x1823, 0x1000)
    assert ref.run(write(0x8, 7, gva=True)) == Ok(None, 0x1008)
    assert ref.run(read(0x1000)) == Ok(0x1863)                    # D: the leaf of the write


def test_setting_bits_is_a_logged_write_of_the_table():
    ref = plain_tables("dirty_log")
    run(ref, GetDirtyLog(0), read(0x200000, gva=True))
    assert str(ref.allowed(GetDirtyLog(0))) == "dirty_log(0x1, 0x2, 0x3, 0x4) ⊆ R ⊆ " \
        "dirty_log(0x1, 0x2, 0x3, 0x4, 0x10)"
    run(ref, GetDirtyLog(0), read(0x200000, gva=True))           # A already set: reads only
    assert str(ref.allowed(GetDirtyLog(0))) == "dirty_log() ⊆ R ⊆ dirty_log(0x1, 0x2, 0x3, " \
        "0x4, 0x10)"


def test_a_tlb_hit_may_leave_a_cleared_accessed_bit_clear():
    # The guest clears A with a plain store and does not invlpg: a TLB hit does not walk.
    ref = plain_tables()
    run(ref, read(0x200000, gva=True), write(0x4000, 0x10003))    # leaf without A again
    assert ref.run(read(0x200000, gva=True)) == Ok(0, 0x10000)
    op = read(0x4000)
    assert allows(ref, op, Ok(0x10003)) and allows(ref, op, Ok(0x10003 | A))
    assert not allows(ref, op, Ok(0x10003 | A | D))
    after = ref.copy()
    assert after.step(op, Ok(0x10003)) is None                      # the read tells which
    assert after.run(op) == Ok(0x10003)


def test_a_fresh_walk_after_invlpg_sets_it_again():
    ref = plain_tables()
    run(ref, read(0x200000, gva=True), write(0x4000, 0x10003), Invlpg(0, 0x200000),
        read(0x200000, gva=True))
    assert ref.run(read(0x4000)) == Ok(0x10003 | A)


def test_a_write_through_a_clean_cached_translation_walks_again():
    # The read cached a translation with D clear; the leaf now maps gfn 0x11.  A read may
    # still use the stale entry, a write may not: setting D takes a walk of the tables.
    ref = plain_tables()
    run(ref, read(0x200000, gva=True), write(0x4000, 0x11003 | A))
    assert allows(ref, read(0x200000, gva=True), Ok(0, 0x10000))
    assert not allows(ref, write(0x200000, 1, gva=True), Ok(None, 0x10000))
    assert ref.run(write(0x200000, 1, gva=True)) == Ok(None, 0x11000)


def test_a_write_through_a_dirty_cached_translation_needs_no_walk():
    ref = plain_tables()
    run(ref, write(0x200000, 1, gva=True), write(0x4000, 0x11003 | A | D))
    assert allows(ref, write(0x200000, 2, gva=True), Ok(None, 0x10000))

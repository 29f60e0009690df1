"""The shadow target's mechanisms, op by op: roles and the gfn hash, write tracking,
unsync/sync, invlpg, MMIO SPTEs and the MMIO cache, prev_roots, invariants."""

from __future__ import annotations

from pathlib import Path

import pytest

from mmufuzz.fuzz.encoding import load_reproducer, parse_reproducer
from mmufuzz.fuzz.runner import run_program
from mmufuzz.harness import faults
from mmufuzz.harness.ops import EINVAL, Ok, PageFault
from mmufuzz.harness.shadow import ShadowTarget
from mmufuzz.harness.shadow.hardware import NONPAGING_ROOT_ROLE, PAGING_ROOT_ROLE
from mmufuzz.harness.shadow.paging_tmpl import DUMMY_ROOT
from mmufuzz.harness.shadow.spte import (ACC_ALL, ACC_EXEC_MASK, ACC_WRITE_MASK,
                                         SHADOW_NONPRESENT_VALUE, is_large_pte, is_mmio_spte,
                                         is_writable_pte, make_role, role_access, role_level)
from mmufuzz.harness.target import InvariantViolation

# A four-level guest table chain 0x1 -> 0x2 -> 0x3 -> 0x4 mapping gva 0 to gfn 0x10.
TABLE_CHAIN = """\
vm type=default vcpus=1
memslot_add slot=0 base=0x0 npages=0x40 flags= host_offset=0
write_pte vcpu=0 table=0x1 index=0 target=0x2 flags=p,rw
write_pte vcpu=0 table=0x2 index=0 target=0x3 flags=p,rw
write_pte vcpu=0 table=0x3 index=0 target=0x4 flags=p,rw
write_pte vcpu=0 table=0x4 index=0 target=0x10 flags=p,rw
"""

TABLES = TABLE_CHAIN + """\
write_pte vcpu=0 table=0x4 index=1 target=0x11 flags=p,rw
paging vcpu=0 root=0x1
access vcpu=0 gva=0x0 word=0 kind=write value=0x5 private=0
"""


def run(text: str, target=None):
    """Run a program's text on a (fresh) shadow target, checking invariants; the outcomes."""
    target = target or ShadowTarget()
    program = parse_reproducer(text).program
    target.reset(program.header)
    outcomes = []
    for op in program.ops:
        outcomes.append(target.execute(op))
        target.check_invariants()
    return target, outcomes


def more(target, text: str):
    """Run more ops (text without a header) on ``target``."""
    program = parse_reproducer("vm type=default vcpus=1\n" + text).program
    outcomes = []
    for op in program.ops:
        outcomes.append(target.execute(op))
        target.check_invariants()
    return outcomes


def pages(target, gfn):
    return list(target.kvm.mmu.mmu_page_hash.get(gfn, ()))


def test_role_word_has_kvms_bit_layout():
    role = make_role(3, True, 5, efer_nx=True, cr0_wp=True, smm=1, guest_mode=True)
    assert role == 3 | 1 << 7 | 5 << 8 | 1 << 12 | 1 << 13 | 1 << 17 | 1 << 24
    assert role_level(role) == 3 and role_access(role) == 5
    assert PAGING_ROOT_ROLE == 4 | ACC_ALL << 8 | 1 << 12 | 1 << 13
    assert NONPAGING_ROOT_ROLE == 4 | 1 << 7 | ACC_ALL << 8


def test_walk_builds_one_indirect_page_per_guest_table_and_write_protects_them():
    target, outcomes = run(TABLES)
    assert outcomes[-1] == Ok(None, 0x10000)
    mmu = target.kvm.mmu
    for gfn, level in ((0x1, 4), (0x2, 3), (0x3, 2), (0x4, 1)):
        [sp] = [sp for sp in pages(target, gfn) if not sp.direct]
        assert sp.level == level and sp.parent_ptes or sp is target.kvm.vcpus[0].root
        # Every SPTE mapping a table gfn (the physical writes' direct map) is read-only.
        assert not any(is_writable_pte(s.spt[i]) for s, i in mmu.rmap.get(gfn, {}))
    assert sorted(mmu.gfn_write_track) == [0x1, 0x2, 0x3]  # upper levels only
    leaf = [sp for sp in pages(target, 0x4) if not sp.direct][0]
    assert leaf.spt[0] != SHADOW_NONPRESENT_VALUE and leaf.spt[2] == SHADOW_NONPRESENT_VALUE


def test_same_gfn_and_role_is_one_page_other_access_is_another():
    target, _ = run(TABLES)
    # A second path to table 0x3 through a read-only PDPTE: same gfn, another role.
    more(target, "write_pte vcpu=0 table=0x2 index=1 target=0x3 flags=p\n"
                 "invlpg vcpu=0 gva=0x40000000\n"
                 "access vcpu=0 gva=0x40000000 word=0 kind=read private=0\n")
    level2 = [sp for sp in pages(target, 0x3) if not sp.direct]
    # Guest PTEs never set U: the inherited access is exec, plus write on the RW path.
    assert sorted(role_access(sp.role) for sp in level2) == [ACC_EXEC_MASK,
                                                             ACC_EXEC_MASK | ACC_WRITE_MASK]
    # The read-only path denies the write the writable path allows.
    out = more(target, "access vcpu=0 gva=0x40000000 word=0 kind=write value=0x1 private=0\n"
                       "access vcpu=0 gva=0x0 word=0 kind=write value=0x2 private=0\n")
    assert out == [PageFault(0x40000000, 0x3), Ok(None, 0x10000)]


def test_write_to_an_upper_level_table_is_emulated_and_zaps_the_entry():
    target, _ = run(TABLES)
    root = target.kvm.vcpus[0].root
    assert root.spt[0] != SHADOW_NONPRESENT_VALUE
    more(target, "write_pte vcpu=0 table=0x1 index=0 target=0x5 flags=p,rw\n")
    assert root.spt[0] == SHADOW_NONPRESENT_VALUE   # kvm_mmu_track_write zapped it
    # The guest flushes nothing yet it sees the new (empty) table at once: no stale path.
    out = more(target, "access vcpu=0 gva=0x0 word=0 kind=read private=0\n")
    assert out == [PageFault(0x0, 0x0)]


def test_write_flooding_zaps_an_upper_level_page_written_three_times_unused():
    target, _ = run(TABLES)
    [level3] = [sp for sp in pages(target, 0x2) if not sp.direct]
    more(target, "".join(f"write_pte vcpu=0 table=0x2 index={i} target=0x9 flags=p\n"
                         for i in (5, 6, 7)))
    assert level3.invalid or level3.freed
    assert 0x2 not in target.kvm.mmu.gfn_write_track


def test_last_level_table_goes_unsync_and_a_guest_flush_syncs_it():
    target, _ = run(TABLES)
    [leaf] = [sp for sp in pages(target, 0x4) if not sp.direct]
    out = more(target, "write_pte vcpu=0 table=0x4 index=0 target=0x11 flags=p,rw\n"
                       "access vcpu=0 gva=0x0 word=0 kind=read private=0\n")
    # Unsync: the write was not trapped, and the page kept its leaves (KVM's), so gva 0x0
    # still reads gfn 0x10, a translation valid since the flush (docs/semantics.md §F).
    assert leaf.unsync and out[1] == Ok(0x5, 0x10000)
    parent = next(iter(leaf.parent_ptes))[0]
    assert parent.unsync_children == 1
    # Further writes go straight to the table; the guest's flush syncs the page.
    out = more(target, "write_pte vcpu=0 table=0x4 index=0 target=0x12 flags=p,rw\n"
                       "access vcpu=0 gva=0x0 word=0 kind=read private=0\n")
    assert out[1] == Ok(0x5, 0x10000)
    out = more(target, "flush_tlb vcpu=0\naccess vcpu=0 gva=0x0 word=0 kind=read private=0\n")
    assert not leaf.unsync and parent.unsync_children == 0
    assert out[1] == Ok(0, 0x12000)


def test_invlpg_syncs_only_its_address():
    target, _ = run(TABLES + "write_pte vcpu=0 table=0x4 index=0 target=0x12 flags=p,rw\n"
                             "access vcpu=0 gva=0x0 word=0 kind=read private=0\n"
                             "access vcpu=0 gva=0x1000 word=0 kind=read private=0\n")
    [leaf] = [sp for sp in pages(target, 0x4) if not sp.direct]
    more(target, "write_pte vcpu=0 table=0x4 index=0 target=0x14 flags=p,rw\n"
                 "write_pte vcpu=0 table=0x4 index=1 target=0x13 flags=p,rw\n"
                 "invlpg vcpu=0 gva=0x0\n")
    assert leaf.unsync
    out = more(target, "access vcpu=0 gva=0x0 word=0 kind=read private=0\n"
                       "access vcpu=0 gva=0x1000 word=0 kind=read private=0\n")
    assert out == [Ok(0, 0x14000), Ok(0, 0x11000)]


def test_mmio_spte_carries_the_generation_and_a_new_slot_makes_it_stale():
    target, _ = run(TABLES.replace("target=0x11 flags=p,rw", "target=0x50 flags=p,rw")
                    + "access vcpu=0 gva=0x1000 word=0 kind=read private=0\n")
    [leaf] = [sp for sp in pages(target, 0x4) if not sp.direct]
    assert is_mmio_spte(leaf.spt[1])
    vcpu = target.kvm.vcpus[0]
    assert vcpu.mmio_gva == 0x1000 and vcpu.mmio_gfn == 0x50
    out = more(target, "access vcpu=0 gva=0x1000 word=0 kind=read private=0\n"
                       "memslot_add slot=1 base=0x50 npages=0x1 flags= host_offset=0\n"
                       "access vcpu=0 gva=0x1000 word=0 kind=read private=0\n")
    assert str(out[0]) == "mmio_exit(0x50000, read)" and out[2] == Ok(0, 0x50000)


def test_cr3_switch_back_reuses_the_cached_root():
    target, _ = run(TABLES + "write_pte vcpu=0 table=0x6 index=0 target=0x2 flags=p,rw\n")
    vcpu = target.kvm.vcpus[0]
    first = vcpu.root
    more(target, "paging vcpu=0 root=0x6\n")
    assert vcpu.prev_roots[0] == (0x1, first) and vcpu.root.gfn == 0x6
    more(target, "paging vcpu=0 root=0x1\n")
    assert vcpu.root is first


def test_zap_all_makes_roots_obsolete_and_vcpus_reload():
    target, _ = run(TABLES)
    old = target.kvm.vcpus[0].root
    out = more(target, "zap_all\naccess vcpu=0 gva=0x0 word=0 kind=read private=0\n")
    assert out[1] == Ok(0x5, 0x10000)
    assert old.freed and target.kvm.vcpus[0].root is not old


def test_capabilities_refuse_tdx_and_private_accesses():
    caps = ShadowTarget.capabilities
    tdx = parse_reproducer("vm type=tdx vcpus=1\nzap_all\n").program
    assert caps.refusal(tdx) == "header: vm type=tdx is not supported by this target"
    private = parse_reproducer("vm type=default vcpus=2\n"
                               "access vcpu=0 gpa=0x0 word=0 kind=read private=1\n").program
    assert "private access" in caps.refusal(private)
    paging = parse_reproducer("vm type=default vcpus=2\npaging vcpu=1 root=0x1\n"
                              "paging vcpu=1 root=off\n").program
    assert caps.refusal(paging) is None and caps.restrict(paging) == paging


def test_vcpus_with_one_cr3_share_its_shadow_pages_and_either_flush_syncs_them():
    text = TABLES.replace("vcpus=1", "vcpus=2") + (
        "paging vcpu=1 root=0x1\n"
        "write_pte vcpu=0 table=0x4 index=0 target=0x12 flags=p,rw\n"
        "access vcpu=1 gva=0x0 word=0 kind=read private=0\n"
        "flush_tlb vcpu=1\n"
        "access vcpu=0 gva=0x0 word=0 kind=read private=0\n")
    target, out = run(text)
    vcpus = target.kvm.vcpus
    assert vcpus[1].root is vcpus[0].root
    # vCPU 1 reads through the leaf vCPU 0's fault made, gone stale in the unsync page: a
    # translation valid since vCPU 1's CR3 load.  vCPU 1's flush syncs the shared page.
    assert out[-3] == Ok(0x5, 0x10000)
    [leaf] = [sp for sp in pages(target, 0x4) if not sp.direct]
    assert not leaf.unsync and out[-1] == Ok(0, 0x12000)


HUGE = """\
vm type=default vcpus=1
memslot_add slot=0 base=0x0 npages=0x600 flags=host_huge host_offset=0
write_pte vcpu=0 table=0x1 index=0 target=0x2 flags=p,rw
write_pte vcpu=0 table=0x2 index=0 target=0x3 flags=p,rw
write_pte vcpu=0 table=0x3 index=1 target=0x200 flags=p,rw,ps
write_pte vcpu=0 table=0x3 index=2 target=0x400 flags=p,rw,ps
paging vcpu=0 root=0x1
access vcpu=0 gva=0x203000 word=0 kind=write value=0x7 private=0
"""


def huge_leaf(target, table_gfn, index):
    """The SPTE at ``index`` of the indirect page shadowing guest table ``table_gfn``."""
    [sp] = [sp for sp in pages(target, table_gfn) if not sp.direct]
    return sp, sp.spt[index]


def test_guest_2m_page_on_a_huge_host_page_is_one_2m_spte():
    target, outcomes = run(HUGE)
    assert outcomes[-1] == Ok(None, 0x203000)
    sp, spte = huge_leaf(target, 0x3, 1)
    assert is_large_pte(spte) and is_writable_pte(spte)
    assert list(target.kvm.mmu.rmap_2m[0x200]) == [(sp, 1)]
    # Another 4K of the same guest 2M page is reached through the same SPTE: no fault.
    assert more(target, "access vcpu=0 gva=0x3ff000 word=0 kind=read private=0\n") == [
        Ok(0, 0x3ff000)]
    assert not [sp for sp in pages(target, 0x200) if sp.direct]


def test_a_shadowed_gfn_disallows_its_2m_range_and_write_protects_a_huge_spte_over_it():
    target, _ = run(HUGE)
    # gfn 0x201 becomes a guest page table (of gva 0): its 2M range may map 4K only.
    more(target, "write_pte vcpu=0 table=0x3 index=0 target=0x201 flags=p,rw\n"
                 "write_pte vcpu=0 table=0x201 index=0 target=0x10 flags=p,rw\n"
                 "access vcpu=0 gva=0x0 word=0 kind=read private=0\n")
    mmu = target.kvm.mmu
    assert 0x201 // 512 in mmu.lpage_disallowed
    sp, spte = huge_leaf(target, 0x3, 1)
    assert is_large_pte(spte) and not is_writable_pte(spte)
    # A write elsewhere in that range faults and is mapped 4K through a direct page.
    assert more(target, "access vcpu=0 gva=0x205000 word=0 kind=write value=0x1 private=0\n") \
        == [Ok(None, 0x205000)]
    assert not is_large_pte(sp.spt[1]) and mmu.sp_of(sp.spt[1]).direct
    # The untouched 2M page at 0x400 still maps huge.
    more(target, "access vcpu=0 gva=0x400000 word=0 kind=read private=0\n")
    assert is_large_pte(huge_leaf(target, 0x3, 2)[1])


def test_dirty_logging_maps_4k_and_disabling_it_recovers_the_huge_page():
    target, _ = run(HUGE)
    mmu = target.kvm.mmu
    more(target, "memslot_set_flags slot=0 flags=dirty_log,host_huge\n")
    assert not is_writable_pte(huge_leaf(target, 0x3, 1)[1])
    out = more(target, "access vcpu=0 gva=0x204000 word=0 kind=write value=0x2 private=0\n"
                       "get_dirty_log slot=0\n")
    assert out[1].gfns == (0x204,)
    sp, spte = huge_leaf(target, 0x3, 1)
    direct = mmu.sp_of(spte)
    assert direct.direct and direct.spt[4] != SHADOW_NONPRESENT_VALUE
    # kvm_mmu_recover_huge_pages drops the direct page's leaves; the next fault maps 2M.
    more(target, "memslot_set_flags slot=0 flags=host_huge\n")
    assert direct.spt[4] == SHADOW_NONPRESENT_VALUE
    more(target, "access vcpu=0 gva=0x204000 word=0 kind=read private=0\n")
    assert is_large_pte(huge_leaf(target, 0x3, 1)[1])


def test_physical_access_maps_2m_split_is_a_no_op_and_invalidation_zaps_the_2m_spte():
    target, _ = run("vm type=default vcpus=1\n"
                    "memslot_add slot=0 base=0x200 npages=0x200 flags=host_huge host_offset=0\n"
                    "access vcpu=0 gpa=0x201000 word=0 kind=write value=0x3 private=0\n")
    mmu = target.kvm.mmu
    assert [sp.level for sp, _ in mmu.rmap_2m[0x200]] == [2]
    assert more(target, "split slot=0\nsplit slot=1\n") == [Ok(), EINVAL]
    assert list(mmu.rmap_2m) == [0x200]
    more(target, "host_invalidate base=0x3ff npages=0x1\n")
    assert not mmu.rmap_2m and not mmu.rmap


def test_a_fault_prefetches_its_neighbours_from_the_guest_table():
    target, _ = run(TABLES)  # gva 0 faulted: entry 1 (gfn 0x11) was prefetched
    [leaf] = [sp for sp in pages(target, 0x4) if not sp.direct]
    assert not leaf.unsync and leaf.spt[1] != SHADOW_NONPRESENT_VALUE
    assert (leaf, 1) in target.kvm.mmu.rmap[0x11]
    # The table goes unsync, keeping its entries; a fault in it prefetches too, from the
    # guest PTEs of that moment.
    more(target, "write_pte vcpu=0 table=0x4 index=2 target=0x12 flags=p,rw\n"
                 "write_pte vcpu=0 table=0x4 index=3 target=0x13 flags=p,rw\n"
                 "access vcpu=0 gva=0x2000 word=0 kind=read private=0\n")
    assert leaf.unsync and leaf.spt[0] != SHADOW_NONPRESENT_VALUE
    assert (leaf, 1) in target.kvm.mmu.rmap[0x11] and (leaf, 2) in target.kvm.mmu.rmap[0x12]
    assert (leaf, 3) in target.kvm.mmu.rmap[0x13]


def test_a_physical_fault_prefetches_its_group_of_eight_from_the_slot():
    target, _ = run("vm type=default vcpus=1\n"
                    "memslot_add slot=0 base=0x0 npages=0x6 flags= host_offset=0\n"
                    "memslot_add slot=1 base=0x6 npages=0x2 flags=readonly host_offset=0\n"
                    "memslot_add slot=2 base=0x8 npages=0x10 flags=dirty_log host_offset=0\n"
                    "access vcpu=0 gpa=0x2000 word=0 kind=read private=0\n"
                    "access vcpu=0 gpa=0x9000 word=0 kind=read private=0\n")
    mmu = target.kvm.mmu
    # The run 0-1 before the faulting entry comes from slot 0; the run 3-7 crosses slot 0's
    # end (kvm_prefetch_pages maps a run from one slot or not at all); the dirty-logged
    # slot's group is not prefetched (a writable SPTE there must fault to be logged).
    assert sorted(mmu.rmap) == [0x0, 0x1, 0x2, 0x9]
    more(target, "access vcpu=0 gpa=0x4000 word=0 kind=read private=0\n")
    assert sorted(mmu.rmap) == [0x0, 0x1, 0x2, 0x3, 0x4, 0x9]  # the run 3; 5-7 crosses still


@pytest.mark.parametrize("breakage, name", [
    (lambda mmu, sp: mmu.mmu_page_hash[sp.gfn].append(
        type(sp)(sp.pfn + 10**6, sp.gfn, sp.role, sp.mmu_valid_gen)), "unique_gfn_role"),
    (lambda mmu, sp: mmu.rmap.clear(), "rmaps_and_parents_match"),
    (lambda mmu, sp: setattr(sp, "unsync_children", 3), "unsync_bits_agree"),
    (lambda mmu, sp: mmu.gfn_write_track.clear(), "synced_gfn_write_protected"),
])
def test_invariants_name_what_broke(breakage, name):
    target, _ = run(TABLES)
    breakage(target.kvm.mmu, target.kvm.vcpus[0].root)
    with pytest.raises(InvariantViolation) as caught:
        target.check_invariants()
    assert caught.value.name == name


def test_snapshot_restores_the_same_behaviour():
    target, _ = run(TABLES)
    snap = target.snapshot()
    a = more(target, "write_pte vcpu=0 table=0x4 index=0 target=0x11 flags=p,rw\nflush_tlb vcpu=0\n"
                     "access vcpu=0 gva=0x0 word=0 kind=read private=0\n")
    target.restore(snap)
    b = more(target, "write_pte vcpu=0 table=0x4 index=0 target=0x11 flags=p,rw\nflush_tlb vcpu=0\n"
                     "access vcpu=0 gva=0x0 word=0 kind=read private=0\n")
    assert a == b == [Ok(), Ok(), Ok(0, 0x11000)]


def test_snapshot_keeps_the_dummy_root_a_dummy_root():
    """A CR3 without a memslot is the dummy root; restored from a snapshot it must still be
    (a campaign's schedule explorer restores snapshots: it once crashed on a copy)."""
    program = "vm type=default vcpus=1\npaging vcpu=0 root=0x800\n"
    access = "access vcpu=0 gva=0x0 word=0 kind=read private=0\n"
    target, _ = run(program)
    target.restore(target.snapshot())
    assert target.kvm.vcpus[0].root is DUMMY_ROOT
    assert more(target, access) == run(program + access)[1][-1:]


CORPUS = sorted((Path(__file__).resolve().parent.parent / "corpus").rglob("*.repro"))


@pytest.mark.parametrize("path", CORPUS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_corpus_program_runs_clean_on_shadow_without_a_fault(path):
    """Seeds and regressions of either target, run without their fault on the shadow
    target: clean, unless the shadow target refuses the program (a TD, say)."""
    program = load_reproducer(path).program
    if ShadowTarget.capabilities.refusal(program) is not None:
        pytest.skip("refused by the shadow target")
    finding = run_program(program, ShadowTarget())
    assert finding is None, finding.summary("shadow")


# --- op postconditions: checked as the op returns, whatever the invariant sampling ------------

UNSYNC_THEN = TABLES + "write_pte vcpu=0 table=0x4 index=1 target=0x12 flags=p,rw\n"


def _postcondition_broken(text: str, fault: str):
    """The InvariantViolation ``execute`` raises running ``text`` with ``fault`` injected and
    no invariant check between ops (as a campaign's input sampled to check after its last op),
    with its op's index; None if every op returned."""
    target = ShadowTarget()
    program = parse_reproducer(text).program
    target.reset(program.header)
    with faults.injected({fault}):
        for index, op in enumerate(program.ops):
            try:
                target.execute(op)
            except InvariantViolation as violation:
                return index, violation.name
    return None


def test_a_guest_flush_that_leaves_unsync_pages_fails_as_it_returns():
    # Afterwards a second address space reaches the unsync table: a page goes unsync under a
    # root since the flush, so a check after the last op no longer holds the flush to its
    # promise (flushed_roots_synced allows that).
    program = (UNSYNC_THEN + "flush_tlb vcpu=0\n"
               "write_pte vcpu=0 table=0x5 index=0 target=0x2 flags=p,rw\n"
               "paging vcpu=0 root=0x5\n"
               "access vcpu=0 gva=0x0 word=0 kind=read private=0\n")
    assert _postcondition_broken(program, "guest-flush-no-sync") == (9, "flushed_roots_synced")
    assert _postcondition_broken(program, "sync-zero-check") is None
    run(program)  # clean without the fault


def test_an_invlpg_that_keeps_a_stale_mmio_spte_fails_as_it_returns():
    program = (TABLES + "write_pte vcpu=0 table=0x4 index=2 target=0x80 flags=p,rw\n"
               "access vcpu=0 gva=0x0 word=0 kind=read private=0\n"
               "access vcpu=0 gva=0x2000 word=0 kind=read private=0\n"
               "write_pte vcpu=0 table=0x4 index=2 target=0x13 flags=p,rw\n"
               "invlpg vcpu=0 gva=0x2000\n"
               "write_pte vcpu=0 table=0x4 index=2 target=0x0 flags=\n")
    assert _postcondition_broken(program, "invlpg-keeps-mmio") == (12, "invalidated_gva_synced")
    run(program)


def test_a_gfn_that_becomes_write_tracked_keeps_no_unsync_page_as_the_op_returns():
    """Table 0x4, an unsync last-level table, becomes a page directory of a second path:
    the access that makes its upper-level page must zap the unsync page (a flush afterwards
    would sync it away, hiding the fault from a check after the last op)."""
    program = (UNSYNC_THEN + "access vcpu=0 gva=0x1000 word=0 kind=read private=0\n"
               "write_pte vcpu=0 table=0x2 index=1 target=0x4 flags=p,rw\n"
               "access vcpu=0 gva=0x40000000 word=0 kind=read private=0\n"
               "flush_tlb vcpu=0\n")
    assert _postcondition_broken(program, "unsync-role-mismatch") == (11, "unsync_bits_agree")
    run(program)


SEEDS = sorted((Path(__file__).resolve().parent.parent / "corpus" / "seeds").glob("*.repro"))
# A physical write_pte shows this fault at once: every seed with a page table does.
EVERY_TABLE_WRITE = "shadow-hash-gfn-only"


@pytest.mark.parametrize("path", SEEDS, ids=lambda p: p.name)
def test_no_seed_alone_shows_a_shadow_fault(path):
    """A seed that shows a fault by itself would make a campaign's detection of that fault
    the seed's doing (the bench's ``seeds`` engine measures what the seeds alone find)."""
    program = ShadowTarget.capabilities.restrict(load_reproducer(path).program)
    for name, fault in sorted(faults.CATALOG.items()):
        if fault.target == "shadow" and name != EVERY_TABLE_WRITE:
            with faults.injected({name}):
                finding = run_program(program, ShadowTarget())
            assert finding is None, f"{name}: {finding.summary('shadow')}"

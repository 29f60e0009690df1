"""The shadow target's MMU-state events and features (harness/shadow/events.py): each
names the shadow state it says, at the op that made it, once."""

from __future__ import annotations

import pickle
from pathlib import Path

from test_shadow_mmu import TABLE_CHAIN

from mmufuzz.fuzz.encoding import load_reproducer, parse_reproducer
from mmufuzz.harness.shadow import ShadowTarget
from mmufuzz.harness.shadow.events import EVENTS

REGRESSIONS = Path(__file__).resolve().parent.parent / "corpus" / "regressions"


def features_per_op(program, target=None) -> list:
    """Run ``program`` without any fault; the features each op left, in order."""
    target = target or ShadowTarget()
    target.reset(program.header)
    out = []
    for op in program.ops:
        target.execute(op)
        out.append(target.features())
    return out


def regression(name: str):
    return load_reproducer(REGRESSIONS / f"shadow-{name}.repro").program


# A gva mapped to MMIO (gfn 0xa has no slot), the page going unsync at a write to another of
# its entries, an access meeting the MMIO SPTE it kept, the gva remapped to RAM, its invlpg.
MMIO_THEN_REMAP = parse_reproducer("""vm type=default vcpus=1
memslot_add slot=0 base=0x0 npages=0x8 flags= host_offset=0
write_pte vcpu=0 table=0x1 index=0 target=0x2 flags=p
write_pte vcpu=0 table=0x2 index=0 target=0x3 flags=p
write_pte vcpu=0 table=0x3 index=0 target=0x4 flags=p
write_pte vcpu=0 table=0x4 index=1 target=0xa flags=p
paging vcpu=0 root=0x1
access vcpu=0 gva=0x1000 word=0 kind=read private=0
write_pte vcpu=0 table=0x4 index=0 target=0x0 flags=
access vcpu=0 gva=0x1000 word=0 kind=read private=0
write_pte vcpu=0 table=0x4 index=1 target=0x0 flags=p
invlpg vcpu=0 gva=0x1000
""").program


def test_events_are_distinct_names():
    assert len(set(EVENTS.names)) == len(EVENTS.names)


def test_a_table_used_at_two_levels_is_an_event_at_the_lookup():
    """The unsync-role-mismatch scenario, run clean: the PD lookup of a gfn whose unsync
    page table is shadowed meets that page (and zaps it); the PT access before it met
    nothing of another role."""
    features = features_per_op(regression("unsync-role-mismatch"))
    assert "find:L2:other_role:L1:unsync" in features[-1]
    assert not any(f.startswith("find:") for op in features[:-1] for f in op)
    # The page table's page went unsync at the physical write, holding a leaf.
    assert "unsync:held_leaves" in features[-3]


def test_a_cr3_load_of_a_page_table_is_an_event():
    program = parse_reproducer(TABLE_CHAIN + """\
paging vcpu=0 root=0x1
access vcpu=0 gva=0x0 word=0 kind=read private=0
paging vcpu=0 root=0x4
""").program
    features = features_per_op(program)
    assert "find:L4:other_role:L1:sync" in features[-1]
    assert "shadow:1:indirect:sync:leaf" in features[-2]


def test_mmio_sptes_in_unsync_pages_and_what_invlpg_meets():
    """The MMIO SPTE made in a synced page, the page going unsync holding it (and keeping it:
    the access after meets it, nothing new is made), the PTE write over it, and the invlpg
    that meets and clears it."""
    features = features_per_op(MMIO_THEN_REMAP)
    assert {"mmio_spte:indirect:sync", "shadow:1:indirect:sync:mmio"} <= set(features[6])
    assert {"unsync:held_mmio", "table:unsync:none"} <= set(features[7])
    assert "shadow:1:indirect:unsync:mmio" in features[8]
    assert "mmio_spte:indirect:unsync" not in features[8]
    assert "table:unsync:mmio" in features[9]
    assert {"invlpg:unsync:L1:mmio", "sync_spte:mmio_cleared"} <= set(features[10])


def test_events_are_reported_once_and_travel_with_a_snapshot():
    program = MMIO_THEN_REMAP
    target = ShadowTarget()
    target.reset(program.header)
    for op in program.ops[:-1]:
        target.execute(op)
        target.features()
    snapshot = target.snapshot()
    target.execute(program.ops[-1])
    first = target.features()
    assert "invlpg:unsync:L1:mmio" in first
    assert not any(f in EVENTS.names for f in target.features())  # drained
    target.restore(snapshot)
    target.execute(program.ops[-1])
    assert target.features() == first
    assert pickle.loads(pickle.dumps(target.kvm.events)) == [0] * len(EVENTS.names)


def _sync_op_feature(features: list, name: str) -> str:
    """The one ``name:unsync=N:debt=D`` feature among an op's features."""
    [feature] = [f for f in features if f.startswith(f"{name}:unsync=")]
    return feature


def test_an_op_that_syncs_says_which_stale_entries_it_began_with():
    """The remap scenario, then a flush: the invlpg begins with an MMIO SPTE in the unsync
    page whose guest PTE now names RAM (and clears it, the page staying unsync); the flush
    after it finds nothing stale."""
    program = MMIO_THEN_REMAP.with_ops(MMIO_THEN_REMAP.ops + parse_reproducer(
        "vm type=default vcpus=1\nflush_tlb vcpu=0\n").program.ops)
    features = features_per_op(program)
    assert _sync_op_feature(features[10], "invlpg") == "invlpg:unsync=1:debt=mmio"
    assert _sync_op_feature(features[11], "flush_tlb") == "flush_tlb:unsync=0:debt=none"


def test_a_leaf_whose_guest_pte_moved_is_leaf_debt_until_the_sync():
    """A shadowed page table goes unsync at a physical PTE write, the vCPU maps a page
    through it, the guest points that PTE elsewhere: a CR3 load then begins with a stale
    leaf; the same load again begins with none."""
    program = parse_reproducer(TABLE_CHAIN + """\
paging vcpu=0 root=0x1
access vcpu=0 gva=0x0 word=0 kind=read private=0
write_pte vcpu=0 table=0x4 index=1 target=0x11 flags=p,rw
access vcpu=0 gva=0x0 word=0 kind=read private=0
write_pte vcpu=0 table=0x4 index=0 target=0x12 flags=p,rw
paging vcpu=0 root=0x1
paging vcpu=0 root=0x1
""").program
    features = features_per_op(program)
    assert "table:unsync:leaf" in features[-3]
    assert _sync_op_feature(features[-2], "paging").endswith(":debt=leaf")
    assert _sync_op_feature(features[-1], "paging").endswith(":debt=none")

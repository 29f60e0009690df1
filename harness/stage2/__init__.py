"""The ``stage2`` target: arm64 KVM's stage-2 page tables (kvm_pgtable) under test.

Built like arch/arm64/kvm/hyp/pgtable.c and arch/arm64/kvm/mmu.c (see
``docs/stage2.md``).  It runs default VMs only: arm64 has no TDX, so a TDX
header, ``accept``, ``set_attributes`` and private accesses are refused.  The
op runner, the schedule bookkeeping and the snapshots are the TDP target's:
both drive a KVM-shaped VM whose ops are generators.
"""

from __future__ import annotations

from mmufuzz.harness.ops import (
    OP_NAMES,
    PAGE_SHIFT,
    Accept,
    Access,
    SetAttributes,
    VmHeader,
    VmType,
    gpa_field,
)
from mmufuzz.harness.stage2.invariants import check_invariants
from mmufuzz.harness.stage2.kvm import Stage2Kvm
from mmufuzz.harness.stage2.pgtable import kvm_pgtable_get_leaf
from mmufuzz.harness.stage2.pte import kvm_pte_valid
from mmufuzz.harness.target import Capabilities
from mmufuzz.harness.tdp import TdpTarget


class Stage2Capabilities(Capabilities):
    """Default VMs, every op but the private-memory ones."""

    # Stage 2 is maps, unmaps and changes of mapping size: memslots and host invalidations
    # take ranges away, dirty logging and get_dirty_log write-protect and split them,
    # split and recover change block sizes.  Each of those kinds is drawn as often as
    # memslot_add, the most frequent of them in the decoder's mix (18 in 256); the rest
    # (the guest's own paging among them, which stage 2 only translates) as the decoder does.
    WEIGHTS = {name: 18 for name in ("memslot_delete", "memslot_move", "memslot_set_flags",
                                     "host_invalidate", "split", "recover", "get_dirty_log")}

    def __init__(self):
        super().__init__({VmType.DEFAULT}, set(OP_NAMES) - {Accept, SetAttributes},
                         weights=self.WEIGHTS)

    def op_refusal(self, op, header):
        reason = super().op_refusal(op, header)
        if reason is None and type(op) is Access and op.private:
            reason = "a private access is not supported by this target (arm64 has no TDX)"
        return reason


class Stage2Target(TdpTarget):
    """The ``stage2`` target (harness.target.Target); ``protected`` selects pKVM's rules."""

    name = "stage2"
    capabilities = Stage2Capabilities()
    protected = False

    def reset(self, header: VmHeader) -> None:
        super().reset(header)
        self.kvm = Stage2Kvm(header, self.protected)

    def check_invariants(self) -> None:
        check_invariants(self.kvm)

    def _record_tables(self) -> None:
        """Its invariant checks keep no records of the tables between checks."""

    def _walk(self, op):
        """``(name, gfn, False, level, leaf)``: where ``op``'s gpa walk stops in stage 2
        (level: arm64's, 3 for a page; a leaf only if valid), None if no gpa."""
        field = gpa_field(op)
        if field is None:
            return None
        gfn = getattr(op, field) >> PAGE_SHIFT
        pte, level = kvm_pgtable_get_leaf(self.kvm.pgt, gfn)
        return OP_NAMES[type(op)], gfn, False, level, kvm_pte_valid(pte)


class Stage2PkvmTarget(Stage2Target):
    """The same target under pKVM's rules: exclusive walks, immediate table teardown."""

    name = "stage2-pkvm"
    protected = True


__all__ = ["Stage2PkvmTarget", "Stage2Target"]

"""The VM of the stage-2 target: struct kvm around one kvm_s2_mmu, and op dispatch.

The generic parts of struct kvm (memslots and their update protocol, the
mmu-notifier invalidation sequence, mmu_lock, kvm->srcu, RCU) are the TDP
target's: they are virt/kvm code, the same on every architecture.  What is
arm64's is the stage-2 MMU, the vCPUs' stage-2 caches and the TLBI they obey.
"""

from __future__ import annotations

from mmufuzz.harness.ops import (
    HostInvalidate,
    MemslotAdd,
    MemslotDelete,
    MemslotMove,
    MemslotSetFlags,
    Recover,
    Split,
    VmHeader,
    ZapAll,
)
from mmufuzz.harness.stage2 import mmu
from mmufuzz.harness.stage2.hardware import Tlbi, Vcpu
from mmufuzz.harness.stage2.pgtable import KvmPgtable
from mmufuzz.harness.tdp import memslots, notifier
from mmufuzz.harness.tdp.attributes import MemoryAttributes
from mmufuzz.harness.tdp.kvm import Kvm


class Stage2Kvm(Kvm):
    """One arm64 VM.  ``protected``: pKVM's rules, where the hypervisor owns the
    stage 2, every walk is exclusive, and an unlinked table is freed at once."""

    def __init__(self, header: VmHeader, protected: bool = False):
        # Not Kvm.__init__: that builds the TDP MMU.  The generic struct kvm is the same.
        self.init_common(header)
        self.tdx = False
        self.protected = protected
        self.attributes = MemoryAttributes()
        self.sept = None
        self.vcpus = [Vcpu(self, i) for i in range(header.vcpus)]
        self.tlbi = Tlbi(self.vcpus)
        self.pgt = KvmPgtable(self.host, self.tlbi, self.rcu)
        if protected:
            self.pgt.free_unlinked_table = self.pgt.free_unlinked
        self.mmu = mmu.Stage2Mmu(self)
        self.dirty_log = mmu.Stage2DirtyLogger(self, header.manual_protect)

    def run(self, op):
        """The generator that performs ``op`` (a simple op) and returns its Outcome.

        vCPU ops and KVM_GET_DIRTY_LOG go the generic way (struct kvm's dispatch);
        the VM ops are arm64's."""
        handler = _VM_OPS.get(type(op))
        return super().run(op) if handler is None else handler(self, op)


_VM_OPS = {MemslotAdd: memslots.memslot_add, MemslotDelete: memslots.memslot_delete,
           MemslotMove: memslots.memslot_move, MemslotSetFlags: mmu.memslot_set_flags,
           HostInvalidate: notifier.host_invalidate, ZapAll: mmu.stage2_unmap_vm,
           Split: mmu.kvm_mmu_split_huge_pages, Recover: mmu.coalesce}

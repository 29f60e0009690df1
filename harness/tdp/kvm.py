"""The VM: every piece of KVM and hardware state of one program, and op dispatch.

``Kvm`` is struct kvm plus the host and the TDX module: memslots, memory
attributes, the TDP MMU, mmu_lock/slots_lock/RCU, the mmu-notifier
invalidation sequence, the vCPUs and host memory.  Each op becomes one
generator (see sched) so that two ops can be interleaved.
"""

from __future__ import annotations

from mmufuzz.harness import faults
from mmufuzz.harness.ops import (
    Accept,
    Access,
    FlushTlb,
    ClearDirtyLog,
    GetDirtyLog,
    HostInvalidate,
    Invlpg,
    MemslotAdd,
    MemslotDelete,
    MemslotMove,
    MemslotSetFlags,
    Paging,
    Recover,
    SetAttributes,
    Split,
    VmHeader,
    VmType,
    WritePte,
    ZapAll,
)
from mmufuzz.harness.tdp import huge, memslots, notifier, private
from mmufuzz.harness.tdp.attributes import MemoryAttributes
from mmufuzz.harness.tdp.dirty import DirtyLogger
from mmufuzz.harness.tdp.events import EVENTS
from mmufuzz.harness.tdp.hardware import Vcpu
from mmufuzz.harness.tdp.hostmem import HostMemory
from mmufuzz.harness.tdp.memslots import Memslots
from mmufuzz.harness.tdp.mmu import TdpMmu
from mmufuzz.harness.tdp.pgalloc import PageTableAllocator
from mmufuzz.harness.tdp.sched import Rcu, RwLock
from mmufuzz.harness.tdp.sept import SecureEpt
from mmufuzz.harness.tdp.spte import TDX_MMIO_VALUE, VMX_EPT_MISCONFIG_WX_VALUE

PML_LOG_NR_ENTRIES = 512  # vmx.h: the PML buffer is one page of gpas


class Kvm:
    """One VM (struct kvm), created from a program header."""

    def __init__(self, header: VmHeader):
        self.init_common(header)
        self.tdx = header.type is VmType.TDX
        # kvm_x86_ops.flush_remote_tlbs_range, which only KVM on Hyper-V has.  Honoured in
        # default VMs only: TDX on Hyper-V is not modelled (docs/semantics.md §J).
        self.range_flush = header.range_flush and not self.tdx
        # tdx_vm_init: kvm_mmu_set_mmio_spte_value(kvm, 0), the per-VM MMIO value.
        td_mmio = self.tdx and not faults.active("td-mmio-misconfig")
        self.mmio_value = TDX_MMIO_VALUE if td_mmio else VMX_EPT_MISCONFIG_WX_VALUE
        # kvm->arch.cpu_dirty_log_size: vmx_vm_init sets it (enable_pml), tdx_vm_init does
        # not (TDX has no PML).  Non-zero: dirty logging clears Dirty bits and the CPU logs
        # writes (PML); zero: it write-protects (kvm_mmu_slot_apply_flags).
        self.cpu_dirty_log_size = 0 if self.tdx else PML_LOG_NR_ENTRIES
        self.pgalloc = PageTableAllocator(self.host)
        self.attributes = MemoryAttributes()
        self.vcpus = [Vcpu(self, i) for i in range(header.vcpus)]
        self.sept = SecureEpt(self) if self.tdx else None
        self.mmu = TdpMmu(self)
        self.dirty_log = DirtyLogger(self, header.manual_protect)

    def init_common(self, header: VmHeader) -> None:
        """The architecture-neutral fields of struct kvm (virt/kvm/kvm_main.c), which every
        MMU here (TDP, shadow, stage 2) builds on: host memory, memslots, the locks and
        the mmu-notifier invalidation sequence."""
        self.vm_type = header.type
        # Whether kvm_flush_remote_tlbs_range flushes only its range: the tdp VM sets it
        # from the header (below); the other MMUs here flush whole.
        self.range_flush = False
        self.host = HostMemory()
        self.memslots = Memslots()
        self.mmu_lock = RwLock()
        self.slots_lock = RwLock()
        self.rcu = Rcu()
        # kvm->srcu: faults read the memslots under it; updates wait for them to finish.
        self.srcu = Rcu()
        self.mmu_invalidate_seq = 0
        self.mmu_invalidate_in_progress = 0
        self.mmu_invalidate_range = (0, 0)
        self.mn_active_invalidate_count = 0
        # MMU-state events of the current op, for campaign feedback (tdp.events; a
        # target whose VM counts others names them in its own ``events``).
        self.events = EVENTS.counts()

    # --- mmu-notifier invalidation sequence -------------------------------------

    def invalidate_begin(self, lo: int, hi: int) -> None:
        """kvm_mmu_invalidate_begin + range_add: faults on [lo, hi) retry until the end."""
        self.mmu_invalidate_in_progress += 1
        if self.mmu_invalidate_in_progress == 1:
            self.mmu_invalidate_range = (lo, hi)
        else:
            self.invalidate_range_add(lo, hi)

    def invalidate_range_add(self, lo: int, hi: int) -> None:
        """kvm_mmu_invalidate_range_add: widen the in-progress invalidation to [lo, hi)."""
        start, end = self.mmu_invalidate_range
        self.mmu_invalidate_range = (min(lo, start), max(hi, end))

    def invalidate_end(self) -> None:
        """kvm_mmu_invalidate_end: bump the sequence, so older pfn lookups are stale."""
        self.mmu_invalidate_seq += 1
        self.mmu_invalidate_in_progress -= 1

    def invalidate_covers(self, gfn: int) -> bool:
        start, end = self.mmu_invalidate_range
        return start <= gfn < end

    def _no_invalidation(self) -> bool:
        return self.mn_active_invalidate_count == 0

    def wait_for_invalidations(self):
        """Generator: memslot updates wait out in-flight invalidations (52ac8b358b0c)."""
        while not self._no_invalidation():
            yield self._no_invalidation

    # --- ops ------------------------------------------------------------------------

    def run(self, op):
        """The generator that performs ``op`` (a simple op) and returns its Outcome."""
        kind = type(op)
        if kind in _VCPU_OPS:
            return _VCPU_OPS[kind](self.vcpus[op.vcpu], op)
        if kind is Accept:
            return private.accept(self, self.vcpus[op.vcpu], op)
        if kind is GetDirtyLog:
            return self.dirty_log.get(op)
        if kind is ClearDirtyLog:
            return self.dirty_log.clear(op)
        return _VM_OPS[kind](self, op)

    def quiesce(self) -> None:
        """A quiescent point: run the RCU callbacks whose grace period has elapsed."""
        self.rcu.process()


_VCPU_OPS = {Access: Vcpu.access, WritePte: Vcpu.write_pte, Paging: Vcpu.paging,
             Invlpg: Vcpu.invlpg, FlushTlb: Vcpu.flush_tlb}
_VM_OPS = {MemslotAdd: memslots.memslot_add, MemslotDelete: memslots.memslot_delete,
           MemslotMove: memslots.memslot_move, MemslotSetFlags: memslots.memslot_set_flags,
           SetAttributes: private.set_memory_attributes, HostInvalidate: notifier.host_invalidate,
           ZapAll: notifier.zap_all, Split: huge.split_slot, Recover: huge.recover}

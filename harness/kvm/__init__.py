"""The real-kernel target: programs run on /dev/kvm, judged by the same reference.

``KvmTarget`` turns each op into what really drives KVM: memslot ops are
KVM_SET_USER_MEMORY_REGION, ``get_dirty_log`` is KVM_GET_DIRTY_LOG, guest ops
are commands to the small guest kernel of ``guest.s`` (its loads and stores go
through KVM's MMU), ``host_invalidate`` gives host pages new copies through
madvise (KVM's mmu notifier), ``zap_all`` deletes a hidden memslot
(kvm_mmu_zap_all_fast).  See docs/kvm.md for the mapping and its limits.
"""

from __future__ import annotations

from typing import Optional

from mmufuzz.harness.kvm import kvmapi
from mmufuzz.harness.kvm.vm import (BASE_ROOT, CMD_FLUSH, CMD_INVLPG, CMD_LOAD_CR3,
                                    CMD_VIRT_READ, CMD_VIRT_WRITE, HIDDEN_GPA, ROOT_COPY, ST_PF,
                                    Backing, Vm)
from mmufuzz.harness.ops import (EINVAL, GFN_LIMIT, NPAGES_MAX, OK, OP_NAMES, PAGE_SHIFT,
                                 PAGE_SIZE, Accept, Access, AccessKind, ClearDirtyLog, DirtyLog,
                                 FlushTlb, GetDirtyLog, HostInvalidate, Invlpg, ManualProtect,
                                 MemslotAdd, MemslotDelete,
                                 MemslotFlag, MemslotMove, MemslotSetFlags, MmioExit, Ok,
                                 PageFault, Paging, Parallel, Recover, SetAttributes, Split,
                                 VmHeader, VmType, WritePte, ZapAll)
from mmufuzz.harness.target import Capabilities

# x86 KVM treats the default local-APIC page as MMIO whatever the memslots say
# (arch/x86/kvm/x86.c, vcpu_is_mmio_gpa: "For APIC access vmexit"); measured here.
APIC_GFN = 0xFEE00

_REFUSED_OPS = {
    SetAttributes: "set_attributes needs private memory (guest_memfd), absent on this host",
    Accept: "accept needs TDX, absent on this host",
    Split: "split has no KVM ioctl for one slot (eager splitting is a module parameter)",
    Recover: "recover has no KVM ioctl (NX-huge-page recovery is a kernel thread)",
    Parallel: "parallel needs two vCPU threads racing, which this target does not run",
}


# KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2's args[0] for each header mode.
_MANUAL_PROTECT_ARGS = {
    ManualProtect.OFF: 0,
    ManualProtect.ON: kvmapi.KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE,
    ManualProtect.INIT_SET: (kvmapi.KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE
                             | kvmapi.KVM_DIRTY_LOG_INITIALLY_SET),
}


class KvmCapabilities(Capabilities):
    """Default VMs, the ops /dev/kvm has, and the limits of this host and harness."""

    def __init__(self):
        super().__init__(vm_types={VmType.DEFAULT},
                         ops=set(OP_NAMES) - set(_REFUSED_OPS))

    def op_refusal(self, op, header: VmHeader) -> Optional[str]:
        reason = _REFUSED_OPS.get(type(op))
        if reason is not None:
            return reason
        if type(op) is Access:
            if op.kind is AccessKind.FETCH:
                return "fetch would execute program data in the guest"
            if op.private:
                return "private accesses need guest_memfd memory attributes, absent on this host"
        elif type(op) is MemslotAdd:
            return _range_refusal(op.base, op.base + op.npages)
        elif type(op) is MemslotMove:
            # The slot's size is not in the op: refuse every base its largest size could
            # carry into a refused range.
            return _range_refusal(op.base, op.base + NPAGES_MAX)
        return super().op_refusal(op, header)


def _range_refusal(base: int, end: int) -> Optional[str]:
    if end > GFN_LIMIT:
        return (f"a memslot reaching gfn {end - 1:#x}: the reference's gfn space ends at "
                f"{GFN_LIMIT:#x}, this host's memslots at kvm_mmu_max_gfn()")
    if base <= APIC_GFN < end:
        return f"a memslot over the APIC page (gfn {APIC_GFN:#x}), MMIO on x86 KVM whatever the slots say"
    return None


CAPABILITIES = KvmCapabilities()


def kvm_flags(flags: MemslotFlag) -> int:
    """KVM_MEM_* of a program's flags; ``host_huge`` is the backing's business (THP)."""
    value = 0
    if flags & MemslotFlag.READONLY:
        value |= kvmapi.KVM_MEM_READONLY
    if flags & MemslotFlag.DIRTY_LOG:
        value |= kvmapi.KVM_MEM_LOG_DIRTY_PAGES
    if flags & MemslotFlag.PRIVATE:
        value |= kvmapi.KVM_MEM_GUEST_MEMFD
    return value


class _Slot:
    __slots__ = ("base", "npages", "flags", "backing")

    def __init__(self, base, npages, flags, backing):
        self.base, self.npages, self.flags, self.backing = base, npages, flags, backing


class KvmTarget:
    """The ``kvm`` target (harness.target.Target): one real VM per program."""

    name = "kvm"
    capabilities = CAPABILITIES

    def __init__(self):
        self.vm: Optional[Vm] = None
        self._slots: dict = {}
        self._roots: list = []
        self._moved: list = []

    def reset(self, header: VmHeader) -> None:
        """Close the last program's VM (fds and mappings) and start a fresh one."""
        self.close()
        self.vm = Vm(header.vcpus, _MANUAL_PROTECT_ARGS[header.manual_protect])
        self._roots = [None] * header.vcpus

    def close(self) -> None:
        """Release the VM: every fd closed, every backing unmapped (idempotent)."""
        for slot in self._slots.values():
            slot.backing.close()
        self._slots = {}
        if self.vm is not None:
            self.vm.close()
            self.vm = None

    def __del__(self):
        self.close()

    def check_invariants(self) -> None:
        """The kernel's structures are not ours to inspect; outcomes are the check."""

    def execute(self, op):
        before = self.vm.counters()
        outcome = getattr(self, "_" + OP_NAMES[type(op)])(op)
        after = self.vm.counters()
        self._moved = sorted(self.vm.moved(before, after))
        return outcome

    def features(self) -> list:
        """The kernel's counters the last op moved (``vcpu0.pf_fixed``, ``vm.mmu_shadow_zapped``,
        ...): coverage of the real KVM that neither Python line coverage nor the outcome shows."""
        return self._moved

    # --- memslots -----------------------------------------------------------------

    def _set(self, slot_id: int, flags: MemslotFlag, base: int, backing) -> bool:
        try:
            self.vm.set_region(slot_id, kvm_flags(flags), base << PAGE_SHIFT, backing)
        except kvmapi.KvmError:
            return False
        return True

    def _memslot_add(self, op: MemslotAdd):
        if op.slot in self._slots:
            # KVM_SET_USER_MEMORY_REGION on an existing id would move or resize it; the op
            # creates, so the harness answers as KVM answers a conflicting request.
            return EINVAL
        backing = Backing(op.npages, op.host_offset, bool(op.flags & MemslotFlag.HOST_HUGE))
        if not self._set(op.slot, op.flags, op.base, backing):
            backing.close()
            return EINVAL
        self._slots[op.slot] = _Slot(op.base, op.npages, op.flags, backing)
        return OK

    def _memslot_delete(self, op: MemslotDelete):
        if not self._set(op.slot, MemslotFlag(0), 0, None):
            return EINVAL
        self._slots.pop(op.slot).backing.close()
        return OK

    def _change(self, slot_id: int, flags: MemslotFlag, base: int):
        """KVM_MR_MOVE or KVM_MR_FLAGS_ONLY of an existing slot (KVM checks the rest)."""
        slot = self._slots[slot_id]
        if (flags ^ slot.flags) & MemslotFlag.HOST_HUGE:
            return EINVAL  # the backing was chosen at add
        if not self._set(slot_id, flags, base, slot.backing):
            return EINVAL
        slot.flags, slot.base = flags, base
        return OK

    def _memslot_move(self, op: MemslotMove):
        slot = self._slots.get(op.slot)
        # A missing slot: KVM would create it, the op moves one.
        return self._change(op.slot, slot.flags, op.base) if slot else EINVAL

    def _memslot_set_flags(self, op: MemslotSetFlags):
        slot = self._slots.get(op.slot)
        return self._change(op.slot, op.flags, slot.base) if slot else EINVAL

    def _clear_dirty_log(self, op: ClearDirtyLog):
        try:
            self.vm.clear_dirty_log(op.slot, op.first, op.npages)
        except kvmapi.KvmError:
            return EINVAL
        return OK

    def _get_dirty_log(self, op: GetDirtyLog):
        slot = self._slots.get(op.slot)
        try:
            pages = self.vm.get_dirty_log(op.slot, slot.npages if slot else 1)
        except kvmapi.KvmError:
            return EINVAL
        return DirtyLog(tuple(slot.base + page for page in pages))

    # --- guest ops ----------------------------------------------------------------

    def _physical(self, vcpu: int, gpa: int, kind: AccessKind, value, tag: bool):
        write = kind is AccessKind.WRITE
        mmio, read = self.vm.physical(vcpu, gpa, write, value or 0)
        if mmio is not None:
            return MmioExit(*mmio)
        return Ok(None if write else read, gpa if tag else None)

    def _access(self, op: Access):
        addr = op.addr + 8 * op.word
        root = self._roots[op.vcpu]
        if not op.virtual or root is None:
            return self._physical(op.vcpu, addr, op.kind, op.value, op.virtual)
        write = op.kind is AccessKind.WRITE
        root_entry = (root << PAGE_SHIFT) + 8 * ((addr >> 39) & 511)
        done = self.vm.command(op.vcpu, CMD_VIRT_WRITE if write else CMD_VIRT_READ, addr,
                               root << PAGE_SHIFT, op.value or 0, root_entry=root_entry)
        if done.mmio is not None:
            return MmioExit(*done.mmio)
        if done.status == ST_PF:
            return PageFault(done.cr2, done.code)
        # The gpa the CPU used is not observable: the reference resolves it (§F).
        return Ok(None if write else done.value)

    def _write_pte(self, op: WritePte):
        gpa = (op.table << PAGE_SHIFT) + 8 * op.index
        return self._physical(op.vcpu, gpa, AccessKind.WRITE, op.pte, False)

    def _paging(self, op: Paging):
        self._roots[op.vcpu] = op.root
        page = BASE_ROOT if op.root is None else ROOT_COPY + op.vcpu
        self.vm.command(op.vcpu, CMD_LOAD_CR3, HIDDEN_GPA + page * PAGE_SIZE)
        return OK

    def _invlpg(self, op: Invlpg):
        self.vm.command(op.vcpu, CMD_INVLPG, op.gva)
        return OK

    def _flush_tlb(self, op: FlushTlb):
        self.vm.command(op.vcpu, CMD_FLUSH)
        return OK

    # --- host ops -----------------------------------------------------------------

    def _host_invalidate(self, op: HostInvalidate):
        end = op.base + op.npages
        for slot in self._slots.values():
            first, last = max(op.base, slot.base), min(end, slot.base + slot.npages)
            if first < last:
                slot.backing.migrate(first - slot.base, last - first)
        return OK

    def _zap_all(self, op: ZapAll):
        self.vm.zap_all()
        return OK


__all__ = ["KvmTarget", "KvmCapabilities"]

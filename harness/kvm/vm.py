"""One real VM on /dev/kvm with the guest kernel of ``guest.s`` running in it.

The VM has a hidden memslot, above every gfn a program can name, holding the
guest's code, stacks, descriptor tables, mailboxes and its own page tables.
The guest runs in 64-bit mode with paging on from its first instruction.

Layout of the hidden slot (page i is at gpa ``HIDDEN_GPA + i*4K`` and at gva
``GUEST_BASE + i*4K``):

====  ==========================================================
0     guest code (guest.bin)
1     GDT
2     IDT
3     mailboxes, 256 bytes per vCPU
4-7   stacks, one page per vCPU
8     base root: a PML4 mapping only the guest (paging off)
9-12  root copies, one per vCPU (paging on; see guest.s)
13    PDPT, 14 PD, 15 PT of the guest's own mapping
16    USER_PT: the user windows' PT (PD entry 1: gva USER_WINDOWS)
====  ==========================================================

PT entries 0..16 map the hidden pages; entry ``WINDOW_INDEX + v`` is vCPU v's
kernel window onto any gpa (the guest rewrites it to copy a PML4 entry);
entry ``DOORBELL_INDEX`` maps a gpa with no memslot.

Physical accesses run at CPL 3 through one of the 512 user windows (see
guest.s and :meth:`Vm.physical`).
"""

from __future__ import annotations

import ctypes
import mmap
import os
import struct
from pathlib import Path

from mmufuzz.harness.kvm import kvmapi as k
from mmufuzz.harness.ops import GFN_LIMIT, PAGE_SHIFT, PAGE_SIZE, VCPUS_MAX

# Above every gfn a program names (< GFN_LIMIT, and PTE targets too), below the host's
# kvm_mmu_max_gfn on a 48-bit-MAXPHYADDR host even with TDP.
HIDDEN_GFN = GFN_LIMIT + (1 << 20)
HIDDEN_GPA = HIDDEN_GFN << PAGE_SHIFT
HIDDEN_PAGES = 17
# A one-page slot deleted and re-added by zap_all (see target.py).
ZAP_GPA = HIDDEN_GPA + (1 << 30)
# No memslot ever covers it: a store there is an MMIO exit, how CPL-3 code reports.
DOORBELL_GPA = HIDDEN_GPA + (2 << 30)
HIDDEN_SLOT, ZAP_SLOT = 100, 101

GUEST_BASE = 0xffffffffc0000000
CODE, GDT, IDT, MAILBOX, STACK, BASE_ROOT, ROOT_COPY, PDPT, PD, PT, USER_PT = (
    0, 1, 2, 3, 4, 8, 9, 13, 14, 15, 16)
USER_WINDOWS = GUEST_BASE + (2 << 20)
# Each vCPU's share of the user windows: a gpa page always uses window gfn % share.
USER_SHARE = 512 // VCPUS_MAX
WINDOW_INDEX, DOORBELL_INDEX = 508, 100
USER_READ, USER_WRITE = 0x700, 0x710  # offsets of user_read, user_write in guest.s
MAILBOX_STRIDE = 256

# Mailbox fields and statuses: guest.s has the same numbers.
MB_CMD, MB_A1, MB_A2, MB_A3, MB_STATUS, MB_VALUE, MB_CR2, MB_CODE = range(0, 64, 8)
ST_DONE, ST_PF, ST_EXC, ST_BAD = 1, 2, 3, 4
REPORT_PORT = 0x10
CMD_VIRT_READ, CMD_VIRT_WRITE = 3, 4
CMD_LOAD_CR3, CMD_INVLPG, CMD_FLUSH, CMD_MAP = 5, 6, 7, 8

# An op that exits to the host more than this many times is stuck: a finding, not a loop.
MAX_EXITS = 64

PTE_P, PTE_RW, PTE_U, PTE_A, PTE_D, PTE_NX = 1, 2, 4, 1 << 5, 1 << 6, 1 << 63
TABLE = PTE_P | PTE_RW | PTE_U | PTE_A | PTE_D

CR0_PE, CR0_MP, CR0_ET, CR0_NE, CR0_WP, CR0_PG = 1, 2, 0x10, 0x20, 1 << 16, 1 << 31
CR4_PAE = 1 << 5
EFER_LME, EFER_LMA, EFER_NXE = 1 << 8, 1 << 10, 1 << 11
GDT_CODE64, GDT_DATA = 0x00AF9B000000FFFF, 0x00CF93000000FFFF

GUEST_BIN = Path(__file__).with_name("guest.bin")


def page_gva(page: int) -> int:
    return GUEST_BASE + page * PAGE_SIZE


class GuestError(RuntimeError):
    """The guest kernel itself went wrong (an exception outside a program access, an
    unexpected exit): a crash finding, never a guest-visible outcome."""


class Exit:
    """What one command did: the first MMIO exit (if any), the status and the mailbox."""

    __slots__ = ("mmio", "status", "value", "cr2", "code")

    def __init__(self, mmio, status, value, cr2, code):
        self.mmio, self.status, self.value, self.cr2, self.code = mmio, status, value, cr2, code


class Backing:
    """Anonymous host memory of one slot, 2M-aligned plus ``host_offset`` pages."""

    def __init__(self, npages: int, host_offset: int = 0, huge: bool = False):
        size = npages * PAGE_SIZE
        self.map = mmap.mmap(-1, size + (4 << 20), mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS
                             | getattr(mmap, "MAP_NORESERVE", 0))
        anchor = ctypes.c_char.from_buffer(self.map)
        start = ctypes.addressof(anchor)
        del anchor  # no exported pointer may outlive the map (close() refuses then)
        aligned = (start + (2 << 20) - 1) & ~((2 << 20) - 1)
        self.offset = aligned - start + host_offset * PAGE_SIZE
        self.address = start + self.offset
        self.size = size
        if huge:
            self.map.madvise(mmap.MADV_HUGEPAGE, aligned - start, size + host_offset * PAGE_SIZE)

    def write(self, offset: int, data: bytes) -> None:
        self.map[self.offset + offset:self.offset + offset + len(data)] = data

    def read(self, offset: int, length: int) -> bytes:
        return self.map[self.offset + offset:self.offset + offset + length]

    def migrate(self, first: int, count: int) -> None:
        """Give each resident page of [first, first+count) a new host page, same contents.

        madvise(MADV_DONTNEED) unmaps the pages (mmu_notifier_invalidate_range_start:
        KVM zaps every SPTE on them); writing the saved bytes back faults in fresh
        pages.  Pages never touched read zero either way and are skipped (mincore).
        """
        resident = k.mincore(self.address + first * PAGE_SIZE, count * PAGE_SIZE)
        page = 0
        while page < count:
            if not resident[page] & 1:
                page += 1
                continue
            end = page
            while end < count and resident[end] & 1:
                end += 1
            offset, length = (first + page) * PAGE_SIZE, (end - page) * PAGE_SIZE
            saved = self.read(offset, length)
            k.madvise(self.address + offset, length, mmap.MADV_DONTNEED)
            self.write(offset, saved)
            page = end

    def close(self) -> None:
        self.map.close()


class Vm:
    """A VM fd, its vCPUs and the hidden slot, with the guest kernel started on each vCPU."""

    def __init__(self, vcpus: int, manual_protect: int = 0):
        """``manual_protect``: KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2's args[0], enabled at once."""
        if not 1 <= vcpus <= VCPUS_MAX:
            raise ValueError(f"vcpus={vcpus}")
        self.fds: list = []
        self.runs: list = []
        self.hidden = self.zap = None
        try:
            self.kvm_fd = self._own(k.open_kvm())
            self.vm_fd = self._own(k.ioctl(self.kvm_fd, k.KVM_CREATE_VM, 0))
            if manual_protect:
                cap = k.kvm_enable_cap(cap=k.KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2)
                cap.args[0] = manual_protect
                k.ioctl(self.vm_fd, k.KVM_ENABLE_CAP, cap)
            self.hidden = Backing(HIDDEN_PAGES)
            self._build_hidden(vcpus)
            self.set_region(HIDDEN_SLOT, 0, HIDDEN_GPA, self.hidden)
            self.zap = Backing(1)
            self.set_region(ZAP_SLOT, 0, ZAP_GPA, self.zap)
            run_size = k.ioctl(self.kvm_fd, k.KVM_GET_VCPU_MMAP_SIZE)
            cpuid = self._cpuid()
            self.vcpu_fds, self._kernel_regs = [], []
            self._user = [False] * vcpus
            self._windows: dict = {}  # user window -> the gpa page its PTE maps
            for index in range(vcpus):
                fd = self._own(k.ioctl(self.vm_fd, k.KVM_CREATE_VCPU, index))
                self.vcpu_fds.append(fd)
                run_map = k.map_run(fd, run_size)
                self.runs.append(run_map)
                k.ioctl(fd, k.KVM_SET_CPUID2, cpuid)
                self._start(fd, index)
            # The kernel's counters, VM first: what each op made KVM do (see features()).
            self.stats = [k.Stats(fd) for fd in [self.vm_fd] + self.vcpu_fds]
            self.fds += [stats.fd for stats in self.stats]
        except BaseException:
            self.close()
            raise

    def counters(self) -> list:
        """A snapshot of every VM and vCPU counter of the kernel (for :meth:`moved`)."""
        return [stats.raw() for stats in self.stats]

    def moved(self, before: list, after: list) -> list:
        """The counters that differ between two snapshots: ``vm.NAME``, ``vcpuN.NAME``."""
        names = []
        for index, (stats, old, new) in enumerate(zip(self.stats, before, after)):
            prefix = "vm." if index == 0 else f"vcpu{index - 1}."
            names += [prefix + name for name in stats.moved(old, new)]
        return names

    def _own(self, fd: int) -> int:
        self.fds.append(fd)
        return fd

    # --- setup ---------------------------------------------------------------

    def _build_hidden(self, vcpus: int) -> None:
        h = self.hidden
        h.write(CODE * PAGE_SIZE, GUEST_BIN.read_bytes())
        h.write(GDT * PAGE_SIZE, struct.pack("<3Q", 0, GDT_CODE64, GDT_DATA))
        idt = b"".join(_idt_gate(page_gva(CODE) + 0x800 + 16 * vector) for vector in range(32))
        h.write(IDT * PAGE_SIZE, idt)
        guest = struct.pack("<Q", (HIDDEN_GPA + PDPT * PAGE_SIZE) | TABLE)
        for root in [BASE_ROOT] + [ROOT_COPY + v for v in range(vcpus)]:
            h.write(root * PAGE_SIZE + 511 * 8, guest)
        h.write(PDPT * PAGE_SIZE + 511 * 8, struct.pack("<Q", (HIDDEN_GPA + PD * PAGE_SIZE) | TABLE))
        h.write(PD * PAGE_SIZE, struct.pack("<2Q", (HIDDEN_GPA + PT * PAGE_SIZE) | TABLE,
                                            (HIDDEN_GPA + USER_PT * PAGE_SIZE) | TABLE))
        h.write(PT * PAGE_SIZE, b"".join(struct.pack("<Q", (HIDDEN_GPA + i * PAGE_SIZE) | TABLE)
                                         for i in range(HIDDEN_PAGES)))
        h.write(PT * PAGE_SIZE + DOORBELL_INDEX * 8, struct.pack("<Q", DOORBELL_GPA | TABLE | PTE_NX))

    def _cpuid(self):
        """The host's supported CPUID, with MAXPHYADDR 52 (no reserved address bits in a
        guest PTE, as the reference's CPU mode says)."""
        cpuid = k.kvm_cpuid2(nent=k.CPUID_ENTRIES_MAX)
        k.ioctl(self.kvm_fd, k.KVM_GET_SUPPORTED_CPUID, cpuid)
        for entry in cpuid.entries[:cpuid.nent]:
            if entry.function == 0x80000008:
                entry.eax = (entry.eax & ~0xFF) | 52
        return cpuid

    def _start(self, fd: int, index: int) -> None:
        sregs = k.kvm_sregs()
        k.ioctl(fd, k.KVM_GET_SREGS, sregs)
        code = dict(base=0, limit=0xFFFFFFFF, selector=8, type=11, present=1, dpl=0, db=0,
                    s=1, l=1, g=1)
        data = dict(base=0, limit=0xFFFFFFFF, selector=16, type=3, present=1, dpl=0, db=1,
                    s=1, l=0, g=1)
        for name, fields in (("cs", code), ("ds", data), ("es", data), ("fs", data),
                             ("gs", data), ("ss", data)):
            segment = getattr(sregs, name)
            for field, value in fields.items():
                setattr(segment, field, value)
        sregs.tr.base, sregs.tr.limit, sregs.tr.selector = 0, 0x67, 0x18
        sregs.tr.type, sregs.tr.present, sregs.tr.s = 11, 1, 0
        sregs.gdt.base, sregs.gdt.limit = page_gva(GDT), PAGE_SIZE - 1
        sregs.idt.base, sregs.idt.limit = page_gva(IDT), 32 * 16 - 1
        sregs.cr0 = CR0_PE | CR0_MP | CR0_ET | CR0_NE | CR0_WP | CR0_PG
        sregs.cr4 = CR4_PAE
        sregs.efer = EFER_LME | EFER_LMA | EFER_NXE
        sregs.cr3 = HIDDEN_GPA + BASE_ROOT * PAGE_SIZE
        k.ioctl(fd, k.KVM_SET_SREGS, sregs)
        regs = k.kvm_regs()
        regs.rip = page_gva(CODE)
        regs.rflags = 2
        regs.rbx = self.mailbox_gva(index)
        regs.r12 = page_gva(WINDOW_INDEX + index)
        regs.r13 = page_gva(PT) + (WINDOW_INDEX + index) * 8
        regs.r14 = page_gva(ROOT_COPY + index)
        regs.rsp = regs.r15 = page_gva(STACK + index) + PAGE_SIZE
        k.ioctl(fd, k.KVM_SET_REGS, regs)
        self._kernel_regs.append(regs)

    def _set_cpl(self, vcpu: int, cpl: int) -> None:
        """Switch ``vcpu`` between the guest kernel (0) and the access stubs (3) from the host:
        only the segments' DPL and RPL change (CR0, CR3, CR4, EFER do not, so KVM keeps its
        MMU context)."""
        fd = self.vcpu_fds[vcpu]
        sregs = k.kvm_sregs()
        k.ioctl(fd, k.KVM_GET_SREGS, sregs)
        for name in ("cs", "ds", "es", "fs", "gs", "ss"):
            segment = getattr(sregs, name)
            segment.dpl, segment.selector = cpl, (segment.selector & ~3) | cpl
        k.ioctl(fd, k.KVM_SET_SREGS, sregs)
        self._user[vcpu] = cpl == 3

    @staticmethod
    def mailbox_gva(index: int) -> int:
        return page_gva(MAILBOX) + index * MAILBOX_STRIDE

    # --- memslots --------------------------------------------------------------

    def set_region(self, slot: int, flags: int, gpa: int, backing) -> None:
        """KVM_SET_USER_MEMORY_REGION (``backing`` None: delete the slot)."""
        region = k.kvm_userspace_memory_region(
            slot=slot, flags=flags, guest_phys_addr=gpa,
            memory_size=0 if backing is None else backing.size,
            userspace_addr=0 if backing is None else backing.address)
        k.ioctl(self.vm_fd, k.KVM_SET_USER_MEMORY_REGION, region)

    def get_dirty_log(self, slot: int, npages: int) -> list:
        """KVM_GET_DIRTY_LOG: the slot-relative pages logged since the last get."""
        words = (npages + 63) // 64
        bitmap = (ctypes.c_uint64 * words)()
        log = k.kvm_dirty_log(slot=slot, dirty_bitmap=ctypes.addressof(bitmap))
        k.ioctl(self.vm_fd, k.KVM_GET_DIRTY_LOG, log)
        pages = []
        for w, bits in enumerate(bitmap):
            while bits:
                low = bits & -bits
                pages.append(w * 64 + low.bit_length() - 1)
                bits ^= low
        return pages

    def clear_dirty_log(self, slot: int, first: int, npages: int) -> None:
        """KVM_CLEAR_DIRTY_LOG of slot pages [first, first+npages), every bit set."""
        bitmap = (ctypes.c_uint64 * max(1, (npages + 63) // 64))()
        for word in range(npages // 64):
            bitmap[word] = (1 << 64) - 1
        if npages % 64:
            bitmap[npages // 64] = (1 << npages % 64) - 1
        log = k.kvm_clear_dirty_log(slot=slot, num_pages=npages, first_page=first,
                                    dirty_bitmap=ctypes.addressof(bitmap))
        k.ioctl(self.vm_fd, k.KVM_CLEAR_DIRTY_LOG, log)

    def zap_all(self) -> None:
        """Delete and re-add the one-page zap slot: a memslot DELETE makes x86 KVM call
        kvm_mmu_zap_all_fast (kvm_arch_flush_shadow_memslot with the default
        KVM_X86_QUIRK_SLOT_ZAP_ALL), the real path of the ``zap_all`` op."""
        self.set_region(ZAP_SLOT, 0, ZAP_GPA, None)
        self.set_region(ZAP_SLOT, 0, ZAP_GPA, self.zap)

    # --- commands --------------------------------------------------------------

    def command(self, vcpu: int, cmd: int, a1: int = 0, a2: int = 0, a3: int = 0,
                root_entry: int = -1) -> Exit:
        """Run one guest-kernel command on ``vcpu`` to its report; note its first MMIO exit.

        ``root_entry`` is the gpa of the program's PML4 entry a gva command copies
        (guest.s, sync_pml4e).  A read of it that exits is the guest's copying, not
        the program's access: it is not reported, and its zero data makes the copied
        entry not present, so the access then faults as KVM's own walker faults on a
        table it cannot read (paging_tmpl.h, FNAME(walk_addr_generic):
        ``kvm_is_error_hva(host_addr)`` -> ``goto error``, a not-present #PF).
        """
        if self._user[vcpu]:
            self._set_cpl(vcpu, 0)
            k.ioctl(self.vcpu_fds[vcpu], k.KVM_SET_REGS, self._kernel_regs[vcpu])
        base = (MAILBOX * PAGE_SIZE + vcpu * MAILBOX_STRIDE)
        self.hidden.write(base, struct.pack("<5Q", cmd, a1, a2, a3, 0))
        mmio, _ = self._run(vcpu, f"command {cmd}", root_entry)
        status, value, cr2, code = struct.unpack("<4Q", self.hidden.read(base + MB_STATUS, 32))
        if status == ST_EXC or status == ST_BAD:
            raise GuestError(f"vcpu {vcpu}: command {cmd} raised vector {code}"
                             if status == ST_EXC else f"vcpu {vcpu}: bad command {cmd}")
        return Exit(mmio, status, value, cr2, code)

    def physical(self, vcpu: int, gpa: int, write: bool, value: int = 0):
        """A load or store of the word at byte ``gpa``: ``(first MMIO exit or None, value)``.

        The page goes to this vCPU's user window ``gfn % USER_SHARE``; unless that
        window maps it already, the guest kernel maps it (a PTE store KVM tracks, and
        invlpg).  Then the access runs at CPL 3 (guest.s, user_read and user_write):
        the CPU executes it, and a miss is a real shadow-MMU page fault (KVM's counter
        ``pf_fixed``), not the instruction emulator.  The SPTE KVM built stays between
        accesses, so a memslot change, mmu-notifier invalidation or dirty-log
        write-protection that KVM failed to apply to it would show.
        """
        page = gpa >> PAGE_SHIFT
        window = vcpu * USER_SHARE + page % USER_SHARE
        if self._windows.get(window) != page:
            self.command(vcpu, CMD_MAP, gpa, window)
            self._windows[window] = page
        self._set_cpl(vcpu, 3)
        regs = k.kvm_regs(rip=page_gva(CODE) + (USER_WRITE if write else USER_READ), rflags=2,
                          rdi=USER_WINDOWS + window * PAGE_SIZE + (gpa & (PAGE_SIZE - 1)),
                          rsi=page_gva(DOORBELL_INDEX), rax=value)
        k.ioctl(self.vcpu_fds[vcpu], k.KVM_SET_REGS, regs)
        return self._run(vcpu, "physical access", -1)

    def _run(self, vcpu: int, what: str, root_entry: int):
        """KVM_RUN until the guest reports (``out`` or the doorbell): ``(mmio, doorbell value)``."""
        run = self.runs[vcpu]
        fd = self.vcpu_fds[vcpu]
        mmio = None
        for _ in range(MAX_EXITS):
            k.ioctl(fd, k.KVM_RUN, 0)
            reason = k.exit_reason(run)
            if reason == k.KVM_EXIT_IO and k.io_port(run) == REPORT_PORT:
                return mmio, None
            if reason == k.KVM_EXIT_MMIO:
                gpa, data, is_write = k.mmio_exit(run)
                exit_ = (gpa, is_write)
                if exit_ == (DOORBELL_GPA, True):
                    return mmio, data
                if mmio is None and exit_ != (root_entry, False):
                    mmio = exit_
                # A read completes with zeros; the guest's report after it is ignored.
                k.complete_mmio_read(run, 0)
                continue
            if reason == k.KVM_EXIT_INTR:
                continue
            raise GuestError(f"vcpu {vcpu}: unexpected exit {k.KVM_EXIT_NAMES.get(reason, reason)}"
                             f" in {what}")
        raise GuestError(f"vcpu {vcpu}: {what} did not finish in {MAX_EXITS} exits")

    # --- teardown --------------------------------------------------------------

    def close(self) -> None:
        """Close every fd and unmap every mapping this VM made (idempotent)."""
        for run_map in self.runs:
            run_map.close()
        self.runs = []
        for fd in reversed(self.fds):
            os.close(fd)
        self.fds = []
        for backing in (self.hidden, self.zap):
            if backing is not None:
                backing.close()
        self.hidden = self.zap = None


def _idt_gate(handler: int) -> bytes:
    """A 64-bit interrupt gate (type 0xE, present, DPL 0) to ``handler`` in segment 8."""
    return struct.pack("<HHBBHII", handler & 0xFFFF, 8, 0, 0x8E, (handler >> 16) & 0xFFFF,
                       handler >> 32, 0)

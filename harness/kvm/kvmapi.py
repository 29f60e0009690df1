"""The /dev/kvm ABI this target speaks: ioctl numbers and structs of include/uapi/linux/kvm.h.

Only the standard library (ctypes, mmap, os; ioctl through libc): the ABI is small and stable, and a
binding would be one more dependency for a dozen ioctls.  Names are the header's, so a
reader can check each against linux/kvm.h and arch/x86/include/uapi/asm/kvm.h.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import struct

u8, u16, u32, u64 = ctypes.c_uint8, ctypes.c_uint16, ctypes.c_uint32, ctypes.c_uint64

KVMIO = 0xAE


def _ioc(direction: int, nr: int, size: int) -> int:
    """``_IOC`` of asm-generic/ioctl.h: dir(2) size(14) type(8) nr(8)."""
    return (direction << 30) | (size << 16) | (KVMIO << 8) | nr


def _io(nr):
    return _ioc(0, nr, 0)


def _iow(nr, struct):
    return _ioc(1, nr, ctypes.sizeof(struct))


def _ior(nr, struct):
    return _ioc(2, nr, ctypes.sizeof(struct))


def _iowr(nr, struct):
    return _ioc(3, nr, ctypes.sizeof(struct))


class kvm_userspace_memory_region(ctypes.Structure):
    _fields_ = [("slot", u32), ("flags", u32), ("guest_phys_addr", u64),
                ("memory_size", u64), ("userspace_addr", u64)]


class kvm_dirty_log(ctypes.Structure):
    _fields_ = [("slot", u32), ("padding1", u32), ("dirty_bitmap", u64)]


class kvm_clear_dirty_log(ctypes.Structure):
    _fields_ = [("slot", u32), ("num_pages", u32), ("first_page", u64), ("dirty_bitmap", u64)]


class kvm_enable_cap(ctypes.Structure):
    _fields_ = [("cap", u32), ("flags", u32), ("args", u64 * 4), ("pad", ctypes.c_uint8 * 64)]


class kvm_regs(ctypes.Structure):
    _fields_ = [(name, u64) for name in (
        "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp", "r8", "r9", "r10", "r11",
        "r12", "r13", "r14", "r15", "rip", "rflags")]


class kvm_segment(ctypes.Structure):
    _fields_ = [("base", u64), ("limit", u32), ("selector", u16), ("type", u8),
                ("present", u8), ("dpl", u8), ("db", u8), ("s", u8), ("l", u8), ("g", u8),
                ("avl", u8), ("unusable", u8), ("padding", u8)]


class kvm_dtable(ctypes.Structure):
    _fields_ = [("base", u64), ("limit", u16), ("padding", u16 * 3)]


class kvm_sregs(ctypes.Structure):
    _fields_ = [("cs", kvm_segment), ("ds", kvm_segment), ("es", kvm_segment),
                ("fs", kvm_segment), ("gs", kvm_segment), ("ss", kvm_segment),
                ("tr", kvm_segment), ("ldt", kvm_segment), ("gdt", kvm_dtable),
                ("idt", kvm_dtable), ("cr0", u64), ("cr2", u64), ("cr3", u64), ("cr4", u64),
                ("cr8", u64), ("efer", u64), ("apic_base", u64), ("interrupt_bitmap", u64 * 4)]


class kvm_cpuid_entry2(ctypes.Structure):
    _fields_ = [("function", u32), ("index", u32), ("flags", u32), ("eax", u32),
                ("ebx", u32), ("ecx", u32), ("edx", u32), ("padding", u32 * 3)]


CPUID_ENTRIES_MAX = 256


class kvm_cpuid2(ctypes.Structure):
    _fields_ = [("nent", u32), ("padding", u32),
                ("entries", kvm_cpuid_entry2 * CPUID_ENTRIES_MAX)]


class _kvm_cpuid2_header(ctypes.Structure):
    """The ioctl number encodes the size of the header only (a flexible array follows)."""
    _fields_ = [("nent", u32), ("padding", u32)]


class kvm_run_io(ctypes.Structure):
    _fields_ = [("direction", u8), ("size", u8), ("port", u16), ("count", u32),
                ("data_offset", u64)]


class kvm_run_mmio(ctypes.Structure):
    _fields_ = [("phys_addr", u64), ("data", u8 * 8), ("len", u32), ("is_write", u8)]


class _kvm_run_exit(ctypes.Union):
    _fields_ = [("io", kvm_run_io), ("mmio", kvm_run_mmio), ("suberror", u32),
                ("hardware_entry_failure_reason", u64), ("padding", u8 * 256)]


class kvm_run(ctypes.Structure):
    _fields_ = [("request_interrupt_window", u8), ("immediate_exit", u8),
                ("padding1", u8 * 6), ("exit_reason", u32),
                ("ready_for_interrupt_injection", u8), ("if_flag", u8), ("flags", u16),
                ("cr8", u64), ("apic_base", u64), ("exit", _kvm_run_exit)]


# Fields of the mmap'ed kvm_run read in place with struct (a ctypes view would pin the
# mmap: it could not be closed while an exception's frames still held the view).
_RUN_EXIT_REASON = kvm_run.exit_reason.offset
_RUN_EXIT = kvm_run.exit.offset


def exit_reason(run: mmap.mmap) -> int:
    return struct.unpack_from("<I", run, _RUN_EXIT_REASON)[0]


def io_port(run: mmap.mmap) -> int:
    return struct.unpack_from("<H", run, _RUN_EXIT + kvm_run_io.port.offset)[0]


def mmio_exit(run: mmap.mmap):
    """``(phys_addr, data as an int, is_write)`` of a KVM_EXIT_MMIO."""
    phys_addr, data, _, is_write = struct.unpack_from("<QQIB", run, _RUN_EXIT)
    return phys_addr, data, bool(is_write)


def complete_mmio_read(run: mmap.mmap, value: int) -> None:
    """The data an MMIO read returns to the guest on the next KVM_RUN."""
    struct.pack_into("<Q", run, _RUN_EXIT + kvm_run_mmio.data.offset, value)


KVM_GET_API_VERSION = _io(0x00)
KVM_CREATE_VM = _io(0x01)
KVM_GET_VCPU_MMAP_SIZE = _io(0x04)
KVM_GET_SUPPORTED_CPUID = _iowr(0x05, _kvm_cpuid2_header)
KVM_CREATE_VCPU = _io(0x41)
KVM_GET_DIRTY_LOG = _iow(0x42, kvm_dirty_log)
KVM_SET_USER_MEMORY_REGION = _iow(0x46, kvm_userspace_memory_region)
KVM_SET_TSS_ADDR = _io(0x47)
KVM_RUN = _io(0x80)
KVM_GET_REGS = _ior(0x81, kvm_regs)
KVM_SET_REGS = _iow(0x82, kvm_regs)
KVM_GET_SREGS = _ior(0x83, kvm_sregs)
KVM_SET_SREGS = _iow(0x84, kvm_sregs)
KVM_SET_CPUID2 = _iow(0x90, _kvm_cpuid2_header)
KVM_ENABLE_CAP = _iow(0xa3, kvm_enable_cap)
KVM_CLEAR_DIRTY_LOG = _iowr(0xc0, kvm_clear_dirty_log)

# KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 and its args[0] bits.
KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 = 168
KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE = 1 << 0
KVM_DIRTY_LOG_INITIALLY_SET = 1 << 1

KVM_API_VERSION = 12

# KVM_SET_USER_MEMORY_REGION flags.
KVM_MEM_LOG_DIRTY_PAGES = 1 << 0
KVM_MEM_READONLY = 1 << 1
KVM_MEM_GUEST_MEMFD = 1 << 2

# kvm_run.exit_reason.
KVM_EXIT_NAMES = {0: "UNKNOWN", 1: "EXCEPTION", 2: "IO", 3: "HYPERCALL", 4: "DEBUG", 5: "HLT",
                  6: "MMIO", 7: "IRQ_WINDOW_OPEN", 8: "SHUTDOWN", 9: "FAIL_ENTRY", 10: "INTR",
                  17: "INTERNAL_ERROR"}
KVM_EXIT_IO = 2
KVM_EXIT_MMIO = 6
KVM_EXIT_INTR = 10

_libc = ctypes.CDLL(None, use_errno=True)
_libc.ioctl.argtypes = (ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p)
_libc.ioctl.restype = ctypes.c_int


class KvmError(OSError):
    """An ioctl failed; ``errno`` is the kernel's answer."""


def ioctl(fd: int, request: int, arg=None) -> int:
    """ioctl(2) through libc with a pointer to ``arg`` (a ctypes object) or an int."""
    if arg is None:
        pointer = None
    elif isinstance(arg, int):
        pointer = arg
    else:
        pointer = ctypes.addressof(arg)
    while True:
        result = _libc.ioctl(fd, request, pointer)
        if result >= 0:
            return result
        err = ctypes.get_errno()
        if err != errno.EINTR:
            raise KvmError(err, f"ioctl {request:#x}: {os.strerror(err)}")


def available(path: str = "/dev/kvm") -> bool:
    """/dev/kvm exists and this process may open it read-write."""
    return os.access(path, os.R_OK | os.W_OK)


def open_kvm(path: str = "/dev/kvm") -> int:
    fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    try:
        version = ioctl(fd, KVM_GET_API_VERSION)
        if version != KVM_API_VERSION:
            raise KvmError(0, f"KVM API version {version}, expected {KVM_API_VERSION}")
    except BaseException:
        os.close(fd)
        raise
    return fd


def map_run(vcpu_fd: int, size: int) -> mmap.mmap:
    """The vCPU's ``struct kvm_run`` page(s), shared with the kernel."""
    return mmap.mmap(vcpu_fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)


# munmap/mmap of anonymous backing at fixed addresses, and mincore, for the host's side
# of an mmu-notifier invalidation.
_libc.mincore.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p)
_libc.mincore.restype = ctypes.c_int
_libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
_libc.madvise.restype = ctypes.c_int


def mincore(address: int, length: int) -> bytes:
    """One byte per page of [address, address+length): bit 0 set if resident."""
    pages = (length + mmap.PAGESIZE - 1) // mmap.PAGESIZE
    vec = ctypes.create_string_buffer(pages)
    if _libc.mincore(address, length, vec) != 0:
        err = ctypes.get_errno()
        raise KvmError(err, f"mincore: {os.strerror(err)}")
    return vec.raw


def madvise(address: int, length: int, advice: int) -> None:
    if _libc.madvise(address, length, advice) != 0:
        err = ctypes.get_errno()
        raise KvmError(err, f"madvise: {os.strerror(err)}")


KVM_GET_STATS_FD = _io(0xCE)


class kvm_stats_header(ctypes.Structure):
    _fields_ = [("flags", u32), ("name_size", u32), ("num_desc", u32), ("id_offset", u32),
                ("desc_offset", u32), ("data_offset", u32)]


class Stats:
    """A VM's or vCPU's binary statistics (KVM_GET_STATS_FD), each read one pread.

    They show what the kernel did for an op: whether guest accesses reached the
    MMU (``pf_fixed``, ``pf_taken``) or the instruction emulator
    (``insn_emulation``), and which MMU paths ran (``mmu_shadow_zapped``, ...).
    """

    def __init__(self, fd: int):
        self.fd = ioctl(fd, KVM_GET_STATS_FD)
        try:
            header = kvm_stats_header.from_buffer_copy(
                os.pread(self.fd, ctypes.sizeof(kvm_stats_header), 0))
            desc_size = 16 + header.name_size
            descs = os.pread(self.fd, desc_size * header.num_desc, header.desc_offset)
        except BaseException:
            os.close(self.fd)
            raise
        self.fields = []  # (name, byte offset in the data block); the first u64 of each
        size = 0
        for i in range(header.num_desc):
            desc = descs[i * desc_size:(i + 1) * desc_size]
            count, offset = int.from_bytes(desc[6:8], "little"), int.from_bytes(desc[8:12], "little")
            self.fields.append((desc[16:].split(b"\0", 1)[0].decode(), offset))
            size = max(size, offset + 8 * count)
        self.data_offset, self.size = header.data_offset, size

    def raw(self) -> bytes:
        """The data block as it is now (compare two to find what moved, cheaply)."""
        return os.pread(self.fd, self.size, self.data_offset)

    def moved(self, before: bytes, after: bytes) -> list:
        """The names whose first value differs between two :meth:`raw` blocks."""
        if before == after:
            return []
        return [name for name, o in self.fields if before[o:o + 8] != after[o:o + 8]]

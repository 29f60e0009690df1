"""The real-kernel target: its guest bytes, its refusals, and agreement with the reference.

Tests that need /dev/kvm skip where it is absent (or not read-write for this user).
"""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mmufuzz.fuzz.corpus import replay
from mmufuzz.bench import throughput
from mmufuzz.fuzz.encoding import (decode, encode, format_program, load_reproducer,
                                   parse_reproducer)
from mmufuzz.fuzz.mutator import mutate
from mmufuzz.fuzz.runner import run_program
from mmufuzz.harness.kvm import APIC_GFN, KvmCapabilities, KvmTarget
from mmufuzz.harness.ops import (EINVAL, GFN_LIMIT, Access, DirtyLog, MmioExit, Ok, PageFault,
                                 Parallel, VmType)
from mmufuzz.harness.target import make_target

ROOT = Path(__file__).resolve().parent.parent
GUEST = ROOT / "harness" / "kvm"
needs_kvm = pytest.mark.skipif(not os.access("/dev/kvm", os.R_OK | os.W_OK),
                               reason="needs read-write /dev/kvm")
CAPS = KvmCapabilities()


def program(text: str):
    return parse_reproducer("vm type=default vcpus=2\n" + text).program


# --- without /dev/kvm -------------------------------------------------------------

@pytest.mark.skipif(not (shutil.which("as") and shutil.which("objcopy")),
                    reason="needs binutils (as, objcopy)")
def test_guest_bin_is_guest_s_assembled(tmp_path):
    obj, out = tmp_path / "guest.o", tmp_path / "guest.bin"
    subprocess.run(["as", "--64", "-o", str(obj), str(GUEST / "guest.s")], check=True)
    subprocess.run(["objcopy", "-O", "binary", "-j", ".text", str(obj), str(out)], check=True)
    assert out.read_bytes() == (GUEST / "guest.bin").read_bytes()


def test_registered_and_refuses_what_this_host_cannot_do():
    assert isinstance(make_target("kvm"), KvmTarget)  # no VM until reset
    tdx = parse_reproducer("vm type=tdx vcpus=1\nzap_all\n").program
    assert CAPS.refusal(tdx) == "header: vm type=tdx is not supported by this target"
    cases = {
        "accept vcpu=0 gpa=0x0 level=4k": "accept needs TDX",
        "set_attributes base=0x0 npages=0x1 private=1": "set_attributes needs private memory",
        "split slot=0": "split has no KVM ioctl",
        "recover": "recover has no KVM ioctl",
        "parallel a=(zap_all) b=(zap_all) schedule=0x0": "parallel needs two vCPU threads",
        "access vcpu=0 gpa=0x0 word=0 kind=fetch private=0": "fetch would execute",
        "access vcpu=0 gpa=0x0 word=0 kind=read private=1": "private accesses need",
        f"memslot_add slot=0 base={APIC_GFN - 1:#x} npages=0x2 flags= host_offset=0":
            "a memslot over the APIC page",
        f"memslot_add slot=0 base={GFN_LIMIT - 1:#x} npages=0x2 flags= host_offset=0":
            "a memslot reaching gfn",
        f"memslot_move slot=0 base={APIC_GFN - 5:#x}": "a memslot over the APIC page",
    }
    for line, reason in cases.items():
        refusal = CAPS.refusal(program(line + "\n"))
        assert refusal is not None and refusal.startswith("op 1: " + reason), (line, refusal)
    fine = program("memslot_add slot=0 base=0x100 npages=0x10 flags=dirty_log host_offset=3\n"
                   f"memslot_add slot=1 base={APIC_GFN + 1:#x} npages=0x10 flags= host_offset=0\n"
                   "access vcpu=1 gva=0x1000 word=3 kind=write value=0x5 private=0\n")
    assert CAPS.refusal(fine) is None


def test_restrict_keeps_only_what_kvm_runs():
    text = ("vm type=tdx vcpus=2\n"
            "memslot_add slot=0 base=0x0 npages=0x10 flags= host_offset=0\n"
            "parallel a=(access vcpu=0 gpa=0x0 word=0 kind=read private=0) "
            "b=(access vcpu=1 gpa=0x0 word=0 kind=fetch private=0) schedule=0x0\n"
            "access vcpu=0 gpa=0x0 word=0 kind=read private=1\n")
    restricted = CAPS.restrict(parse_reproducer(text).program)
    assert CAPS.refusal(restricted) is None
    assert restricted.header.type is VmType.DEFAULT
    assert [type(op) for op in restricted.ops] == [type(restricted.ops[0]), Access]
    assert not any(isinstance(op, Parallel) for op in restricted.ops)


# --- on /dev/kvm ------------------------------------------------------------------

@pytest.fixture
def kvm():
    target = KvmTarget()
    yield target
    target.close()


def run_ops(target, text: str, vcpus: int = 2):
    prog = parse_reproducer(f"vm type=default vcpus={vcpus}\n" + text).program
    target.reset(prog.header)
    return [target.execute(op) for op in prog.ops]


@needs_kvm
def test_guest_accesses_faults_and_exits(kvm):
    outcomes = run_ops(kvm, """\
memslot_add slot=0 base=0x0 npages=0x400 flags=host_huge host_offset=0
write_pte vcpu=0 table=0x1 index=0 target=0x2 flags=p,rw
write_pte vcpu=0 table=0x2 index=0 target=0x3 flags=p,rw
write_pte vcpu=0 table=0x3 index=0 target=0x4 flags=p,rw
write_pte vcpu=0 table=0x4 index=1 target=0x10 flags=p
paging vcpu=0 root=0x1
access vcpu=0 gpa=0x10000 word=2 kind=write value=0x77 private=0
access vcpu=0 gva=0x1000 word=2 kind=read private=0
access vcpu=0 gva=0x1000 word=2 kind=write value=0x1 private=0
access vcpu=0 gva=0x2000 word=0 kind=read private=0
access vcpu=1 gpa=0x800000 word=1 kind=write value=0x1 private=0
access vcpu=1 gpa=0xfee00000 word=0 kind=read private=0
""")
    assert outcomes[6:] == [Ok(), Ok(0x77), PageFault(0x1010, 0x3), PageFault(0x2000, 0x0),
                            MmioExit(0x800008, True), MmioExit(0xFEE00000, False)]


@needs_kvm
def test_dirty_log_and_host_work_keep_contents(kvm):
    outcomes = run_ops(kvm, """\
memslot_add slot=3 base=0x200 npages=0x200 flags=dirty_log host_offset=7
access vcpu=0 gpa=0x203000 word=0 kind=write value=0x2 private=0
access vcpu=1 gpa=0x3ff000 word=511 kind=write value=0x3 private=0
host_invalidate base=0x0 npages=0x1000
zap_all
access vcpu=0 gpa=0x203000 word=0 kind=read private=0
access vcpu=0 gpa=0x3ff000 word=511 kind=read private=0
get_dirty_log slot=3
memslot_move slot=3 base=0x600
access vcpu=0 gpa=0x603000 word=0 kind=read private=0
memslot_set_flags slot=3 flags=readonly
""")
    assert outcomes[5:7] == [Ok(2), Ok(3)]
    assert isinstance(outcomes[7], DirtyLog) and {0x203, 0x3ff} <= set(outcomes[7].gfns)
    # readonly may not change: KVM's own check, not the harness's
    assert outcomes[8:] == [Ok(), Ok(2), EINVAL]


@needs_kvm
def test_physical_accesses_reach_the_shadow_mmu_and_host_work_zaps_it(kvm):
    """The kernel's own counters (features): a first access faults its SPTE in, a second
    uses it, and an mmu-notifier invalidation or zap_all makes the next one fault again."""
    prog = parse_reproducer("""vm type=default vcpus=1
memslot_add slot=0 base=0x0 npages=0x10 flags= host_offset=0
access vcpu=0 gpa=0x5000 word=0 kind=write value=0x5 private=0
access vcpu=0 gpa=0x5000 word=1 kind=read private=0
host_invalidate base=0x5 npages=0x1
access vcpu=0 gpa=0x5000 word=0 kind=read private=0
access vcpu=0 gpa=0x5000 word=0 kind=read private=0
zap_all
access vcpu=0 gpa=0x5000 word=0 kind=read private=0
""").program
    kvm.reset(prog.header)
    faulted = []
    for op in prog.ops:
        kvm.execute(op)
        faulted.append("vcpu0.pf_fixed" in kvm.features())
    assert faulted == [False, True, False, False, True, False, False, True]


@needs_kvm
def test_reset_and_close_release_every_fd_and_mapping(kvm):
    def fds():
        return set(os.listdir("/proc/self/fd"))

    def maps():
        return Path("/proc/self/maps").read_text().count("\n")

    before_fds, before_maps = fds(), maps()
    text = ("memslot_add slot=0 base=0x0 npages=0x100 flags= host_offset=0\n"
            "memslot_add slot=1 base=0x1000 npages=0x100 flags=dirty_log host_offset=0\n"
            "access vcpu=1 gpa=0x1000000 word=0 kind=write value=0x1 private=0\n")
    run_ops(kvm, text, vcpus=4)
    during = fds() - before_fds
    # /dev/kvm, the VM, four vCPUs, the dup of each that Python's mmap of kvm_run holds,
    # and the statistics fds of the VM and of each vCPU
    assert len(during) == 2 + 4 + 4 + 5
    for _ in range(3):
        run_ops(kvm, text, vcpus=4)
        assert len(fds() - before_fds) == len(during)
    kvm.close()
    assert fds() == before_fds
    assert maps() == before_maps


@needs_kvm
def test_runnable_corpus_replays_clean_on_kvm():
    ran = []
    for path in sorted((ROOT / "corpus").glob("*/*.repro")):
        repro = load_reproducer(path)
        if repro.meta.get("expect", "clean") != "clean" and "inject" not in repro.meta:
            continue  # a divergence without a fault: a finding of its own target
        if CAPS.refusal(repro.program) is not None:
            continue
        result = replay(repro, target="kvm", inject="none")
        assert result.finding is None, result.report()
        ran.append(path.name)
    assert len(ran) >= 5
    # The guest-walk rules the real kernel once disagreed on (docs/kvm.md) are among them.
    assert {"clean-walk-table-outside-slots.repro", "clean-walk-sets-accessed-dirty.repro",
            "clean-walk-accessed-dirty-and-the-tlb.repro"} <= set(ran)


@needs_kvm
def test_replay_of_a_tdx_reproducer_exits_2_with_the_reason():
    path = ROOT / "corpus" / "regressions" / "accept-level-ignored.repro"
    done = subprocess.run([sys.executable, "-m", "mmufuzz.fuzz.cli", "replay", str(path),
                           "--target", "kvm"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert "target kvm cannot run this program: header: vm type=tdx" in done.stderr


@needs_kvm
def test_kvm_agrees_with_the_reference_on_mutated_programs():
    """Programs mutated from the seeds, bent to the target: a bounded count, all clean."""
    rng = random.Random(25)
    seeds = [CAPS.restrict(load_reproducer(p).program)
             for p in sorted((ROOT / "corpus" / "seeds").glob("*.repro"))]
    seeds = [s for s in seeds if s.ops]
    target = KvmTarget()
    try:
        for _ in range(150):
            prog = rng.choice(seeds)
            for _ in range(rng.randrange(1, 5)):
                prog = mutate(prog, rng)
            prog = CAPS.restrict(prog)
            finding = run_program(prog, target)
            assert finding is None, finding.summary("kvm")
    finally:
        target.close()


def dirty_log_program(rng: random.Random):
    """A random program of dirty-logging work in a random manual-protect mode: slots of
    sizes around a 64-page word, guest reads and writes in them, gets, clears (aligned,
    misaligned, to the end, past it), flag toggles, moves, deletes and host work."""
    lines = [f"vm type=default vcpus=1 manual_protect={rng.choice(['off', 'on', 'init_set'])}"]
    sizes = {}
    for _ in range(rng.randrange(10, 40)):
        slot = rng.randrange(3)
        base = 0x400 * (slot + 1) + rng.choice((0, 0x1f0, 0x200))
        roll = rng.random()
        if roll < 0.15 or slot not in sizes:
            npages = rng.choice((0x10, 0x40, 0x50, 0x80, 0x1ff, 0x200))
            flags = ",".join(f for f, p in (("dirty_log", 0.7), ("host_huge", 0.4),
                                            ("readonly", 0.1)) if rng.random() < p)
            lines.append(f"memslot_add slot={slot} base={base:#x} npages={npages:#x} "
                         f"flags={flags} host_offset=0")
            sizes.setdefault(slot, npages)
        elif roll < 0.55:
            page = rng.randrange(sizes[slot] + 2)
            kind = rng.choice(("read", "write"))
            value = f" value={rng.randrange(1 << 16):#x}" if kind == "write" else ""
            lines.append(f"access vcpu=0 gpa={(base + page) << 12:#x} word={rng.randrange(512)} "
                         f"kind={kind}{value} private=0")
        elif roll < 0.7:
            lines.append(f"get_dirty_log slot={slot}")
        elif roll < 0.85:
            size = sizes[slot]
            first = rng.choice((0, 0, 0x40, 0x80, 0x1c0, rng.randrange(size + 64)))
            npages = rng.choice((0, 0x40, 0x80, max(0, size - first), rng.randrange(size + 64)))
            lines.append(f"clear_dirty_log slot={slot} first={first:#x} npages={npages:#x}")
        elif roll < 0.93:
            lines.append(f"memslot_set_flags slot={slot} flags="
                         + rng.choice(("dirty_log", "", "dirty_log,host_huge", "host_huge")))
        elif roll < 0.96:
            lines.append(f"memslot_move slot={slot} base={base + 0x40:#x}")
        elif roll < 0.98:
            lines.append(f"memslot_delete slot={slot}")
            sizes.pop(slot)
        else:
            lines.append(rng.choice(("zap_all", f"host_invalidate base={base:#x} npages=0x200")))
    return CAPS.restrict(parse_reproducer("\n".join(lines) + "\n").program)


@needs_kvm
def test_kvm_agrees_with_the_reference_on_dirty_logging_programs():
    """Manual protect, initially-set bitmaps and KVM_CLEAR_DIRTY_LOG on the real kernel: a
    bounded count of random programs, all clean (docs/kvm.md has a larger run)."""
    rng = random.Random(28)
    target = KvmTarget()
    try:
        for _ in range(200):
            prog = dirty_log_program(rng)
            finding = run_program(prog, target)
            assert finding is None, finding.summary("kvm") + "\n" + format_program(prog)
    finally:
        target.close()


def _vm_holders(pids) -> set:
    """The pids among ``pids`` still holding a KVM VM or vCPU fd."""
    holders = set()
    for pid in pids:
        try:
            links = [os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")]
        except OSError:
            continue  # gone (or its fds with it)
        if any(link.startswith(("anon_inode:kvm-vm", "anon_inode:kvm-vcpu")) for link in links):
            holders.add(pid)
    return holders


def _descendants(root: int) -> set:
    """``root`` and every live process below it (from /proc/*/stat's ppid)."""
    parents = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            parents[int(entry)] = int(stat.rsplit(")", 1)[1].split()[1])
    tree, grew = {root}, True
    while grew:
        below = {pid for pid, ppid in parents.items() if ppid in tree} - tree
        tree |= below
        grew = bool(below)
    return tree


@needs_kvm
def test_a_killed_campaign_leaves_no_vm_behind(tmp_path):
    """SIGKILL a kvm campaign's supervisor while its worker has a VM open: the worker
    (in a session of its own) dies with it (fuzz/lifeline.py), so no process of the
    campaign survives and no VM, memslot or mapping does (the kernel frees a VM with
    its last fd, and the memslots' memory with the process's mm)."""
    proc = subprocess.Popen([sys.executable, "-m", "mmufuzz.fuzz.cli", "fuzz", "--target",
                             "kvm", "--max-execs", "100000", "--out", str(tmp_path / "out")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    tree = set()
    try:
        for _ in range(1200):  # up to about 2 minutes on a loaded machine
            tree |= _descendants(proc.pid)
            if _vm_holders(tree):
                break
            time.sleep(0.1)
        else:
            pytest.fail("the campaign never opened a VM")
    finally:
        proc.kill()
        proc.wait()
    for _ in range(300):
        if not [pid for pid in tree if _alive(pid)]:
            break
        time.sleep(0.1)
    assert not _vm_holders(tree)
    assert not [pid for pid in tree if _alive(pid)]


def _alive(pid: int) -> bool:
    """``pid`` exists and is not a zombie (a zombie holds no fd and no memory)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@needs_kvm
def test_bench_replay_loop_runs_the_programs_bent_to_the_target(tmp_path):
    """The throughput phase's plain replay runs what a kvm campaign worker runs: the
    corpus's programs without the ops this target refuses (here, `split`)."""
    prog = program("""\
memslot_add slot=0 base=0x100 npages=0x10 flags= host_offset=0
split slot=0
access vcpu=0 gpa=0x100000 word=0 kind=write value=0x1 private=0
access vcpu=1 gpa=0x100000 word=0 kind=read private=0
""")
    (tmp_path / "input").write_bytes(encode(prog))
    results = []
    throughput.replay_loop(results.append, str(tmp_path), "kvm", 1e-9)  # one pass
    assert results[0]["execs"] == 1
    assert results[0]["ops"] == len(CAPS.restrict(decode(encode(prog))).ops) == 3

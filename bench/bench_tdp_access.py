"""Per-access cost of the tdp target: mapped (TLB hit, SPTE hit) against faulting.

A mapped access is the fuzzer's hot path and must not pay for the generator
machinery; a faulting access walks the EPT, runs the fault path and installs
SPTEs.  Prints ns per access for each kind and their ratio, measured in one run.

    python bench/bench_tdp_access.py [pages]
"""

from __future__ import annotations

import sys
import time

from mmufuzz.harness.ops import Access, AccessKind, MemslotAdd, MemslotFlag, VmHeader, VmType
from mmufuzz.harness.tdp import TdpTarget

BASE = 0x1000


def _accesses(pages: int) -> list:
    return [Access(0, (BASE + i) << 12, False, i % 512, AccessKind.READ, None, False)
            for i in range(pages)]


def _per_access(target: TdpTarget, ops: list) -> float:
    """Seconds per op for executing ``ops`` once."""
    execute = target.execute
    start = time.perf_counter()
    for op in ops:
        execute(op)
    return (time.perf_counter() - start) / len(ops)


def measure(pages: int) -> dict:
    """ns per access: first touch (fault), TLB hit, and SPTE hit after a TLB flush."""
    target = TdpTarget()
    target.reset(VmHeader(VmType.DEFAULT, 1))
    target.execute(MemslotAdd(0, BASE, pages, MemslotFlag(0), 0))
    ops = _accesses(pages)
    faulting = _per_access(target, ops)
    tlb_hit = min(_per_access(target, ops) for _ in range(3))
    target.kvm.mmu.flush()
    spte_hit = _per_access(target, ops)
    return {"faulting": faulting * 1e9, "tlb_hit": tlb_hit * 1e9, "spte_hit": spte_hit * 1e9}


def main(argv: list) -> None:
    pages = int(argv[1]) if len(argv) > 1 else 20000
    ns = measure(pages)
    print(f"pages={pages}")
    for kind in ("tlb_hit", "spte_hit", "faulting"):
        print(f"  {kind:9s} {ns[kind]:9.0f} ns/access")
    print(f"ratio faulting/tlb_hit  = {ns['faulting'] / ns['tlb_hit']:.1f}")
    print(f"ratio spte_hit/tlb_hit  = {ns['spte_hit'] / ns['tlb_hit']:.1f}")


if __name__ == "__main__":
    main(sys.argv)

"""The optimized MMU under test: KVM's TDP MMU structure plus a hardware model.

``TdpTarget`` turns ops into calls on a :class:`~harness.tdp.kvm.Kvm`.  An op
runs as a generator drained to completion; ``parallel`` interleaves two.  A
data access whose translations are all cached skips the generator machinery.
"""

from __future__ import annotations

from harness.ops import Access, PairOutcome, Parallel, VmHeader
from harness.tdp.invariants import check_invariants
from harness.tdp.kvm import Kvm
from harness.tdp.sched import interleave, run


class TdpTarget:
    """The ``tdp`` target (harness.target.Target)."""

    name = "tdp"

    def __init__(self):
        self.kvm = None
        self._switches: set = set()

    def reset(self, header: VmHeader) -> None:
        self.kvm = Kvm(header)
        self._switches.clear()

    def execute(self, op):
        kvm = self.kvm
        if type(op) is Access:
            outcome = kvm.vcpus[op.vcpu].try_fast(op)
            if outcome is not None:
                return outcome
        if type(op) is Parallel:
            a, b = interleave(kvm.run(op.a), kvm.run(op.b), op.schedule, kvm.quiesce,
                              self._note_switch)
            outcome = PairOutcome(a, b)
        else:
            outcome = run(kvm.run(op))
        kvm.quiesce()
        return outcome

    def check_invariants(self) -> None:
        check_invariants(self.kvm)

    def _note_switch(self, parked: str, resumed: str) -> None:
        self._switches.add(f"{parked}>{resumed}")

    def features(self) -> list:
        """The context switches of the last op: yield point parked > yield point resumed.

        A schedule that preempts one side at a new place is new interleaving
        coverage, which line coverage cannot see (the same lines run in either
        order).  Sorted, so consumers see them in a deterministic order.
        """
        switches = sorted(self._switches)
        self._switches.clear()
        return switches


__all__ = ["TdpTarget"]

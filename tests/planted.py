"""Targets with planted bugs, for the engine's tests (never in the fault catalog).

Each wraps the reference target, so it is correct except for its one planted
mistake.  Campaign subprocesses load them as ``planted:NAME`` with ``tests/``
on ``PYTHONPATH``.
"""

from __future__ import annotations

from mmufuzz.harness.ops import (OP_NAMES, Access, AccessKind, MemslotAdd, Ok, PairOutcome,
                                  Parallel, VmType, ZapAll)
from mmufuzz.harness.target import Capabilities
from mmufuzz.fuzz.runner import ReferenceTarget


class ForgetsAfter(ReferenceTarget):
    """After a successful ``trigger`` op, accesses of ``kind`` read 0: the page was lost."""

    trigger: type = ZapAll
    kind: AccessKind = AccessKind.READ

    def reset(self, header):
        super().reset(header)
        self.triggered = False

    def execute(self, op):
        outcome = super().execute(op)
        if isinstance(op, Parallel):
            return PairOutcome(*map(self._forget, op.sides, outcome.sides))
        return self._forget(op, outcome)

    def _forget(self, op, outcome):
        self.triggered |= isinstance(op, self.trigger) and outcome == Ok()
        if self.triggered and isinstance(op, Access) and op.kind is self.kind \
                and type(outcome) is Ok:
            return Ok(0, outcome.gpa)
        return outcome


class ZapForgets(ForgetsAfter):
    """After a zap_all every read returns 0 (contents lost with the mappings)."""

    name = "zap-forgets"


class FetchForgets(ForgetsAfter):
    """Instruction fetches read 0 (the executable mapping points at a zeroed page).

    No seed fetches a word it wrote: the fuzzer has to make one.  The known
    minimal program is memslot_add, a non-zero write, a fetch of it.
    """

    name = "fetch-forgets"
    trigger, kind = MemslotAdd, AccessKind.FETCH


class DefaultOnly(ReferenceTarget):
    """The reference, declaring that it runs neither TDX VMs nor ``parallel`` nor ``zap_all``."""

    capabilities = Capabilities(vm_types={VmType.DEFAULT},
                                ops=set(OP_NAMES) - {Parallel, ZapAll})

"""The optimized MMU under test: KVM's TDP MMU structure plus a hardware model.

``TdpTarget`` turns ops into calls on a :class:`~harness.tdp.kvm.Kvm`.  An op
runs as a generator drained to completion; ``parallel`` interleaves its two to
four actors.  A
data access whose translations are all cached skips the generator machinery.
"""

from __future__ import annotations

from mmufuzz.harness.ops import (LEVEL_NAMES, OP_NAMES, PAGE_SHIFT, SIDE_NAMES, Accept, Access,
                                 PairOutcome, Parallel, VmHeader, gpa_field)
from mmufuzz.harness.tdp import checkpoint
from mmufuzz.harness.tdp.events import EVENTS
from mmufuzz.harness.tdp.invariants import check_invariants, record_tables
from mmufuzz.harness.tdp.kvm import Kvm
from mmufuzz.harness.tdp.lpage import max_mapping_level
from mmufuzz.harness.tdp.sched import interleave, run

LEVEL_NAME = {level: name for name, level in LEVEL_NAMES.items()}


class TdpTarget:
    """The ``tdp`` target (harness.target.Target)."""

    name = "tdp"
    # The names of the MMU-state events its VM counts (``kvm.events``, harness.target.StateEvents).
    events = EVENTS

    def __init__(self):
        self.kvm = None
        self._switches: set = set()
        self._last = None
        # The last parallel, for schedule exploration: the state its sides started from
        # (see :meth:`_start_state`) and the steps each side took, in side order.
        self.pair_start = ""
        self.taken = [0, 0]
        # False while a campaign runs ops whose features and pair_start it never reads
        # (harness.target.Target): they are not made then.
        self.observed = True

    def reset(self, header: VmHeader) -> None:
        self._replace(Kvm(header))
        self._switches.clear()
        self._last = None

    def _replace(self, kvm: Kvm) -> None:
        """Run ``kvm`` from now on, and take the old VM apart (kvm_destroy_vm).

        A VM's object graph is cyclic, as KVM's structs are (each part points
        back at its struct kvm): dropped whole, it would wait for the garbage
        collector, whose passes then ran for 16% of a campaign worker's time
        (a schedule variant drops one VM per run).  Emptying the Kvm breaks
        every cycle through it, so its parts are freed at once.
        """
        old, self.kvm = self.kvm, kvm
        if old is not None:
            vars(old).clear()

    def execute(self, op):
        kvm = self.kvm
        self._last = op
        if type(op) is Access:
            outcome = kvm.vcpus[op.vcpu].try_fast(op)
            if outcome is not None:
                return outcome
        if type(op) is Parallel:
            sides = op.sides
            observed = self.observed
            self.pair_start = "|".join(sorted(map(self._start_state, sides))) if observed else ""
            self.taken = [0] * len(sides)
            # kvm.quiesce, not kvm.rcu.process: each VM says what its quiescent points run
            # (the shadow MMU's is SRCU's), at the price of one call per step.
            outcome = PairOutcome(*interleave([kvm.run(side) for side in sides], op.schedule,
                                              kvm.quiesce, self._note_switch if observed else None,
                                              self.taken))
        else:
            outcome = run(kvm.run(op))
        kvm.quiesce()
        return outcome

    def check_invariants(self) -> None:
        check_invariants(self.kvm)

    def snapshot(self) -> checkpoint.Snapshot:
        """The VM between two ops (:mod:`~mmufuzz.harness.tdp.checkpoint`): between ops no
        generator is alive (every op ran to completion and its RCU callbacks are
        drained), so the Kvm object graph is plain data, and restoring it is several
        times cheaper than rerunning the ops that built it.  The invariant checks'
        records of its tables are taken first: every copy restored from it shares them."""
        self._record_tables()
        return checkpoint.dumps(self.kvm)

    def _record_tables(self) -> None:
        record_tables(self.kvm)

    def restore(self, snapshot: checkpoint.Snapshot) -> None:
        self._replace(checkpoint.loads(snapshot))
        self._switches.clear()
        self._last = None

    def _note_switch(self, parked: str, resumed: str) -> None:
        self._switches.add(f"{parked}>{resumed}")

    def features(self) -> list:
        """Coverage of the last op that neither line coverage nor its outcome shows.

        - The context switches of a ``parallel``: yield point parked > yield
          point resumed.  A schedule that preempts one side at a new place is
          new interleaving coverage (the same lines run in either order).
        - The mapping an access or accept left behind for its gpa: the level of
          the leaf in the root it used and, for a private gpa of a TD, the
          secure-EPT leaf's level and accept state.  The same outcome over a
          4K, a 2M or no mapping are different MMU states (op x outcome x
          mapping level); a huge private mapping with some pages accepted is
          how the merge paths are reached.
        - The MMU-state events the op raised (:mod:`mmufuzz.harness.tdp.events`):
          SPTE transitions per level and root, secure-EPT calls, why faults
          retried, what hardware walks found, TLB flushes.
        Sorted switches first, so consumers see them in a deterministic order.
        (The state a ``parallel`` started from is :attr:`pair_start`.)
        """
        features = sorted(self._switches)
        self._switches.clear()
        features += self.events.drain(self.kvm.events)
        op = self._last
        if type(op) is Parallel:
            for name, side in zip(SIDE_NAMES, op.sides):
                features += [f"{name}.{f}" for f in self._mapping(side) or ()]
        else:
            features += self._mapping(op) or ()
        return features

    def _walk(self, op):
        """``(name, gfn, private, level, leaf)`` of an op faulting on a gpa, else None.

        ``level`` and ``leaf`` are :meth:`TdpMmu.walk_depth` in the root the gpa uses.
        """
        field = gpa_field(op)
        if field is None:
            return None
        kvm = self.kvm
        gfn = getattr(op, field) >> PAGE_SHIFT
        private = kvm.tdx and (type(op) is Accept or op.private)
        root = kvm.mmu.root(private)
        level, leaf = kvm.mmu.walk_depth(root, gfn) if root is not None else (0, False)
        return OP_NAMES[type(op)], gfn, private, level, leaf

    def _mapping(self, op):
        """``op``'s mapping features (see :meth:`features`), or None for other ops."""
        walk = self._walk(op)
        if walk is None:
            return None
        name, gfn, private, level, leaf = walk
        features = [f"map:{name}:{'private' if private else 'shared'}:{level if leaf else 0}"]
        if private:
            leaf = self.kvm.sept.lookup(gfn)
            state = f"{leaf.level}:{'accepted' if leaf.accepted else 'pending'}" if leaf else "none"
            features.append(f"sept:{name}:{state}")
        return features

    def _start_state(self, op) -> str:
        """One side's part of :attr:`pair_start`.

        For a side that names a gpa: how deep its walk went and the largest
        level the fault may map (0: none, it exits).  Two faults racing into
        a 4K table under a 2M-capable range are another race than two faults
        into empty tables.  An accept also names the level it accepts at:
        a 4K accept inside a 2M-capable range races a fault there in another
        way than a 2M accept of the range, which maps it whole.
        """
        walk = self._walk(op)
        if walk is None:
            return OP_NAMES[type(op)]
        name, gfn, private, level, leaf = walk
        if type(op) is Accept:
            name += f".{LEVEL_NAME[op.level]}"
        kvm = self.kvm
        slot = kvm.memslots.lookup(gfn)
        # As kvm_mmu_faultin_pfn: a fault whose private-ness the attributes contradict
        # exits to userspace, and so does a private one outside a guest_memfd slot.
        usable = (slot is not None and kvm.attributes.is_private(gfn) == private
                  and (slot.gmem is not None or not private))
        most = max_mapping_level(slot, gfn, private) if usable else 0
        return f"{name}:{'private' if private else 'shared'}:{'leaf' if leaf else 'walk'}{level}:max{most}"


__all__ = ["TdpTarget"]

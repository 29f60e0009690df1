"""A campaign's op mix: how often an op the mutator generates is of each kind.

The byte decoder's opcode table (:mod:`mmufuzz.fuzz.encoding`) is one mix for
every target: guest accesses dominate, every kind stays reachable.  A target
that models one part of the MMU is driven by a few kinds of ops, which that
mix makes rare: the shadow MMU by the guest's own page tables (CR3 loads, PTE
writes, invlpg, TLB flushes), arm64's stage 2 by maps, unmaps, dirty logging,
splitting and coalescing; and an op kind the target does not model is a
wasted draw (the campaign drops it, ``Capabilities.restrict``).

So a target declares, in its ``Capabilities``, the op kinds it runs
(``ops``) and, where it wants, weights for the kinds it is about
(``weights``: op name -> weight on the decoder's scale, where all 256 opcodes
weigh one each; ``parallel`` weighs its arities together, split as the
decoder splits them).  :class:`OpMix` turns that data into a table of 256
kinds, the decoder's own for a target that declares nothing and runs
everything.  fuzz/ reads nothing else of a target.

The byte format is the same for every target (a campaign's inputs decode the
same under any target): the mix only picks the kind of each fresh op the
mutator generates (:func:`mmufuzz.fuzz.mutator.insert_op`), by rewriting the
opcode byte in front of the op's random bytes to one of the drawn kind.
"""

from __future__ import annotations

import collections

from mmufuzz.harness.ops import OP_NAMES, Parallel
from mmufuzz.fuzz.encoding import opcode, opcode_table

OPCODES = 256
# The decoder's weight of each kind (op class, actors), in its table's order.
DECODER_WEIGHTS: dict = dict(collections.Counter(opcode_table()))


def apportion(weights: dict, slots: int = OPCODES) -> dict:
    """``weights`` scaled to whole numbers summing to ``slots`` (largest remainder; ties to
    the earlier kind); every kind of positive weight keeps at least one slot."""
    total = sum(weights.values())
    if total <= 0:
        raise ValueError("an op mix needs a kind of positive weight")
    quotas = {kind: weight * slots / total for kind, weight in weights.items()}
    counts = {kind: max(int(quota), 1 if quota > 0 else 0) for kind, quota in quotas.items()}
    order = sorted(quotas, key=lambda kind: counts[kind] - quotas[kind])  # most owed first
    for kind in order[:max(slots - sum(counts.values()), 0)]:
        counts[kind] += 1
    while sum(counts.values()) > slots:  # the kinds kept at one slot overshot: take from
        kind = max((k for k in counts if counts[k] > 1),  # the most overpaid
                   key=lambda k: counts[k] - quotas[k])
        counts[kind] -= 1
    return counts


class OpMix:
    """256 op kinds, each the kind of one value of a fresh op's opcode byte."""

    def __init__(self, weights: dict):
        """``weights``: kind (op class, actors) -> weight; kinds missing never drawn."""
        counts = apportion(weights)
        self.table = tuple(kind for kind, n in counts.items() for _ in range(n))
        self._opcodes = tuple(opcode(kind) for kind in self.table)

    @classmethod
    def of(cls, capabilities) -> "OpMix":
        """The mix of a target with these capabilities (``ops`` and ``weights``)."""
        declared = getattr(capabilities, "weights", {})
        parallel = sum(w for (kind, _), w in DECODER_WEIGHTS.items() if kind is Parallel)
        weights = {}
        for (kind, actors), weight in DECODER_WEIGHTS.items():
            name = OP_NAMES[kind]
            if kind not in capabilities.ops:
                weight = 0
            elif name in declared:
                weight = declared[name] * weight / parallel if kind is Parallel else declared[name]
            weights[(kind, actors)] = weight
        return cls(weights)

    def recode(self, byte: int) -> int:
        """The opcode of the kind this mix draws for ``byte`` (0..255)."""
        return self._opcodes[byte]

    def counts(self) -> dict:
        """Opcodes per op name: what the mix draws, out of 256."""
        return dict(collections.Counter(OP_NAMES[kind] for kind, _ in self.table))


DEFAULT = OpMix(DECODER_WEIGHTS)

"""The measurement subprocess: ``python -m mmufuzz.bench.child KIND PARAMS_JSON``.

Every measurement runs in a fresh interpreter so that no engine inherits
another's warm caches, imports or instrumentation, and so that the parent can
run one per core and stop one at its cap by killing it.  A measurement reports
by printing JSON objects, one per line, on stdout; the parent timestamps each
line as it arrives (time-to-detect is measured by the parent, from launch,
for every engine alike).
"""

from __future__ import annotations

import importlib
import json
import sys


# KIND -> (module of mmufuzz.bench, function(emit, **params)).  Only the module of the kind
# asked for is imported: the parent never loads the engines, and the coverage loop must enter
# its instrumentation before anything imports the target (mmufuzz.bench.coverage_loop).
KINDS = {"random": ("engines", "random_engine"), "hypothesis": ("engines", "hypothesis_engine"),
         "seeds": ("engines", "seeds_engine"), "shallow": ("mutants", "shallow_check"),
         "replay": ("throughput", "replay_loop"),
         "differential": ("throughput", "differential_loop"),
         "coverage": ("coverage_loop", "coverage_loop"),
         "profile": ("throughput", "profile_loop"), "minimize": ("minimization", "minimize_one"),
         "soak": ("soak", "soak_one")}


def emit(record: dict) -> None:
    """One report line; flushed at once, because the parent's clock reads it."""
    print(json.dumps(record, sort_keys=True), flush=True)


def main(argv: list) -> int:
    kind, params = argv[0], json.loads(argv[1])
    module, function = KINDS[kind]
    getattr(importlib.import_module(f"mmufuzz.bench.{module}"), function)(emit, **params)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""``mmufuzz bench``: how fast mmufuzz finds bugs, measured honestly, side by side.

One run measures throughput (plain replay, the differential loop, the
coverage-guided campaign), time-to-detect of every injectable fault for
mmufuzz and two baselines, minimization quality and ``--jobs`` scaling, and
writes a Markdown report with plots (``docs/benchmarks.md``).  Every
measurement runs in a process of its own (:mod:`mmufuzz.bench.child`), so engines never
share an interpreter, and at most one measurement runs per core.
"""

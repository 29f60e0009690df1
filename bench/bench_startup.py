"""Worker start-up with a cold instrumentation cache against a warm one, measured in one run.

A campaign's first findings (every shallow fault's) come at start-up, and so
does every ``--jobs`` worker's first exec.  Each launch here is the campaign
worker, ``python -m mmufuzz.fuzz.fuzz_mmu -runs=1`` on an empty corpus: interpreter,
instrumented imports, libFuzzer set-up and one exec.  Cold launches get an
empty cache each; warm ones share one the first launch filled.  Prints the
median seconds of each and their ratio.

    python bench/bench_startup.py [launches]
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _launch(cache: Path, corpus: Path) -> float:
    env = dict(os.environ, XDG_CACHE_HOME=str(cache))
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "mmufuzz.fuzz.fuzz_mmu", "-runs=1", str(corpus)], env=env,
                   stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL, check=True)
    return time.perf_counter() - started


def main(launches: int) -> None:
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        corpus, warm_cache = root / "corpus", root / "warm"
        corpus.mkdir()
        _launch(warm_cache, corpus)  # fills it
        cold_times, warm_times = [], []
        for launch in range(launches):  # interleaved, so both see the same machine
            cold_times.append(_launch(root / f"cold{launch}", corpus))
            warm_times.append(_launch(warm_cache, corpus))
    cold, warm = statistics.median(cold_times), statistics.median(warm_times)
    print(f"worker start-up, median of {launches}: cold cache {cold:.3f} s, "
          f"warm cache {warm:.3f} s, {cold / warm:.1f}x faster warm")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 10)

"""A CI-sized differential soak of random decoded programs on the shadow target.

The 100,000-program soak is ``tests/test_soak.py`` (``-m slow``, parametrized over
targets); this one is bounded by a program count so that CI catches a shadow
regression on the same programs every run.
"""

from __future__ import annotations

import pytest
from test_soak import _run_chunk


@pytest.mark.parametrize("mode, count", [("any", 150), ("with-parallel", 60)])
def test_random_programs_run_clean_on_shadow(mode, count):
    runs, ops, failure = _run_chunk(0, mode, "shadow", count)
    assert failure is None, failure
    assert runs == count and ops > count

"""The shipped seeds are plain uses of the MMU, not reproducers of the faults."""

from __future__ import annotations

import pytest

from mmufuzz.harness import faults
from mmufuzz.fuzz.campaign import seed_files
from mmufuzz.fuzz.encoding import load_reproducer
from mmufuzz.fuzz.runner import make_target, run_program

# Faults that no seed shows alone: a campaign must reach them by mutation, pairing or
# schedule (docs/faults.md, "Generic detection of the issue 28 faults").  The seeds of
# manual protection (09) and ranged flushes (10) came in for the first four.
DEEP = ("clear-dirty-keeps-huge", "clear-dirty-last-word", "collapsible-flush-sp-base",
        "removed-pt-flush-wrong-start", "sept-busy-no-retry", "merge-frozen-child",
        "dirty-log-rearm-before-harvest", "free-before-flush", "huge-over-table-no-flush")


@pytest.mark.parametrize("fault", DEEP)
def test_no_seed_alone_shows_a_deep_fault(fault):
    for path in seed_files():
        with faults.injected({fault}):
            finding = run_program(load_reproducer(path).program, make_target("tdp"))
        assert finding is None, f"{path.name} shows {fault}: {finding}"


def test_the_header_options_each_have_a_seed():
    headers = [load_reproducer(path).program.header for path in seed_files()]
    assert {h.manual_protect.value for h in headers} >= {"off", "on"}
    assert {h.range_flush for h in headers} == {False, True}
    assert {h.type.value for h in headers} == {"default", "tdx"}

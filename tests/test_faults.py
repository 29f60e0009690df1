"""The fault switch: off by default, strict about names, and every catalog entry is wired up.

Each fault's behaviour (it diverges when injected, runs clean when not) is
pinned by its reproducer in ``corpus/regressions``, collected by conftest.py.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from mmufuzz.fuzz.encoding import load_reproducer
from mmufuzz.harness import faults

ROOT = Path(__file__).resolve().parent.parent
REGRESSIONS = ROOT / "corpus" / "regressions"
NAMES = sorted(faults.CATALOG)


def _harness_sources() -> str:
    return "\n".join(p.read_text() for p in sorted((ROOT / "harness").rglob("*.py")))


def test_no_fault_is_active_by_default():
    assert [name for name in NAMES if faults.active(name)] == []


@pytest.mark.parametrize("name", NAMES)
def test_injected_activates_only_the_named_fault(name):
    with faults.injected([name]):
        assert [n for n in NAMES if faults.active(n)] == [name]
    assert not faults.active(name)


def test_injected_restores_the_switch_after_an_error():
    with pytest.raises(RuntimeError), faults.injected([NAMES[0]]):
        raise RuntimeError("boom")
    assert not faults.active(NAMES[0])


def test_unknown_fault_name_is_rejected_by_injected():
    with pytest.raises(faults.UnknownFault, match=r"^unknown fault no-such-fault \(known: "), \
            faults.injected(["no-such-fault"]):
        pass  # pragma: no cover - never entered


@pytest.mark.parametrize("command", ["fuzz", "replay"])
def test_unknown_fault_name_is_a_one_line_cli_error(command, tmp_path):
    repro = tmp_path / "r.repro"
    repro.write_text("vm type=default vcpus=1\nzap_all\n")
    args = {"fuzz": ["fuzz", "--max-execs", "1", "--out", str(tmp_path / "out")],
            "replay": ["replay", str(repro)]}[command]
    done = subprocess.run([sys.executable, "-m", "mmufuzz.fuzz.cli", *args, "--inject", "no-such-fault"],
                          capture_output=True, text=True, cwd=ROOT, timeout=60, check=False)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "unknown fault no-such-fault" in lines[0]


@pytest.mark.parametrize("name", NAMES)
def test_every_fault_has_a_branch_in_the_harness(name):
    assert f'faults.active("{name}")' in _harness_sources()


def test_every_branch_names_a_catalog_fault():
    used = set(re.findall(r'faults\.active\("([^"]+)"\)', _harness_sources()))
    assert used <= set(NAMES)


def regression_path(name: str) -> Path:
    """A fault's regression file: ``NAME.repro`` where the name says its target (tdp's, and
    ``stage2-...``), ``TARGET-NAME.repro`` where it does not (the shadow faults)."""
    target = faults.CATALOG[name].target
    if target == "tdp" or name.startswith(target.partition("-")[0] + "-"):
        return REGRESSIONS / f"{name}.repro"
    return REGRESSIONS / f"{target}-{name}.repro"


@pytest.mark.parametrize("name", NAMES)
def test_every_fault_has_a_regression_that_injects_it(name):
    meta = load_reproducer(regression_path(name)).meta
    assert meta["inject"] == name
    assert meta["expect"] == "divergence"
    assert meta["target"] == faults.CATALOG[name].target
    assert re.fullmatch(r"[0-9a-f]{8}", meta["signature"])


@pytest.mark.parametrize("name", [n for n in NAMES if faults.CATALOG[n].concurrent])
def test_concurrent_faults_need_a_parallel_op(name):
    program = load_reproducer(regression_path(name)).program
    assert any(type(op).__name__ == "Parallel" for op in program.ops)

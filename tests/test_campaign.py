"""Campaigns: findings kept once per signature, resume, Ctrl-C, and one real exec-bounded campaign."""

from __future__ import annotations

import json
import re
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from mmufuzz.harness.ops import (Access, AccessKind, FlushTlb, MemslotAdd, MemslotFlag, Parallel, Program,
                         Split, VmHeader, VmType)
from mmufuzz.harness.target import InvariantViolation
from mmufuzz.fuzz import campaign
from mmufuzz.fuzz.campaign import (CampaignConfig, CampaignError, FindingStore, Layout, Options,
                           libfuzzer_command, resolve_config, seed_files, write_seeds)
from mmufuzz.fuzz.cli import main
from mmufuzz.fuzz.encoding import decode, encode, load_reproducer
from mmufuzz.fuzz.runner import ReferenceTarget, run_program
from mmufuzz.fuzz.worker import CampaignTarget, CounterSink, FindingError, Worker
from planted import FetchForgets

REPO = Path(__file__).resolve().parent.parent
TESTS = Path(__file__).resolve().parent


PLANTED = "planted:FetchForgets"
MINIMAL_OPS = 3


def fetch(gpa):
    return Access(0, gpa, False, 0, AccessKind.FETCH, None, False)


def write(gpa, value):
    return Access(0, gpa, False, 0, AccessKind.WRITE, value, False)


SLOT = MemslotAdd(0, 0x100, 0x10, MemslotFlag(0), 0)
FAILING = Program(VmHeader(VmType.DEFAULT, 1), (SLOT, write(0x100000, 5), Split(0),
                                                 fetch(0x100000)))
CLEAN = Program(VmHeader(VmType.DEFAULT, 1), (SLOT, write(0x100000, 5), fetch(0x101000)))


def test_planted_target_diverges_on_fetching_written_data_and_no_seed_does_that():
    assert run_program(CLEAN, FetchForgets()) is None
    assert run_program(FAILING, FetchForgets()).op_index == 3
    assert all(run_program(load_reproducer(p).program, FetchForgets()) is None
               for p in (REPO / "corpus" / "seeds").glob("*.repro"))


# --- the finding store -------------------------------------------------------------

def test_two_signatures_are_both_kept_and_duplicates_are_not(tmp_path):
    store, other_worker = FindingStore(tmp_path), FindingStore(tmp_path)
    assert store.record(b"a", "report a\n", "11111111")
    assert not store.record(b"b", "report b\n", "11111111")
    assert not other_worker.record(b"c", "report c\n", "11111111")
    assert other_worker.record(b"d", "report d\n", "22222222")
    assert [f.signature for f in store.entries()] == ["11111111", "22222222"]
    assert (tmp_path / "11111111" / "input.bin").read_bytes() == b"a"
    assert (tmp_path / "22222222" / "finding.repro").read_text() == "report d\n"
    assert not list(tmp_path.glob(".*"))


# The same bug seen from a parallel pair: signed by the side that diverged, one signature.
FAILING_IN_PAIR = Program(VmHeader(VmType.DEFAULT, 2), (
    SLOT, write(0x100000, 5), Parallel(fetch(0x100000), FlushTlb(1), 0)))


def test_worker_keeps_one_finding_per_signature_and_keeps_going(tmp_path):
    layout = Layout(tmp_path)
    layout.prepare()
    worker = Worker(CampaignConfig(PLANTED), layout)
    inputs = [FAILING, CLEAN, FAILING_IN_PAIR, FAILING, FAILING_IN_PAIR, CLEAN]
    for program in inputs:
        worker.test_one_input(encode(program))
    assert worker.execs == len(inputs)
    (first,) = FindingStore(layout.findings).entries()
    assert (first.path / "input.bin").read_bytes() == encode(FAILING)
    repro = load_reproducer(first.raw)
    assert repro.program == FAILING and repro.marker == 3 and repro.meta["target"] == PLANTED
    assert repro.meta["signature"] == first.signature
    assert worker.run(encode(FAILING_IN_PAIR))[1].signature == first.signature
    heartbeat = json.loads(next(layout.workers.glob("*.json")).read_text())
    assert heartbeat["execs"] >= 1


def test_standalone_worker_reports_a_finding_as_a_crash(monkeypatch):
    monkeypatch.delenv(campaign.CAMPAIGN_ENV, raising=False)
    worker = Worker.from_environment()
    assert worker.config.target == "tdp" and worker.store is None
    worker = Worker(CampaignConfig(PLANTED))
    worker.test_one_input(encode(CLEAN))
    with pytest.raises(FindingError, match=">>> access vcpu=0 gpa=0x100000 word=0 kind=fetch"):
        worker.test_one_input(encode(FAILING))


def test_sampled_invariants_still_report_what_replay_sees():
    class BreaksAtSplit(ReferenceTarget):
        def reset(self, header):
            super().reset(header)
            self.broken = False

        def execute(self, op):
            self.broken |= isinstance(op, Split)
            return super().execute(op)

        def check_invariants(self):
            if self.broken:
                raise InvariantViolation("planted", "gfn=0x100")

    worker = Worker(CampaignConfig("reference", invariant_rate=0.0))
    worker.target = CampaignTarget(BreaksAtSplit())
    _, finding = worker.run(encode(FAILING))
    assert (finding.kind, finding.op_index) == ("invariant", 2)


def test_outcome_features_get_one_counter_each():
    reserved, traced = [], []
    sink = CounterSink(lambda: reserved.append(len(reserved)) or reserved[-1], traced.append)
    target = CampaignTarget(ReferenceTarget(), sink)
    run_program(CLEAN, target)
    run_program(CLEAN, target)
    assert len(traced) == 2 * 2 * len(CLEAN.ops)
    assert len(reserved) == len(set(traced)) == 2 * len(CLEAN.ops)
    assert "access.write.gpa->ok" in sink.counters
    assert "memslot_add->ok|access.write.gpa->ok" in sink.counters


# --- configuration, seeds, command line ------------------------------------------------

def test_seeds_ship_with_the_package_and_encode_to_bytes(tmp_path):
    names = [p.name for p in seed_files()]
    assert names == sorted(p.name for p in (REPO / "corpus" / "seeds").glob("*.repro"))
    assert write_seeds(tmp_path) == len(names)
    for path in seed_files():
        data = (tmp_path / path.name.replace(".repro", ".bin")).read_bytes()
        assert decode(data) == load_reproducer(path).program


def test_a_directory_keeps_its_target_and_fault(tmp_path):
    layout = Layout(tmp_path)
    assert resolve_config(layout, Options(out=tmp_path)) == CampaignConfig("tdp", "none")
    CampaignConfig(PLANTED).save(layout.config)
    assert resolve_config(layout, Options(out=tmp_path)).target == PLANTED
    with pytest.raises(CampaignError, match="holds a campaign with target"):
        resolve_config(layout, Options(out=tmp_path, target="reference"))


def test_bad_fuzz_options_are_one_line_errors(tmp_path, capsys):
    assert main(["fuzz", "--target", "nosuch", "--out", str(tmp_path / "a")]) == 2
    assert main(["fuzz", "--inject", "no-such-fault", "--out", str(tmp_path / "b")]) == 2
    assert main(["fuzz", "--jobs", "0", "--out", str(tmp_path / "c")]) == 2
    assert len(capsys.readouterr().err.splitlines()) == 3
    assert not (tmp_path / "a").exists()


def test_libfuzzer_command_carries_limits_jobs_and_both_corpora(tmp_path):
    layout = Layout(tmp_path)
    command = libfuzzer_command(layout, Options(out=tmp_path, max_time=2.5, max_execs=100,
                                                jobs=4, rss_limit_mb=512, seed=7))
    assert command[:3] == [sys.executable, "-m", "mmufuzz.fuzz.fuzz_mmu"]
    for flag in ("-max_total_time=3", "-runs=25", "-rss_limit_mb=512", "-seed=7", "-jobs=4",
                 "-workers=4"):
        assert flag in command
    assert command[-2:] == [str(layout.corpus), str(layout.seeds)]


# --- one real campaign, then a resumed one stopped with Ctrl-C ---------------------------

def fuzz_command(out: Path, *extra: str) -> list:
    return [sys.executable, "-m", "mmufuzz.fuzz.cli", "fuzz", "--target", PLANTED, "--out", str(out),
            *extra]


ENV = dict(os.environ, PYTHONPATH=os.pathsep.join([str(TESTS), str(REPO)]))


CAMPAIGN_EXECS = 2000


@pytest.fixture(scope="module")
def campaign_dir(tmp_path_factory):
    """A campaign of 2000 inputs on the planted target.

    Bounded by inputs with a fixed seed, it runs the same inputs under any
    load (its schedule explorer budgets by ops then): seed 2 finds the bug
    within its first 300 inputs.
    """
    out = tmp_path_factory.mktemp("campaign")
    done = subprocess.run(fuzz_command(out, "--max-execs", str(CAMPAIGN_EXECS), "--seed", "2"),
                          env=ENV, capture_output=True, text=True, timeout=600)
    return out, done


def test_campaign_finds_the_planted_bug_and_minimizes_it_to_the_known_minimum(campaign_dir,
                                                                              capsys):
    """The bug shows on a plain fetch and on a fetch inside a parallel: two signatures,
    each minimal at three ops (slot, write, the fetch or the pair holding it)."""
    out, done = campaign_dir
    assert done.returncode == 1, done.stderr
    findings = FindingStore(out / "findings").entries()
    op_kinds = {re.match(r"divergence at op \d+ \((\w+)\)", f.summary()).group(1)
                for f in findings}
    assert "access" in op_kinds and op_kinds <= {"access", "parallel"}
    for finding in findings:
        text = finding.minimized.read_text()
        minimized = load_reproducer(finding.minimized)
        assert len(minimized.program.ops) <= 1.2 * MINIMAL_OPS, text
        assert minimized.meta["signature"] == finding.signature
        assert minimized.meta["target"] == PLANTED and minimized.meta["inject"] == "none"
        assert minimized.meta["finding"].startswith("divergence at op 2 (")
        assert "# expected: " in text and ">>> " in text
        assert main(["replay", str(finding.minimized)]) == 1
        assert f"divergence {finding.signature}" in capsys.readouterr().out
        assert f"{finding.signature}  divergence at op" in done.stderr
    assert "stopped: limit reached" in done.stderr


def test_campaign_writes_stats_lines(campaign_dir):
    out, _ = campaign_dir
    lines = [json.loads(line) for line in (out / "stats.jsonl").read_text().splitlines()]
    assert len(lines) >= 2 and lines[-1]["final"]  # the first second's, the final one
    assert lines[-1]["execs"] == CAMPAIGN_EXECS and lines[-1]["ops"] > lines[-1]["execs"]
    assert lines[-1]["findings"] >= 1 and lines[-1]["corpus"] > 0 and lines[-1]["rss_mb"] > 0
    assert [line["execs"] for line in lines] == sorted(line["execs"] for line in lines)


def test_rerun_resumes_and_ctrl_c_stops_cleanly(campaign_dir):
    out, _ = campaign_dir
    corpus = {p.name for p in (out / "corpus").iterdir()}
    findings = {p.name for p in (out / "findings").iterdir()}
    before = json.loads((out / "stats.jsonl").read_text().splitlines()[-1])
    started = time.time()
    rerun = subprocess.Popen(fuzz_command(out), env=ENV, stderr=subprocess.PIPE, text=True)
    _wait_for(lambda: _has_executed_since(out, started))
    rerun.send_signal(signal.SIGINT)
    _, stderr = rerun.communicate(timeout=60)
    assert rerun.returncode == 1, stderr
    assert "stopped: interrupted" in stderr and "over 2 run(s)" in stderr
    assert corpus <= {p.name for p in (out / "corpus").iterdir()}
    assert {p.name for p in (out / "findings").iterdir()} == findings
    after = json.loads((out / "stats.jsonl").read_text().splitlines()[-1])
    assert after["run"] == 2 and after["execs"] > before["execs"]
    assert not campaign_processes(out)


def _wait_for(condition, limit: float = 600) -> None:
    """Poll until ``condition()``; the limit only turns a hang into a failure."""
    deadline = time.monotonic() + limit
    while not condition():
        assert time.monotonic() < deadline, "gave up waiting"
        time.sleep(0.2)


def _has_executed_since(out: Path, started: float) -> bool:
    """A worker started after ``started`` has published executions (however loaded the machine)."""
    for beat in (out / "workers").glob("*.json"):
        try:
            status = json.loads(beat.read_text())
            if status["started"] >= started and status["execs"] > 0:
                return True
        except (OSError, ValueError):
            pass  # replaced while we read it
    return False


def campaign_processes(out: Path) -> list:
    """Live processes started for the campaign in ``out`` (they carry its directory)."""
    found = []
    for process in psutil.process_iter():
        try:
            if process.environ().get(campaign.CAMPAIGN_ENV) == str(out.resolve()):
                found.append(process)
        except psutil.Error:
            continue
    return found


def test_entry_script_runs_standalone_as_oss_fuzz_does(tmp_path):
    """No campaign directory: the default target, libFuzzer flags, a corpus folder."""
    write_seeds(tmp_path)
    # The script run by path, as OSS-Fuzz's wrapper does, with this interpreter: its
    # "#!/usr/bin/env python3" would pick whatever python3 PATH has (not this venv's).
    env = {k: v for k, v in ENV.items() if k != campaign.CAMPAIGN_ENV}
    env["PATH"] = os.defpath
    done = subprocess.run([sys.executable, str(REPO / "fuzz" / "fuzz_mmu.py"), "-runs=1",
                           str(tmp_path)],
                          env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "INFO: Instrumenting mmufuzz.harness.tdp" in done.stderr
    assert re.search(r"Done \d+ runs", done.stderr)


def test_max_execs_stops_the_campaign_and_every_input_is_counted(tmp_path):
    done = subprocess.run([sys.executable, "-m", "mmufuzz.fuzz.cli", "fuzz", "--target", "reference",
                           "--max-execs", "200", "--out", str(tmp_path)], env=ENV,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    final = json.loads((tmp_path / "stats.jsonl").read_text().splitlines()[-1])
    assert final["final"] and final["execs"] == 200 and final["findings"] == 0
    assert "200 execs" in done.stderr and "findings: 0 (clean)" in done.stderr


def test_a_targets_own_features_reach_libfuzzer():
    class Switching(ReferenceTarget):
        def features(self):
            return ["fault:12>zap:40"]

    keys = []
    run_program(CLEAN, CampaignTarget(Switching(), lambda key: keys.append(key) or 1))
    assert keys.count("target:fault:12>zap:40") == len(CLEAN.ops)


def test_prepare_drops_the_previous_runs_seeds_and_logs(tmp_path):
    layout = Layout(tmp_path)
    layout.prepare()
    (layout.seeds / "removed_seed.bin").write_bytes(b"\x00")
    (layout.logs / "fuzz-7.log").write_text("cov: 99999 ft: 99999\n")
    (layout.corpus / "kept").write_bytes(b"\x01")
    layout.prepare()
    assert not list(layout.seeds.iterdir()) and not list(layout.logs.iterdir())
    assert (layout.corpus / "kept").read_bytes() == b"\x01"


# --- one campaign per directory ------------------------------------------------------

def test_a_second_campaign_on_a_locked_directory_is_refused(tmp_path):
    with campaign.hold_lock(Layout(tmp_path)):
        done = subprocess.run(fuzz_command(tmp_path, "--max-execs", "1"), env=ENV,
                              capture_output=True, text=True, timeout=600)
    assert done.returncode == 2
    (line,) = done.stderr.splitlines()
    assert line == (f"mmufuzz: error: {tmp_path.resolve()} is in use by another campaign: "
                    "wait for it to stop, or use another --out")
    assert not (tmp_path / "workers").exists()


HOLD_LOCK = """import sys, time
from mmufuzz.fuzz.campaign import Layout, hold_lock
lock = hold_lock(Layout(sys.argv[1]))
print("locked", flush=True)
time.sleep(600)
"""


def test_a_killed_holder_leaves_the_directory_unlocked(tmp_path):
    """As a killed campaign does: the kernel releases the lock of a process that dies."""
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(tmp_path)], env=ENV,
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline() == "locked\n"
    with pytest.raises(CampaignError, match="in use by another campaign"):
        campaign.hold_lock(Layout(tmp_path))
    holder.kill()
    holder.wait()
    holder.stdout.close()
    campaign.hold_lock(Layout(tmp_path)).close()

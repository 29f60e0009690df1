"""The benchmark: its arithmetic, its engines, and one quick smoke run end to end.

Nothing here asserts a speed: the smoke run checks that every phase reports
and that the report has its sections, not what the numbers are.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from mmufuzz.harness import faults
from mmufuzz.harness.ops import Recover
from mmufuzz.fuzz.corpus import replay
from mmufuzz.fuzz import fuzz_mmu
from mmufuzz.fuzz.campaign import CampaignConfig, seed_files, write_seeds
from mmufuzz.fuzz.encoding import encode, load_reproducer, parse_reproducer
from mmufuzz.fuzz.worker import CounterSink, Worker
from mmufuzz.fuzz.runner import ReferenceTarget, make_target
from mmufuzz.bench import (analysis, cli, coverage_loop, detect, engines, mutants, procs, report,
                           soak, suite, throughput)
from mmufuzz.bench.detect import ENGINES
from mmufuzz.bench.minimization import MINIMAL_DIR, check_minimal, known_minimal

TESTS = Path(__file__).resolve().parent


class RecoverCrashes(ReferenceTarget):
    """A planted bug every engine meets within a few programs: ``recover`` raises."""

    name = "recover-crashes"

    def execute(self, op):
        if isinstance(op, Recover):
            raise RuntimeError("planted")
        return super().execute(op)


PLANTED = "test_bench:RecoverCrashes"


def detection(fault, engine, seconds, found=True):
    return {"fault": fault, "engine": engine, "seed": 1, "found": found, "seconds": seconds}


# --- arithmetic ------------------------------------------------------------------

def test_capped_runs_count_at_the_cap_in_the_median():
    runs = [detection("f", "mmufuzz", 2.0), detection("f", "mmufuzz", 60.0, found=False),
            detection("f", "mmufuzz", 60.0, found=False)]
    (summary,) = analysis.summarize_detection(runs, cap=60.0)["f"].values()
    assert summary.median == 60.0 and summary.capped_median and summary.found == 1


def test_speedup_is_the_ratio_of_medians_and_the_geomean_combines_faults():
    runs = [detection("a", "mmufuzz", 1.0), detection("a", "random", 40.0),
            detection("b", "mmufuzz", 2.0), detection("b", "random", 5.0)]
    summary = analysis.summarize_detection(runs, cap=60.0)
    ratios = analysis.speedups(summary, "random")
    assert ratios == {"a": 40.0, "b": 2.5}
    assert analysis.geomean(ratios.values()) == pytest.approx(10.0)


def test_the_speedup_bound_finds_every_fault_at_the_engines_fastest_median():
    runs = [detection("easy", "mmufuzz", 0.5), detection("easy", "random", 0.25),
            detection("hard", "mmufuzz", 30.0), detection("hard", "random", 60.0, found=False)]
    summary = analysis.summarize_detection(runs, cap=60.0)
    best, start_up = analysis.speedup_bound(summary, "random")
    assert start_up == 0.5
    assert best == pytest.approx((0.25 / 0.5 * 60.0 / 0.5) ** 0.5)


def test_a_missed_target_says_by_how_much():
    results = {"config": {"cap": 60.0},
               "detection": [detection("a", "mmufuzz", 1.0), detection("a", "random", 4.0)],
               "throughput": {"campaign": {"execs": 10, "ops": 15000, "seconds": 1.0,
                                           "workers": 1},
                              "campaign_jobs2": {"execs": 19, "ops": 28000, "seconds": 1.0,
                                                 "workers": 2},
                              "replay": {"execs": 50, "ops": 20000, "seconds": 1.0}},
               "minimization": [{"ratio": 1.5}]}
    checks = {c.name: c for c in analysis.check_targets(results)}
    assert checks["time-to-detect"].met
    assert not checks["speed-up over random"].met
    assert checks["speed-up over random"].shortfall == (
        "missed by 2.5x; at most 4.0x had every fault been found at start-up (1.00 s, the "
        "fastest median)")
    assert checks["differential loop under coverage"].shortfall == (
        "missed by 2.0x; the target alone replays 20,000 ops/s")
    assert checks["scaling"].met
    assert checks["minimization"].shortfall == "missed by 1.25x"


def test_missed_scaling_names_the_machines_own_ceiling():
    loop = {"execs": 100, "ops": 1000, "seconds": 1.0}
    results = {"config": {"cap": 60.0},
               "throughput": {"campaign": {"execs": 10, "ops": 15000, "seconds": 1.0},
                              "campaign_jobs2": {"execs": 17, "ops": 26000, "seconds": 1.0},
                              "replay": loop,
                              "replay_pair": [{**loop, "execs": 85}, {**loop, "execs": 90}]}}
    assert analysis.machine_scaling(results["throughput"]) == pytest.approx(1.75)
    (check,) = [c for c in analysis.check_targets(results) if c.name == "scaling"]
    assert not check.met
    assert check.shortfall == ("missed by 1.06x; two independent replay processes get 1.75x "
                               "on this machine")


def test_campaign_rate_leaves_start_up_out(tmp_path):
    lines = [{"workers": 0, "execs": 0, "ops": 0, "run_seconds": 1.0},
             {"workers": 1, "execs": 100, "ops": 1000, "run_seconds": 2.0},
             {"workers": 1, "execs": 1100, "ops": 21000, "run_seconds": 12.0}]
    for line in lines[1:]:
        line.update(cov=1, ft=2, features=3, corpus=4)
    stats = tmp_path / "stats.jsonl"
    stats.write_text("".join(json.dumps(line) + "\n" for line in lines))
    measured = throughput.campaign_rate(stats)
    assert analysis.rate(measured) == (100.0, 2000.0)


def test_cli_rejects_an_unknown_fault(capsys):
    assert cli.main(["--faults", "no-such-fault"]) == cli.EXIT_BAD_OPTIONS
    assert "no-such-fault" in capsys.readouterr().err


def _render_error(capsys, path: Path) -> str:
    """The one stderr line of ``bench --render path``, which must exit 2."""
    assert cli.main(["--render", str(path), "--report", str(path.parent / "r.md")]) == \
        cli.EXIT_BAD_OPTIONS
    (line,) = capsys.readouterr().err.splitlines()
    return line


def test_render_names_a_missing_results_file(tmp_path, capsys):
    line = _render_error(capsys, tmp_path / "results.json")
    assert str(tmp_path / "results.json") in line and "cannot read" in line


def test_render_names_a_file_that_is_not_json(tmp_path, capsys):
    path = tmp_path / "results.json"
    path.write_text('{"config": ')
    line = _render_error(capsys, path)
    assert str(path) in line and "not JSON" in line


@pytest.mark.parametrize("breakage, field", [
    (lambda r: r.pop("machine"), "'machine'"),
    (lambda r: r["config"].pop("cap"), "'config.cap'"),
    (lambda r: r["detection"][2].pop("seconds"), "'detection[2].seconds'"),
    (lambda r: r.update(load=[]), "'load'"),
    (lambda r: r.update(soak={"programs": 1}), "'soak.parallel_ops'"),
])
def test_render_names_the_malformed_field(tmp_path, capsys, breakage, field):
    results = json.loads((TESTS.parent / "docs" / "bench" / "results.json").read_text())
    breakage(results)
    path = tmp_path / "results.json"
    path.write_text(json.dumps(results))
    line = _render_error(capsys, path)
    assert str(path) in line and field in line
    assert not (tmp_path / "r.md").exists()


# --- engines and known minima ---------------------------------------------------------

@pytest.mark.parametrize("engine", [engines.random_engine, engines.hypothesis_engine,
                                    engines.seeds_engine])
def test_each_baseline_reports_the_planted_bug_with_its_cpu_counts_and_program(engine):
    reports = []
    engine(reports.append, PLANTED, "none", 1)
    started, *progress, found = reports
    assert started["event"] == "started" and found["event"] == "finding"
    assert "crash" in found["summary"] and found["cpu"] >= started["cpu"] > 0
    program = parse_reproducer(found["repro"]).program
    assert any(isinstance(op, Recover) for op in program.ops)
    # Programs run and their ops, the failing one included, as a campaign counts them.
    assert found["execs"] >= 1 and found["ops"] >= len(program.ops)
    counts = [(r["execs"], r["ops"]) for r in progress] + [(found["execs"], found["ops"])]
    assert all(r["event"] == "progress" for r in progress) and counts == sorted(counts)


def test_a_baseline_stopped_at_its_cap_has_said_how_far_it_got(monkeypatch):
    """Progress records, at most one a CPU second: the last one before the cap is the
    budget's count of programs (the parent reads it for a trial that found nothing)."""
    monkeypatch.setattr(engines, "PROGRESS_CPU_SECONDS", 0.0)
    reports = []
    engines.hypothesis_engine(reports.append, PLANTED, "none", 1)
    progress = [r for r in reports if r["event"] == "progress"]
    assert [r["execs"] for r in progress] == list(range(1, len(progress) + 1))
    assert progress[-1]["execs"] == reports[-1]["execs"] and progress[-1]["ops"] > 0


def test_a_finding_counts_for_a_fault_only_if_the_fault_shows_it_and_nothing_else_does():
    """Clean without the fault, and a finding with it on replay: a crash a campaign met
    that no replay shows (a harness bug) is no detection of any fault."""
    regression = load_reproducer(Path(__file__).resolve().parents[1] / "corpus" / "regressions"
                                 / "merge-by-zap.repro").program
    assert engines.fault_needed(regression, "tdp", "merge-by-zap")
    assert not engines.fault_needed(regression, "tdp", "convert-no-zap")  # clean both ways
    clean = load_reproducer(seed_files()[0]).program
    assert not engines.fault_needed(clean, "tdp", "merge-by-zap")
    assert engines.fault_needed(clean, "tdp")  # no fault named: clean is all it asks


def test_the_seeds_engine_runs_each_seed_once_and_stops():
    reports = []
    engines.seeds_engine(reports.append, "tdp", "none", 1)
    assert [r["event"] for r in reports] == ["started", "exhausted"]
    assert reports[-1]["execs"] == len(seed_files())


@pytest.mark.parametrize("path", sorted(MINIMAL_DIR.glob("*.repro")), ids=lambda p: p.stem)
def test_hand_minimal_reproducer_fails_only_with_its_fault(path):
    known = check_minimal(path, "tdp")
    assert path.name.split(".")[0] in faults.CATALOG  # FAULT.repro or FAULT.SYMPTOM.repro
    assert known.verified, known.problem


def test_a_minimized_finding_is_compared_with_the_hand_minimum_of_its_signature():
    fault = "huge-over-table-no-flush"
    main, other = (check_minimal(MINIMAL_DIR / name, "tdp")
                   for name in (f"{fault}.repro", f"{fault}.td-walk-cache.repro"))
    assert main.signature != other.signature and other.ops == main.ops + 2
    assert known_minimal(fault, "tdp", other.signature)["hand_ops"] == other.ops
    for signature in (main.signature, None):
        assert known_minimal(fault, "tdp", signature)["hand_ops"] == main.ops


# --- the clean soak ---------------------------------------------------------------------

def test_soak_on_clean_code_counts_programs_with_pairs_and_finds_nothing():
    records = []
    soak.soak_one(records.append, "tdp", seed=7, programs=20)
    (result,) = records
    assert result == {**result, "event": "result", "programs": 20, "findings": 0}
    assert result["parallel_ops"] >= 20 and result["ops"] >= result["parallel_ops"]


def test_soak_keeps_the_reproducers_of_what_it_finds(tmp_path, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(TESTS),
                                                                   os.environ.get("PYTHONPATH")])))
    totals = soak.soak(PLANTED, programs=30, jobs=2, out=tmp_path)
    assert totals["programs"] == 30 and totals["findings"] > 0
    assert 0 < len(totals["reproducers"]) <= 2 * soak.KEPT_FINDINGS
    for kept in totals["reproducers"]:
        finding = replay(load_reproducer(kept["path"]), PLANTED, "none").finding
        assert finding is not None and finding.signature == kept["signature"]


# --- budgets -----------------------------------------------------------------------------------

def test_a_search_is_stopped_when_its_cpu_budget_after_start_up_is_spent(tmp_path):
    """The random engine on the clean target never finds anything: the budget stops it."""
    run = procs.run_child("random", {"target": "tdp", "inject": "none", "seed": 1},
                          tmp_path / "random.log", until="finding",
                          budget=procs.Budget(cpu=1.0, startup_limit=60.0))
    assert run.stopped_at_cap and run.first("started") is not None
    assert run.startup == run.first("started")[1]["cpu"] > 0
    assert 1.0 <= run.cpu - run.startup < 3.0


# --- the unguided ablation and the mutants ---------------------------------------------------

def _libfuzzer_log(tmp_path, guidance: str) -> str:
    """The output of 30 execs of the campaign worker from the seeds, guided or not."""
    seeds = tmp_path / f"seeds-{guidance}"
    seeds.mkdir()
    count = write_seeds(seeds)
    env = dict(os.environ, **{fuzz_mmu.GUIDANCE_ENV: guidance})
    done = subprocess.run([sys.executable, "-m", "mmufuzz.fuzz.fuzz_mmu", "-runs=30", "-seed=1",
                           str(seeds)], env=env, cwd=tmp_path, capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"corp: {count}/" in done.stderr  # every seed in the corpus
    return done.stderr


def test_the_unguided_worker_gives_libfuzzer_no_coverage_but_keeps_the_seeds(tmp_path):
    guided = _libfuzzer_log(tmp_path, "on")
    assert "cov: " in guided
    # The throughput phase's coverage loop instruments what a campaign worker does, no less
    # (it once imported the reference before entering the instrumentation).
    hits, misses = map(int, re.search(r"instrumented modules: (\d+) from .*?, (\d+) anew",
                                      guided).groups())
    corpus = tmp_path / "seeds-on"
    run = procs.run_child("coverage", {"corpus": str(corpus), "target": "tdp", "seconds": 0},
                          tmp_path / "coverage.log")
    assert run.returncode == 0, (tmp_path / "coverage.log").read_text()[-2000:]
    assert run.first("result")[1]["instrumented_modules"] == hits + misses
    unguided = _libfuzzer_log(tmp_path, "off")
    assert "cov: " not in unguided and "guidance off" in unguided
    assert "Done 30 runs" in unguided


def test_a_failed_campaign_trial_says_what_libfuzzer_and_python_reported(tmp_path):
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "fuzz-0.log").write_text(
        "Traceback (most recent call last):\n  File \"x.py\", line 1\n"
        "TypeError: unsupported operand\n==1== ERROR: libFuzzer: fuzz target exited\n"
        "SUMMARY: libFuzzer: fuzz target exited\n")
    assert detect._libfuzzer_summary(tmp_path) == \
        "; libFuzzer: fuzz target exited (TypeError: unsupported operand)"
    assert detect._libfuzzer_summary(tmp_path / "nothing") == ""


def test_the_unguided_sink_counts_features_and_traces_nothing():
    sink = fuzz_mmu.unguided_sink(CounterSink)
    worker = Worker(CampaignConfig("tdp", "none"), sink=sink)
    worker.run(encode(load_reproducer(seed_files()[0]).program))
    assert len(sink.counters) > 0 and worker.explorer is not None
    assert sorted(sink.counters.values()) == list(range(len(sink.counters)))


def test_mutants_are_sampled_deterministically_and_applied_outside_the_repository(tmp_path):
    drawn = mutants.sample(3, seed=5)
    assert drawn == mutants.sample(3, seed=5) and drawn != mutants.sample(3, seed=6)
    original = {p: p.read_bytes() for p in (mutants.PACKAGE / "harness").rglob("*.py")}
    folder = mutants.package_with(drawn[0], tmp_path / "pkg")
    mutated = folder / "mmufuzz" / drawn[0].file
    assert mutated.read_text() != (mutants.PACKAGE / drawn[0].file).read_text()
    assert {p: p.read_bytes() for p in (mutants.PACKAGE / "harness").rglob("*.py")} == original
    assert all(not m.file.endswith("invariants.py") for m in mutants.all_mutants())


def test_the_mutant_sample_leaves_out_the_code_only_an_injected_fault_runs():
    source = """def f(x):
    if faults.active("a"):
        x += 1
        x *= 2
    elif not faults.active("b"):
        x -= 1
    if not faults.active("c"):
        x = 3
    else:
        x = 4
    return x + 5
"""
    assert mutants.fault_only_lines(source) == {3, 4, 10}
    huge = [m for m in mutants.all_mutants() if m.file.endswith("/huge.py")]
    text = (mutants.PACKAGE / "harness/tdp/huge.py").read_text().splitlines()
    flush = next(i for i, line in enumerate(text, 1)
                 if 'faults.active("removed-pt-flush-wrong-start")' in line)
    assert huge and not [m for m in huge if m.line in (flush + 2, flush + 3)]
    assert [m for m in huge if m.line == flush]  # the test itself stays


def test_a_mutant_the_seeds_kill_is_shallow_and_checked_on_the_original(tmp_path):
    """``x is None`` -> ``x is not None`` on the fault path crashes on the first access."""
    mutant = next(m for m in mutants.all_mutants() if m.file.endswith("/fault.py")
                  and m.operator == "core/ReplaceComparisonOperator_Is_IsNot")
    row = mutants.classify(mutant, "tdp", programs=5, seed=1, work=tmp_path)
    assert row["kind"] == mutants.SHALLOW and row["by"].startswith("seed "), row
    assert " is not " in row["change"]


# --- stopping and resuming ------------------------------------------------------------

@pytest.fixture
def ctrl_c_raises():
    """SIGINT raises KeyboardInterrupt, as in a terminal, even where the test runner ignores it."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def _stopped_by_ctrl_c_in_third_trial(monkeypatch) -> list:
    """Trials that cost nothing; the trials started, in order.

    The third is stopped as a Ctrl-C stops a real one: SIGINT to the process
    (which the kernel gives its main thread), and the trial's own process ends
    early but normally, so the trial returns a result (here once the bench is
    stopping) that is no result.
    """
    started = []

    def run_trial(trial, bug, target, budget, work):
        started.append(trial)
        if len(started) == 3:
            os.kill(os.getpid(), signal.SIGINT)
            assert procs.stopping.wait(10)
        return detect.Detection(trial.fault, trial.engine, trial.seed, True, float(len(started)))

    monkeypatch.setattr(detect, "run_trial", run_trial)
    phases = [("throughput", lambda config: {"trials_started": len(started)}),
              ("detection", suite.measure_detection)]
    monkeypatch.setattr(suite, "PHASES", phases)
    return started


def _config(tmp_path):
    args = ["--faults", "mmio-stale-generation,pending-access-maps", "--seeds", "2",
            "--jobs", "1", "--out", str(tmp_path / "out")]
    return cli.config_from(cli.build_parser().parse_args(args), args)


def test_a_stopped_bench_resumes_with_what_it_had_measured(tmp_path, monkeypatch, ctrl_c_raises):
    started = _stopped_by_ctrl_c_in_third_trial(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        suite.run(_config(tmp_path))
    before_stop = len(started)  # 3, or 4 if the next trial began before the stop cancelled it
    results = suite.run(_config(tmp_path), resume=True)
    planned = detect.trials(_config(tmp_path).faults, _config(tmp_path).seeds)
    # A trial's seconds are its start's number: the two finished before the stop are kept,
    # every other one (the stopped one included) is measured after the resume.
    seconds = [d["seconds"] for d in results["detection"]]
    assert seconds[:2] == [1.0, 2.0] and all(s > before_stop for s in seconds[2:])
    assert len(started) == before_stop + len(planned) - 2
    assert results["throughput"] == {"trials_started": 0} and len(results["resumed"]) == 1
    assert results["complete"]
    fresh = suite.run(_config(tmp_path))
    assert len(started) == before_stop + 2 * len(planned) - 2 and "resumed" not in fresh


def test_resume_measures_a_phase_added_since_the_run(tmp_path, monkeypatch):
    monkeypatch.setattr(suite, "PHASES", [("throughput", lambda config: {"old": True})])
    suite.run(_config(tmp_path))
    path = tmp_path / "out" / "results.json"
    older = json.loads(path.read_text())
    del older["config"]["soak_programs"]  # the option came with the phase
    path.write_text(json.dumps(older))
    monkeypatch.setattr(suite, "PHASES", [("throughput", lambda config: {"old": False}),
                                          ("newer", lambda config: {"measured": True})])
    results = suite.run(_config(tmp_path), resume=True)
    assert results["throughput"] == {"old": True} and results["newer"] == {"measured": True}
    assert results["config"]["soak_programs"] == _config(tmp_path).soak_programs
    assert len(results["resumed"]) == 1 and results["complete"]
    # A complete run has nothing to resume: no new entry.
    assert suite.run(_config(tmp_path), resume=True)["resumed"] == results["resumed"]


def test_a_run_whose_middle_phase_is_measured_again_ends_complete(tmp_path, monkeypatch):
    """A phase taken out of a finished run (a fix to what it measures) is redone alone."""
    phases = [(name, lambda config, name=name: {"measured": name}) for name in "abc"]
    monkeypatch.setattr(suite, "PHASES", phases)
    suite.run(_config(tmp_path))
    path = tmp_path / "out" / "results.json"
    stored = json.loads(path.read_text())
    del stored["b"]
    path.write_text(json.dumps(stored))
    results = suite.run(_config(tmp_path), resume=True)
    assert [results[name] for name in "abc"] == [{"measured": name} for name in "abc"]
    assert results["complete"] and json.loads(path.read_text())["complete"]
    assert results["resumed"][-1]["phases"] == ["b"]
    assert "measured the b phase(s)" in report.render(results, plots=[])


def test_only_the_phases_asked_for_are_measured_and_such_a_run_is_complete(tmp_path,
                                                                           monkeypatch):
    monkeypatch.setattr(suite, "PHASES", [(name, lambda config, name=name: {"measured": name})
                                          for name in ("throughput", "mutants", "soak")])
    args = ["--phases", "mutants", "--engines", "unguided,mmufuzz", "--out",
            str(tmp_path / "out")]
    config = cli.config_from(cli.build_parser().parse_args(args), args)
    assert config.phases == ("mutants",) and config.engines == ("mmufuzz", "unguided")
    results = suite.run(config)
    assert "throughput" not in results and "soak" not in results
    assert results["mutants"] == {"measured": "mutants"} and results["complete"]
    text = report.render(results, plots=[])
    assert "Phases asked for: mutants" in text and "Partial run" not in text


def test_resume_refuses_another_configuration(tmp_path, monkeypatch, capsys, ctrl_c_raises):
    _stopped_by_ctrl_c_in_third_trial(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        suite.run(_config(tmp_path))
    capsys.readouterr()
    args = ["--resume", "--faults", "mmio-stale-generation,pending-access-maps", "--seeds", "3",
            "--jobs", "1", "--out", str(tmp_path / "out")]
    assert cli.main(args) == cli.EXIT_BAD_OPTIONS
    (line,) = capsys.readouterr().err.splitlines()
    assert str(tmp_path / "out" / "results.json") in line and "'config.seeds'" in line


def test_a_campaign_that_ran_no_op_in_its_time_is_reported_not_divided_by():
    """A loaded machine can give a seconds-long campaign no op at all: the report says n/a."""
    idle = {"execs": 0, "ops": 0, "seconds": 2.0, "workers": 1}
    text = report._throughput({"throughput": {
        "replay": {"execs": 10, "ops": 100, "seconds": 1.0},
        "differential": {"execs": 5, "ops": 50, "seconds": 1.0},
        "campaign": idle, "campaign_jobs2": dict(idle, workers=2)}})
    assert "| n/a |" in text and "cost a further n/a" in text
    scaling = report._scaling({"throughput": {"campaign": idle,
                                              "campaign_jobs2": dict(idle, workers=2)}})
    assert scaling.count("n/a") == 2


# --- the quick smoke run ----------------------------------------------------------------

def test_quick_smoke_run_reports_every_phase(tmp_path, monkeypatch):
    # Campaign subprocesses run in their own folders: they find the planted target by path.
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(TESTS),
                                                                   os.environ.get("PYTHONPATH")])))
    report = tmp_path / "docs" / "benchmarks.md"
    code = cli.main(["--quick", "--target", PLANTED, "--faults", "none", "--seeds", "1",
                     "--cap", "8", "--campaign-time", "2", "--loop-time", "0.5",
                     "--minimize-time", "5", "--soak-programs", "20", "--jobs", "2",
                     "--mutants", "2", "--mutant-programs", "20", "--mutant-budget", "2",
                     "--out", str(tmp_path / "out"),
                     "--report", str(report)])
    assert code == cli.EXIT_OK
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert {"replay", "differential", "campaign", "campaign_jobs2", "profile", "replay_pair"} \
        <= results["throughput"].keys()
    assert [loop["execs"] > 0 for loop in results["throughput"]["replay_pair"]] == [True, True]
    assert all(results["throughput"][k]["ops"] > 0 for k in ("replay", "differential"))
    assert sorted(d["engine"] for d in results["detection"]) == sorted(ENGINES)
    assert results["over_time"]["records"]
    measured = results["mutants"]
    assert len(measured["mutants"]) == 2 and measured["total"] > 1000
    deep = [m["name"] for m in measured["mutants"] if m["kind"] == mutants.DEEP]
    assert sorted((d["fault"], d["engine"]) for d in measured["detection"]) == \
        sorted((name, engine) for name in deep for engine in suite.MUTANT_ENGINES)
    assert results["soak"]["programs"] == 20 and results["soak"]["findings"] > 0  # planted
    text = report.read_text()
    for heading in ("## The issue's targets", "## Throughput", "## Scaling", "## Time to detect",
                    "## Mutant benchmark",
                    "## A campaign over time", "## Minimization", "## Clean soak", "## Method",
                    "## Machine"):
        assert heading in text
    assert "Command: `mmufuzz bench --quick" in text
    assert "The machine's own ceiling: two plain replay loops" in text
    assert {p.name for p in (report.parent / "bench").glob("*.png")} == \
        {"time_to_detect.png", "detected_over_time.png", "campaign_over_time.png"}
    assert not psutil.Process().children(recursive=True), "a measurement process outlived the run"


def test_the_coverage_loop_counts_the_explorers_ops_apart_from_the_inputs(tmp_path):
    """One pass over the seeds (one has a ``parallel``): the inputs' ops are theirs alone,
    the explorer's variants are counted and timed apart."""
    make_target("tdp")  # imported already: this process's tdp is not instrumented here
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    programs = [load_reproducer(path).program for path in seed_files()]
    for i, program in enumerate(programs):
        (corpus / f"{i:02d}").write_bytes(encode(program))
    records = []
    coverage_loop.coverage_loop(records.append, str(corpus), "tdp", 1e-9)
    (result,) = records
    assert result["execs"] == len(programs)
    assert result["ops"] == sum(len(p.ops) for p in programs)
    assert result["explorer_runs"] > 0 and result["explorer_ops"] > 0
    assert result["seconds"] + result["explorer_seconds"] == pytest.approx(result["cpu_seconds"])


def test_the_hit_record_loop_is_checked_against_the_goal_with_the_explorer_beside_it():
    results = {"config": {"cap": 60.0},
               "throughput": {"coverage": {"execs": 10, "ops": 6000, "seconds": 1.0,
                                           "explorer_ops": 3000, "explorer_seconds": 1.5,
                                           "explorer_runs": 40}}}
    check = {c.name: c for c in analysis.check_targets(results)}[
        "differential loop under the hit record (CPU time)"]
    assert not check.met and check.shortfall == "missed by 5.0x"
    assert check.measured == "6,000 ops/CPU-s (explorer: 2,000)"

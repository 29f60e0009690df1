"""The command line: exit codes, reports, and one-line errors for bad input."""

from __future__ import annotations

import os
import re
import stat
import subprocess
from pathlib import Path
import sys

import pytest

from mmufuzz.harness import target as harness_target
from mmufuzz.harness.ops import Access, AccessKind, Ok
from mmufuzz.fuzz.cli import main
from mmufuzz.fuzz.runner import ReferenceTarget

GOOD = """\
# mmufuzz reproducer v1
vm type=default vcpus=2
memslot_add slot=0 base=0x100 npages=0x10 flags= host_offset=0
access vcpu=0 gpa=0x100000 word=3 kind=write value=0x2a private=0
access vcpu=1 gpa=0x100000 word=3 kind=read private=0
"""


class StaleRead(ReferenceTarget):
    """Planted divergence for these tests: every read returns 0."""

    name = "stale-read"

    def execute(self, op):
        outcome = super().execute(op)
        if isinstance(op, Access) and op.kind is AccessKind.READ:
            return Ok(0)
        return outcome


@pytest.fixture
def planted(monkeypatch):
    monkeypatch.setitem(harness_target.TARGETS, "stale-read", f"{__name__}:StaleRead")


def write(tmp_path, text, name="case.repro"):
    path = tmp_path / name
    path.write_text(text) if isinstance(text, str) else path.write_bytes(text)
    return path


def test_show_prints_canonical_lines_with_numbers(tmp_path, capsys):
    path = write(tmp_path, GOOD.replace("word=3 kind=read", "kind=read  word=0x3"))
    assert main(["show", str(path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["1", "#", "mmufuzz", "reproducer", "v1"]
    assert lines[-1].split(maxsplit=1) == ["5", "access vcpu=1 gpa=0x100000 word=3 kind=read "
                                           "private=0"]


def test_replay_clean_exits_0(tmp_path, capsys):
    assert main(["replay", "--target", "reference", str(write(tmp_path, GOOD))]) == 0
    assert "clean" in capsys.readouterr().out


def test_replay_finding_exits_1_with_marker_and_expected_vs_actual(tmp_path, capsys, planted):
    assert main(["replay", "--target", "stale-read", str(write(tmp_path, GOOD))]) == 1
    out = capsys.readouterr().out
    assert ">>> access vcpu=1 gpa=0x100000 word=3 kind=read private=0" in out
    assert "# expected: ok(0x2a)" in out and "# actual:   ok(0x0)" in out
    assert "divergence at op 2 (access)" in out


def test_replay_report_is_itself_a_reproducer_that_replays(tmp_path, capsys, planted):
    main(["replay", "--target", "stale-read", str(write(tmp_path, GOOD))])
    report = capsys.readouterr().out.split("\n", 1)[1]
    assert main(["replay", str(write(tmp_path, report, "report.repro"))]) == 1


MALFORMED = [
    # (name, text, line, field)
    ("unknown_op", "vm type=default vcpus=1\nfrobnicate slot=0\n", 2, None),
    ("missing_field", "vm type=default vcpus=1\nmemslot_delete\n", 2, "slot"),
    ("bad_hex", "vm type=default vcpus=1\nmemslot_delete slot=0xZZ\n", 2, "slot"),
    ("bad_decimal", "vm type=default vcpus=1\nmemslot_move slot=1 base=12a\n", 2, "base"),
    ("negative", "vm type=default vcpus=1\nmemslot_move slot=1 base=-1\n", 2, "base"),
    ("out_of_range", "vm type=default vcpus=1\nmemslot_delete slot=16\n", 2, "slot"),
    ("misaligned", "vm type=default vcpus=1\naccess vcpu=0 gpa=0x1001 word=0 kind=read "
                   "private=0\n", 2, "gpa"),
    ("value_on_read", "vm type=default vcpus=1\naccess vcpu=0 gpa=0x1000 word=0 kind=read "
                      "value=0x1 private=0\n", 2, "value"),
    ("write_without_value", "vm type=default vcpus=1\naccess vcpu=0 gpa=0x1000 word=0 "
                            "kind=write private=0\n", 2, "value"),
    ("vcpu_not_in_vm", "vm type=default vcpus=2\nflush_tlb vcpu=2\n", 2, "vcpu"),
    ("duplicate_field", "vm type=default vcpus=1\nmemslot_delete slot=1 slot=2\n", 2, "slot"),
    ("unknown_field", "vm type=default vcpus=1\nmemslot_delete slot=1 color=3\n", 2, "color"),
    ("bad_enum", "vm type=default vcpus=1\naccess vcpu=0 gpa=0x0 word=0 kind=jump "
                 "private=0\n", 2, "kind"),
    ("bad_flag", "vm type=default vcpus=1\nmemslot_set_flags slot=0 flags=readonly,bogus\n",
     2, "flags"),
    ("accept_2m_misaligned", "vm type=tdx vcpus=1\naccept vcpu=0 gpa=0x1000 level=2m\n", 2,
     "gpa"),
    ("nested_parallel", "vm type=default vcpus=2\nparallel a=(parallel a=(zap_all) "
                        "b=(recover) schedule=0x0) b=(zap_all) schedule=0x1\n", 2, "a"),
    ("unbalanced_parens", "vm type=default vcpus=2\nparallel a=(zap_all b=(recover) "
                          "schedule=0x1\n", 2, None),
    ("header_missing", "memslot_delete slot=0\n", 1, None),
    ("header_twice", "vm type=default vcpus=1\nvm type=tdx vcpus=1\n", 2, None),
    ("bad_vm_type", "vm type=sev vcpus=1\n", 1, "type"),
    ("truncated", "vm type=default vcpus=1\nmemslot_add slot=0 base=0x1", 2, "npages"),
    ("empty", "", None, None),
    ("binary_garbage", b"\x00\xff\xfe\x80garbage\x00\x01", None, None),
]


@pytest.mark.parametrize("name,text,line,field", MALFORMED, ids=[m[0] for m in MALFORMED])
@pytest.mark.parametrize("command", ["show", "replay"])
def test_malformed_input_is_one_line_naming_file_line_field_and_exits_2(
        tmp_path, capsys, command, name, text, line, field):
    path = write(tmp_path, text, f"{name}.repro")
    assert main([command, str(path)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    (message,) = captured.err.splitlines()
    assert str(path) in message and "Traceback" not in message
    if line is not None:
        assert f"{path}:{line}:" in message
    if field is not None:
        assert f"'{field}'" in message


def test_directory_with_one_bad_file_names_it(tmp_path, capsys):
    write(tmp_path, GOOD, "a_good.repro")
    bad = write(tmp_path, GOOD + "memslot_delete slot=99\n", "b_bad.repro")
    assert main(["replay", "--target", "reference", str(tmp_path)]) == 2
    (message,) = capsys.readouterr().err.splitlines()
    assert f"{bad}:6:" in message and "'slot'" in message


def test_missing_file_and_directory_as_file_are_one_line_errors(tmp_path, capsys):
    assert main(["show", str(tmp_path / "nope.repro")]) == 2
    assert len(capsys.readouterr().err.splitlines()) == 1


def test_unknown_target_and_fault_are_one_line_errors(tmp_path, capsys):
    path = str(write(tmp_path, GOOD))
    assert main(["replay", "--target", "nosuch", path]) == 2
    assert "unknown target 'nosuch'" in capsys.readouterr().err
    assert main(["replay", "--inject", "no-such-fault", path]) == 2
    assert "unknown fault no-such-fault" in capsys.readouterr().err


def test_console_script_reports_bad_input_without_traceback(tmp_path):
    path = write(tmp_path, "vm type=default vcpus=1\nmemslot_delete slot=0xZZ\n")
    done = subprocess.run([sys.executable, "-m", "mmufuzz.fuzz.cli", "replay", str(path)],
                          capture_output=True, text=True)
    assert done.returncode == 2
    assert done.stdout == "" and len(done.stderr.splitlines()) == 1
    assert f"{path}:2:" in done.stderr and "Traceback" not in done.stderr


def test_a_reader_that_leaves_early_stops_quietly(tmp_path):
    """``mmufuzz show BIG | head -1``: exit as SIGPIPE would, no traceback."""
    many_ops = GOOD + GOOD.splitlines(keepends=True)[-1] * 20_000  # far more than a pipe holds
    show = subprocess.Popen([sys.executable, "-m", "mmufuzz.fuzz.cli", "show",
                             str(write(tmp_path, many_ops))],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    show.stdout.readline()
    show.stdout.close()  # the reader leaves while most of it is still to be written
    assert show.wait(timeout=60) == 141
    assert "Traceback" not in show.stderr.read()


# --- untrusted files: a reproducer names data, never code --------------------------

@pytest.mark.parametrize("target", ["sys:exit", "os:abort", "builtins:input", "os.path",
                                    "tests.planted:ZapForgets", "nosuch"])
@pytest.mark.parametrize("command", ["replay", "minimize"])
def test_a_file_naming_code_as_its_target_is_refused_and_nothing_is_imported(
        tmp_path, capsys, monkeypatch, command, target):
    imported = []
    monkeypatch.setattr("importlib.import_module", lambda name, *a: imported.append(name))
    path = write(tmp_path, f"# mmufuzz reproducer v1\n# target: {target}\n" + GOOD)
    assert main([command, str(path)]) == 2
    (message,) = capsys.readouterr().err.splitlines()
    assert f"{path}:2: field 'target': unknown target {target!r}" in message
    assert "tdp, reference" in message
    assert imported == []


def test_hostile_target_cannot_end_a_directory_replay_early(tmp_path):
    """``# target: sys:exit`` once made ``replay DIR`` exit 0 with no output."""
    write(tmp_path, GOOD.replace("vm type", "# target: reference\nvm type"), "a.repro")
    write(tmp_path, "# target: sys:exit\n" + GOOD, "b.repro")
    done = subprocess.run([sys.executable, "-m", "mmufuzz.fuzz.cli", "replay", str(tmp_path)],
                          capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert done.returncode == 2 and done.stdout == ""
    assert "b.repro:1: field 'target': unknown target 'sys:exit'" in done.stderr


def test_the_command_line_may_still_plant_a_target(tmp_path, capsys):
    path = write(tmp_path, GOOD)
    assert main(["replay", "--target", f"{__name__}:StaleRead", str(path)]) == 1


def test_unknown_fault_in_a_file_names_file_line_and_field(tmp_path, capsys):
    path = write(tmp_path, "# inject: no-such-fault\n" + GOOD)
    assert main(["replay", str(path)]) == 2
    (message,) = capsys.readouterr().err.splitlines()
    assert f"{path}:1: field 'inject': unknown fault no-such-fault" in message


# --- the newcomer's path -------------------------------------------------------------

def test_version(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.startswith("mmufuzz ")


@pytest.mark.parametrize("command", [[], ["fuzz"], ["replay"], ["minimize"], ["show"],
                                     ["faults"]])
def test_help_reads_as_help(capsys, command):
    assert main(command + ["--help"]) == 0
    text = capsys.readouterr().out
    for markup in ("``", ":func:", ":class:", ":data:"):
        assert markup not in text, markup
    if command in (["fuzz"], ["replay"]):
        assert "exit codes:" in text
        assert all(f"  {code}  " in text for code in "012")


def test_replay_of_a_directory_ends_with_a_summary(tmp_path, capsys, planted):
    write(tmp_path, GOOD, "a.repro")
    write(tmp_path, GOOD, "b.repro")
    assert main(["replay", "--target", "reference", str(tmp_path)]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == "2 files: 2 clean, 0 findings"
    assert main(["replay", "--target", "stale-read", str(tmp_path)]) == 1
    assert capsys.readouterr().out.splitlines()[-1] == "2 files: 0 clean, 2 findings"


def test_replay_of_a_directory_without_reproducers_says_so(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("no reproducers here\n")
    assert main(["replay", str(tmp_path)]) == 2
    assert f"{tmp_path}: no reproducer (*.repro) in this directory" in capsys.readouterr().err


def test_minimize_of_a_campaign_input_takes_target_and_fault_from_campaign_json(
        tmp_path, capsys, planted):
    from mmufuzz.fuzz.encoding import encode, parse_reproducer
    folder = tmp_path / "findings" / "0badc0de"
    folder.mkdir(parents=True)
    (tmp_path / "campaign.json").write_text('{"target": "stale-read", "inject": "none"}\n')
    (folder / "input.bin").write_bytes(encode(parse_reproducer(GOOD).program))
    assert main(["minimize", str(folder / "input.bin")]) == 0
    captured = capsys.readouterr()
    assert "# target: stale-read" in captured.out and "None" not in captured.out + captured.err
    # A campaign.json is data too: it may not name code to load.
    (tmp_path / "campaign.json").write_text('{"target": "os:abort"}')
    assert main(["minimize", str(folder / "input.bin")]) == 2
    assert "campaign.json: field 'target': unknown target 'os:abort'" in capsys.readouterr().err


def test_minimize_of_a_clean_input_never_prints_none(tmp_path, capsys):
    from mmufuzz.fuzz.encoding import encode, parse_reproducer
    raw = tmp_path / "input.bin"
    raw.write_bytes(encode(parse_reproducer(GOOD).program))
    assert main(["minimize", str(raw), "--target", "reference"]) == 1
    captured = capsys.readouterr()
    assert "None" not in captured.out + captured.err
    assert "# not-reproduced: no finding in 3 replays" in captured.out


def test_output_files_honour_the_umask(tmp_path, capsys, planted):
    out = tmp_path / "min.repro"
    old = os.umask(0o022)
    try:
        assert main(["minimize", "--target", "stale-read", "-o", str(out),
                     str(write(tmp_path, GOOD))]) == 0
    finally:
        os.umask(old)
    assert stat.S_IMODE(out.stat().st_mode) == 0o644


# --- bad options -----------------------------------------------------------------------

@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "1e400", "-1", "soon"])
@pytest.mark.parametrize("command", ["fuzz", "minimize"])
def test_max_time_must_be_a_finite_number_of_seconds(tmp_path, capsys, command, value):
    argv = [command, f"--max-time={value}"] + ([] if command == "fuzz" else ["x.repro"])
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "argument --max-time:" in err and "seconds" in err and "Traceback" not in err


def test_fuzz_out_must_be_a_directory_it_can_create(tmp_path, capsys):
    a_file = write(tmp_path, "x", "a_file")
    assert main(["fuzz", "--out", str(a_file), "--max-time", "1"]) == 2
    assert f"{a_file}: --out must name a directory" in capsys.readouterr().err
    assert main(["fuzz", "--out", str(a_file / "below"), "--max-time", "1"]) == 2
    (message,) = capsys.readouterr().err.splitlines()
    assert f"--out: {a_file} is not a directory" in message
    assert not (tmp_path / "below").exists()


def test_minimize_output_must_be_a_writable_file(tmp_path, capsys):
    path = str(write(tmp_path, GOOD))
    assert main(["minimize", path, "-o", str(tmp_path)]) == 2
    assert "-o must name a file, this is not one" in capsys.readouterr().err
    a_file = write(tmp_path, "x", "a_file")
    assert main(["minimize", path, "-o", str(a_file / "out.repro")]) == 2
    assert "is not a directory" in capsys.readouterr().err


def test_every_fault_cites_a_commit_or_a_link(capsys):
    """A reader can follow every source: a 12-digit commit id or a lore link, never a
    thread number of files a clone does not have."""
    from mmufuzz.harness import faults
    assert main(["faults"]) == 0
    out = capsys.readouterr().out
    for fault in faults.CATALOG.values():
        assert re.search(r"\b[0-9a-f]{12}\b|https://(lore|git)\.kernel\.org/", fault.source), \
            fault.name
        assert "thread [" not in fault.source and fault.source in out


def test_docs_point_only_inside_the_repository():
    root = Path(__file__).resolve().parent.parent
    for doc in [root / "README.md", *sorted((root / "docs").glob("*.md"))]:
        text = doc.read_text()
        assert "../shared" not in text and "SEMANTICS.md" not in text, doc
        assert "thread [" not in text, doc


@pytest.mark.parametrize("content", ["", "[]", "{", "[" * 50_000, '{"target": 7}',
                                     "\xff\xfe", "x" * (1 << 17)])
def test_a_damaged_campaign_json_is_a_one_line_error(tmp_path, capsys, content):
    from mmufuzz.fuzz.encoding import encode, parse_reproducer
    (tmp_path / "campaign.json").write_bytes(content.encode("utf-8", "surrogateescape")
                                             if isinstance(content, str) else content)
    raw = tmp_path / "input.bin"
    raw.write_bytes(encode(parse_reproducer(GOOD).program))
    assert main(["minimize", str(raw)]) == 2
    (message,) = capsys.readouterr().err.splitlines()
    assert f"{tmp_path / 'campaign.json'}" in message


@pytest.mark.parametrize("argv", [[], ["frobnicate"], ["fuzz", "--jobs", "0"],
                                  ["replay"], ["fuzz", "--max-execs", "many"]])
def test_usage_errors_are_one_line(capsys, argv):
    assert main(argv) == 2
    (message,) = capsys.readouterr().err.splitlines()
    assert "error:" in message and "--help" in message

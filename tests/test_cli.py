"""The command line: exit codes, reports, and one-line errors for bad input."""

from __future__ import annotations

import subprocess
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

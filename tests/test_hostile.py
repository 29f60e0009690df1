"""Hostile and malformed reproducers: every one is exit 2 with one line, fast, small, no traceback.

The corpus is ``tests/hostile/`` (written by ``tests/hostile/generate.py``);
the cases that cannot be committed — lines of a megabyte, a FIFO, a symlink to
``/dev/zero``, a directory or a file over the size cap named ``*.repro`` —
are made here in a temporary folder.
"""

from __future__ import annotations

import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mmufuzz.fuzz.cli import main
from mmufuzz.fuzz.encoding import MAX_FILE_BYTES

sys.path.insert(0, str(Path(__file__).parent / "hostile"))
import generate  # noqa: E402  (tests/hostile/generate.py)

HOSTILE = Path(__file__).parent / "hostile"
# Far above what any case takes (a few hundred ms for a megabyte line on an idle machine):
# a case that gets near it hangs or loops, it is not slow.
SECONDS_PER_RUN = 30
MEMORY_LIMIT = 2 << 30  # address space of a subprocess: /dev/zero must not be read whole


def _run_in_process(capsys, command, path):
    started = time.monotonic()
    status = main([command, str(path)])
    seconds = time.monotonic() - started
    captured = capsys.readouterr()
    return status, captured.out, captured.err, seconds


def _check_refused(status, out, err, seconds, path):
    assert status == 2, (path, out, err)
    assert out == ""
    (message,) = err.splitlines()
    assert message.startswith(f"mmufuzz: error: {path}") and "Traceback" not in message
    assert len(message) < 1000, f"quotes too much: {len(message)} characters"
    assert seconds < SECONDS_PER_RUN


def test_the_committed_corpus_is_what_the_generator_writes():
    committed = {path.stem: path.read_bytes() for path in HOSTILE.glob("*.repro")}
    assert committed == generate.COMMITTED
    assert len(generate.CASES) >= 100


@pytest.mark.parametrize("command", ["replay", "show"])
def test_every_committed_hostile_file_is_refused(capsys, command):
    paths = sorted(HOSTILE.glob("*.repro"))
    assert len(paths) >= 100
    for path in paths:
        _check_refused(*_run_in_process(capsys, command, path), path)


@pytest.mark.parametrize("command", ["replay", "show"])
def test_every_big_hostile_file_is_refused(tmp_path, capsys, command):
    for path in generate.write_all(tmp_path, generate.BIG):
        _check_refused(*_run_in_process(capsys, command, path), path)


def test_errors_name_the_line_and_field_they_are_about(capsys):
    expected = {
        "target-00": (2, "field 'target': unknown target 'sys:exit'"),
        "target-after-program": (5, "field 'target'"),
        "inject-00": (2, "field 'inject': unknown fault no-such-fault"),
        "nested-parallel-90": (3, "a parallel cannot contain a parallel"),
        "bom-then-bad-op": (3, "unknown op 'frobnicate'"),
        "c1-control": (2, "character U+0085"),
        "field-parallel-side-bad-field": (4, "field 'slot'"),
        "field-gpa-misaligned": (4, "field 'gpa'"),
    }
    for name, (line, text) in expected.items():
        status, out, err, _ = _run_in_process(capsys, "replay", HOSTILE / f"{name}.repro")
        assert status == 2 and out == ""
        assert f"{name}.repro:{line}: {text}" in err, err


def _special_files(folder: Path) -> list[Path]:
    """Files that are not regular files, or too big, each named like a reproducer."""
    fifo = folder / "fifo.repro"
    os.mkfifo(fifo)
    zero = folder / "zero.repro"
    zero.symlink_to("/dev/zero")
    (folder / "directory.repro").mkdir()
    (folder / "directory.repro" / "inside.repro").write_text("vm type=sev vcpus=1\n")
    big = folder / "big.repro"
    with open(big, "wb") as out:
        out.truncate(MAX_FILE_BYTES + 1)  # sparse: costs no disk
    dangling = folder / "dangling.repro"
    dangling.symlink_to(folder / "nowhere")
    return [fifo, zero, folder / "directory.repro", big, dangling]


def _limit_memory():
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))


@pytest.mark.parametrize("command", ["replay", "show"])
def test_fifos_devices_directories_and_huge_files_are_refused_fast(tmp_path, command):
    """A FIFO once hung ``replay``; a symlink to /dev/zero ran it out of memory."""
    for path in _special_files(tmp_path):
        done = subprocess.run([sys.executable, "-m", "mmufuzz.fuzz.cli", command, str(path)],
                              capture_output=True, text=True, timeout=120,
                              stdin=subprocess.DEVNULL, preexec_fn=_limit_memory)
        assert done.returncode == 2, (path, done.stderr)
        (message,) = done.stderr.splitlines()
        assert str(path) in message and "Traceback" not in message


def test_a_directory_holding_a_fifo_is_refused_not_hung(tmp_path):
    (tmp_path / "good.repro").write_text("vm type=default vcpus=1\nzap_all\n")
    os.mkfifo(tmp_path / "fifo.repro")
    done = subprocess.run([sys.executable, "-m", "mmufuzz.fuzz.cli", "replay", str(tmp_path)],
                          capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL,
                          preexec_fn=_limit_memory)
    assert done.returncode == 2 and done.stdout == ""
    assert f"{tmp_path / 'fifo.repro'}: cannot read: a FIFO, not a regular file" in done.stderr


def test_the_console_script_refuses_deep_nesting_without_a_traceback(tmp_path):
    """``parallel`` nested 330 deep was a RecursionError (and aborted pytest's collection)."""
    for path in generate.write_all(tmp_path, {k: v for k, v in generate.CASES.items()
                                              if k.startswith("nested-")}):
        done = subprocess.run([sys.executable, "-m", "mmufuzz.fuzz.cli", "replay", str(path)],
                              capture_output=True, text=True, timeout=120,
                              stdin=subprocess.DEVNULL)
        assert done.returncode == 2 and len(done.stderr.splitlines()) == 1, done.stderr
        assert "Traceback" not in done.stderr and "Recursion" not in done.stderr

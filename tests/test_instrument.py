"""The instrumentation cache (a later process takes the stored code and the same counters)
and the hit record (blocks counted inline, handed to libFuzzer once per exec)."""

import collections
import ctypes
import dis
import json
import os
import py_compile
import re
import subprocess
import sys
import textwrap

import atheris
import pytest
from atheris.instrument_bytecode import patch_code

from mmufuzz.fuzz.instrument import HitRecord, _blocks_in_order, freeze, patch_code_for_record, thaw

SIGN = textwrap.dedent("""\
    def sign(x):
        if x < 0:
            return -1
        return 1 if x else 0
""")

# Imports the probe package under the cached hook in a process of its own, as a worker does.
IMPORT = textwrap.dedent("""\
    import hashlib, json, sys
    from pathlib import Path
    import atheris
    from mmufuzz.fuzz.instrument import freeze, instrument_branches
    for _ in range(int(sys.argv[2])):  # counters taken before, as by an earlier import
        atheris._reserve_counter()
    with instrument_branches({"mmufuzz_probe"}, set(), Path(sys.argv[1])) as cache:
        import mmufuzz_probe
    print(json.dumps({
        "hits": cache.hits, "misses": cache.misses,
        "next_counter": atheris._reserve_counter(),
        "code": hashlib.sha256(freeze(mmufuzz_probe.sign.__code__)).hexdigest(),
        "signs": [mmufuzz_probe.sign(x) for x in (-3, 0, 3)],
    }))
""")


def _import_probe(tmp_path, source: str, counters_before: int = 0,
                  keep_mtime: bool = False) -> dict:
    """Write the probe package (``keep_mtime``: over one it keeps the times of), import it
    under the cached hook in a process of its own; what the import saw."""
    package = tmp_path / "src" / "mmufuzz_probe"
    package.mkdir(parents=True, exist_ok=True)
    init = package / "__init__.py"
    before = init.stat() if keep_mtime else None
    init.write_text(source)
    if before is not None:
        os.utime(init, ns=(before.st_atime_ns, before.st_mtime_ns))
    done = subprocess.run([sys.executable, "-c", IMPORT, str(tmp_path / "cache"),
                           str(counters_before)],
                          cwd=package.parent, capture_output=True, text=True, check=True)
    return json.loads(done.stdout)


# Three hundred blocks and no integer constant of its own: every int it loads is a counter.
MANY_BLOCKS = "def many(x):\n" + "".join(f"    if x == 'v{i}':\n        x = 'w{i}'\n"
                                           for i in range(300)) + "    return x\n"


@pytest.mark.parametrize("scheme", ["calls", "record"])
def test_blocks_are_numbered_in_bytecode_order_whatever_their_addresses(scheme):
    """atheris orders blocks by a set of instructions hashed by address: another
    allocation history (a checkout at another path) gave another numbering."""
    source = compile(MANY_BLOCKS, "<probe>", "exec")
    with _blocks_in_order():
        if scheme == "calls":
            code = patch_code(source, trace_dataflow=False)
        else:
            code = patch_code_for_record(source, HitRecord(reserve=None, trace=None).hits)
    many = next(c for c in code.co_consts if getattr(c, "co_name", "") == "many")
    counters = [i.argval for i in dis.get_instructions(many)
                if i.opname == "LOAD_CONST" and type(i.argval) is int and i.argval != 1]
    assert len(counters) > 300
    assert counters == list(range(counters[0], counters[0] + len(counters)))


def test_instrumented_code_survives_freeze_and_thaw():
    code = patch_code(compile(SIGN, "<probe>", "exec"), trace_dataflow=False)
    sign = next(c for c in code.co_consts if getattr(c, "co_name", "") == "sign")
    assert atheris in sign.co_consts  # the constant marshal cannot store
    assert thaw(freeze(code)) == code


def test_a_second_process_takes_the_cached_code_and_the_same_counters(tmp_path):
    first = _import_probe(tmp_path, SIGN)
    second = _import_probe(tmp_path, SIGN)
    assert (first["hits"], first["misses"]) == (0, 1)
    assert (second["hits"], second["misses"]) == (1, 0)
    assert second["code"] == first["code"]
    assert second["next_counter"] == first["next_counter"]
    assert second["signs"] == first["signs"] == [-1, 0, 1]


def test_an_edited_module_is_instrumented_again(tmp_path):
    _import_probe(tmp_path, SIGN)
    edited = _import_probe(tmp_path, SIGN.replace("return -1", "return -2"))
    assert (edited["hits"], edited["misses"]) == (0, 1)
    assert edited["signs"] == [-2, 0, 1]


def test_a_same_size_edit_with_the_same_mtime_gives_the_new_code_not_a_stale_pyc(tmp_path):
    """A plain import leaves __pycache__/*.pyc, valid while the source's whole-second
    mtime and its size match; an edit that keeps both (within the second, or cp -p,
    rsync -a, tar) must still be compiled from the new source, and cached under it."""
    _import_probe(tmp_path, SIGN)
    init = tmp_path / "src" / "mmufuzz_probe" / "__init__.py"
    # What a plain import writes (unless PYTHONDONTWRITEBYTECODE), written whatever the env.
    py_compile.compile(str(init), invalidation_mode=py_compile.PycInvalidationMode.TIMESTAMP)
    edited = SIGN.replace("return -1", "return -2")
    assert len(edited) == len(SIGN)
    first = _import_probe(tmp_path, edited, keep_mtime=True)
    assert (first["hits"], first["misses"]) == (0, 1)
    assert first["signs"] == [-2, 0, 1]
    second = _import_probe(tmp_path, edited, keep_mtime=True)
    assert (second["hits"], second["misses"]) == (1, 0)
    assert second["signs"] == [-2, 0, 1]


def test_a_module_whose_counters_would_start_elsewhere_is_instrumented_again(tmp_path):
    first = _import_probe(tmp_path, SIGN)
    shifted = _import_probe(tmp_path, SIGN, counters_before=1)
    assert (shifted["hits"], shifted["misses"]) == (0, 1)
    assert shifted["next_counter"] == first["next_counter"] + 1


def test_a_damaged_entry_is_instrumented_again(tmp_path):
    _import_probe(tmp_path, SIGN)
    (entry,) = (tmp_path / "cache").iterdir()
    data = bytearray(entry.read_bytes())
    data[-8] ^= 0xFF  # flipped bits in the stored code
    entry.write_bytes(bytes(data))
    damaged = _import_probe(tmp_path, SIGN)
    assert (damaged["hits"], damaged["misses"]) == (0, 1)
    assert damaged["signs"] == [-1, 0, 1]


def test_a_cache_that_cannot_be_written_costs_only_the_instrumentation(tmp_path):
    (tmp_path / "cache").write_text("a file where the cache folder would be")
    for _ in range(2):
        run = _import_probe(tmp_path, SIGN)
        assert (run["hits"], run["misses"]) == (0, 1)
        assert run["signs"] == [-1, 0, 1]


def test_the_fuzz_target_imports_no_system_under_test_before_its_hook():
    """What is imported before the hook is in place stays uninstrumented: no coverage from it."""
    script = ("import sys, mmufuzz.fuzz.fuzz_mmu; print(sorted(m for m in sys.modules "
              "if m.split('.')[:2] in (['mmufuzz', 'harness'], ['mmufuzz', 'reference'])))")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          check=True)
    assert done.stdout.strip() == "[]"


# A probe fuzzed by libFuzzer: its blocks counted by atheris's calls or by a hit record.
FUZZ = textwrap.dedent("""\
    import sys
    from pathlib import Path
    import atheris
    from mmufuzz.fuzz.instrument import (HitRecord, instrument_branches, reserve_counter,
                                         trace_branch)
    record = HitRecord() if sys.argv[2] == "record" else None
    with instrument_branches({"mmufuzz_probe"}, set(), Path(sys.argv[1]), record):
        import mmufuzz_probe
    # A feature counter reserved while fuzzing, as a campaign's CounterSink does.
    reserve, hit = (reserve_counter, trace_branch) if record is None else (record.reserve,
                                                                           record.hit)
    feature = []

    def one(data):
        try:
            if not feature:
                feature.append(reserve())
            hit(feature[0])
            for byte in data:
                mmufuzz_probe.sign(byte - 128)
        finally:
            if record is not None:
                record.fold()

    atheris.Setup(["probe", "-runs=300", "-seed=1"], one)
    atheris.Fuzz()
""")


def _fuzz_probe(tmp_path, scheme: str) -> int:
    """libFuzzer's final ``cov`` (blocks covered) of a short run on the probe."""
    package = tmp_path / "src" / "mmufuzz_probe"
    package.mkdir(parents=True, exist_ok=True)
    (package / "__init__.py").write_text(SIGN)
    done = subprocess.run([sys.executable, "-c", FUZZ, str(tmp_path / scheme), scheme],
                          cwd=package.parent, capture_output=True, text=True, check=True)
    return int(re.findall(r"DONE +cov: (\d+)", done.stderr)[-1])


def test_libfuzzer_sees_the_same_blocks_and_features_from_a_hit_record_as_from_calls(tmp_path):
    calls, record = _fuzz_probe(tmp_path, "calls"), _fuzz_probe(tmp_path, "record")
    assert calls >= 4  # the function, both of its branches and the feature, at least
    assert record == calls


def _probe_in_record(source: str):
    record = HitRecord(reserve=None, trace=None)
    code = patch_code_for_record(compile(source, "<probe>", "exec"), record.hits)
    record.cover(atheris._reserve_counter() + 1)
    namespace = {}
    exec(code, namespace)
    record.hits[:] = [0] * len(record.hits)  # the module body's own blocks
    return record, namespace, code


def test_a_record_counts_each_block_once_per_run():
    record, probe, _ = _probe_in_record(SIGN)
    probe["sign"](-3)
    once = list(record.hits)
    probe["sign"](-3)
    probe["sign"](-3)
    assert any(once)
    assert record.hits == [3 * hits for hits in once]


def test_what_runs_muted_leaves_a_record_as_it_was():
    record, probe, _ = _probe_in_record(SIGN)
    probe["sign"](-3)
    before = list(record.hits)
    with record.muted():
        probe["sign"](3)  # the other branch
    assert record.hits == before
    probe["sign"](3)
    assert record.hits != before


def test_a_record_sees_the_branches_inside_comprehensions():
    record, probe, _ = _probe_in_record(
        "def evens(xs):\n    return [x for x in xs if x % 2 == 0]\n")
    probe["evens"]([1, 3])
    odd_only = {i for i, hits in enumerate(record.hits) if hits}
    probe["evens"]([2])
    assert {i for i, hits in enumerate(record.hits) if hits} > odd_only  # the kept-x block


def test_record_instrumented_code_survives_freeze_and_thaw():
    record, _, code = _probe_in_record(SIGN)
    thawed = thaw(freeze(code, record.hits), record.hits)
    assert thawed == code
    sign = next(c for c in thawed.co_consts if getattr(c, "co_name", "") == "sign")
    assert any(c is record.hits for c in sign.co_consts)


def test_a_fold_caps_counts_at_255_and_starts_the_next_exec_from_zero():
    array = ctypes.create_string_buffer(8)
    record = HitRecord(reserve=None, trace=None, counters=(ctypes.addressof(array), len(array)))
    record.cover(4)
    record.hits[:] = [0, 1, 300, 5]
    record.fold()
    assert array.raw[:4] == bytes([0, 1, 255, 5])
    assert record.hits == [0, 0, 0, 0]


def test_without_atheris_counters_a_fold_calls_the_least_count_of_each_bucket():
    traced = []
    record = HitRecord(reserve=None, trace=traced.append)
    record.cover(6)
    record.hits[:] = [0, 1, 3, 5, 40, 300]  # buckets 1, 3, 4-7, 32-127, 128+
    record.fold()  # no libFuzzer in this process: no counter array to find
    assert sorted(collections.Counter(traced).items()) == [(1, 1), (2, 3), (3, 4), (4, 32),
                                                          (5, 128)]


# A libFuzzer run whose every exec meets a new feature key, as a campaign's early execs do.
NEW_KEY_EVERY_EXEC = textwrap.dedent("""\
    import sys
    import atheris
    from mmufuzz.fuzz.instrument import reserve_counter, trace_branch
    from mmufuzz.fuzz.worker import CounterSink
    sink = CounterSink(reserve_counter, trace_branch)
    execs = iter(range(1 << 30))
    atheris.Setup([sys.argv[0], "-runs=4500"], lambda data: sink(f"key {next(execs)}"))
    atheris.Fuzz()
""")


def test_feature_counters_outlast_libfuzzers_4096_modules(tmp_path):
    """atheris registers the counters reserved since the last exec as a libFuzzer module, of
    which libFuzzer keeps 4096: one counter reserved per new key crashed exec 4097 (SIGSEGV)."""
    done = subprocess.run([sys.executable, "-c", NEW_KEY_EVERY_EXEC], cwd=tmp_path,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert re.search(r"Done 4500 runs", done.stderr)

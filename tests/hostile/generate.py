"""Write the hostile reproducer corpus: files every command must refuse with exit 2.

Each case is a file a user could be handed (in a bug report, a pull request, a
campaign directory) that is wrong in one way: code named as a target, nesting
or lines far beyond anything the printer writes, bytes that are not text,
characters that hide what a line says, a field out of its domain.  ``mmufuzz
replay`` and ``mmufuzz show`` must answer each with one line naming the file
(and the line and field where there is one) and exit 2, in bounded time and
memory (``tests/test_hostile.py``).

The output is deterministic.  ``python tests/hostile/generate.py`` rewrites the
small cases as the ``*.repro`` files beside it (the test checks they are what
it writes); the cases over ``COMMITTED_BYTES`` (lines of a megabyte) and those
that cannot be committed (a FIFO, a symlink to ``/dev/zero``, a file over the
size cap) are made by the test in a temporary folder.
"""

from __future__ import annotations

import sys
from pathlib import Path

HEAD = "# mmufuzz reproducer v1\n"
VM = "vm type=tdx vcpus=2\n"
SLOT = "memslot_add slot=0 base=0x200 npages=0x200 flags=host_huge host_offset=0\n"
READ = "access vcpu=0 gpa=0x200000 word=0 kind=read private=0\n"
GOOD = HEAD + VM + SLOT + READ
MB = 1 << 20
COMMITTED_BYTES = 64 << 10


def _nested(depth: int) -> str:
    op = "zap_all"
    for _ in range(depth):
        op = f"parallel a=({op}) b=(recover) schedule=0x0"
    return op


def _cases() -> dict[str, bytes | str]:
    cases: dict[str, bytes | str] = {}

    # A file names data, never code: every one of these once imported or ran something.
    for index, target in enumerate((
            "sys:exit", "os:abort", "builtins:input", "os:system", "subprocess:call",
            "builtins:breakpoint", "mmufuzz.fuzz.cli:main", "mmufuzz.harness.tdp:TdpTarget",
            "tests.planted:ZapForgets", "os.path", "tdp:TdpTarget", "TDP", "../tdp",
            "reference:ReferenceTarget", "x" * MB)):
        cases[f"target-{index:02}"] = HEAD + f"# target: {target}\n" + VM + SLOT + READ
    cases["target-after-program"] = GOOD + "# target: os:abort\n"
    cases["target-beside-other-keys"] = HEAD + "# inject: none  target: sys:exit\n" + VM + READ

    # Faults must be known ones.
    for index, inject in enumerate(("no-such-fault", "merge-frozen-child,no-such-fault",
                                    "MERGE-FROZEN-CHILD", "y" * MB)):
        cases[f"inject-{index:02}"] = HEAD + f"# inject: {inject}\n" + VM + READ

    # Nesting is bounded by the grammar, whatever the depth.
    for depth in (2, 3, 10, 90, 330, 5000):
        cases[f"nested-parallel-{depth}"] = HEAD + VM + _nested(depth) + "\n"
    cases["nested-parens-100k"] = HEAD + VM + "parallel a=" + "(" * 100_000 + "zap_all" + \
        ")" * 100_000 + " b=(recover) schedule=0x0\n"
    cases["unbalanced-parens-100k"] = HEAD + VM + "parallel a=" + "(" * 100_000 + "\n"

    # Lines far beyond what the printer writes: the error quotes an excerpt.
    cases["long-op-keyword"] = HEAD + VM + "z" * MB + "\n"
    cases["long-field-name"] = HEAD + VM + "memslot_delete " + "s" * MB + "=0\n"
    cases["long-field-value"] = HEAD + VM + "memslot_delete slot=" + "9" * MB + "\n"
    cases["long-hex-value"] = HEAD + VM + "memslot_delete slot=0x" + "f" * MB + "\n"
    cases["many-fields"] = HEAD + VM + "zap_all" + " x=1" * 200_000 + "\n"
    cases["many-spaces-then-junk"] = HEAD + VM + "zap_all" + " " * MB + "junk\n"
    cases["long-comment-then-bad-op"] = HEAD + "# " + "c" * MB + "\n" + VM + "frobnicate\n"
    cases["long-meta-spaces"] = HEAD + "# target:" + " " * MB + "os:abort\n" + VM
    cases["long-flags"] = HEAD + VM + "memslot_set_flags slot=0 flags=" + "dirty_log," * 100_000 \
        + "bogus\n"
    cases["too-many-ops"] = HEAD + VM + "zap_all\n" * 100_001
    cases["too-many-lines"] = HEAD + VM + "\n" * 200_001

    # Not text, or text that hides what it says.
    cases["invalid-utf8"] = (HEAD + VM).encode() + b"zap_all \xff\xfe\n"
    cases["utf16-with-bom"] = (HEAD + VM + "zap_all\n").encode("utf-16")
    cases["nul-byte"] = HEAD + VM + "zap_all\0\n"
    cases["nul-only"] = b"\0" * 4096
    cases["escape-sequence-in-comment"] = HEAD + "# finding: \x1b[2J\x1b[31mall clean\n" + VM
    cases["escape-sequence-in-target"] = HEAD + "# target: tdp\x1b[8m\n" + VM
    cases["bell-in-op"] = HEAD + VM + "zap_all\a\n"
    cases["carriage-returns-only"] = (HEAD + VM + "zap_all\n" + "frobnicate\n").replace("\n", "\r")
    cases["form-feed"] = HEAD + VM + "\fzap_all\n"
    cases["c1-control"] = HEAD + "# note \x85 next line\n" + VM + "frobnicate\n"
    cases["bidi-override-in-comment"] = HEAD + "# expect: \u202eneelc\n" + VM + READ
    cases["bidi-isolate-in-comment"] = HEAD + "# \u2066target: tdp\u2069\n" + VM
    cases["nbsp-between-fields"] = HEAD + VM + "memslot_delete\u00a0slot=0\n"
    cases["fullwidth-digit"] = HEAD + VM + "memslot_delete slot=\uff11\n"
    cases["arabic-indic-digit"] = HEAD + VM + "memslot_delete slot=\u0663\n"
    cases["zero-width-space-in-keyword"] = HEAD + VM + "zap\u200b_all\n"
    cases["homoglyph-keyword"] = HEAD + VM + "z\u0430p_all\n"
    cases["line-separator-in-code"] = HEAD + VM + "zap_all\u2028frobnicate\n"
    cases["bom-then-bad-op"] = "\ufeff" + HEAD + VM + "frobnicate\n"
    cases["two-boms"] = "\ufeff\ufeff" + HEAD + VM + READ

    # Structure.
    cases["empty"] = ""
    cases["only-comments"] = HEAD + "# expect: clean\n"
    cases["only-blank-lines"] = "\n" * 10_000
    cases["no-header"] = HEAD + SLOT
    cases["header-twice"] = HEAD + VM + VM
    cases["header-after-op"] = HEAD + VM + READ + VM
    cases["header-marked-twice"] = HEAD + ">>> " + VM + ">>> " + VM
    cases["header-tab-separated-twice"] = HEAD + VM + "vm\ttype=tdx\tvcpus=1\n"
    cases["header-no-vcpus"] = HEAD + "vm type=tdx\n"
    cases["header-zero-vcpus"] = HEAD + "vm type=tdx vcpus=0\n"
    cases["header-five-vcpus"] = HEAD + "vm type=tdx vcpus=5\n"
    cases["header-huge-vcpus"] = HEAD + "vm type=tdx vcpus=99999999999999999999999\n"
    cases["header-unknown-type"] = HEAD + "vm type=sev vcpus=1\n"
    cases["header-unknown-field"] = HEAD + "vm type=tdx vcpus=1 memory=4g\n"
    cases["header-keyword-glued"] = HEAD + "vmtype=tdx vcpus=1\n"
    cases["header-manual-protect-unknown"] = HEAD + "vm type=default vcpus=1 manual_protect=yes\n"
    cases["header-manual-protect-empty"] = HEAD + "vm type=default vcpus=1 manual_protect=\n"
    cases["header-manual-protect-twice"] = (HEAD + "vm type=default vcpus=1 manual_protect=on "
                                            "manual_protect=init_set\n")
    cases["header-manual-protect-case"] = HEAD + "vm type=default vcpus=1 manual_protect=ON\n"
    cases["marker-alone"] = HEAD + VM + ">>>\n>>> frobnicate\n"
    cases["marker-twice-on-a-line"] = HEAD + VM + ">>> >>> zap_all\n"
    cases["python-expression"] = HEAD + VM + "__import__('os').system('true')\n"
    cases["shell-line"] = HEAD + VM + "$(reboot)\n"
    cases["json-instead"] = '{"vm": {"type": "tdx", "vcpus": 1}, "ops": []}\n'
    cases["yaml-instead"] = "vm:\n  type: tdx\n  vcpus: 1\n"

    # Fields.
    fields = {
        "unknown-op": "frobnicate slot=0",
        "unknown-field": "memslot_delete slot=0 color=red",
        "duplicate-field": "memslot_delete slot=0 slot=1",
        "missing-field": "memslot_delete",
        "empty-value": "memslot_delete slot=",
        "double-equals": "memslot_delete slot==0",
        "value-with-equals": "memslot_delete slot=0=1",
        "no-name": "memslot_delete =0",
        "bare-word": "memslot_delete 0",
        "trailing-word": "zap_all now",
        "negative": "memslot_delete slot=-1",
        "plus-sign": "memslot_delete slot=+1",
        "underscore-digits": "memslot_delete slot=1_0",
        "uppercase-hex-prefix": "memslot_delete slot=0X1",
        "octal": "memslot_delete slot=0o7",
        "binary": "memslot_delete slot=0b1",
        "float": "memslot_delete slot=1.0",
        "slot-out-of-range": "memslot_delete slot=16",
        "gfn-past-limit": "memslot_add slot=1 base=0x800000000 npages=0x1 flags= host_offset=0",
        "npages-zero": "memslot_add slot=1 base=0x0 npages=0x0 flags= host_offset=0",
        "npages-huge": "memslot_add slot=1 base=0x0 npages=0x40001 flags= host_offset=0",
        "value-over-64-bits": "access vcpu=0 gpa=0x200000 word=0 kind=write "
                              "value=0x10000000000000000 private=0",
        "gpa-misaligned": "access vcpu=0 gpa=0x200001 word=0 kind=read private=0",
        "word-out-of-range": "access vcpu=0 gpa=0x200000 word=512 kind=read private=0",
        "vcpu-not-in-vm": "access vcpu=2 gpa=0x200000 word=0 kind=read private=0",
        "gpa-and-gva": "access vcpu=0 gpa=0x0 gva=0x0 word=0 kind=read private=0",
        "write-without-value": "access vcpu=0 gpa=0x200000 word=0 kind=write private=0",
        "read-with-value": "access vcpu=0 gpa=0x200000 word=0 kind=read value=0x1 private=0",
        "unknown-kind": "access vcpu=0 gpa=0x200000 word=0 kind=execute private=0",
        "bool-two": "access vcpu=0 gpa=0x200000 word=0 kind=read private=2",
        "bool-word": "access vcpu=0 gpa=0x200000 word=0 kind=read private=true",
        "unknown-flag": "memslot_set_flags slot=0 flags=dirty_log,sticky",
        "flag-case": "memslot_set_flags slot=0 flags=DIRTY_LOG",
        "accept-2m-misaligned": "accept vcpu=0 gpa=0x201000 level=2m",
        "accept-1g": "accept vcpu=0 gpa=0x0 level=1g",
        "ps-target-misaligned": "write_pte vcpu=0 table=0x1 index=0 target=0x201 flags=p,ps",
        "index-out-of-range": "write_pte vcpu=0 table=0x1 index=512 target=0x0 flags=p",
        "root-word": "paging vcpu=0 root=on",
        "schedule-over-64-bits": "parallel a=(zap_all) b=(recover) schedule=0x10000000000000000",
        "parallel-same-vcpu": "parallel a=(flush_tlb vcpu=1) b=(invlpg vcpu=1 gva=0x0) "
                              "schedule=0x0",
        "parallel-missing-side": "parallel a=(zap_all) schedule=0x0",
        "parallel-empty-side": "parallel a=() b=(recover) schedule=0x0",
        "parallel-blank-side": "parallel a=(   ) b=(recover) schedule=0x0",
        "parallel-unparenthesised": "parallel a=zap_all b=(recover) schedule=0x0",
        "parallel-close-only": "parallel a=zap_all) b=(recover) schedule=0x0",
        "parallel-open-only": "parallel a=(zap_all b=(recover) schedule=0x0",
        "parallel-side-bad-field": "parallel a=(memslot_delete slot=99) b=(recover) schedule=0x0",
        "parallel-side-unknown-op": "parallel a=(frobnicate) b=(recover) schedule=0x0",
        "parallel-side-is-header": "parallel a=(vm type=tdx vcpus=1) b=(recover) schedule=0x0",
        # More than two actors: at most four (a to d), in order, each named once, on
        # vCPUs of their own; the schedule stays a 64-bit number whatever the count.
        "parallel-five-actors": "parallel a=(zap_all) b=(recover) c=(zap_all) d=(recover) "
                                "e=(zap_all) schedule=0x0",
        "parallel-side-twice": "parallel a=(zap_all) b=(recover) c=(zap_all) c=(recover) "
                               "schedule=0x0",
        "parallel-d-without-c": "parallel a=(zap_all) b=(recover) d=(zap_all) schedule=0x0",
        "parallel-c-alone": "parallel a=(zap_all) c=(recover) schedule=0x0",
        "parallel-third-same-vcpu": "parallel a=(flush_tlb vcpu=1) b=(zap_all) "
                                    "c=(invlpg vcpu=1 gva=0x0) schedule=0x0",
        "parallel-four-schedule-over-64-bits": "parallel a=(zap_all) b=(recover) c=(zap_all) "
                                               "d=(recover) schedule=0x10000000000000000",
        "parallel-nested-in-c": "parallel a=(zap_all) b=(recover) "
                                "c=(parallel a=(zap_all) b=(recover) schedule=0x0) schedule=0x0",
        "parallel-side-named-0": "parallel a=(zap_all) b=(recover) 0=(zap_all) schedule=0x0",
        "parenthesised-op-alone": "(zap_all)",
        "op-then-parens": "zap_all()",
        "set-attributes-bad-private": "set_attributes base=0x200 npages=0x1 private=yes",
        "host-invalidate-no-npages": "host_invalidate base=0x200",
        "split-no-slot": "split",
        "get-dirty-log-slot-word": "get_dirty_log slot=zero",
        "clear-dirty-log-no-npages": "clear_dirty_log slot=0 first=0x0",
        "clear-dirty-log-first-past-limit": "clear_dirty_log slot=0 first=0x40040 npages=0x40",
        "clear-dirty-log-negative-npages": "clear_dirty_log slot=0 first=0x0 npages=-64",
        "clear-dirty-log-gfn-field": "clear_dirty_log slot=0 base=0x200 npages=0x40",
        "clear-dirty-log-slot-past-limit": "clear_dirty_log slot=16 first=0x0 npages=0x40",
        "tab-inside-value": "memslot_delete slot=\t",
    }
    for name, line in fields.items():
        cases[f"field-{name}"] = HEAD + VM + SLOT + line + "\n"
    return cases


CASES = {name: content if isinstance(content, bytes) else content.encode("utf-8")
         for name, content in _cases().items()}
COMMITTED = {name: data for name, data in CASES.items() if len(data) <= COMMITTED_BYTES}
BIG = {name: data for name, data in CASES.items() if len(data) > COMMITTED_BYTES}


def write_all(folder: Path, cases: dict) -> list[Path]:
    """Write ``cases`` as ``folder/NAME.repro``; return the paths, sorted."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in cases.items():
        (folder / f"{name}.repro").write_bytes(data)
    return sorted(folder / f"{name}.repro" for name in cases)


if __name__ == "__main__":
    here = Path(__file__).resolve().parent
    for stale in here.glob("*.repro"):
        stale.unlink()
    print(f"{len(write_all(here, COMMITTED))} files in {here}", file=sys.stderr)

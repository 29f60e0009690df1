#!/bin/bash -eu
# ClusterFuzzLite / OSS-Fuzz build: one fuzzer binary per fuzz/fuzz_*.py, plus its seed corpus.
#
# The fuzz target imports the systems under test by name at run time
# (mmufuzz.harness.target.TARGETS), which PyInstaller cannot see: collect the packages.
# Standalone, a finding is reported as a crash (mmufuzz.fuzz.worker.FindingError).

cd "$SRC/mmufuzz"
pip3 install .

for fuzzer in fuzz/fuzz_*.py; do
  name=$(basename "$fuzzer" .py)
  compile_python_fuzzer "$fuzzer" \
    --collect-submodules mmufuzz
  seeds=$(mktemp -d)
  python3 -c "import sys; from pathlib import Path; from mmufuzz.fuzz.campaign import write_seeds; \
write_seeds(Path(sys.argv[1]))" "$seeds"
  (cd "$seeds" && zip -q "$OUT/${name}_seed_corpus.zip" ./*.bin)
  rm -rf "$seeds"
done

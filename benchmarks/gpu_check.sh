#!/usr/bin/env bash
# GPU check, in one go on a machine with a CUDA GPU (under ten minutes): build the extension
# against that machine's torch, run the cuda-marked tests, run the GPU benchmarks, and print
# the table last. Needs no network: the build uses the installed torch, setuptools and ninja.
#   PYTHON=python3  TORCH_CUDA_ARCH_LIST=9.0  BENCH_ARGS="--quick"  OUT=<results folder>
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT_DIR=${OUT:-benchmarks/results-gpu}
mkdir -p "$OUT_DIR"
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
export TRITON_INTERPRET=0   # tests/conftest.py would otherwise select the interpreter
export PYTHONUNBUFFERED=1

echo "== build ($($PY -c 'import torch; print(torch.__version__, torch.cuda.get_device_name())'))"
start=$(date +%s)
$PY -m pip install -q --no-build-isolation --no-deps --no-index -e . > "$OUT_DIR/build.log" 2>&1 \
  || { tail -40 "$OUT_DIR/build.log"; echo "BUILD FAILED"; exit 1; }
echo "built in $(( $(date +%s) - start )) s"

echo "== GPU tests"
timeout 240 $PY -m pytest tests -m cuda -q -p no:cacheprovider 2>&1 | tee "$OUT_DIR/tests.log" | tail -25
tests_rc=${PIPESTATUS[0]}

echo "== GPU benchmarks"
timeout 300 $PY -m benchmarks --device cuda --out "$OUT_DIR" ${BENCH_ARGS:-} > "$OUT_DIR/bench.log" 2>&1
bench_rc=$?
tail -3 "$OUT_DIR/bench.log"
echo "== results (tests rc=$tests_rc, benchmarks rc=$bench_rc)"
cat "$OUT_DIR/results.md" 2>/dev/null || echo "no results table"
exit $(( tests_rc || bench_rc ))

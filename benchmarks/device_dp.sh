#!/usr/bin/env bash
# Issue #20's GPU figure, prepared as one command for a machine with an NVIDIA GPU and
# no package registry (the workplace's device machines: Python 3.12 with a CUDA build
# of torch, numpy, scipy, scikit-learn and rich, but no Opacus or cryptography).
#
#   here, once (where pip reaches a registry):  benchmarks/device_dp.sh --fetch-wheels
#   there (the device tool, carrying .whl):     bash benchmarks/device_dp.sh [dp_cuda_bench flags]
#
# --fetch-wheels downloads the wheels bract's DP path needs beyond that machine's image
# into .whl/ (git-ignored through .git/info/exclude). A run installs them into a
# private folder, runs benchmarks/dp_cuda_bench.py against this checkout's src/, and
# writes its log to $OUT (or /tmp). It exits non-zero, with one line, when the wheels
# are missing or the benchmark fails: no figure is printed for work that did not run.
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS=.whl
PY=${PYTHON:-python3}

if [ "${1:-}" = "--fetch-wheels" ]; then
  mkdir -p .git/info
  grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d "$WHEELS" \
    opacus==1.6.0 cryptography==50.0.2 cffi==2.1.1 pycparser==3.12 opt_einsum==3.4.0
  echo "device_dp.sh: wheels in $WHEELS/ ($(du -sh "$WHEELS" | cut -f1)); carry .whl to the device"
  exit 0
fi

if ! compgen -G "$WHEELS/*.whl" >/dev/null; then
  echo "device_dp.sh: error: no wheels in $WHEELS/: run benchmarks/device_dp.sh --fetch-wheels" \
       "where pip reaches a registry, then carry .whl" >&2
  exit 2
fi
SITE=$(mktemp -d /tmp/bract-site.XXXXXX)
"$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" \
  "$WHEELS"/*.whl
export PYTHONPATH="$SITE:$PWD/src:$PWD/benchmarks" PYTHONUNBUFFERED=1
command -v nvidia-smi >/dev/null && nvidia-smi -L || true
LOG="${OUT:-/tmp}/dp_cuda_bench.log"
if ! "$PY" benchmarks/dp_cuda_bench.py "$@" 2>&1 | tee "$LOG"; then
  echo "device_dp.sh: error: dp_cuda_bench.py failed (log: $LOG); nothing was measured" >&2
  exit 1
fi

#!/usr/bin/env bash
# bract's one entry point for a fresh machine: creates .venv when missing, installs
# torch (CPU build where there is no NVIDIA GPU, CUDA build where there is one) and
# bract with its test extra, then runs what you asked for.
#
#   ./dev.sh demo [bract simulate flags...]   # simulated federation of hospitals
#   ./dev.sh test [pytest args...]            # the whole test suite (CI runs this)
#   ./dev.sh bract ...                        # any bract command inside the venv
#
# Environment: PYTHON (interpreter to build the venv with, default python3),
# BRACT_VENV (default .venv), BRACT_TORCH_VERSION (default 2.13.0),
# BRACT_TORCH_INDEX (a pip index URL for torch, e.g. PyTorch's CPU-only index on a
# machine without a GPU that has no local CPU wheel).
set -euo pipefail
cd "$(dirname "$0")"

VENV=${BRACT_VENV:-.venv}
PY=${PYTHON:-python3}
TORCH_VERSION=${BRACT_TORCH_VERSION:-2.13.0}

ensure_env() {
  if [ ! -x "$VENV/bin/python" ]; then
    echo "dev.sh: creating $VENV with $($PY --version 2>&1)" >&2
    "$PY" -m venv "$VENV"
    "$VENV/bin/python" -m pip install -q --upgrade pip
  fi
  if ! "$VENV/bin/python" -c "import torch" >/dev/null 2>&1; then
    # Install torch first and pinned, so that bract's open range ("torch>=2.2") is
    # already satisfied and pip never pulls a multi-GB CUDA build by accident.
    local index_args=()
    if [ -n "${BRACT_TORCH_INDEX:-}" ]; then index_args=(--index-url "$BRACT_TORCH_INDEX"); fi
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
      echo "dev.sh: NVIDIA GPU found: installing torch==$TORCH_VERSION (CUDA build)" >&2
    else
      echo "dev.sh: no GPU: installing torch==$TORCH_VERSION (CPU build where one is available)" >&2
    fi
    "$VENV/bin/python" -m pip install -q "torch==$TORCH_VERSION" "${index_args[@]}"
  fi
  local stamp="$VENV/.bract-installed"
  local want
  want=$(sha256sum pyproject.toml | cut -d' ' -f1)
  if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    echo "dev.sh: installing bract and its dependencies into $VENV" >&2
    "$VENV/bin/python" -m pip install -q -e ".[test]"
    echo "$want" > "$stamp"
  fi
}

cmd=${1:-}
[ $# -gt 0 ] && shift
case "$cmd" in
  demo)
    ensure_env
    export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1
    exec "$VENV/bin/bract" simulate "$@"
    ;;
  test)
    ensure_env
    export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1
    "$VENV/bin/ruff" check src tests benchmarks examples
    exec "$VENV/bin/python" -m pytest "$@"
    ;;
  bract)
    ensure_env
    exec "$VENV/bin/bract" "$@"
    ;;
  setup)
    ensure_env
    ;;
  *)
    echo "usage: ./dev.sh {demo|test|bract|setup} [args...]" >&2
    exit 2
    ;;
esac

#!/usr/bin/env bash
# Create or reuse the virtual environment at <repo>/.venv and install what the project needs.
# Sourced by examples/quickstart.sh and tools/run_tests.sh; afterwards $PY is the venv's python.
#   - no CUDA (no nvidia-smi): the pinned CPU stack of requirements/cpu.txt (torch 2.13.0 CPU).
#   - CUDA host: a venv that sees the system's CUDA torch (--system-site-packages), unpinned.
# Re-installs only when setup.py or requirements/cpu.txt changed (stamp file in the venv).
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$REPO/.venv"
PY="$VENV/bin/python"
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  VENV_ARGS=(--system-site-packages); PIP_CONSTRAINT_ARGS=()
else
  VENV_ARGS=(); PIP_CONSTRAINT_ARGS=(-c "$REPO/requirements/cpu.txt")
fi
if [ ! -x "$PY" ]; then
  echo "[venv] creating $VENV"
  python3 -m venv "${VENV_ARGS[@]}" "$VENV"
fi
STAMP="$VENV/.megatron_adadpo-stamp"
WANT="$(cat "$REPO/setup.py" "$REPO/requirements/cpu.txt" | sha256sum | cut -c1-16)"
if [ "$(cat "$STAMP" 2>/dev/null || true)" != "$WANT" ]; then
  echo "[venv] installing the project and its dependencies (about a minute on a fresh machine)"
  if [ ${#PIP_CONSTRAINT_ARGS[@]} -gt 0 ]; then
    # torch first, pinned: an unpinned resolve would pull a multi-GB CUDA build.
    "$PY" -m pip install -q "${PIP_CONSTRAINT_ARGS[@]}" "torch==2.13.0"
  fi
  "$PY" -m pip install -q "${PIP_CONSTRAINT_ARGS[@]}" -e "$REPO[hf,test,plot]"
  echo "$WANT" > "$STAMP"
fi
export PY

#!/usr/bin/env bash
# Create or reuse a virtual environment of the project and install what it needs.
# Sourced by examples/quickstart.sh and tools/run_tests.sh; afterwards $PY is the venv's python.
# MEGATRON_ADADPO_STACK picks the stack (the two ends of the supported range, both run in CI):
#   default  <repo>/.venv: the host's python3 (3.11 tested).
#     - no CUDA (no nvidia-smi): the pinned CPU stack of requirements/cpu.txt (torch 2.13.0 CPU,
#       megatron-core 0.16.1).
#     - CUDA host: a venv that sees the system's CUDA torch (--system-site-packages), unpinned.
#   newest   <repo>/.venv-newest: Python 3.12 ($NEWEST_PYTHON, else pyenv's 3.12.1, else
#            python3.12 on PATH) with the pins of requirements/newest.txt (megatron-core 0.19.2;
#            torch's Python 3.12 wheel is the CUDA build, ~4.7 GB, which also runs on CPU).
# Re-installs only when setup.py or the pins file changed (stamp file in the venv).
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

newest_python() {
  # The Python 3.12 that creates .venv-newest, or a one-line error naming the fix.
  local root candidate
  root="$(pyenv root 2>/dev/null || echo "$HOME/.pyenv")"
  for candidate in "${NEWEST_PYTHON:-}" "$root/versions/3.12.1/bin/python" \
    "$(command -v python3.12 || true)"; do
    if [ -n "$candidate" ] && [ -x "$candidate" ] &&
      "$candidate" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))'; then
      echo "$candidate"
      return 0
    fi
  done
  echo "[venv] the newest stack needs Python 3.12 (tested: 3.12.1), found none: run" \
    "'pyenv install 3.12.1', or set NEWEST_PYTHON=/path/to/python3.12" >&2
  return 1
}

case "${MEGATRON_ADADPO_STACK:-default}" in
  default)
    VENV="$REPO/.venv"; BASE_PY=python3; PINS="$REPO/requirements/cpu.txt"; EXTRA=()
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
      VENV_ARGS=(--system-site-packages); PINS=""
    else
      VENV_ARGS=()
    fi ;;
  newest)
    VENV="$REPO/.venv-newest"; BASE_PY="$(newest_python)"; PINS="$REPO/requirements/newest.txt"
    VENV_ARGS=(); EXTRA=(triton) ;;  # megatron-core >= 0.17 imports triton at import time
  *)
    echo "[venv] unknown stack '${MEGATRON_ADADPO_STACK}': use default or newest" >&2
    exit 2 ;;
esac
PY="$VENV/bin/python"
if [ ! -x "$PY" ]; then
  echo "[venv] creating $VENV"
  "$BASE_PY" -m venv "${VENV_ARGS[@]}" "$VENV"
fi
STAMP="$VENV/.megatron_adadpo-stamp"
WANT="$(cat "$REPO/setup.py" "${PINS:-$REPO/requirements/cpu.txt}" | sha256sum | cut -c1-16)"
if [ "$(cat "$STAMP" 2>/dev/null || true)" != "$WANT" ]; then
  echo "[venv] installing the project and its dependencies into $VENV (minutes on a fresh machine)"
  if [ -n "$PINS" ]; then
    # torch first, pinned: an unpinned resolve would pull another (multi-GB) build.
    "$PY" -m pip install -q -c "$PINS" "$(grep -E '^torch==' "$PINS")"
    "$PY" -m pip install -q -c "$PINS" "${EXTRA[@]}" -e "$REPO[hf,test,plot]"
  else
    "$PY" -m pip install -q -e "$REPO[hf,test,plot]"
  fi
  echo "$WANT" > "$STAMP"
fi
export PY

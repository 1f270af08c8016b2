#!/usr/bin/env bash
# Run the whole test suite (unit, distributed on CPU with gloo, end-to-end; GPU tests skip
# without CUDA). Extra arguments go to pytest, e.g. `bash tools/run_tests.sh -k losses`.
# `--stack newest` (first argument) runs it on the newest supported stack instead (.venv-newest:
# Python 3.12, megatron-core 0.19.2; tools/venv.sh), e.g. `bash tools/run_tests.sh --stack newest`.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
MEGATRON_ADADPO_STACK=default
if [ "${1:-}" = "--stack" ]; then
  MEGATRON_ADADPO_STACK="${2:?--stack needs a name: default or newest}"
  shift 2
fi
source "$REPO/tools/venv.sh"
cd "$REPO"
exec "$PY" -m pytest -q -p no:cacheprovider "$@"

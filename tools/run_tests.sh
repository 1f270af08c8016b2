#!/usr/bin/env bash
# Run the whole test suite (unit, distributed on CPU with gloo, end-to-end; GPU tests skip
# without CUDA). Extra arguments go to pytest, e.g. `bash tools/run_tests.sh -k losses`.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$REPO/tools/venv.sh"
cd "$REPO"
exec "$PY" -m pytest -q -p no:cacheprovider "$@"

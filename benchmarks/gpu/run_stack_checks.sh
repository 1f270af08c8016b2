#!/usr/bin/env bash
# The GPU-only paths end to end (fusions, bf16, TE checkpoints, FP8, CP2 = CP1, parameter sync
# before a save), as far as this machine allows; every skip says why. One call, <= 540 s with
# the preflight.
# On the lent H200 (Python 3.12, CUDA torch, no TE / apex) carry megatron-core's cp312 wheel in
# .whl/ (env.sh installs it). Results: $OUT/stack_checks.json, logs beside it.
#   bash benchmarks/gpu/run_stack_checks.sh [--only NAME ...] [--cpu]
set -uo pipefail
source "$(dirname "$0")/env.sh"
timeout 385 python3 benchmarks/gpu/stack_checks.py --out "$OUT" --work /tmp/stack_work "$@" 2>&1 \
  | grep -v -e "UserWarning" -e "warnings.warn" | tee "$OUT/stack_checks.txt"

#!/usr/bin/env bash
# The GPU tests and the Llama-1B-shaped training step, in one device call of at most 540 s
# (preflight included; the other benchmarks: run_gpu_bench.sh). On the lent H100/H200 (Python
# 3.12, CUDA torch, no megatron-core) carry the wheels README.md lists in .whl/; that install
# doubles as the check that the plugin works on it. Results land in $OUT (or ./gpu_out).
#   bash benchmarks/gpu/run_gpu_checks.sh
set -uo pipefail
source "$(dirname "$0")/env.sh"
echo "== GPU tests (pytest -m gpu + CUDA loss tests)"
timeout 180 python3 -m pytest -q -p no:cacheprovider -o addopts="" tests/gpu \
  tests/unit/test_losses_cuda.py 2>&1 | tail -15 | tee "$OUT/gpu_tests.txt"
echo "== Llama-1B-shaped training step, bf16, AdaDPO vs DPO, precomputed vs resident"
timeout 175 python3 benchmarks/bench_train_step.py --preset llama-1b --steps 5 --warmup 1 \
  --json "$OUT/train_step_1b.json" 2>&1 | tail -40
echo "== planner prediction for the same configuration"
timeout 30 python3 tools/plan.py "${PLAN_1B[@]}" \
  --json > "$OUT/plan_1b.json" 2> "$OUT/plan_1b.err"; echo "plan rc=$?"; head -c 1500 "$OUT/plan_1b.json"

#!/usr/bin/env bash
# Every check that needs a GPU, in one call (the lent H100/H200: Python 3.12, CUDA torch, no
# megatron-core -> the newest megatron-core cp312 wheel is carried in .whl/, which doubles as
# the check that the plugin works on it). Results land in $OUT (or ./gpu_out).
#   bash benchmarks/gpu/run_gpu_checks.sh
set -uo pipefail
source "$(dirname "$0")/env.sh"
python3 - <<'PY' 2>&1 | tee "$OUT/versions.txt"
import torch, megatron.core as m
print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name())
print("megatron-core", m.__version__)
PY
echo "== GPU tests (pytest -m gpu + CUDA loss tests)"
timeout 240 python3 -m pytest -q -p no:cacheprovider -o addopts="" tests/gpu \
  tests/unit/test_losses_cuda.py 2>&1 | tail -15 | tee "$OUT/gpu_tests.txt"
echo "== Llama-1B-shaped training step, bf16, AdaDPO vs DPO, precomputed vs resident"
timeout 300 python3 benchmarks/bench_train_step.py --preset llama-1b --steps 6 --warmup 2 \
  --json "$OUT/train_step_1b.json" 2>&1 | tail -40
echo "== Llama-1B-shaped bf16 step without TE: torch SDPA vs Megatron's local attention (MFU)"
timeout 300 python3 benchmarks/bench_local_spec.py --preset llama-1b --steps 4 --warmup 1 \
  --json "$OUT/local_spec_1b.json" 2>&1 | tail -40
echo "== planner prediction for the same configuration"
python3 tools/plan.py "${PLAN_1B[@]}" \
  --json > "$OUT/plan_1b.json" 2> "$OUT/plan_1b.err"; echo "plan rc=$?"; head -c 1500 "$OUT/plan_1b.json"
echo "== data.batching on one GPU: fixed vs token_budget vs packed (UltraFeedback lengths, 2048)"
timeout 400 python3 benchmarks/bench_batching.py --measure --max-pp 1 --model llama-1b --bf16 \
  --impl auto --measure-gbs 32 --steps 4 --threads 4 --json "$OUT/batching_1b.json" 2>&1 | tail -30

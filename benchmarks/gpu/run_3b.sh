#!/usr/bin/env bash
# The largest Llama shape that fits one 80 GB GPU (Llama-3.2-3B, bf16, full recompute, resident
# reference): step time, tokens/s, MFU, peak memory, and the planner's prediction beside it.
set -uo pipefail
source "$(dirname "$0")/env.sh"
timeout 280 python3 benchmarks/bench_train_step.py --preset llama-3b --steps 3 --warmup 1 \
  --json "$OUT/train_step_3b.json" 2>&1 | tail -30
timeout 30 python3 tools/plan.py "${PLAN_3B[@]}" \
  --json > "$OUT/plan_3b.json" 2> "$OUT/plan_3b.err"; echo "plan rc=$?"

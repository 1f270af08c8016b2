#!/usr/bin/env bash
# Chunked output layer + log-probs on a GPU (issue 13): the chunked-vs-unchunked CUDA test
# (megatron-core 0.19's GPTModel output_processor path, fp32 trajectories equal, bf16 close),
# then the Llama-1B-shaped step (bench_train_step.py) and the planner's prediction with
# execution.logprob_chunk_tokens = 0 and auto: step time and peak memory side by side.
# CHUNKED_3B=1 adds the 3B shape (full recompute, one pair per micro-batch).
#   bash benchmarks/gpu/run_chunked.sh
set -uo pipefail
source "$(dirname "$0")/env.sh"
echo "== chunked vs unchunked on CUDA"
timeout 180 python3 -m pytest -q -p no:cacheprovider -o addopts="" tests/gpu \
  -k chunked 2>&1 | tail -8 | tee "$OUT/gpu_chunked_tests.txt"
shapes=(1b)
[ "${CHUNKED_3B:-0}" = 1 ] && shapes+=(3b)
for shape in "${shapes[@]}"; do
  plan="PLAN_${shape^^}[@]"
  for chunk in 0 auto; do
    echo "== llama-$shape step, execution.logprob_chunk_tokens=$chunk"
    timeout 180 python3 benchmarks/bench_train_step.py --preset "llama-$shape" --steps 3 \
      --warmup 1 --set "execution.logprob_chunk_tokens=$chunk" \
      --json "$OUT/train_step_${shape}_chunk_$chunk.json" 2>&1 | tail -3
    python3 tools/plan.py "${!plan}" --set "execution.logprob_chunk_tokens=$chunk" \
      --json > "$OUT/plan_${shape}_chunk_$chunk.json" 2> "$OUT/plan_${shape}_chunk_$chunk.err"
    python3 - "$OUT" "$shape" "$chunk" <<'PY'
import json, sys
out, shape, chunk = sys.argv[1:]
step = json.load(open(f"{out}/train_step_{shape}_chunk_{chunk}.json"))
plan = json.load(open(f"{out}/plan_{shape}_chunk_{chunk}.json"))
measured, predicted = step.get("peak_memory_gib"), plan["peak_allocated_gib"]
times = {k: round(v["median_s"], 3) for k, v in step["variants"].items()}
ratio = predicted / measured if measured else float("nan")
print(f"{shape} chunk={chunk} ({step['logprob_chunk_tokens']} tokens): step s {times}, peak "
      f"GiB measured {measured} planned {predicted:.2f} (planned/measured {ratio:.3f})")
PY
  done
done

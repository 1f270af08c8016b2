#!/usr/bin/env bash
# Chunked output layer + log-probs on a GPU (issue 13): the chunked-vs-unchunked CUDA test
# (megatron-core 0.19's GPTModel output_processor path, fp32 trajectories equal, bf16 close),
# then the Llama-shaped step (bench_train_step.py) and the planner's prediction with
# execution.logprob_chunk_tokens = 0 and auto: step time and peak memory side by side.
# One device call of at most 540 s (preflight included); SHAPE 1b (default) or 3b (full
# recompute, one pair per micro-batch).
#   bash benchmarks/gpu/run_chunked.sh [1b|3b]
set -uo pipefail
source "$(dirname "$0")/env.sh"
shape=${1:-1b}
plan="PLAN_${shape^^}[@]"
echo "== chunked vs unchunked on CUDA"
timeout 115 python3 -m pytest -q -p no:cacheprovider -o addopts="" tests/gpu \
  -k chunked 2>&1 | tail -8 | tee "$OUT/gpu_chunked_tests.txt"

step() {  # step CHUNK SECONDS: the training step and the plan at logprob_chunk_tokens=CHUNK
  echo "== llama-$shape step, execution.logprob_chunk_tokens=$1"
  timeout "$2" python3 benchmarks/bench_train_step.py --preset "llama-$shape" --steps 3 \
    --warmup 1 --set "execution.logprob_chunk_tokens=$1" \
    --json "$OUT/train_step_${shape}_chunk_$1.json" 2>&1 | tail -3
}
compare() {  # compare CHUNK: planned vs measured peak memory
  timeout 15 python3 tools/plan.py "${!plan}" --set "execution.logprob_chunk_tokens=$1" \
    --json > "$OUT/plan_${shape}_chunk_$1.json" 2> "$OUT/plan_${shape}_chunk_$1.err"
  timeout 10 python3 - "$OUT" "$shape" "$1" <<'PY'
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
}
step 0 110
compare 0
step auto 110
compare auto

#!/usr/bin/env bash
# Attention and batching benchmarks on one GPU, in one device call of at most 540 s (preflight
# included): torch SDPA vs Megatron's local attention without TE (MFU), and data.batching
# fixed vs token_budget vs packed at UltraFeedback lengths. Results land in $OUT.
#   bash benchmarks/gpu/run_gpu_bench.sh
set -uo pipefail
source "$(dirname "$0")/env.sh"
echo "== Llama-1B-shaped bf16 step without TE: torch SDPA vs Megatron's local attention (MFU)"
timeout 180 python3 benchmarks/bench_local_spec.py --preset llama-1b --steps 3 --warmup 1 \
  --json "$OUT/local_spec_1b.json" 2>&1 | tail -40
echo "== data.batching on one GPU: fixed vs token_budget vs packed (UltraFeedback lengths, 2048)"
timeout 205 python3 benchmarks/bench_batching.py --measure --max-pp 1 --model llama-1b --bf16 \
  --impl auto --measure-gbs 32 --steps 3 --threads 4 --json "$OUT/batching_1b.json" 2>&1 | tail -30

#!/usr/bin/env bash
# The largest Llama shape that fits one 80 GB GPU (Llama-3.2-3B, bf16, full recompute, resident
# reference): step time, tokens/s, MFU, peak memory, and the planner's prediction beside it.
set -uo pipefail
source "$(dirname "$0")/env.sh"
timeout 280 python3 benchmarks/bench_train_step.py --preset llama-3b --steps 3 --warmup 1 \
  --json "$OUT/train_step_3b.json" 2>&1 | tail -30
python3 tools/plan.py --recipe examples/configs/quickstart.yaml --gpu h100 --gpus 1 \
  --set model.num_layers=28 --set model.hidden_size=3072 --set model.ffn_hidden_size=8192 \
  --set model.num_attention_heads=24 --set model.num_query_groups=8 \
  --set model.vocab_size=128256 --set model.tie_word_embeddings=true \
  --set model.make_vocab_size_divisible_by=128 --set execution.tp=1 --set execution.bf16=true \
  --set execution.recompute=full --set execution.recompute_num_layers=1 \
  --set train.global_batch_size=8 --set train.micro_batch_size=1 --set data.max_length=1024 \
  --set data.max_prompt_length=256 --set execution.transformer_impl=local \
  --json > "$OUT/plan_3b.json" 2> "$OUT/plan_3b.err"; echo "plan rc=$?"

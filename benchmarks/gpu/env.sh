# Sourced by the GPU check scripts: install the carried wheels (.whl/, e.g. megatron-core's
# cp312 wheel) into /tmp/site and set up PYTHONPATH and $OUT.
OUT="${OUT:-gpu_out}"; mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH="/tmp/site:$PWD"
fi
export PYTHONPATH="${PYTHONPATH:-}:$PWD" PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
# The planner's view of the bench_train_step presets (tools/plan.py --set items).
LLAMA_VOCAB_PLAN=(--set model.vocab_size=128256 --set model.tie_word_embeddings=true
  --set model.make_vocab_size_divisible_by=128 --set execution.tp=1 --set execution.bf16=true
  --set data.max_length=1024 --set data.max_prompt_length=256
  --set execution.transformer_impl=local --set train.global_batch_size=8)
PLAN_1B=(--recipe examples/configs/quickstart.yaml --gpu h100 --gpus 1 "${LLAMA_VOCAB_PLAN[@]}"
  --set model.num_layers=16 --set model.hidden_size=2048 --set model.ffn_hidden_size=8192
  --set model.num_attention_heads=32 --set model.num_query_groups=8
  --set train.micro_batch_size=2)
PLAN_3B=(--recipe examples/configs/quickstart.yaml --gpu h100 --gpus 1 "${LLAMA_VOCAB_PLAN[@]}"
  --set model.num_layers=28 --set model.hidden_size=3072 --set model.ffn_hidden_size=8192
  --set model.num_attention_heads=24 --set model.num_query_groups=8
  --set execution.recompute=full --set execution.recompute_num_layers=1
  --set train.micro_batch_size=1)

# Sourced first by every GPU check script (benchmarks/gpu/run_*.sh; README.md beside it):
# install the carried wheels (.whl/) into /tmp/site AFTER the image's site-packages, set up
# PYTHONPATH and $OUT, then run the preflight before any timed check. Every timeout here
# counts in each script's 540 s budget (tests/unit/test_gpu_scripts.py).
OUT="${OUT:-gpu_out}"; mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  timeout 45 python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
    --upgrade --target /tmp/site .whl/*.whl || { echo "env.sh: carried wheels failed" >&2; exit 1; }
  # A .pth file in site-packages appends /tmp/site to sys.path after site-packages, in every
  # interpreter (torchrun's ranks too): a carried wheel fills in what the image lacks and never
  # shadows the image's own (torch's triton). PYTHONPATH would put /tmp/site first.
  SITE_DIR=$(timeout 10 python3 -c 'import site; print(site.getsitepackages()[0])')
  echo /tmp/site > "$SITE_DIR/zz_carried_wheels.pth" \
    || { echo "env.sh: cannot write $SITE_DIR (run as root, see README.md)" >&2; exit 1; }
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
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
# The preflight, last: imports, one torch.compile, versions ($OUT/preflight.txt).
timeout 100 python3 benchmarks/gpu/preflight.py 2>&1 | tee "$OUT/preflight.txt"
[ "${PIPESTATUS[0]}" = 0 ] || { echo "env.sh: preflight failed (see above)" >&2; exit 1; }

#!/usr/bin/env bash
# The main job: a small CPU AdaDPO training on the bundled data (2 processes, TP=2, gloo).
# Trains DPO and AdaDPO from the same start, a bundled SFT checkpoint of the model (made by
# `python examples/miniature/run.py --sft-only --bundle DIR`, docs/miniature.md), and plots
# their log-prob trajectories: DPO's chosen log-prob falls, AdaDPO's holds.
# Creates / reuses .venv (tools/venv.sh). On a CUDA machine it runs the same on the GPUs.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$REPO/tools/venv.sh"
cd "$REPO"
OUT="${OUT_DIR:-runs/quickstart}"
STEPS="${STEPS:-40}"
START="${START:-examples/checkpoints/sft_tiny}"  # the SFT warm start (model weights only)
export OMP_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false PYTHONWARNINGS=ignore
for run in dpo:false adadpo:true; do
  name="${run%%:*}"; adaptive="${run##*:}"
  rm -rf "$OUT/$name"
  echo "=== training ${name} (loss.name=${name}, ${STEPS} steps) ==="
  "$PY" -m torch.distributed.run --standalone --nproc-per-node 2 -m megatron_adadpo.train \
    --config examples/configs/quickstart.yaml \
    --set loss.name="$name" --set loss.adaptive="$adaptive" --set logging.run_dir="$OUT/$name" \
    --set train.train_iters="$STEPS" --set checkpoint.resume=false \
    --set train.init_checkpoint="$START" --set optimizer.lr=3e-4 --set optimizer.min_lr=3e-5 \
    --set eval.interval=4 \
    "$@" 2>&1 | grep -v -E "Warning|warnings.warn" || { echo "training $name failed" >&2; exit 1; }
done
"$PY" tools/plot_metrics.py "$OUT/dpo" "$OUT/adadpo" --labels DPO AdaDPO \
  --output "$OUT/comparison.png"
echo
echo "Metrics:    $OUT/dpo/metrics.jsonl  $OUT/adadpo/metrics.jsonl"
echo "Plot:       $OUT/comparison.png"
echo "Checkpoint: $OUT/adadpo/checkpoints/$(cat "$OUT/adadpo/checkpoints/latest")"

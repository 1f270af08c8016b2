#!/usr/bin/env bash
# One node, GPUS_PER_NODE processes (default 8): Llama-3-8B-Instruct AdaDPO by default.
#
#   bash examples/launch/single_node.sh                       # the 8B recipe on 8 GPUs
#   bash examples/launch/single_node.sh --dry-run             # layout + memory plan, no launch
#   GPUS_PER_NODE=4 bash examples/launch/single_node.sh --config R.yaml --set loss.beta=0.05
#
# Runs:  torchrun --standalone --nnodes 1 --nproc-per-node $GPUS_PER_NODE \
#            -m megatron_adadpo.train --config $CONFIG [--set KEY=VALUE ...]
# Variables: see common.sh (PYTHON, GPU, GPUS_PER_NODE, DRY_RUN, PLAN_CHECK, FORCE).
SCRIPT=single_node.sh
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
source "$REPO/examples/launch/common.sh"

CONFIG=${CONFIG:-$REPO/examples/recipes/llama3_8b_adadpo.yaml}
parse_args "$@"
require_int GPUS_PER_NODE

cmd=("$PYTHON" -m torch.distributed.run --standalone --nnodes 1
     --nproc-per-node "$GPUS_PER_NODE" -m "$ENTRY" --config "$CONFIG"
     ${TRAIN_ARGS[@]+"${TRAIN_ARGS[@]}"})
preflight 1 "${cmd[@]}"
cd "$REPO"
exec "${cmd[@]}"

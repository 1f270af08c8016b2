#!/usr/bin/env bash
# Multi-node without Slurm: run this same command on every node (any order); torchrun's c10d
# rendezvous on MASTER_ADDR:MASTER_PORT (the first node) gathers them into one job.
#
#   # on each of the 8 nodes:
#   NNODES=8 MASTER_ADDR=node001 bash examples/launch/multi_node.sh \
#       --config examples/recipes/llama3_70b_adadpo.yaml
#   NNODES=8 MASTER_ADDR=node001 bash examples/launch/multi_node.sh --dry-run --config ...
#
# Runs:  torchrun --nnodes $NNODES --nproc-per-node $GPUS_PER_NODE --rdzv-backend c10d \
#            --rdzv-endpoint $MASTER_ADDR:$MASTER_PORT --rdzv-id $RDZV_ID \
#            -m megatron_adadpo.train --config $CONFIG [--set KEY=VALUE ...]
# Required: NNODES, MASTER_ADDR (an address of the first node every node can reach).
# Optional: MASTER_PORT (29500), RDZV_ID (adadpo; change it per job on a shared host), GPUS_PER_NODE
# (8), NCCL/network settings as in docs/scaling.md ("Network environment"); common.sh for the rest.
SCRIPT=multi_node.sh
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
source "$REPO/examples/launch/common.sh"

CONFIG=${CONFIG:-$REPO/examples/recipes/llama3_70b_adadpo.yaml}
parse_args "$@"
require NNODES MASTER_ADDR
require_int NNODES GPUS_PER_NODE
MASTER_PORT=${MASTER_PORT:-29500}
RDZV_ID=${RDZV_ID:-adadpo}

cmd=("$PYTHON" -m torch.distributed.run --nnodes "$NNODES" --nproc-per-node "$GPUS_PER_NODE"
     --rdzv-backend c10d --rdzv-endpoint "$MASTER_ADDR:$MASTER_PORT" --rdzv-id "$RDZV_ID"
     --max-restarts 0 -m "$ENTRY" --config "$CONFIG" ${TRAIN_ARGS[@]+"${TRAIN_ARGS[@]}"})
preflight "$NNODES" "${cmd[@]}"
cd "$REPO"
exec "${cmd[@]}"

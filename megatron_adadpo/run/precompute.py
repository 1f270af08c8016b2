"""Precompute reference log-probs once: one forward-only pass of the reference model.

Visits the pairs in epoch 0's training order (same seed, same micro-batches as training, so the
values are bitwise those a resident reference would compute in the first epoch), completes the
last global batch by wrap-around, and writes ``[N, 2]`` per-pair sums tied to the dataset's
manifest identity, to the reference model (``consistency.reference_model``:
``reference.checkpoint`` when set, else the policy's start; ``reference.write_precomputed``) and
to ``loss.ld_alpha`` (LD-DPO's weighted sums). Training with ``reference.mode: precomputed``
then holds no reference model.

    python tools/precompute_reference.py --config RUN.yaml --output DIR [--eval] [--set k=v]
"""

from __future__ import annotations

import argparse
import math

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from megatron_adadpo.config import Config, load_config
from megatron_adadpo.platform import cpu
from megatron_adadpo.platform.distributed import destroy, init_distributed, init_model_parallel
from megatron_adadpo.platform.machine import probe_machine
from megatron_adadpo.platform.parallel import Parallel
from megatron_adadpo.resolve import resolve
from megatron_adadpo.run.batches import step_batches
from megatron_adadpo.run.datasets import load_dataset
from megatron_adadpo.run.reference import attach_forward_logps, freeze, write_precomputed
from megatron_adadpo.run.state.consistency import reference_model
from megatron_adadpo.run.step import StepContext
from megatron_adadpo.run.trainer import build_reference_model
from megatron_adadpo.status import log as status


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Precompute reference log-probs to disk")
    parser.add_argument("--config", required=True)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--output", required=True, help="directory for the reference values")
    parser.add_argument("--eval", action="store_true", help="the eval.inputs pairs instead")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    config = load_config(args.config, [*args.set, "reference.mode=resident"])
    cpu.activate()  # Megatron on a machine without CUDA; a no-op on GPU hosts
    init_distributed(config.train.distributed_timeout_minutes)
    run = resolve(config, dist.get_world_size(), probe_machine())
    timeout = config.train.distributed_timeout_minutes
    parallel = init_model_parallel(config.execution, config.train.seed, timeout)
    dataset = load_dataset(config, eval_split=args.eval)
    model = freeze(build_reference_model(config, run))  # reference.checkpoint, or the start
    context = StepContext.from_config(config, run, parallel)
    batches = step_batches(config, run, dataset, parallel, 0, drop_last=False)
    steps = math.ceil(len(dataset) / config.train.global_batch_size)
    ids, sums = [], []
    logging = parallel.is_logging_rank
    for _ in tqdm(range(steps), desc="reference log-probs", disable=not logging):
        micro = batches.next_step()
        attach_forward_logps(model, micro, context)
        for batch in micro:
            if batch.reference_logps is not None:  # the last pipeline stage
                ids.append(batch.pair_ids.cpu())
                sums.append(batch.reference_logps.view(-1, 2).cpu())
    _gather_and_write(args.output, dataset, ids, sums, config, parallel)
    destroy()


def _gather_and_write(
    output: str, dataset, ids: list, sums: list, config: Config, parallel: Parallel
):
    """Collect every DP rank's values on the logging rank and write them."""
    if not parallel.is_last_stage:
        dist.barrier()
        return
    local = (torch.cat(ids), torch.cat(sums)) if ids else None
    parts = [None] * parallel.dp_size
    dist.all_gather_object(parts, local, group=parallel.dp)
    if parallel.is_logging_rank:
        values = np.full((len(dataset), 2), np.nan, dtype=np.float32)
        for pair_ids, pair_sums in parts:
            values[pair_ids.numpy()] = pair_sums.numpy()
        missing = int(np.isnan(values).any(axis=1).sum())
        if missing:
            raise RuntimeError(f"{missing} pairs received no reference value")
        # LD-DPO weights the sums: the trainer refuses a file made with another ld_alpha
        extra = {"reference_model": reference_model(config), "ld_alpha": config.loss.ld_alpha}
        write_precomputed(output, values, dataset.identity, extra)
        status.info("wrote reference log-probs of %d pairs to %s", len(dataset), output)
    dist.barrier()

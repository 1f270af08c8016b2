"""Precompute reference log-probs once: one forward-only pass of the reference model.

Visits the pairs in epoch 0's training order (same seed, same micro-batches as training, so the
values are bitwise those a resident reference would compute in the first epoch), completes the
last global batch by wrap-around, and writes ``[N, 2]`` per-pair sums tied to the dataset's
manifest identity (``reference.write_precomputed``). Training with ``reference.mode:
precomputed`` then holds no reference model.
"""

from __future__ import annotations

import argparse
import math

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from megatron_adadpo import parallel, train
from megatron_adadpo.config import check_world, load_config
from megatron_adadpo.megatron_api import parallel_state
from megatron_adadpo.metrics import is_logging_rank
from megatron_adadpo.reference import write_precomputed
from megatron_adadpo.step import attach_resident_reference


def precompute(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Precompute reference log-probs to disk")
    parser.add_argument("--config", required=True)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--output", required=True, help="directory for the reference values")
    parser.add_argument("--eval", action="store_true", help="the eval.inputs pairs instead")
    args = parser.parse_args(argv)
    c = load_config(args.config, [*args.set, "reference.mode=resident"])
    parallel.init_distributed()
    dp = check_world(c, dist.get_world_size())
    e = c.execution
    parallel.init_model_parallel(parallel.Layout(e.tp, e.pp, e.vpp, e.cp), seed=c.train.seed)
    dataset = train.load_data(c, eval_split=args.eval)
    model = train.build_policy(c)  # the reference is the initial policy
    for chunk in model:
        chunk.eval()
        chunk.requires_grad_(False)
    batches = train.build_batches(c, dataset, dp, consumed=0, drop_last=False)
    steps = math.ceil(len(dataset) / c.train.global_batch_size)
    ids, sums = [], []
    for _ in tqdm(range(steps), desc="reference log-probs", disable=not is_logging_rank()):
        step_batches = batches.next_step()
        attach_resident_reference(model, step_batches, c.model.vocab_size)
        for b in step_batches:
            if "reference_logps" in b:
                ids.append(b["pair_ids"].cpu())
                sums.append(b["reference_logps"].view(-1, 2).cpu())
    _gather_and_write(args.output, dataset, ids, sums, c)
    parallel.destroy()


def _gather_and_write(output: str, dataset, ids: list, sums: list, c) -> None:
    """Collect every DP rank's values on the logging rank and write them."""
    if not parallel_state.is_pipeline_last_stage(ignore_virtual=True):
        dist.barrier()
        return
    local = (torch.cat(ids), torch.cat(sums)) if ids else None
    parts = [None] * parallel_state.get_data_parallel_world_size()
    dist.all_gather_object(parts, local, group=parallel_state.get_data_parallel_group())
    if is_logging_rank():
        values = np.full((len(dataset), 2), np.nan, dtype=np.float32)
        for pair_ids, pair_sums in parts:
            values[pair_ids.numpy()] = pair_sums.numpy()
        missing = int(np.isnan(values).any(axis=1).sum())
        if missing:
            raise RuntimeError(f"{missing} pairs received no reference value")
        extra = {"init_checkpoint": c.train.init_checkpoint, "seed": c.train.seed}
        write_precomputed(output, values, dataset.identity, extra)
        print(f"[megatron_adadpo] wrote reference log-probs of {len(dataset)} pairs to {output}")
    dist.barrier()

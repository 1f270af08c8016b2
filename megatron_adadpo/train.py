"""AdaDPO / DPO-family training with Megatron-Core.

    torchrun --nproc-per-node N -m megatron_adadpo.train --config FILE.yaml [--set a.b=c ...]

config -> distributed init -> data -> policy (+ reference) -> DDP, optimizer, schedule ->
resume -> loop (micro-batches -> reference log-probs -> schedule fwd/bwd -> optimizer ->
metrics -> eval -> checkpoint) -> final checkpoint. SIGTERM (Slurm preemption) saves and exits.
"""

from __future__ import annotations

import argparse
import signal
import sys
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from megatron_adadpo import checkpointing, parallel
from megatron_adadpo.config import Config, check_world, load_config
from megatron_adadpo.data import (
    PreferenceSampler,
    collate_pairs,
    load_preference_dataset,
    pad_multiple,
)
from megatron_adadpo.hardware import peak_flops_per_device
from megatron_adadpo.init import init_layout_invariant
from megatron_adadpo.losses import accumulate_metrics, reduce_metrics
from megatron_adadpo.megatron_api import parallel_state
from megatron_adadpo.metrics import MetricsLogger, step_values
from megatron_adadpo.model import build_model
from megatron_adadpo.optimization import build_optimizer, build_scheduler, wrap_ddp
from megatron_adadpo.reference import PrecomputedReference, ResidentReference
from megatron_adadpo.step import evaluate, train_step


@dataclass
class Batches:
    """Turns sampler index lists into collated micro-batches on the training device."""

    dataset: object
    sampler: PreferenceSampler
    pad_id: int
    multiple: int
    fixed_length: int | None

    def __post_init__(self):
        self.iterator = iter(self.sampler)

    def next_step(self) -> list[dict]:
        device = torch.cuda.current_device() if torch.cuda.is_available() else "cpu"
        out = []
        for _ in range(self.sampler.num_microbatches):
            examples = [self.dataset[i] for i in next(self.iterator)]
            batch = collate_pairs(examples, self.pad_id, self.multiple, self.fixed_length)
            out.append({k: v.to(device) for k, v in batch.items() if v is not None})
        return out


def build_batches(c: Config, dataset, dp: int, consumed: int, drop_last: bool = True) -> Batches:
    """Training order (reshuffled per epoch by ``train.seed``); ``drop_last=False`` visits every
    pair, completing the last global batch by wrapping around (reference precompute)."""
    e = c.execution
    sampler = PreferenceSampler(
        num_pairs=len(dataset),
        global_batch_size=c.train.global_batch_size,
        micro_batch_size=c.train.micro_batch_size,
        dp_rank=parallel_state.get_data_parallel_rank(),
        dp_size=dp,
        seed=c.train.seed,
        consumed_samples=consumed,
        shuffle=True,
        drop_last=drop_last,
    )
    multiple = pad_multiple(e.tp, e.cp, e.sequence_parallel)
    fixed = c.data.max_length if e.pp > 1 else None  # pipeline p2p needs fixed shapes
    return Batches(dataset, sampler, dataset.pad_id, multiple, fixed)


def load_data(c: Config, eval_split: bool = False):
    """Tokenize / load on rank 0 first (it fills the cache), then everyone else."""
    data = c.data.replace(inputs=tuple(c.eval.inputs)) if eval_split else c.data
    if dist.get_rank() == 0:
        dataset = load_preference_dataset(data)
    dist.barrier()
    if dist.get_rank() != 0:
        dataset = load_preference_dataset(data)
    return dataset


def build_policy(c: Config) -> list:
    chunks = build_model(c.model, c.execution)
    if c.train.init_checkpoint:
        checkpointing.load_model(chunks, c.train.init_checkpoint, c.model)
    elif c.train.init_method == "layout_invariant":
        init_layout_invariant(chunks, c.train.seed, c.model.vocab_size)
    return chunks


def build_reference(c: Config, policy_chunks: list, dataset, eval_dataset=None):
    """(train reference, eval reference): resident model, precomputed values, or none."""
    if c.reference.mode == "resident":
        ref = ResidentReference(c.model, c.execution, policy_chunks)
        return ref, ref
    if c.reference.mode == "precomputed":
        train_ref = PrecomputedReference(c.reference.path, dataset.identity)
        eval_ref = None
        if eval_dataset is not None and c.reference.eval_path:
            eval_ref = PrecomputedReference(c.reference.eval_path, eval_dataset.identity)
        return train_ref, eval_ref
    return None, None


def train_iters(c: Config, dataset) -> int:
    if c.train.train_iters is not None:
        return c.train.train_iters
    return c.train.epochs * (len(dataset) // c.train.global_batch_size)


class _Preemption:
    """Remembers a SIGTERM so the loop can save and leave at the next step boundary."""

    def __init__(self):
        self.requested = False
        signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        self.requested = True


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    c = load_config(args.config, args.set)  # every config check before any allocation
    parallel.init_distributed()
    dp = check_world(c, dist.get_world_size())
    e = c.execution
    parallel.init_model_parallel(parallel.Layout(e.tp, e.pp, e.vpp, e.cp), seed=c.train.seed)
    if dist.get_rank() == 0:
        print(f"[megatron_adadpo] resolved config:\n{c.to_yaml()}", flush=True)
    dataset = load_data(c)
    eval_set = load_data(c, eval_split=True) if c.eval.interval else None
    total = train_iters(c, dataset)
    policy_chunks = build_policy(c)
    reference, eval_reference = build_reference(c, policy_chunks, dataset, eval_set)
    policy = wrap_ddp(policy_chunks, c.optimizer)
    optimizer = build_optimizer(policy, c.optimizer, e.bf16)
    scheduler = build_scheduler(optimizer, c.optimizer, total, c.train.global_batch_size)
    state = {"step": 0, "consumed_samples": 0, "dataset_identity": dataset.identity}
    resume = checkpointing.latest_checkpoint(c.logging.run_dir) if c.checkpoint.resume else None
    if resume is not None:
        state = checkpointing.load_training(resume, policy, optimizer, scheduler, c.model)
        check_resume_data(state, dataset, resume)
        if dist.get_rank() == 0:
            print(f"[megatron_adadpo] resumed from {resume} at step {state['step']}", flush=True)
    batches = build_batches(c, dataset, dp, state["consumed_samples"])
    evaluator = None
    if eval_set is not None:
        evaluator = Evaluator(c, policy, eval_reference, eval_set, dp)
    run_loop(c, policy, optimizer, scheduler, reference, batches, state, total, dp, evaluator)
    parallel.destroy()


def check_resume_data(state: dict, dataset, where) -> None:
    """Refuse to resume on other data or another tokenisation (sample order would differ)."""
    if state.get("dataset_identity") != dataset.identity:
        raise ValueError(
            f"checkpoint {where} was trained on dataset {str(state.get('dataset_identity'))[:16]}"
            f"... but the configured data is {dataset.identity[:16]}... (other inputs, tokenizer "
            "or truncation settings); use the original data, or a new logging.run_dir"
        )


class Evaluator:
    """Periodic loss metrics on held-out pairs (every pair once, fixed order)."""

    def __init__(self, c: Config, policy: list, reference, dataset, dp: int):
        self.c, self.policy, self.reference = c, policy, reference
        self.dataset, self.dp = dataset, dp
        pairs = min(len(dataset), c.eval.max_pairs or len(dataset))
        self.steps = max(1, pairs // c.train.global_batch_size)

    def __call__(self) -> dict:
        batches = build_batches(self.c, self.dataset, self.dp, consumed=0, drop_last=False)
        metrics = []
        for _ in range(self.steps):
            step_batches = batches.next_step()
            if self.reference is not None:
                self.reference.attach(step_batches)
            metrics.append(
                evaluate(self.policy, step_batches, self.c.loss, self.c.model.vocab_size)
            )
        return accumulate_metrics(m for m in metrics if m)


def run_loop(
    c: Config, policy, optimizer, scheduler, reference, batches, state, total, dp, evaluator=None
):
    logger = MetricsLogger(c.logging.run_dir, total, c.logging.tensorboard, c.logging.progress)
    preemption = _Preemption()
    peak = _peak_flops(c) * dist.get_world_size()
    micro_per_step = batches.sampler.num_microbatches * dp
    mult = 4.0 if c.reference.mode == "resident" else 3.0  # fwd+bwd (+ reference forward)
    config_yaml = c.to_yaml()

    def save():
        checkpointing.save_training(
            c.logging.run_dir,
            state["step"],
            policy,
            optimizer,
            scheduler,
            state,
            c.model,
            config_yaml,
        )

    while state["step"] < total:
        start = time.monotonic()
        step_batches = batches.next_step()
        if reference is not None:
            reference.attach(step_batches)
        result = train_step(
            policy,
            optimizer,
            scheduler,
            step_batches,
            c.loss,
            c.model.vocab_size,
            c.train.global_batch_size,
            nan_policy=c.train.nan_policy,
            step=state["step"] + 1,
            stop_requested=preemption.requested,
        )
        state["step"] += 1
        state["consumed_samples"] += c.train.global_batch_size
        elapsed = time.monotonic() - start
        if state["step"] % c.logging.log_interval == 0 or state["step"] == total:
            seq = step_batches[0]["tokens"].shape[1]
            seqs = 2 * c.train.global_batch_size
            flops = mult * c.model.forward_flops(seq, c.execution.tp) * seqs
            values = step_values(
                result.metrics,
                result.grad_norm,
                optimizer.param_groups[0]["lr"],
                elapsed,
                c.train.global_batch_size,
                micro_per_step,
                flops,
                peak,
            )
            values["skipped"] = float(result.skipped)
            logger.log(state["step"], values)
        if evaluator is not None and state["step"] % c.eval.interval == 0:
            eval_metrics = evaluator()
            if eval_metrics:
                values = reduce_metrics(eval_metrics)
                values.pop("batch/tokens", None)
                logger.log(state["step"], values, prefix="eval")
        interval = c.checkpoint.save_interval
        if result.stop:
            save()
            if dist.get_rank() == 0:
                print(f"[megatron_adadpo] SIGTERM: saved step {state['step']}, exiting", flush=True)
            break
        if interval and state["step"] % interval == 0 and state["step"] < total:
            save()
    else:
        if c.checkpoint.save_at_end:
            save()
    logger.close()


def _peak_flops(c: Config) -> float:
    """Peak dense FLOP/s of one device: ``logging.peak_tflops`` or the hardware table (bf16)."""
    if c.logging.peak_tflops:
        return c.logging.peak_tflops * 1e12
    return peak_flops_per_device()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="YAML run configuration")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set loss.beta=0.05 (repeatable)",
    )
    return parser.parse_args(argv)


if __name__ == "__main__":
    main(sys.argv[1:])

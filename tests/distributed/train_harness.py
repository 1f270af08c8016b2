"""Run the real trainer (``megatron_adadpo.train``) inside forked gloo ranks, and read results."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from megatron_adadpo import train
from megatron_adadpo.model.initialization import global_param_names
from megatron_adadpo.platform.megatron import parallel_state

REPO = Path(__file__).resolve().parents[2]

TINY_OVERRIDES = [
    "model.num_layers=4",
    "model.hidden_size=64",
    "model.ffn_hidden_size=128",
    "model.num_attention_heads=4",
    "model.num_query_groups=2",
    "model.vocab_size=640",
    "model.max_position_embeddings=128",
    "model.make_vocab_size_divisible_by=32",
    "execution.tp=1",
    "data.max_length=64",
    "data.max_prompt_length=32",
    "train.global_batch_size=8",
    "train.micro_batch_size=2",
    "train.train_iters=5",
    "train.init_method=layout_invariant",
    "optimizer.lr=1e-3",
    "optimizer.warmup_fraction=0.0",
    "optimizer.decay_style=constant",
    "logging.progress=false",
    "checkpoint.save_at_end=false",
    "eval.interval=0",
]


def overrides(run_dir: Path, cache_dir: Path, extra: list[str]) -> list[str]:
    return [
        *TINY_OVERRIDES,
        f"logging.run_dir={run_dir}",
        f"data.cache_dir={cache_dir}",
        *extra,
    ]


QUICKSTART = str(REPO / "examples/configs/quickstart.yaml")


def argv(run_dir: Path, cache_dir: Path, *extra: str) -> list[str]:
    """The trainer's command line: the quickstart config, ``TINY_OVERRIDES`` and ``extra``."""
    out = ["--config", QUICKSTART]
    for item in overrides(run_dir, cache_dir, list(extra)):
        out += ["--set", item]
    return out


def run_trainer(rank: int, world: int, argv: list[str]) -> None:
    """Rank body: the trainer's own ``main``."""
    train.main(argv)


def kill_in_step(rank: int, world: int, argv: list[str], kill_step: int) -> None:
    """Rank body: the trainer's ``main``, SIGKILL-ed in the middle of step ``kill_step``."""
    from megatron_adadpo.run import trainer

    real_train_step = trainer.train_step

    def dying_train_step(*a, **kw):
        if kw["step"] == kill_step:
            os.kill(os.getpid(), signal.SIGKILL)
        return real_train_step(*a, **kw)

    trainer.train_step = dying_train_step
    train.main(argv)


def sigterm_in(rank: int, world: int, argv: list[str], where: str, call: int) -> bool:
    """Rank body: the trainer's ``main``, the last rank sending itself SIGTERM (the others never
    get it) inside the ``call``-th call of ``where``: "train_step", "save" (a checkpoint save)
    or "reference" (the resident reference's forward, in training and evaluation). Returns
    whether the run stopped on SIGTERM (its fast exit, ``cli.leave_now``, is not taken here,
    so that the rank can report)."""
    from megatron_adadpo import cli
    from megatron_adadpo.run import trainer
    from megatron_adadpo.run.reference import ResidentReference

    owner, name = {
        "train_step": (trainer, "train_step"),
        "save": (trainer.checkpoints, "save_training"),
        "reference": (ResidentReference, "attach"),
    }[where]
    real, calls, stopped = getattr(owner, name), [], []

    def signalled(*a, **kw):
        calls.append(1)
        if len(calls) == call and rank == world - 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(*a, **kw)

    setattr(owner, name, signalled)
    cli.leave_now = lambda status=0: stopped.append(status)
    train.main(argv)
    return stopped == [0]


def read_metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def losses(run_dir: Path) -> list[float]:
    return [r["loss"] for r in read_metrics(run_dir) if r["split"] == "train"]


def first_step_gradients(rank: int, world: int, argv: list[str]) -> dict | None:
    """Run the schedule's forward+backward of step 1 and return full gradients on rank 0.

    Gradients are un-sharded over TP (concatenated along each parameter's partition dim; the
    gated fc1's ``[gate; up]`` halves handled), collected over pipeline stages, keyed by global
    parameter name, in fp64 — comparable across every layout.
    """
    result = first_step(rank, world, argv)
    return None if result is None else result["grads"]


def first_step(rank: int, world: int, argv: list[str]) -> dict | None:
    """``first_step_gradients`` plus, on rank 0, the step's per-sequence values: ``{"grads",
    "losses" (per pair, every micro-batch of the last stage's DP ranks), "metrics" (the step's
    reduced metrics), "reference_logps" (per sequence, or None)}``."""
    from functools import partial

    from megatron_adadpo.config import load_config
    from megatron_adadpo.run.step import forward_step, reduce_reports, run_schedule
    from megatron_adadpo.run.trainer import Trainer

    args = train.parse_args(argv)
    config = load_config(args.config, args.set)
    trainer = Trainer(config)  # installs finalize_model_grads through the optimizer
    batches = trainer.batches.next_step()
    if trainer.reference is not None:
        trainer.reference.attach(batches)
    reports = run_schedule(trainer.policy, batches, partial(forward_step, trainer.context), False)
    metrics = reduce_reports(reports, trainer.parallel.dp)
    local = {
        "losses": [r["losses"] for r in reports],
        "metrics": {k: v.double() for k, v in metrics.items()},
        "reference_logps": [b.reference_logps for b in batches] if reports else [],
    }
    grads = _gather_full_grads(trainer.policy, config.model.vocab_size)
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, local)
    if dist.get_rank() != 0:
        return None
    merged = {"grads": grads, "losses": [], "metrics": {}, "reference_logps": []}
    for part in gathered:
        merged["losses"] += part["losses"]
        merged["metrics"] = merged["metrics"] or part["metrics"]
        merged["reference_logps"] += part["reference_logps"]
    return merged


def train_capturing_step_one(rank: int, world: int, argv: list[str]) -> dict:
    """Run the real trainer to the end and capture step 1 on the way.

    Returns ``{"grads": ...}`` (full step-1 gradients on rank 0 as ``first_step_gradients``
    gives them, taken when the optimizer steps: after Megatron's grad finalisation, before
    clipping) and ``"micro_batches"``: this rank's step-1 micro-batches as
    ``(pair_ids, rows, segment_ids or None)`` on the host.
    """
    from megatron_adadpo.config import load_config
    from megatron_adadpo.run.trainer import Trainer

    args = train.parse_args(argv)
    config = load_config(args.config, args.set)
    trainer = Trainer(config)
    captured: dict = {}
    next_step, optimizer_step = trainer.batches.next_step, trainer.optimizer.step

    def capturing_next_step():
        batches = next_step()
        captured.setdefault("micro_batches", [_layout(b) for b in batches])
        return batches

    def capturing_optimizer_step(*a, **kw):
        if "grads" not in captured:
            captured["grads"] = _gather_full_grads(trainer.policy, config.model.vocab_size)
        return optimizer_step(*a, **kw)

    trainer.batches.next_step = capturing_next_step
    trainer.optimizer.step = capturing_optimizer_step
    trainer.train()
    return captured


def _layout(batch) -> tuple:
    segments = batch.segment_ids
    return (
        batch.pair_ids.tolist(),
        batch.tokens.shape[0],
        None if segments is None else segments.cpu(),
    )


def train_checked(rank: int, world: int, argv: list[str]) -> dict:
    """Run the real trainer to the end; check Megatron DDP's parameter all-gathers after every
    step and return the final parameters.

    Returns ``{"pending": [(step, chunk, bucket group)] whose all-gather was dispatched and
    never waited for (``param_gather_handle`` set after the step: the next step's
    ``start_param_sync`` asserts on it), "own_bucket": whether the untied output layer sits in a
    DDP bucket group of its own (None where it has none on this rank), "params": the full
    parameters on rank 0 as ``first_step_gradients`` gives gradients (after Megatron's
    ``force_param_sync``)}``.
    """
    from megatron_adadpo.config import load_config
    from megatron_adadpo.platform.megatron_optimizer import force_param_sync
    from megatron_adadpo.run import trainer as trainer_module

    args = train.parse_args(argv)
    config = load_config(args.config, args.set)
    trainer = trainer_module.Trainer(config)
    pending: list = []
    real_train_step = trainer_module.train_step

    def checked_train_step(*a, **kw):
        result = real_train_step(*a, **kw)
        pending.extend((kw["step"], *where) for where in pending_param_gathers(trainer.policy))
        return result

    trainer_module.train_step = checked_train_step
    try:
        trainer.train()
    finally:
        trainer_module.train_step = real_train_step
    own_bucket = _output_layer_alone(trainer.policy)
    force_param_sync(trainer.policy, trainer.optimizer)
    params = _gather_full(trainer.policy, config.model.vocab_size, lambda p: p)
    return {"pending": pending, "own_bucket": own_bucket, "params": params}


def pending_param_gathers(policy: list) -> list[tuple[int, int]]:
    """``(chunk, bucket group)`` of every DDP bucket group with an all-gather in flight."""
    return [
        (c, g)
        for c, chunk in enumerate(policy)
        for g, group in enumerate(chunk.bucket_groups)
        if group.param_gather_handle is not None
    ]


def _output_layer_alone(policy: list) -> bool | None:
    """Whether the output layer's own weight is the only parameter of its bucket group."""
    for chunk in policy:
        layer = getattr(chunk.module, "output_layer", None)
        weight = None if layer is None else layer.weight
        if weight is not None and weight in chunk.param_to_bucket_group:
            params = [p for b in chunk.param_to_bucket_group[weight].buckets for p in b.params]
            return len(params) == 1 and params[0] is weight
    return None


def _gather_full_grads(policy: list, vocab_size: int) -> dict | None:
    return _gather_full(policy, vocab_size, lambda p: p.main_grad, trainable_only=True)


# TP shards of these hold [gate_shard; up_shard] (the gated MLP's fc1 and its LoRA B)
GATED_FC1 = ("linear_fc1.weight", "linear_fc1.base.weight", "linear_fc1.lora_b")


def _gather_full(policy: list, vocab_size: int, tensor_of, trainable_only=False) -> dict | None:
    """``tensor_of(param)`` of every parameter (``trainable_only``: of those with gradients,
    not a LoRA run's frozen base), un-sharded over TP (see ``first_step_gradients``) and
    collected over pipeline stages, fp64, on rank 0."""
    tp = parallel_state.get_tensor_model_parallel_world_size()
    tp_group = parallel_state.get_tensor_model_parallel_group()
    local = {}
    for chunk in policy:
        for name, param in global_param_names(chunk.module).items():
            if trainable_only and not param.requires_grad:
                continue
            grad = tensor_of(param).detach().double()
            if getattr(param, "tensor_model_parallel", False) and tp > 1:
                parts = [torch.empty_like(grad) for _ in range(tp)]
                dist.all_gather(parts, grad.contiguous(), group=tp_group)
                dim = param.partition_dim
                if name.endswith(GATED_FC1):
                    halves = [p.chunk(2, dim=dim) for p in parts]
                    grad = torch.cat([torch.cat([h[i] for h in halves], dim) for i in (0, 1)], dim)
                else:
                    grad = torch.cat(parts, dim=dim)
            if "word_embeddings" in name or "output_layer" in name:
                grad = grad[:vocab_size]
            local[name] = grad
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, local)
    if dist.get_rank() != 0:
        return None
    merged = {}
    for part in gathered:
        for name, grad in part.items():
            merged.setdefault(name, grad)
    return merged


# metrics.jsonl keys that depend on how a step ran (speed, padding), not on what it computed
NOT_COMPARED = ("throughput/", "step_time_s", "step", "split", "skipped")
# tied embeddings on a pipeline: the last stage's output weight is a copy of the embedding
TIED_COPY, TIED_WITH = "output_layer.weight", "embedding.word_embeddings.weight"


def assert_same_rows(rows: list, want_rows: list, label: str) -> None:
    """Every logged metric of every step equal (rtol = atol = 1e-5: rewards are beta x
    differences of ~50-nat log-prob sums, which agree to ~3e-7 relative; their difference can
    be ~1e-6 absolute near zero), speed and padding apart (``NOT_COMPARED``)."""
    assert len(rows) == len(want_rows), f"{label}: {len(rows)} steps vs {len(want_rows)}"
    for step, (row, ref) in enumerate(zip(rows, want_rows, strict=True), start=1):
        for key, value in ref.items():
            if key.startswith(NOT_COMPARED) or key in NOT_COMPARED:
                continue
            if step == 1 and key == "rewards/accuracies":
                # policy == reference: h_w, h_l are 0 up to rounding (CPU BLAS may round the
                # policy's and the reference's copies of the weights apart by ~1e-7), so
                # mean[h_w > h_l] compares noise; from step 2 on margins are real.
                continue
            assert row[key] == pytest.approx(value, rel=1e-5, abs=1e-5), (
                f"{label}: step {step} {key} {row[key]} vs {value}"
            )


WEIGHT_STD = 0.02  # model.init_method_std's default: a weight's norm is ~0.02 * sqrt(numel)


def _norm_of(name: str, value: torch.Tensor, zero_start: tuple) -> torch.Tensor:
    """The norm a parameter's error is relative to: its own, at least a weight's for the
    parameters named ``*zero_start``."""
    norm = value.norm()
    if zero_start and name.endswith(zero_start):
        norm = norm.clamp(min=WEIGHT_STD * value.numel() ** 0.5)
    return norm.clamp(min=1e-30)


def assert_same_run(
    got: dict, want: dict, rows: list, want_rows: list, label: str, zero_start: tuple = ()
) -> None:
    """A run equals the plain run: every logged metric of every step (rtol = atol = 1e-5) and
    every final parameter (relative norm error <= 1e-5); ``got`` / ``want`` are
    ``train_checked``'s rank-0 results. The parameters named ``*zero_start`` (that start at 0:
    their norm is their few updates alone, e.g. LoRA's B) are compared against a weight's norm
    (``WEIGHT_STD``), not their own."""
    assert_same_rows(rows, want_rows, label)
    params, refs = got["params"], {name: name for name in want["params"]}
    if TIED_COPY not in refs and TIED_COPY in params:  # tied, the last stage's copy
        refs[TIED_COPY] = TIED_WITH
    assert set(params) == set(refs), f"{label}: parameters {sorted(params)}"
    errors = {
        name: float((value - want["params"][refs[name]]).norm() / _norm_of(name, value, zero_start))
        for name, value in params.items()
    }
    worst = max(errors, key=errors.get)
    print(f"[assert_same_run] {label}: worst parameter {worst} {errors[worst]:.2e}")
    assert errors[worst] <= 1e-5, f"{label}: final {worst} differs by {errors[worst]:.2e}"

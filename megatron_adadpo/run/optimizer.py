"""Megatron DDP, optimizer and learning-rate schedule for the policy chunks."""

from __future__ import annotations

import math

import torch

from megatron_adadpo.config import OptimizerSection
from megatron_adadpo.platform.megatron import (
    DistributedDataParallel,
    DistributedDataParallelConfig,
    OptimizerParamScheduler,
    finalize_model_grads,
)
from megatron_adadpo.platform.megatron_optimizer import (
    OPTIMIZER_GROUP_KEYS,
    OptimizerConfig,
    get_megatron_optimizer,
)


def wrap_ddp(chunks: list[torch.nn.Module], opt: OptimizerSection) -> list:
    """Wrap each chunk in Megatron's DDP (contiguous fp32 grad buffers, bucketed reduce).

    The first chunk of a virtual pipeline owns bucketing; later chunks disable it, as in
    Megatron-LM, so overlapped reduction follows the interleaved schedule. With
    ``overlap_param_gather`` under the interleaved schedule the parameter all-gathers are
    aligned across pipeline stages (``align_param_gather``): the schedule dispatches them
    through ``param_sync_func`` (installed by ``build_optimizer``) and DDP's forward hooks then
    only wait for them, as Megatron-LM sets both together (``megatron/training/arguments.py``
    turns ``align_param_gather`` off without virtual stages; ``training.py`` installs
    ``param_sync_func`` only with it). ``optimizer.ddp_bucket_size`` is Megatron's
    ``bucket_size`` (parameters per bucket; None: its default ``max(40M, 1M * dp)``, and one
    bucket per chunk without ``overlap_grad_reduce``).
    """
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=opt.overlap_grad_reduce,
        overlap_param_gather=opt.overlap_param_gather,
        align_param_gather=opt.overlap_param_gather and len(chunks) > 1,
        use_distributed_optimizer=opt.use_distributed_optimizer,
        check_for_nan_in_grad=False,
        bucket_size=opt.ddp_bucket_size,  # None: Megatron's default (one bucket without overlap)
    )
    wrapped = []
    for i, chunk in enumerate(chunks):
        wrapped.append(
            DistributedDataParallel(
                config=chunk.config,
                ddp_config=ddp_config,
                module=chunk,
                disable_bucketing=i > 0,
            )
        )
    return wrapped


def build_optimizer(policy: list, opt: OptimizerSection, bf16: bool):
    """``get_megatron_optimizer`` (AdamW; distributed when configured) + schedule hooks."""
    config = OptimizerConfig(
        optimizer="adam",
        lr=opt.lr,
        min_lr=opt.min_lr,
        weight_decay=opt.weight_decay,
        adam_beta1=opt.adam_beta1,
        adam_beta2=opt.adam_beta2,
        adam_eps=opt.adam_eps,
        clip_grad=opt.clip_grad,
        bf16=bf16,
        params_dtype=torch.bfloat16 if bf16 else torch.float32,
        use_distributed_optimizer=opt.use_distributed_optimizer,
    )
    optimizer = get_megatron_optimizer(config, policy)
    model_config = policy[0].config
    model_config.finalize_model_grads_func = finalize_model_grads
    model_config.grad_scale_func = optimizer.scale_loss
    if opt.overlap_grad_reduce:  # let the schedule start grad reduction during backward
        model_config.no_sync_func = _per_chunk([c.no_sync for c in policy])
        model_config.grad_sync_func = _per_chunk([c.start_grad_sync for c in policy])
    if policy[0].ddp_config.align_param_gather:  # the schedule dispatches the all-gathers
        model_config.param_sync_func = _per_chunk([c.start_param_sync for c in policy])
    return optimizer


def _per_chunk(funcs: list):
    """Megatron's schedules take one function, or a list with virtual pipeline stages."""
    return funcs if len(funcs) > 1 else funcs[0]


def build_scheduler(
    optimizer,
    opt: OptimizerSection,
    train_iters: int,
    global_batch_size: int,
    override: bool = False,
) -> OptimizerParamScheduler:
    """Warm-up then cosine (or linear / constant) decay, counted in samples (pairs).

    ``override``: a loaded checkpoint keeps only its step count and this schedule applies from
    there (Megatron's ``override_opt_param_scheduler``); otherwise ``run/state/resume.py`` refuses a
    saved schedule that differs from this one.
    """
    total = train_iters * global_batch_size
    warmup = int(math.floor(opt.warmup_fraction * train_iters)) * global_batch_size
    return OptimizerParamScheduler(
        optimizer,
        init_lr=0.0 if warmup else opt.lr,
        max_lr=opt.lr,
        min_lr=opt.min_lr,
        lr_warmup_steps=warmup,
        lr_decay_steps=max(total, 1),
        lr_decay_style=opt.decay_style,
        start_wd=opt.weight_decay,
        end_wd=opt.weight_decay,
        wd_incr_steps=max(total, 1),
        wd_incr_style="constant",
        override_opt_param_scheduler=override,
        use_checkpoint_opt_param_scheduler=not override,
    )


# Per-param-group schedule values Megatron's optimizer carries (``get_megatron_optimizer``'s
# param groups) and ``OptimizerParamScheduler.get_lr`` prefers over its own.
GROUP_SCHEDULE_KEYS = ("max_lr", "min_lr")


def adopt_group_schedules(optimizer, loaded: dict) -> None:
    """Give a loaded optimizer state's param groups this optimizer's (the config's) schedule
    values, in place, before ``optimizer.load_state_dict(loaded)``.

    A saved group g_saved pairs with the fresh group g whose Megatron identifier
    (``OPTIMIZER_GROUP_KEYS``: wd_mult, lr_mult, expert / decoupled flags, ...) is equal outside
    ``GROUP_SCHEDULE_KEYS``; then g_saved[k] := g[k] for k in ``GROUP_SCHEDULE_KEYS``.
    Megatron's load matches groups by that identifier, which from megatron-core 0.19 includes
    ``max_lr`` / ``min_lr``: a changed ``optimizer.lr`` would otherwise fail the load ("Could
    not find parameter group with key") and on 0.16 the load would bring back the saved
    learning rate. Without ``checkpoint.override_scheduler`` the values are already equal
    (``run/state/resume.py`` ``check_schedule`` refused others). Unpaired groups are left to
    Megatron's own error.
    """
    parts = getattr(optimizer, "chained_optimizers", [optimizer])
    for part, saved_groups in zip(parts, _saved_group_lists(loaded, len(parts)), strict=True):
        fresh = {_structure(g): g for g in part.param_groups}
        for saved in saved_groups:
            current = fresh.get(_structure(saved))
            if current is not None:
                saved.update({k: current[k] for k in GROUP_SCHEDULE_KEYS if k in current})


def _structure(group: dict) -> tuple:
    """A param group's Megatron identifier without the schedule values (NeMo's ``pre_`` alias
    as in Megatron's own matching)."""
    keys = [k for k in OPTIMIZER_GROUP_KEYS if k not in GROUP_SCHEDULE_KEYS]
    return tuple(group.get(k, group.get(f"pre_{k}")) for k in keys)


def _saved_group_lists(loaded: dict, parts: int) -> list[list[dict]]:
    """The param-group lists of a loaded Megatron optimizer state, one per chained optimizer:
    ``{i: state}`` for a chain of several, else one state whose groups sit at
    ``["param_groups"]`` (fp32) or ``["optimizer"]["param_groups"]`` (mixed precision,
    distributed)."""
    states = [loaded[i] for i in sorted(loaded)] if parts > 1 else [loaded]
    return [
        s["param_groups"] if "param_groups" in s else s["optimizer"]["param_groups"] for s in states
    ]

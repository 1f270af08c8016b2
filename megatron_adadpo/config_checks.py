"""The field checks of the run config's sections that span fields (``config.validate`` runs
them with the resolver's rules): ranges, the training, reference, optimizer and logging fields,
and which losses train without a rejected answer. Each returns error strings (the field and
the fix), every one reported at once. Torch-free."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from megatron_adadpo.config import Config

DEFAULT_MIXUP_ALPHA = 0.6  # TRL DPOConfig.ref_model_mixup_alpha
WANDB_MODES = ("online", "offline", "disabled")  # logging.wandb_mode


def section_errors(config: Config) -> list[str]:
    """Every field error of ``config``'s sections (``[]``: none)."""
    errors = []
    for check in (_check_ranges, _check_train, _check_reference, _check_optimizer, _check_logging):
        errors += check(config)
    return errors + _check_rejected_optional(config)


CHOSEN_ONLY_LOSSES = ("sft",)  # train on the chosen answers: their rows need no rejected one


def _check_rejected_optional(config: Config) -> list[str]:
    if config.data.rejected_optional and config.loss.name not in CHOSEN_ONLY_LOSSES:
        return [
            f"data.rejected_optional=true (rows without a rejected answer) is for loss.name=sft; "
            f"loss.name={config.loss.name} needs every row's rejected answer: remove it"
        ]
    return []


def _ranges(config: Config) -> dict:
    """``{field: (value, test, rule in words)}`` of every number with a range."""
    train, opt, log = config.train, config.optimizer, config.logging
    at_least_1 = (lambda v: v >= 1, "an integer >= 1")
    at_least_0 = (lambda v: v >= 0, ">= 0")
    positive = (lambda v: v > 0, "> 0")
    optional = (lambda v: v is None or v >= 1, "an integer >= 1 (or unset)")
    return {
        "train.train_iters": (train.train_iters, *optional),
        "train.epochs": (train.epochs, *at_least_1),
        "train.seed": (train.seed, *at_least_0),
        "train.data_wait_minutes": (train.data_wait_minutes, *positive),
        "train.distributed_timeout_minutes": (train.distributed_timeout_minutes, *positive),
        "checkpoint.save_interval": (config.checkpoint.save_interval, *at_least_0),
        "logging.log_interval": (log.log_interval, *at_least_1),
        "logging.peak_tflops": (log.peak_tflops, lambda v: v is None or v > 0, "> 0 (or unset)"),
        "eval.interval": (config.eval.interval, *at_least_0),
        "eval.max_pairs": (config.eval.max_pairs, *optional),
        "optimizer.weight_decay": (opt.weight_decay, *at_least_0),
        "optimizer.clip_grad": (opt.clip_grad, *at_least_0),
        "optimizer.adam_beta1": (opt.adam_beta1, lambda v: 0 <= v < 1, "in [0, 1)"),
        "optimizer.adam_beta2": (opt.adam_beta2, lambda v: 0 <= v < 1, "in [0, 1)"),
        "optimizer.adam_eps": (opt.adam_eps, *positive),
        "optimizer.ddp_bucket_size": (opt.ddp_bucket_size, *optional),
    }


def _check_ranges(config: Config) -> list[str]:
    errors = []
    for name, (value, ok, rule) in _ranges(config).items():
        if not ok(value):
            errors.append(f"{name}={value!r} must be {rule}")
    data, model = config.data, config.model
    if data.max_length > model.max_position_embeddings:
        errors.append(
            f"data.max_length={data.max_length} exceeds model.max_position_embeddings="
            f"{model.max_position_embeddings} (positions the model was built for); lower "
            "data.max_length"
        )
    return errors


def _check_train(config: Config) -> list[str]:
    errors = []
    train = config.train
    if train.nan_policy not in ("stop", "skip"):
        errors.append(f"train.nan_policy={train.nan_policy!r}; accepted: 'stop', 'skip'")
    if train.init_method not in ("megatron", "layout_invariant"):
        errors.append(
            f"train.init_method={train.init_method!r}; accepted: 'megatron', 'layout_invariant'"
        )
    return errors


def _check_reference(config: Config) -> list[str]:
    errors = []
    reference, loss = config.reference, config.loss
    modes = ("resident", "precomputed", "adapters_off", "none")
    if reference.mode is not None and reference.mode not in modes:
        errors.append(
            f"reference.mode={reference.mode!r}; accepted: {', '.join(map(repr, modes))} (or unset)"
        )
    if reference.mode == "precomputed" and not reference.path:
        errors.append(
            "reference.mode=precomputed needs reference.path (the output dir of "
            "tools/precompute_reference.py)"
        )
    if loss.needs_reference and reference.mode == "none":
        errors.append(
            f"loss.name={loss.name!r} needs reference log-probs; set "
            "reference.mode to 'resident', 'precomputed' or (with lora) 'adapters_off'"
        )
    errors += reference_checkpoint_errors(config) + reference_sync_errors(config)
    evaluation = config.eval
    if evaluation.interval and not evaluation.inputs:
        errors.append("eval.interval > 0 needs eval.inputs (held-out preference pairs)")
    if evaluation.interval and reference.mode == "precomputed" and loss.needs_reference:
        if not reference.eval_path:
            errors.append(
                "evaluation with reference.mode=precomputed needs reference.eval_path "
                "(tools/precompute_reference.py --eval --output DIR)"
            )
    return errors


def reference_checkpoint_errors(config: Config) -> list[str]:
    """``reference.checkpoint`` names the reference model: it needs a run that has one."""
    checkpoint = config.reference.checkpoint
    if checkpoint and config.reference_mode == "none":
        why = (
            "reference.mode=none"
            if config.reference.mode == "none"
            else f"loss.name={config.loss.name} is reference-free"
        )
        return [
            f"reference.checkpoint={checkpoint} has no effect: {why} (no reference model is "
            "run or read); remove reference.checkpoint"
        ]
    return []


def reference_sync_errors(config: Config) -> list[str]:
    """TR-DPO (``reference.sync_steps``, ``reference.mixup_alpha``) updates a resident
    reference model from the policy: it needs one (not precomputed values, not LoRA's
    adapters-off base, which is the policy's own frozen weights)."""
    ref = config.reference
    if not isinstance(ref.sync_steps, int) or ref.sync_steps < 0:
        return [f"reference.sync_steps={ref.sync_steps!r} must be an integer >= 0 (0 = off)"]
    if not 0.0 < ref.mixup_alpha <= 1.0:
        return [f"reference.mixup_alpha={ref.mixup_alpha!r} must be in (0, 1] (1: a hard copy)"]
    if not ref.sync_steps:
        if ref.mixup_alpha != DEFAULT_MIXUP_ALPHA:
            return [
                f"reference.mixup_alpha={ref.mixup_alpha} has no effect with reference.sync_steps"
                "=0 (TR-DPO off): set reference.sync_steps (steps between updates) or remove it"
            ]
        return []
    if config.reference_mode == "precomputed":
        return [
            f"reference.sync_steps={ref.sync_steps} (TR-DPO) updates the reference model from "
            "the policy during training, but precomputed log-probs were made once from a fixed "
            "model: set reference.mode=resident, or reference.sync_steps=0"
        ]
    if config.reference_mode == "adapters_off":
        return [
            f"reference.sync_steps={ref.sync_steps} (TR-DPO) updates a resident reference model, "
            "but reference.mode=adapters_off (the default with lora:) is the policy's own frozen "
            "base with the adapters off: set reference.mode=resident (a separate copy of the "
            "starting model), or reference.sync_steps=0"
        ]
    if config.reference_mode == "none":
        return [
            f"reference.sync_steps={ref.sync_steps} has no effect: loss.name={config.loss.name}"
            f" / reference.mode={ref.mode} runs no reference model; remove it"
        ]
    return []


def _check_logging(config: Config) -> list[str]:
    errors = []
    mode = config.logging.wandb_mode
    if mode is not None and mode not in WANDB_MODES:
        errors.append(f"logging.wandb_mode={mode!r}; accepted: {list(WANDB_MODES)} or null")
    return errors


def _check_optimizer(config: Config) -> list[str]:
    errors = []
    opt = config.optimizer
    if opt.decay_style not in ("cosine", "linear", "constant"):
        errors.append(
            f"optimizer.decay_style={opt.decay_style!r}; accepted: 'cosine', 'linear', 'constant'"
        )
    if not 0.0 <= opt.warmup_fraction < 1.0:
        errors.append("optimizer.warmup_fraction must be in [0, 1)")
    if opt.lr <= 0:
        errors.append(f"optimizer.lr={opt.lr} must be > 0")
    if not 0 <= opt.min_lr <= opt.lr:
        errors.append(f"optimizer.min_lr={opt.min_lr} must be in [0, optimizer.lr={opt.lr}]")
    if opt.overlap_param_gather and not opt.use_distributed_optimizer:
        errors.append("optimizer.overlap_param_gather needs optimizer.use_distributed_optimizer")
    if opt.ddp_bucket_size is not None and not opt.overlap_grad_reduce:
        errors.append(
            "optimizer.ddp_bucket_size applies only with optimizer.overlap_grad_reduce: true "
            "(without it Megatron DDP keeps one bucket per model chunk); set "
            "optimizer.overlap_grad_reduce: true or unset optimizer.ddp_bucket_size"
        )
    return errors

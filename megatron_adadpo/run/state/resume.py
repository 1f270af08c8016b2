"""What a resumed run must agree on with the checkpoint it continues. Torch-free.

The run state saved with every checkpoint (``RunState``) records the data, the seed and the
optimizer's layout; ``check_run_state`` compares it with the config before any tensor is
loaded, and ``check_schedule`` compares the saved learning-rate schedule with the config's.
Each refusal names the field, both values and the fix, instead of training on something other
than what ``config.yaml`` says.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import yaml

from megatron_adadpo.config import Config, ConfigError
from megatron_adadpo.resolve import ResolvedRun
from megatron_adadpo.run.state.consistency import starting_model

# The config fields that set the run's length (Megatron counts it in samples: pairs).
LENGTH_FIELDS = ("train.train_iters", "train.epochs", "train.global_batch_size")
# Megatron's OptimizerParamScheduler state -> (what it is, in pairs?, the config fields that set
# it). ``end_wd`` and ``wd_incr_steps`` follow ``start_wd`` and ``lr_decay_steps``.
SCHEDULE_FIELDS = {
    "max_lr": ("peak learning rate", False, ("optimizer.lr",)),
    "min_lr": ("minimum learning rate", False, ("optimizer.min_lr",)),
    "lr_warmup_steps": ("warm-up", True, ("optimizer.warmup_fraction", *LENGTH_FIELDS)),
    "lr_decay_steps": ("decay length", True, LENGTH_FIELDS),
    "lr_decay_style": ("decay style", False, ("optimizer.decay_style",)),
    "start_wd": ("weight decay", False, ("optimizer.weight_decay",)),
    "end_wd": ("weight decay", False, ("optimizer.weight_decay",)),
    "wd_incr_steps": ("decay length", True, LENGTH_FIELDS),
}


def optimizer_layout(config: Config, run: ResolvedRun) -> dict:
    """What the distributed optimizer's ``dp_reshardable`` state depends on: the model
    parallel layout, the gradient buckets (not the data-parallel size) and the resolved layer
    spec. The state is stored per gradient-buffer range in the buffer's parameter order
    (megatron-core 0.16.1 ``distrib_optimizer.py`` ``get_parameter_state_dp_reshardable``, line
    942) and loaded back by position; the Transformer Engine spec holds other parameters in
    another order than the local spec (its ``linear_qkv`` / ``linear_fc1`` carry the fused
    layer norms), so ``transformer_impl: auto`` resolving differently on another machine would
    load the moments into the wrong parameters (``run.kernels.transformer_engine``)."""
    e, opt = config.execution, config.optimizer
    return {
        "distributed_optimizer": opt.use_distributed_optimizer,
        "tp": e.tp,
        "pp": e.pp,
        "vpp": e.vpp,
        "overlap_grad_reduce": opt.overlap_grad_reduce,
        "ddp_bucket_size": opt.ddp_bucket_size,
        "layer_spec": "transformer_engine" if run.kernels.transformer_engine else "local",
    }


# How a refusal names each entry of ``optimizer_layout``: the config field that sets it.
_LAYOUT_FIELDS = {
    "tp": "execution.tp",
    "pp": "execution.pp",
    "vpp": "execution.vpp",
    "overlap_grad_reduce": "optimizer.overlap_grad_reduce",
    "ddp_bucket_size": "optimizer.ddp_bucket_size",
    "layer_spec": "execution.transformer_impl",
}


@dataclass
class RunState:
    """Where the run is: saved with every checkpoint as ``run`` (``to_dict``), read back by a
    resumed run (``resumed``, after ``check_run_state`` accepted the saved values)."""

    step: int  # optimizer steps taken
    consumed_samples: int  # pairs trained on (Megatron counts samples)
    dataset_identity: str | None  # the manifest identity of the data (``data/``)
    seed: int  # train.seed of the run (the data order within an epoch)
    optimizer_layout: dict  # ``optimizer_layout(config, run)``: what its optimizer state needs
    reference_sync: dict | None = None  # TR-DPO's settings (``reference_sync``), None: off
    reference_source: str | None = None  # the model the reference is loaded from
    adapter_base: dict | None = None  # LoRA: the base model the adapters belong to
    eval_pending: bool = False  # SIGTERM abandoned this step's evaluation: do it first

    @classmethod
    def fresh(cls, config: Config, run: ResolvedRun, dataset_identity: str) -> RunState:
        """The state of a run that starts at step 0."""
        return cls(
            0,
            0,
            dataset_identity,
            config.train.seed,
            optimizer_layout(config, run),
            reference_sync(config),
            reference_source(config),
            adapter_base(config),
        )

    @classmethod
    def resumed(cls, saved: dict, config: Config, run: ResolvedRun) -> RunState:
        """The state of a run resumed from a checkpoint's ``saved`` run state: its position and
        data; this config's seed and optimizer layout (accepted by ``check_run_state``)."""
        return cls(
            saved["step"],
            saved["consumed_samples"],
            saved.get("dataset_identity"),
            config.train.seed,
            optimizer_layout(config, run),
            reference_sync(config),
            reference_source(config),
            adapter_base(config),
            eval_pending=bool(saved.get("eval_pending")),
        )

    def to_dict(self) -> dict:
        """The checkpoint's ``run`` entry (``eval_pending`` only when set, as before)."""
        values = asdict(self)
        if not self.eval_pending:
            del values["eval_pending"]
        return values


def adapter_base(config: Config) -> dict | None:
    """What a LoRA run's adapter-only checkpoints belong to: the base model they were trained
    on (``train.init_checkpoint`` with its fingerprint, or the initialisation and seed) and
    the adapters' shape; None without LoRA (full-model checkpoints)."""
    if config.lora is None:
        return None
    lora = config.lora
    return {
        "init_checkpoint": config.train.init_checkpoint,
        "base": starting_model(config),
        "lora": {"rank": lora.rank, "alpha": lora.alpha, "targets": list(lora.target_modules)},
    }


def adapter_base_errors(saved: dict | None, current: dict | None, where: Path) -> list[str]:
    """A checkpoint's adapters load only onto the base (and adapter shape) they were trained
    with; a full-model checkpoint does not resume as adapters, nor adapters as a full model."""
    if saved == current:
        return []
    if current is None:
        return [f"checkpoint {where} holds LoRA adapters only: restore the lora: section"]
    if saved is None:
        return [
            f"checkpoint {where} holds a full model, not LoRA adapters: remove the lora: "
            "section, or start in a new logging.run_dir"
        ]
    if saved["lora"] != current["lora"]:
        return [f"checkpoint {where} holds adapters {saved['lora']}; restore lora: to them"]
    was, now = saved["base"], current["base"]
    fields = {"checkpoint": "train.init_checkpoint", "model": "the model section"}
    fields.update(init_method="train.init_method", seed="train.seed")
    changed = [key for key in fields if was.get(key) != now.get(key)]
    shown = {**was, "checkpoint": saved["init_checkpoint"], "model": "(model.yaml)"}
    diff = ", ".join(f"{fields[key]}={shown.get(key)}" for key in changed)
    return [
        f"checkpoint {where} holds LoRA adapters of another base model (trained on {diff}; "
        "an init checkpoint is recognised by its fingerprint): restore that base, or start in "
        "a new logging.run_dir"
    ]


def check_run_state(
    saved: dict,
    config: Config,
    run: ResolvedRun,
    dataset_identity: str,
    samples_per_epoch: int,
    where: Path,
) -> None:
    """Refuse to resume ``saved`` (a checkpoint's run state) with this config: other data or
    tokenisation, another seed in the middle of an epoch, or an optimizer layout the saved
    optimizer state cannot be loaded into."""
    if saved.get("dataset_identity") != dataset_identity:
        raise ConfigError(
            f"checkpoint {where} was trained on dataset {str(saved.get('dataset_identity'))[:16]}"
            f"... but the configured data is {dataset_identity[:16]}... (other inputs, tokenizer "
            "or truncation settings); use the original data, or a new logging.run_dir"
        )
    seed, consumed = saved.get("seed", config.train.seed), saved["consumed_samples"]
    if seed != config.train.seed and consumed % samples_per_epoch:
        raise ConfigError(
            f"checkpoint {where} stopped in the middle of an epoch with train.seed={seed}; "
            f"train.seed={config.train.seed} would re-order the rest of the epoch (pairs seen "
            f"twice or never): restore train.seed={seed} (a new seed is safe at an epoch boundary)"
        )
    errors = adapter_base_errors(saved.get("adapter_base"), adapter_base(config), where)
    if errors:
        raise ConfigError(errors[0])
    _check_optimizer_layout(saved.get("optimizer_layout"), optimizer_layout(config, run), where)
    check_reference_sync(saved.get("reference_sync"), reference_sync(config), where)
    check_reference_source(saved, config, where)


def reference_sync(config: Config) -> dict | None:
    """TR-DPO's settings, recorded in the run state: its checkpoints hold the updated reference
    model (``checkpoints.save_training``), which a resumed run continues from."""
    ref = config.reference
    return (
        {"sync_steps": ref.sync_steps, "mixup_alpha": ref.mixup_alpha} if ref.sync_steps else None
    )


def reference_source(config: Config) -> str | None:
    """The fingerprint of the checkpoint a resident, fixed reference is loaded from at every
    start (``reference.checkpoint``, else ``train.init_checkpoint``); None when none is (random
    initialisation), or when TR-DPO saves the reference with each checkpoint."""
    from megatron_adadpo.run.state.consistency import checkpoint_fingerprint

    source = config.reference.checkpoint or config.train.init_checkpoint
    fixed = config.reference_mode == "resident" and not config.reference.sync_steps
    return checkpoint_fingerprint(source) if fixed and source else None


def check_reference_source(saved: dict, config: Config, where: Path) -> None:
    """Refuse resuming against another resident reference model than the run trained with."""
    current = reference_source(config)
    if saved.get("reference_source", current) == current:  # older checkpoints: not recorded
        return
    field = "reference.checkpoint" if config.reference.checkpoint else "train.init_checkpoint"
    raise ConfigError(
        f"checkpoint {where} was trained against a resident reference loaded from another "
        f"checkpoint than {field}={config.reference.checkpoint or config.train.init_checkpoint}"
        " (its weights differ): restore the run's reference.checkpoint / train.init_checkpoint,"
        " or use a new logging.run_dir"
    )


def check_reference_sync(saved: dict | None, current: dict | None, where: Path) -> None:
    """Refuse resuming across a change of TR-DPO's settings: a checkpoint without the updated
    reference would restart it from its initial weights, one with it would be ignored."""
    if saved == current:
        return
    if saved is None:
        raise ConfigError(
            f"checkpoint {where} was saved without TR-DPO (reference.sync_steps=0) and holds no "
            "updated reference model: resume with reference.sync_steps=0, or use a new "
            "logging.run_dir"
        )
    fields = ", ".join(f"reference.{k}={v}" for k, v in saved.items())
    raise ConfigError(
        f"checkpoint {where} continues TR-DPO with {fields} (its reference model is part of "
        f"the checkpoint): set {fields}, or use a new logging.run_dir"
    )


def _check_optimizer_layout(saved: dict | None, current: dict, where: Path) -> None:
    if saved is not None:  # checkpoints from before these entries: the default bucket size,
        # and a spec that was not recorded (taken as this run's)
        saved = {"ddp_bucket_size": None, "layer_spec": current["layer_spec"], **saved}
    if saved is None or saved == current:
        return
    was_distributed = saved["distributed_optimizer"]
    if was_distributed != current["distributed_optimizer"]:
        kind = "distributed" if was_distributed else "plain"
        raise ConfigError(
            f"checkpoint {where} holds the {kind} optimizer's state; restore "
            f"optimizer.use_distributed_optimizer={str(was_distributed).lower()} (the two store "
            "their state differently)"
        )
    if not current["distributed_optimizer"]:
        return  # the plain optimizer's state reshards with the model
    diff = ", ".join(
        f"{_LAYOUT_FIELDS.get(k, k)}={saved[k]}" for k in saved if saved[k] != current[k]
    )
    raise ConfigError(
        f"checkpoint {where} holds distributed-optimizer state in Megatron's dp_reshardable "
        f"format, which loads at any data-parallel size but only with the layout it was saved "
        f"with: set execution / optimizer back to {diff}"
    )


def check_schedule(saved: dict, configured: dict, where: Path, step: int, config: Config) -> None:
    """Refuse a saved learning-rate schedule that differs from the config's (Megatron would
    silently keep the saved one: a new ``optimizer.lr``, or a longer ``train.train_iters``
    running flat at ``min_lr``). ``checkpoint.override_scheduler: true`` takes the config's.

    The message names the config fields that changed since the checkpoint (its
    ``config.yaml``), and what they change in the schedule, sample counts in pairs."""
    keys = [k for k in SCHEDULE_FIELDS if k in saved and saved[k] != configured[k]]
    if not keys:
        return
    before, now = _saved_config(where), config.to_dict()
    named, effects = [], []
    for key in keys:
        what, in_pairs, fields = SCHEDULE_FIELDS[key]
        changed = [f for f in fields if _value(before, f) != _value(now, f)] if before else []
        if "train.train_iters" in changed or _value(now, "train.train_iters") is not None:
            changed = [f for f in changed if f != "train.epochs"]  # train_iters decides
        for name in changed or [" / ".join(fields)]:
            if name not in named:
                named.append(name)
        unit = " pairs" if in_pairs else ""
        effect = f"{what}: checkpoint {saved[key]}{unit}, config {configured[key]}{unit}"
        if (in_pairs or not before) and effect not in effects:
            effects.append(effect)
    diff = "; ".join(_describe(name, before, now) for name in named)
    effect = f" ({'; '.join(effects)})" if effects else ""
    raise ConfigError(
        f"checkpoint {where} has another learning-rate schedule: {diff}{effect}; restore the "
        "saved values, or set checkpoint.override_scheduler=true to continue from step "
        f"{step} on the config's schedule"
    )


def _saved_config(where: Path) -> dict:
    """The resolved config saved with the checkpoint (``{}`` when unreadable)."""
    try:
        values = yaml.safe_load((Path(where) / "config.yaml").read_text())
    except (OSError, yaml.YAMLError):
        return {}
    return values if isinstance(values, dict) else {}


def _value(values: dict, dotted: str):
    for part in dotted.split("."):
        values = values.get(part) if isinstance(values, dict) else None
    return values


def _describe(name: str, before: dict, now: dict) -> str:
    if not before:  # the checkpoint has no readable config.yaml: the fields that set it
        return name
    return f"{name}: checkpoint {_value(before, name)}, config {_value(now, name)}"

"""Run configuration: YAML + ``--set a.b=c`` overrides -> frozen, validated dataclasses.

Each section checks its own fields; ``validate`` adds the run's rules that need neither a
machine nor a world size (``megatron_adadpo.resolve``, shared with the trainer and the planner)
and ``check_environment`` those of this machine, before any process group or tensor exists:
one error names every reason, each with the field and the fix. The trainer resolves the run
on its world size (``resolve``). Importing this module imports neither Megatron nor torch.
Sections: ``model`` (architecture), ``execution`` (layout, precision, recompute), ``loss``,
``data``, ``eval``, ``reference``, ``lora`` (adapters; ``model/lora_config.py``),
``optimizer``, ``train``, ``checkpoint``, ``logging``.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from megatron_adadpo.config_text import ConfigError, coerce, read_yaml
from megatron_adadpo.data.config import DataConfig
from megatron_adadpo.layout import ExecutionConfig
from megatron_adadpo.losses.config import LossConfig
from megatron_adadpo.model.config import ModelConfig
from megatron_adadpo.model.lora_config import LoraSection, resolved_reference_mode
from megatron_adadpo.resolve.resolver import raise_errors, run_errors

DEFAULT_MIXUP_ALPHA = 0.6  # TRL DPOConfig.ref_model_mixup_alpha


@dataclass(frozen=True)
class ReferenceConfig:
    """Where reference log-probs come from: a resident frozen model, a file, the policy with its
    LoRA adapters off, or nowhere."""

    # "resident" | "precomputed" | "adapters_off" | "none"; unset: adapters_off with a lora:
    # section, resident without (Config.reference_mode)
    mode: str | None = None
    path: str | None = None  # precomputed: output dir of tools/precompute_reference.py
    eval_path: str | None = None  # precomputed values of the eval pairs (eval.inputs)
    # The reference model when it is not the policy's start (TRL's ref_model: iterative DPO,
    # reference = the SFT model while the policy starts from a merged one): a converted
    # checkpoint of the same model and tokenizer, loaded by the resident reference and by
    # tools/precompute_reference.py; None: the policy's initial weights
    checkpoint: str | None = None
    # TR-DPO (arXiv 2404.09656; TRL sync_ref_model / ref_model_sync_steps /
    # ref_model_mixup_alpha): every sync_steps optimizer steps the resident reference becomes
    # mixup_alpha * policy + (1 - mixup_alpha) * reference (1.0: a hard copy); 0 = off
    sync_steps: int = 0
    mixup_alpha: float = DEFAULT_MIXUP_ALPHA


@dataclass(frozen=True)
class EvalConfig:
    inputs: list = field(default_factory=list)  # held-out pairs (same formats as data.inputs)
    interval: int = 0  # steps between evaluations; 0 = never
    max_pairs: int | None = None


@dataclass(frozen=True)
class OptimizerSection:
    lr: float = 5e-7
    min_lr: float = 0.0
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    warmup_fraction: float = 0.1
    decay_style: str = "cosine"  # "cosine" | "linear" | "constant"
    use_distributed_optimizer: bool = False
    overlap_grad_reduce: bool = False
    overlap_param_gather: bool = False
    # Parameters per DDP gradient bucket with overlap_grad_reduce (the unit of overlapped
    # reduce-scatter / all-gather); None: Megatron's default, max(40M, 1M * data-parallel size)
    ddp_bucket_size: int | None = None


@dataclass(frozen=True)
class TrainSection:
    global_batch_size: int = 128  # pairs per optimizer step, all data-parallel ranks together
    micro_batch_size: int = 1  # pairs per micro-batch per rank (2x sequences)
    epochs: int = 1
    train_iters: int | None = None  # None: epochs * pairs // global_batch_size
    seed: int = 1234
    nan_policy: str = "stop"  # "stop" | "skip": on a non-finite loss
    data_wait_minutes: float = 720.0  # how long other ranks wait for rank 0 to tokenize data
    # Collective timeout of every process group (torch's default group and Megatron's groups);
    # Megatron-LM's --distributed-timeout-minutes. 30: Megatron-Core's initialize_model_parallel
    # default (torch's own default group waits 10).
    distributed_timeout_minutes: float = 30.0
    init_checkpoint: str | None = None  # converted HF checkpoint (tools/convert_hf_to_megatron)
    init_method: str = "megatron"  # "megatron" | "layout_invariant" (tests, reproducible runs)


@dataclass(frozen=True)
class CheckpointSection:
    save_interval: int = 0  # steps; 0 = only at the end
    resume: bool = True  # continue from <run_dir>/checkpoints/latest when present
    save_at_end: bool = True
    override_scheduler: bool = False  # on resume: the config's lr schedule, not the saved one
    # Each tensor replicated over data parallelism (x CP) written, and read, by one rank of the
    # group, the bytes spread evenly (Megatron's fully-parallel strategies; Megatron-LM's
    # --ckpt-fully-parallel-save, default on); false: DP rank 0 writes them, every rank reads.
    fully_parallel: bool = True
    # Write checkpoints in a background process while training goes on (Megatron's async
    # save); `latest` moves once every rank's write is complete. Megatron-LM's --async-save.
    async_save: bool = False


WANDB_MODES = ("online", "offline", "disabled")


@dataclass(frozen=True)
class LoggingSection:
    run_dir: str = "runs/default"
    log_interval: int = 1
    tensorboard: bool = False
    progress: bool = True
    peak_tflops: float | None = None  # per-device peak for MFU; None = look up the device
    wandb_project: str | None = None  # also log to this Weights & Biases project (pip wandb)
    wandb_entity: str | None = None  # W&B team or user; None: the logged-in default
    wandb_name: str | None = None  # W&B run name; None: the run_dir's last component
    wandb_mode: str | None = None  # online | offline | disabled; None: wandb's ($WANDB_MODE)
    # TRL's per-token metrics `entropy` and `mean_token_accuracy` (one more pass over each
    # token's logits, docs/training.md); false skips them (`logits/*` are always logged)
    token_metrics: bool = True


@dataclass(frozen=True)
class Config:
    model: ModelConfig
    execution: ExecutionConfig = field(default_factory=ExecutionConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    data: DataConfig | None = None
    eval: EvalConfig = field(default_factory=EvalConfig)
    reference: ReferenceConfig = field(default_factory=ReferenceConfig)
    lora: LoraSection | None = None  # present: LoRA adapters, the base frozen
    optimizer: OptimizerSection = field(default_factory=OptimizerSection)
    train: TrainSection = field(default_factory=TrainSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    logging: LoggingSection = field(default_factory=LoggingSection)

    @property
    def reference_mode(self) -> str:
        """The reference the run uses: ``reference.mode`` (unset: ``adapters_off`` with LoRA,
        else ``resident``), or "none" for a reference-free loss (simpo, cpo, orpo), which never
        runs or reads a reference."""
        if not self.loss.needs_reference:
            return "none"
        return resolved_reference_mode(self.reference.mode, self.lora)

    @property
    def notices(self) -> tuple[str, ...]:
        """One-line notices about settings whose default meaning changed (rank 0 prints them)."""
        return self.loss.notices

    def to_dict(self) -> dict:
        return dataclasses.asdict(self) | {"loss": self.loss.to_dict()}  # loss: flat knobs

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def _section_types() -> dict[str, type]:
    hints = typing.get_type_hints(Config)
    out = {}
    for name, hint in hints.items():
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        out[name] = args[0] if args else hint
    return out


def from_dict(values: dict) -> Config:
    """Build and validate a ``Config`` from nested dicts (the YAML document)."""
    types = _section_types()
    unknown = sorted(set(values) - set(types))
    if unknown:
        raise ConfigError(f"unknown config sections {unknown}; accepted: {sorted(types)}")
    if "model" not in values:
        raise ConfigError("config section 'model' is required (num_layers, hidden_size, ...)")
    sections = {}
    for name, value in values.items():
        if value is None:
            continue
        cls = types[name]
        if not isinstance(value, dict):
            raise ConfigError(f"config section '{name}' must be a mapping, got {value!r}")
        known = (
            cls.accepted_keys()  # the loss section: shared fields + every family's knobs
            if hasattr(cls, "accepted_keys")
            else {f.name for f in dataclasses.fields(cls)}
        )
        bad = sorted(set(value) - known)
        if bad:
            raise ConfigError(
                f"unknown keys {[f'{name}.{k}' for k in bad]}; accepted: {sorted(known)}"
            )
        coerced = coerce(cls, name, value)
        try:
            sections[name] = cls(**coerced)
        except ConfigError:
            raise
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"in section '{name}': {exc}") from exc
    config = Config(**sections)
    validate(config)
    return config


def load_config(path: str | Path | None, overrides: list[str] = ()) -> Config:
    """Read a YAML file, apply ``--set`` overrides, validate (on this machine too).

    ``path=None``: overrides only.
    """
    config = from_dict(read_yaml(path, overrides))
    check_environment(config)
    return config


def validate(config: Config) -> None:
    """The field checks of each section and the run's rules that need neither a machine nor a
    world size (``resolve.run_errors``): one ``ConfigError`` naming every reason."""
    if config.data is None:
        raise ConfigError("config section 'data' is required (inputs, tokenizer, max_length)")
    errors = []
    for check in (_check_ranges, _check_train, _check_reference, _check_optimizer, _check_logging):
        errors += check(config)
    errors += _check_rejected_optional(config)
    raise_errors(errors + run_errors(config))


CHOSEN_ONLY_LOSSES = ("sft",)  # train on the chosen answers: their rows need no rejected one


def _check_rejected_optional(config: Config) -> list[str]:
    if config.data.rejected_optional and config.loss.name not in CHOSEN_ONLY_LOSSES:
        return [
            f"data.rejected_optional=true (rows without a rejected answer) is for loss.name=sft; "
            f"loss.name={config.loss.name} needs every row's rejected answer: remove it"
        ]
    return []


def check_environment(config: Config) -> None:
    """Refuse what this machine cannot run (the run's rules on ``probe_machine()``, optional
    packages the config asks for) and files that disagree with the config
    (``train.init_checkpoint``'s model and tokenizer); no allocation. The planner, which plans
    for another machine, runs the rules on the machine it describes instead."""
    import importlib.util

    from megatron_adadpo.platform.machine import probe_machine
    from megatron_adadpo.run.consistency import check_init_checkpoint

    check_init_checkpoint(config)
    errors = run_errors(config, machine=probe_machine())
    if config.logging.tensorboard and importlib.util.find_spec("tensorboard") is None:
        errors.append(
            "logging.tensorboard: true needs the tensorboard package (pip install "
            "tensorboard), or set logging.tensorboard: false (metrics.jsonl is always written)"
        )
    if config.logging.wandb_project and importlib.util.find_spec("wandb") is None:
        errors.append(
            f"logging.wandb_project={config.logging.wandb_project!r} needs the wandb package "
            "(pip install wandb), or unset logging.wandb_project (metrics.jsonl is always written)"
        )
    raise_errors(errors)


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
    reference model from the policy: it needs one."""
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

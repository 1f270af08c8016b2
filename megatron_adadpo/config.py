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

from megatron_adadpo.config_checks import DEFAULT_MIXUP_ALPHA, section_errors
from megatron_adadpo.config_text import ConfigError, coerce, read_yaml
from megatron_adadpo.data.config import DataConfig
from megatron_adadpo.layout import ExecutionConfig
from megatron_adadpo.losses.config import LossConfig
from megatron_adadpo.model.config import ModelConfig
from megatron_adadpo.model.lora_config import LoraSection
from megatron_adadpo.resolve.lora import resolved_reference_mode
from megatron_adadpo.resolve.resolver import raise_errors, run_errors


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
    raise_errors(section_errors(config) + run_errors(config))


def check_environment(config: Config) -> None:
    """Refuse what this machine cannot run (the run's rules on ``probe_machine()``, optional
    packages the config asks for) and files that disagree with the config
    (``train.init_checkpoint``'s model and tokenizer); no allocation. The planner, which plans
    for another machine, runs the rules on the machine it describes instead."""
    import importlib.util

    from megatron_adadpo.platform.machine import probe_machine
    from megatron_adadpo.run.state.consistency import check_init_checkpoint

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

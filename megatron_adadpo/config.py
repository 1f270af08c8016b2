"""Run configuration: YAML + ``--set a.b=c`` overrides -> frozen, validated dataclasses.

Every check runs here, before any process group or tensor exists, and each error names the
field and the fix. Sections: ``model`` (architecture), ``execution`` (layout, precision,
recompute), ``loss``, ``data``, ``eval``, ``reference``, ``optimizer``, ``train``,
``checkpoint``, ``logging``.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from megatron_adadpo.data.config import DataConfig
from megatron_adadpo.layout import pad_multiple
from megatron_adadpo.losses import LossConfig
from megatron_adadpo.model import ExecutionConfig
from megatron_adadpo.model_config import ModelConfig
from megatron_adadpo.yaml_config import read_yaml


class ConfigError(ValueError):
    """A configuration value that cannot work; the message names the field and the fix."""


@dataclass(frozen=True)
class ReferenceConfig:
    """Where reference log-probs come from: a resident frozen model, a file, or nowhere."""

    mode: str = "resident"  # "resident" | "precomputed" | "none"
    path: str | None = None  # precomputed: output dir of tools/precompute_reference.py
    eval_path: str | None = None  # precomputed values of the eval pairs (eval.inputs)


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


@dataclass(frozen=True)
class TrainSection:
    global_batch_size: int = 128  # pairs per optimizer step, all data-parallel ranks together
    micro_batch_size: int = 1  # pairs per micro-batch per rank (2x sequences)
    epochs: int = 1
    train_iters: int | None = None  # None: epochs * pairs // global_batch_size
    seed: int = 1234
    nan_policy: str = "stop"  # "stop" | "skip": on a non-finite loss
    init_checkpoint: str | None = None  # converted HF checkpoint (tools/convert_hf_to_megatron)
    init_method: str = "megatron"  # "megatron" | "layout_invariant" (tests, reproducible runs)


@dataclass(frozen=True)
class CheckpointSection:
    save_interval: int = 0  # steps; 0 = only at the end
    resume: bool = True  # continue from <run_dir>/checkpoints/latest when present
    save_at_end: bool = True


@dataclass(frozen=True)
class LoggingSection:
    run_dir: str = "runs/default"
    log_interval: int = 1
    tensorboard: bool = False
    progress: bool = True
    peak_tflops: float | None = None  # per-device peak for MFU; None = look up the device


@dataclass(frozen=True)
class Config:
    model: ModelConfig
    execution: ExecutionConfig = field(default_factory=ExecutionConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    data: DataConfig | None = None
    eval: EvalConfig = field(default_factory=EvalConfig)
    reference: ReferenceConfig = field(default_factory=ReferenceConfig)
    optimizer: OptimizerSection = field(default_factory=OptimizerSection)
    train: TrainSection = field(default_factory=TrainSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    logging: LoggingSection = field(default_factory=LoggingSection)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

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
        known = {f.name for f in dataclasses.fields(cls)}
        bad = sorted(set(value) - known)
        if bad:
            raise ConfigError(
                f"unknown keys {[f'{name}.{k}' for k in bad]}; accepted: {sorted(known)}"
            )
        try:
            sections[name] = cls(**_coerce(cls, name, value))
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"in section '{name}': {exc}") from exc
    config = Config(**sections)
    validate(config)
    return config


def _coerce(cls, section: str, values: dict) -> dict:
    """Numbers written as YAML strings (``1e-3``) become floats; bad types name the field."""
    hints = typing.get_type_hints(cls)
    out = dict(values)
    for key, value in values.items():
        kinds = set(typing.get_args(hints[key])) or {hints[key]}
        if float in kinds and isinstance(value, (str, int)) and not isinstance(value, bool):
            try:
                out[key] = float(value)
            except ValueError:
                raise ConfigError(f"{section}.{key}={value!r} must be a number") from None
        elif int in kinds and float not in kinds and isinstance(value, float):
            if not value.is_integer():
                raise ConfigError(f"{section}.{key}={value!r} must be an integer")
            out[key] = int(value)
        elif bool in kinds and not isinstance(value, bool) and value is not None:
            raise ConfigError(f"{section}.{key}={value!r} must be true or false")
    return out


def load_config(path: str | Path | None, overrides: list[str] = ()) -> Config:
    """Read a YAML file, apply ``--set`` overrides, validate. ``path=None``: overrides only."""
    try:
        values = read_yaml(path, overrides)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    return from_dict(values)


def validate(c: Config) -> None:
    """Cross-field checks: everything that would otherwise fail after allocation."""
    _validate_execution(c.model, c.execution)
    t, e = c.train, c.execution
    if t.micro_batch_size <= 0 or t.global_batch_size <= 0:
        raise ConfigError("train.micro_batch_size and train.global_batch_size must be positive")
    if t.nan_policy not in ("stop", "skip"):
        raise ConfigError(f"train.nan_policy={t.nan_policy!r}; accepted: 'stop', 'skip'")
    if t.init_method not in ("megatron", "layout_invariant"):
        raise ConfigError(
            f"train.init_method={t.init_method!r}; accepted: 'megatron', 'layout_invariant'"
        )
    if c.reference.mode not in ("resident", "precomputed", "none"):
        raise ConfigError(
            f"reference.mode={c.reference.mode!r}; accepted: 'resident', 'precomputed', 'none'"
        )
    if c.reference.mode == "precomputed" and not c.reference.path:
        raise ConfigError(
            "reference.mode=precomputed needs reference.path (the output dir of "
            "tools/precompute_reference.py)"
        )
    if c.eval.interval and not c.eval.inputs:
        raise ConfigError("eval.interval > 0 needs eval.inputs (held-out preference pairs)")
    if c.eval.interval and c.reference.mode == "precomputed" and c.loss.needs_reference:
        if not c.reference.eval_path:
            raise ConfigError(
                "evaluation with reference.mode=precomputed needs reference.eval_path "
                "(tools/precompute_reference.py --eval --output DIR)"
            )
    if c.logging.tensorboard:
        import importlib.util

        if importlib.util.find_spec("tensorboard") is None:
            raise ConfigError(
                "logging.tensorboard: true needs the tensorboard package (pip install "
                "tensorboard), or set logging.tensorboard: false (metrics.jsonl is always written)"
            )
    if c.data is None:
        raise ConfigError("config section 'data' is required (inputs, tokenizer, max_length)")
    if c.loss.needs_reference and c.reference.mode == "none":
        raise ConfigError(
            f"loss.name={c.loss.name!r} needs reference log-probs; set "
            "reference.mode to 'resident' or 'precomputed'"
        )
    if c.optimizer.decay_style not in ("cosine", "linear", "constant"):
        raise ConfigError(
            f"optimizer.decay_style={c.optimizer.decay_style!r}; accepted: "
            "'cosine', 'linear', 'constant'"
        )
    if not 0.0 <= c.optimizer.warmup_fraction < 1.0:
        raise ConfigError("optimizer.warmup_fraction must be in [0, 1)")
    if c.optimizer.lr <= 0:
        raise ConfigError(f"optimizer.lr={c.optimizer.lr} must be > 0")
    if not 0 <= c.optimizer.min_lr <= c.optimizer.lr:
        raise ConfigError(
            f"optimizer.min_lr={c.optimizer.min_lr} must be in [0, optimizer.lr={c.optimizer.lr}]"
        )
    if c.optimizer.overlap_param_gather and not c.optimizer.use_distributed_optimizer:
        raise ConfigError(
            "optimizer.overlap_param_gather needs optimizer.use_distributed_optimizer"
        )
    if c.data is not None and e.pp > 1 and c.data.max_length % _pad_multiple(e):
        raise ConfigError(
            f"data.max_length={c.data.max_length} must be a multiple of {_pad_multiple(e)} "
            "(pipeline parallel runs at a fixed sequence length padded for TP/CP)"
        )


def check_world(c: Config, world_size: int) -> int:
    """Data-parallel size for ``world_size`` processes; batch divisibility checks."""
    e, t = c.execution, c.train
    model = e.tp * e.pp * e.cp
    if world_size % model:
        raise ConfigError(
            f"{world_size} processes are not divisible by execution.tp*pp*cp = {model}; launch a "
            "multiple of it or change the layout"
        )
    dp = world_size // model
    if t.global_batch_size % (t.micro_batch_size * dp):
        raise ConfigError(
            f"train.global_batch_size={t.global_batch_size} must be divisible by "
            f"train.micro_batch_size*DP = {t.micro_batch_size}*{dp}"
        )
    num_micro = t.global_batch_size // (t.micro_batch_size * dp)
    if e.vpp and num_micro % e.pp:
        raise ConfigError(
            f"the interleaved schedule needs the number of micro-batches ({num_micro}) to be a "
            f"multiple of execution.pp={e.pp}; change train.global_batch_size"
        )
    return dp


def _pad_multiple(e: ExecutionConfig) -> int:
    return pad_multiple(e.tp, e.cp, e.sequence_parallel)


def _validate_execution(m: ModelConfig, e: ExecutionConfig) -> None:
    for name in ("tp", "pp", "cp"):
        if getattr(e, name) < 1:
            raise ConfigError(f"execution.{name} must be >= 1")
    if m.num_attention_heads % e.tp or m.query_groups % e.tp:
        raise ConfigError(
            f"execution.tp={e.tp} must divide model.num_attention_heads="
            f"{m.num_attention_heads} and model.num_query_groups={m.query_groups}"
        )
    stages = e.pp * (e.vpp or 1)
    if m.num_layers % stages:
        raise ConfigError(
            f"model.num_layers={m.num_layers} must be divisible by execution.pp*vpp = {stages}"
        )
    if e.vpp is not None and (e.vpp < 2 or e.pp < 2):
        raise ConfigError("execution.vpp (virtual stages) needs vpp >= 2 and pp >= 2, or null")
    if e.sequence_parallel and e.tp == 1:
        raise ConfigError("execution.sequence_parallel needs execution.tp > 1")
    if e.recompute not in (None, "selective", "full"):
        raise ConfigError(f"execution.recompute={e.recompute!r}; accepted: null, selective, full")
    if e.transformer_impl not in ("auto", "local", "transformer_engine"):
        raise ConfigError(
            f"execution.transformer_impl={e.transformer_impl!r}; accepted: "
            "auto, local, transformer_engine"
        )
    if e.fp8 not in (None, "hybrid", "e4m3"):
        raise ConfigError(f"execution.fp8={e.fp8!r}; accepted: null, hybrid, e4m3")
    if e.fp8 or e.transformer_impl == "transformer_engine":
        import torch

        from megatron_adadpo.megatron_api import te_available

        if not (torch.cuda.is_available() and te_available()):
            raise ConfigError(
                "execution.fp8 / transformer_impl=transformer_engine need Transformer Engine on a "
                "CUDA GPU (pip install 'megatron_adadpo[gpu]'); set execution.fp8=null and "
                "execution.transformer_impl=local to run without it"
            )
    if e.cp > 1 and not e.use_te():
        raise ConfigError("execution.cp > 1 needs Transformer Engine attention (GPU); set cp=1")

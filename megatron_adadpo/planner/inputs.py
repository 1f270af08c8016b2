"""What the planner needs from a recipe, read without importing torch or Megatron.

A recipe is the training YAML (``megatron_adadpo.config``); the planner reads the sections that
decide memory and speed (model, execution, train, optimizer, reference, data) and checks the
layout against the cluster (nodes x GPUs per node). It runs on a login node in well under a
second. Every refusal names the field and the fix (``LayoutError``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from megatron_adadpo.hardware import GpuSpec, gpu_spec
from megatron_adadpo.layout import pad_multiple
from megatron_adadpo.model_config import ModelConfig
from megatron_adadpo.yaml_config import read_yaml

# Defaults of megatron_adadpo.model.ExecutionConfig (a unit test keeps them in sync).
EXECUTION_DEFAULTS = dict(
    tp=1,
    pp=1,
    vpp=None,
    cp=1,
    sequence_parallel=False,
    bf16=False,
    fp8=None,
    fp8_recipe="delayed",
    recompute=None,
    recompute_num_layers=1,
    transformer_impl="auto",
)


class LayoutError(ValueError):
    """A layout that cannot run; the message says which field and why."""


@dataclass(frozen=True)
class Cluster:
    """Where the job runs: ``nodes`` x ``gpus_per_node`` GPUs of one kind (``gpus`` of them)."""

    gpu: GpuSpec
    nodes: int = 1
    gpus_per_node: int = 8
    gpus: int | None = None  # None: every GPU of the nodes

    @property
    def world_size(self) -> int:
        return self.gpus if self.gpus is not None else self.nodes * self.gpus_per_node


@dataclass(frozen=True)
class PlanInput:
    """One training run's shape: model, layout, precision, batch and reference mode.

    ``micro_batch_size`` and ``global_batch_size`` count preference *pairs* (two sequences each).
    ``seq_length`` is the padded length (``data.max_length``); ``avg_seq_length`` the mean tokens
    per sequence for FLOPs (None: ``seq_length``, which pipeline-parallel runs always use).
    """

    model: ModelConfig
    tp: int = 1
    pp: int = 1
    vpp: int | None = None
    cp: int = 1
    sequence_parallel: bool = False
    bf16: bool = True
    fp8: str | None = None
    recompute: str | None = None
    recompute_num_layers: int = 1
    transformer_impl: str = "auto"
    global_batch_size: int = 128
    micro_batch_size: int = 1
    seq_length: int = 2048
    avg_seq_length: int | None = None
    distributed_optimizer: bool = True
    reference: str = "resident"  # "resident" | "precomputed" | "none"
    grad_bytes: int = 4  # Megatron DDP main-grad buffer: fp32 (grads accumulated/reduced in fp32)

    def replace(self, **changes) -> PlanInput:
        return dataclasses.replace(self, **changes)

    @property
    def flash_attention(self) -> bool:
        """GPU runs use Transformer Engine's fused attention unless the local spec is forced."""
        return self.transformer_impl != "local"

    def layout_str(self) -> str:
        vpp = f" (VPP {self.vpp})" if self.vpp else ""
        return f"TP{self.tp} x PP{self.pp}{vpp} x CP{self.cp}"


def read_recipe(path: str | Path | None, overrides: list[str] = ()) -> dict:
    """The recipe's YAML as nested dicts with ``--set a.b=c`` overrides applied."""
    try:
        values = read_yaml(path, overrides)
    except ValueError as err:
        raise LayoutError(str(err)) from None
    if "model" not in values:
        raise LayoutError("the recipe has no 'model' section (num_layers, hidden_size, ...)")
    return values


def plan_input(values: dict) -> PlanInput:
    """Build a ``PlanInput`` from recipe dicts (see ``read_recipe``)."""
    try:
        model = ModelConfig.from_dict(dict(values["model"]))
    except (TypeError, ValueError) as exc:
        raise LayoutError(f"model section: {exc}") from exc
    ex = dict(EXECUTION_DEFAULTS)
    unknown = sorted(set(values.get("execution") or {}) - set(ex))
    if unknown:
        raise LayoutError(f"unknown keys {[f'execution.{k}' for k in unknown]}")
    ex.update(values.get("execution") or {})
    train = values.get("train") or {}
    data = values.get("data") or {}
    opt = values.get("optimizer") or {}
    ref = (values.get("reference") or {}).get("mode", "resident")
    loss = values.get("loss") or {}
    if loss.get("name") in ("simpo", "cpo", "orpo"):
        ref = "none"  # reference-free families never run a reference model
    ex.pop("fp8_recipe")
    return PlanInput(
        model=model,
        **ex,
        global_batch_size=int(train.get("global_batch_size", 128)),
        micro_batch_size=int(train.get("micro_batch_size", 1)),
        seq_length=int(data.get("max_length", 1024)),
        distributed_optimizer=bool(opt.get("use_distributed_optimizer", False)),
        reference=ref,
    )


def check_layout(p: PlanInput, cluster: Cluster) -> list[str]:
    """Raise ``LayoutError`` (all reasons) if the layout cannot run; return warnings."""
    m, errors, warnings = p.model, [], []
    for name in ("tp", "pp", "cp", "micro_batch_size", "global_batch_size", "seq_length"):
        if not isinstance(getattr(p, name), int) or getattr(p, name) < 1:
            errors.append(f"{_field(name)}={getattr(p, name)!r} must be a positive integer")
    if errors:
        raise LayoutError("; ".join(errors))
    if m.num_attention_heads % p.tp or m.query_groups % p.tp:
        errors.append(
            f"execution.tp={p.tp} does not divide model.num_attention_heads="
            f"{m.num_attention_heads} and model.num_query_groups={m.query_groups}"
        )
    stages = p.pp * (p.vpp or 1)
    if m.num_layers % stages:
        errors.append(f"execution.pp*vpp={stages} does not divide model.num_layers={m.num_layers}")
    if p.vpp is not None and (p.vpp < 2 or p.pp < 2):
        errors.append("execution.vpp (virtual stages) needs vpp >= 2 and pp >= 2, or null")
    if p.sequence_parallel and p.tp == 1:
        errors.append("execution.sequence_parallel needs execution.tp > 1")
    if p.recompute not in (None, "selective", "full"):
        errors.append(f"execution.recompute={p.recompute!r}; accepted: null, selective, full")
    if p.fp8 not in (None, "hybrid", "e4m3"):
        errors.append(f"execution.fp8={p.fp8!r}; accepted: null, hybrid, e4m3")
    if p.fp8 and cluster.gpu.fp8_tflops is None:
        errors.append(
            f"execution.fp8={p.fp8!r} needs FP8 tensor cores; {cluster.gpu.name} has none"
        )
    if (p.cp > 1 or p.fp8) and p.transformer_impl == "local":
        errors.append(
            "execution.cp > 1 and execution.fp8 need Transformer Engine "
            "(transformer_impl auto or transformer_engine)"
        )
    if p.reference not in ("resident", "precomputed", "none"):
        errors.append(f"reference.mode={p.reference!r}; accepted: resident, precomputed, none")
    pad = _pad_multiple(p)
    if p.pp > 1 and p.seq_length % pad:
        errors.append(f"data.max_length={p.seq_length} must be a multiple of {pad} (TP/CP padding)")
    errors += _world_errors(p, cluster)
    if errors:
        raise LayoutError("; ".join(errors))
    if p.tp > cluster.gpus_per_node:
        warnings.append(
            f"TP{p.tp} spans nodes ({cluster.gpus_per_node} GPUs per node): tensor "
            "parallelism across the network is slow; keep TP within a node"
        )
    if p.tp > 1 and not p.sequence_parallel:
        warnings.append("TP > 1 without sequence_parallel stores replicated activations")
    return warnings


def data_parallel_size(p: PlanInput, cluster: Cluster) -> int:
    return cluster.world_size // (p.tp * p.pp * p.cp)


def num_micro_batches(p: PlanInput, cluster: Cluster) -> int:
    """Micro-batches per optimizer step on each data-parallel rank."""
    return p.global_batch_size // (p.micro_batch_size * data_parallel_size(p, cluster))


def _world_errors(p: PlanInput, c: Cluster) -> list[str]:
    errors = []
    if c.nodes < 1 or c.gpus_per_node < 1:
        return [f"nodes={c.nodes} and gpus_per_node={c.gpus_per_node} must be >= 1"]
    if c.gpus is not None and c.gpus > c.nodes * c.gpus_per_node:
        return [
            f"{c.gpus} GPUs requested but {c.nodes} nodes x {c.gpus_per_node} GPUs per node "
            f"= {c.nodes * c.gpus_per_node}; add nodes or ask for fewer GPUs"
        ]
    model = p.tp * p.pp * p.cp
    if c.world_size % model:
        return [
            f"{c.world_size} GPUs are not divisible by execution.tp*pp*cp = {model}; use a "
            "multiple of it or change the layout"
        ]
    dp = c.world_size // model
    if p.global_batch_size % (p.micro_batch_size * dp):
        errors.append(
            f"train.global_batch_size={p.global_batch_size} is not divisible by "
            f"train.micro_batch_size*DP = {p.micro_batch_size}*{dp}"
        )
    elif p.vpp and (p.global_batch_size // (p.micro_batch_size * dp)) % p.pp:
        micro = p.global_batch_size // (p.micro_batch_size * dp)
        errors.append(
            f"the interleaved schedule needs the micro-batch count ({micro}) to be a "
            f"multiple of execution.pp={p.pp}; change train.global_batch_size"
        )
    return errors


def _pad_multiple(p: PlanInput) -> int:
    return pad_multiple(p.tp, p.cp, p.sequence_parallel)


def _field(name: str) -> str:
    if name in ("micro_batch_size", "global_batch_size"):
        return f"train.{name}"
    if name == "seq_length":
        return "data.max_length"
    return f"execution.{name}"


def make_cluster(gpu: str, nodes: int = 1, gpus_per_node: int = 8, gpus: int | None = None):
    return Cluster(gpu=gpu_spec(gpu), nodes=nodes, gpus_per_node=gpus_per_node, gpus=gpus)

"""What the planner needs from a recipe: the validated training config, checked on a cluster.

A recipe is the training YAML; ``read_recipe`` builds the validated ``Config`` of
``megatron_adadpo.config`` (``from_dict``: the config's own defaults and rules, but not its
environment check, since the plan is for another machine) and ``plan_input`` keeps what decides
memory and speed: model, ``ExecutionConfig``, batch sizes, sequence length, optimizer and the
effective reference. ``check_layout`` runs the trainer's resolver (``megatron_adadpo.resolve``)
on the cluster: its world size ``nodes x GPUs per node`` and its GPU as a ``Machine``
(``Cluster.machine``), plus the cluster's own rule (the GPU count fits the nodes). No GPU or
Megatron is needed; every refusal names the field and the fix (``LayoutError``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from megatron_adadpo.config import Config, ConfigError, from_dict, read_yaml
from megatron_adadpo.layout import ExecutionConfig, data_parallel_size
from megatron_adadpo.model.config import ModelConfig
from megatron_adadpo.model.lora_config import LoraSection
from megatron_adadpo.platform.hardware import GpuSpec, gpu_spec
from megatron_adadpo.resolve import Machine, RunRequest, run_errors

_REQUEST_FIELDS = tuple(f.name for f in dataclasses.fields(RunRequest))
_OWN = {"max_length": "seq_length"}  # RunRequest field -> the PlanInput field of that value


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

    @property
    def machine(self) -> Machine:
        """Each node as the resolver sees it (CUDA, Transformer Engine, the GPU's facts)."""
        return Machine.of_gpu(self.gpu)


@dataclass(frozen=True)
class PlanInput:
    """One training run's shape: model, execution (layout, precision), batch, reference mode.

    ``micro_batch_size`` and ``global_batch_size`` count preference *pairs* (two sequences each).
    ``seq_length`` is the longest row (``data.max_length``); ``avg_seq_length`` the mean tokens
    per sequence for FLOPs (None: ``seq_length``). ``reference`` is the effective reference mode
    (``Config.reference_mode``). ``batching`` / ``max_tokens_per_micro_batch`` are the data
    section's; ``row_lengths`` (int ``[n, 2]``, chosen and rejected rows of pairs drawn from a
    length profile) lets the planner run the batching policy on realistic lengths
    (``planner/batching.py``); without it every sequence is ``avg_seq_length`` tokens.
    """

    model: ModelConfig
    execution: ExecutionConfig = field(default_factory=lambda: ExecutionConfig(bf16=True))
    global_batch_size: int = 128
    micro_batch_size: int = 1
    seq_length: int = 2048
    avg_seq_length: int | None = None
    distributed_optimizer: bool = True
    reference: str = "resident"  # "resident" | "precomputed" | "adapters_off" | "none"
    loss: str = "adadpo"  # loss.name
    grad_bytes: int = 4  # Megatron DDP main-grad buffer: fp32 (grads accumulated/reduced in fp32)
    batching: str = "fixed"  # "fixed" | "token_budget" | "packed" (data.batching)
    max_tokens_per_micro_batch: int | None = None
    row_lengths: np.ndarray | None = field(default=None, compare=False, repr=False)
    lora: LoraSection | None = None  # LoRA adapters: only they have gradients and optimizer state

    def replace(self, **changes) -> PlanInput:
        return dataclasses.replace(self, **changes)

    def with_execution(self, **changes) -> PlanInput:
        """A copy with ``execution`` fields replaced, e.g. ``p.with_execution(tp=2)``."""
        return self.replace(execution=dataclasses.replace(self.execution, **changes))

    @property
    def flash_attention(self) -> bool:
        """Fused attention (TE's, or torch SDPA's flash kernel on the local spec) unless
        ``execution.attention=megatron_local`` (Megatron's materialised ``s x s`` softmax)."""
        return self.execution.attention != "megatron_local"

    def request(self) -> RunRequest:
        """What the resolver reads of this run (``resolve.RunRequest``)."""
        return RunRequest(**{f: getattr(self, _OWN.get(f, f)) for f in _REQUEST_FIELDS})

    @property
    def micro_batch_shape(self) -> tuple[float, float]:
        """``(rows, tokens per row)`` of the largest micro-batch, for memory: ``fixed``
        ``[2 x micro_batch_size, seq_length]``; ``token_budget`` at most ``max_tokens``, rows of
        up to ``seq_length``; ``packed`` one row of ``max_tokens``."""
        if self.batching == "packed":
            return 1.0, float(self.max_tokens_per_micro_batch)
        if self.batching == "token_budget":
            return self.max_tokens_per_micro_batch / self.seq_length, float(self.seq_length)
        return 2.0 * self.micro_batch_size, float(self.seq_length)

    def layout_str(self) -> str:
        e = self.execution
        vpp = f" (VPP {e.vpp})" if e.vpp else ""
        return f"TP{e.tp} x PP{e.pp}{vpp} x CP{e.cp}"


def read_recipe(path: str | Path | None, overrides: list[str] = ()) -> Config:
    """The recipe's validated ``Config`` with ``--set a.b=c`` overrides applied.

    A ``ConfigError`` becomes a ``LayoutError`` with the same message.
    """
    try:
        return from_dict(read_yaml(path, list(overrides)))
    except ConfigError as err:
        raise LayoutError(str(err)) from None


def plan_input(config: Config) -> PlanInput:
    """The ``PlanInput`` of a validated ``Config`` (see ``read_recipe``): the resolver's
    request of it (``RunRequest.of_config``) and the optimizer's sharding."""
    request = RunRequest.of_config(config)
    given = {_OWN.get(f, f): getattr(request, f) for f in _REQUEST_FIELDS}
    return PlanInput(**given, distributed_optimizer=config.optimizer.use_distributed_optimizer)


def check_layout(p: PlanInput, cluster: Cluster) -> list[str]:
    """Raise ``LayoutError`` (all reasons) if the layout cannot run; return warnings.

    The rules are the trainer's resolver's (``resolve.run_errors``) on ``cluster.world_size``
    processes of ``cluster.machine``; the planner adds the cluster's shape.
    """
    e = p.execution
    errors = _cluster_errors(cluster)
    world = None if errors else cluster.world_size
    errors += run_errors(p.request(), world, cluster.machine)
    if errors:
        raise LayoutError("; ".join(errors))
    warnings = []
    if e.tp > cluster.gpus_per_node:
        warnings.append(
            f"TP{e.tp} spans nodes ({cluster.gpus_per_node} GPUs per node): tensor "
            "parallelism across the network is slow; keep TP within a node"
        )
    if e.tp > 1 and not e.sequence_parallel:
        warnings.append("TP > 1 without sequence_parallel stores replicated activations")
    return warnings


def num_micro_batches(p: PlanInput, cluster: Cluster) -> int:
    """Micro-batches per optimizer step on each data-parallel rank (``fixed`` batching)."""
    dp = data_parallel_size(p.execution, cluster.world_size)
    return p.global_batch_size // (p.micro_batch_size * dp)


def _cluster_errors(c: Cluster) -> list[str]:
    if c.nodes < 1 or c.gpus_per_node < 1:
        return [f"nodes={c.nodes} and gpus_per_node={c.gpus_per_node} must be >= 1"]
    if c.gpus is not None and c.gpus < 1:
        return [f"gpus={c.gpus} must be >= 1 (or unset: every GPU of the nodes)"]
    if c.gpus is not None and c.gpus > c.nodes * c.gpus_per_node:
        return [
            f"{c.gpus} GPUs requested but {c.nodes} nodes x {c.gpus_per_node} GPUs per node "
            f"= {c.nodes * c.gpus_per_node}; add nodes or ask for fewer GPUs"
        ]
    return []


def make_cluster(gpu: str, nodes: int = 1, gpus_per_node: int = 8, gpus: int | None = None):
    return Cluster(gpu=gpu_spec(gpu), nodes=nodes, gpus_per_node=gpus_per_node, gpus=gpus)

"""The resolved run: what will run, settled once from the config on a machine (torch-free).

``resolve(config, world_size, machine)`` (``resolve/resolver.py``) makes it; the trainer, the
model builder, the batcher, the step, precompute, generation and the planner read it and never
re-derive, re-check or re-probe. ``RunRequest`` is what the resolver reads of a config (the
planner describes one without data files).
"""

from __future__ import annotations

from dataclasses import dataclass
from operator import attrgetter
from typing import TYPE_CHECKING

from megatron_adadpo.resolve.batching import Batching
from megatron_adadpo.resolve.kernels import Kernels

if TYPE_CHECKING:
    from megatron_adadpo.layout import ExecutionConfig
    from megatron_adadpo.model.config import ModelConfig
    from megatron_adadpo.model.lora_config import LoraSection


@dataclass(frozen=True)
class RunRequest:
    """The config fields the resolver reads (``of_config``), nothing else.

    ``reference`` is the effective reference mode (``Config.reference_mode``), ``loss`` the
    loss family (``loss.name``), ``max_length`` the longest row (``data.max_length``), ``lora``
    the adapters (``LoraSection``; None: full-parameter training).
    """

    model: ModelConfig
    execution: ExecutionConfig
    micro_batch_size: int = 1
    global_batch_size: int = 1
    max_length: int = 1024
    batching: str = "fixed"
    max_tokens_per_micro_batch: int | None = None
    reference: str = "resident"
    loss: str = "adadpo"
    lora: LoraSection | None = None

    @classmethod
    def of_config(cls, config) -> RunRequest:
        """The request of a validated ``Config`` (``CONFIG_FIELDS``)."""
        return cls(**{name: attrgetter(path)(config) for name, path in CONFIG_FIELDS.items()})


# Where each field of a request comes from in the ``Config``.
CONFIG_FIELDS = {
    "model": "model",
    "execution": "execution",
    "micro_batch_size": "train.micro_batch_size",
    "global_batch_size": "train.global_batch_size",
    "max_length": "data.max_length",
    "batching": "data.batching",
    "max_tokens_per_micro_batch": "data.max_tokens_per_micro_batch",
    "reference": "reference_mode",
    "loss": "loss.name",
    "lora": "lora",
}


@dataclass(frozen=True)
class Parallel:
    """Parallel degrees (this house's ``ParallelDims``): ``world = tp * pp * cp * dp``."""

    tp: int
    pp: int
    vpp: int | None
    cp: int
    dp: int
    sequence_parallel: bool

    @property
    def world_size(self) -> int:
        return self.tp * self.pp * self.cp * self.dp


@dataclass(frozen=True)
class Step:
    """What one step computes: the settled log-prob chunk size (0: not chunked), the
    reference mode ("resident" | "precomputed" | "adapters_off" | "none"), the loss family
    and the LoRA adapters (None: every parameter trains)."""

    logprob_chunk_tokens: int
    reference: str
    loss: str
    lora: LoraSection | None = None


@dataclass(frozen=True)
class ResolvedRun:
    """What will run: parallel degrees, kernels, step, batching; ``device`` "cuda" | "cpu"."""

    parallel: Parallel
    kernels: Kernels
    step: Step
    batching: Batching

    @property
    def device(self) -> str:
        return "cuda" if self.kernels.cuda else "cpu"

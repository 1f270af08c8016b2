"""``resolve(config, world_size, machine) -> ResolvedRun``: every rule and every ``auto``
settled in one place, or one error with every reason the config cannot run (torch-free).

The rules are those of ``resolve/layout.py`` (layout, batch sizes, world size),
``resolve/kernels.py`` (Transformer Engine, attention, FP8, context parallelism),
``resolve/batching.py`` (token budget) and ``resolve/lora.py`` (LoRA's adapters).
``run_errors`` applies them with what is known: without ``world_size`` the world's rules wait,
without ``machine`` the kernel rules apply to the best the config allows. The config's loading
checks a config with neither (``config.validate``), then on this machine
(``config.check_environment``); the trainer resolves it on its world size; the planner on its
cluster's world size and ``Machine``.
"""

from __future__ import annotations

import dataclasses

from megatron_adadpo.config_text import ConfigError
from megatron_adadpo.layout import logprob_chunk_tokens
from megatron_adadpo.platform.hardware import Machine
from megatron_adadpo.resolve.batching import (
    Batching,
    batching_policy,
    budget_errors,
    packing_format,
)
from megatron_adadpo.resolve.kernels import resolve_kernels
from megatron_adadpo.resolve.layout import layout_errors
from megatron_adadpo.resolve.lora import lora_run_errors, split_norm_linears
from megatron_adadpo.resolve.run import Parallel, ResolvedRun, RunRequest, Step


def request_of(config) -> RunRequest:
    """A ``RunRequest`` as given, or the request of a ``Config``."""
    return config if isinstance(config, RunRequest) else RunRequest.of_config(config)


def run_errors(config, world_size: int | None = None, machine: Machine | None = None) -> list:
    """Every reason ``config`` (a ``Config`` or ``RunRequest``) cannot run on ``world_size``
    processes of ``machine`` (each one line naming the field and the fix; ``[]``: it runs)."""
    r = request_of(config)
    errors = layout_errors(
        r.model,
        r.execution,
        micro_batch_size=r.micro_batch_size,
        global_batch_size=r.global_batch_size,
        world_size=world_size,
        batching=r.batching,
        machine=machine,
    )
    if errors:
        return errors
    errors = budget_errors(_policy(r), r.max_length)  # padded for a valid layout
    return errors + _lora_errors(r)


def _lora_errors(r: RunRequest) -> list:
    """LoRA's rules with the rest of the run (``lora_run_errors``)."""
    e = r.execution
    chunk = logprob_chunk_tokens(e, r.model.padded_vocab_size(e.tp))
    return lora_run_errors(r.lora, r.reference, chunk, r.model.tie_word_embeddings, e.fp8)


def raise_errors(errors: list[str]) -> None:
    """One ``ConfigError`` naming every reason (one line)."""
    if len(errors) == 1:
        raise ConfigError(errors[0])
    if errors:
        listed = " ".join(f"({i}) {e}" for i, e in enumerate(errors, 1))
        raise ConfigError(f"{len(errors)} reasons this config cannot run: {listed}")


def resolve(config, world_size: int, machine: Machine) -> ResolvedRun:
    """The run ``config`` (a ``Config`` or ``RunRequest``) makes on ``world_size`` processes
    of ``machine``; raises one ``ConfigError`` listing every reason it cannot run."""
    raise_errors(run_errors(config, world_size, machine))
    r = request_of(config)
    e = r.execution
    kernels = resolve_kernels(e, machine)
    split = split_norm_linears(r.lora, kernels.transformer_engine)
    kernels = dataclasses.replace(kernels, split_norm_linears=split)
    parallel = Parallel(
        tp=e.tp,
        pp=e.pp,
        vpp=e.vpp,
        cp=e.cp,
        dp=world_size // e.model_parallel_size,
        sequence_parallel=e.sequence_parallel,
    )
    chunk = logprob_chunk_tokens(e, r.model.padded_vocab_size(e.tp))
    batching = Batching(_policy(r), packing_format(r.batching, kernels.attention))
    step = Step(chunk, r.reference, r.loss, r.lora)
    return ResolvedRun(parallel, kernels, step, batching)


def _policy(r: RunRequest):
    return batching_policy(
        r.batching, r.max_tokens_per_micro_batch, r.execution, r.micro_batch_size
    )

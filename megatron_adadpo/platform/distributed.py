"""Start torch.distributed (nccl on GPUs, gloo on CPU) and Megatron's parallel state.

On a machine without CUDA the entry point switches on the CPU compatibility layer first
(``megatron_adadpo.platform.cpu.activate()``); nothing here does it implicitly.
"""

from __future__ import annotations

import datetime
import os
import socket

import torch
import torch.distributed as dist

from megatron_adadpo.layout import ExecutionConfig
from megatron_adadpo.platform.megatron import parallel_state, tensor_parallel
from megatron_adadpo.platform.parallel import Parallel


def init_distributed(timeout_minutes: float = 30.0) -> None:
    """Initialise the default process group from torchrun's environment (idempotent).

    NCCL with one GPU per local rank when CUDA is present, gloo otherwise. A plain ``python``
    run (no ``RANK`` in the environment) is a world of one process. ``timeout_minutes``
    (``train.distributed_timeout_minutes``) is every collective's timeout; torch's own default
    is 10 minutes (``torch/distributed/constants.py``), and ``NCCL_TIMEOUT`` is read by neither.
    """
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if dist.is_initialized():
        return
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if "RANK" not in os.environ:
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    dist.init_process_group(backend, timeout=datetime.timedelta(minutes=timeout_minutes))


def init_model_parallel(
    execution: ExecutionConfig, seed: int = 1234, timeout_minutes: float = 30.0
) -> Parallel:
    """Create Megatron's TP/PP/CP/DP groups for ``execution``'s layout, seed its RNG tracker,
    and return the run's parallel value (``platform/parallel.py``: degrees, groups, this rank's
    coordinates; built once, passed to the batcher, step, log-prob and metric code).
    ``timeout_minutes`` is the groups' collective timeout (``initialize_model_parallel``'s
    ``distributed_timeout_minutes``, 0.16.1 and 0.19: ``timedelta(minutes=...)``)."""
    destroy_model_parallel()
    before = set(_registered_groups())
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=execution.tp,
        pipeline_model_parallel_size=execution.pp,
        virtual_pipeline_model_parallel_size=execution.vpp,
        context_parallel_size=execution.cp,
        distributed_timeout_minutes=timeout_minutes,
    )
    _MEGATRON_GROUPS[:] = [g for g in _registered_groups() if g not in before]
    tensor_parallel.model_parallel_cuda_manual_seed(seed)
    return Parallel.current(execution.vpp)


# The process groups the last ``initialize_model_parallel`` created (torch's registry, read
# before and after it): Megatron's ``destroy_model_parallel`` (0.16.1, 0.19.2) forgets its groups
# but destroys only the gloo copies of the DP groups, so a process that opens run after run (the
# miniature grid's workers, a sweep, a notebook) kept every run's: 17 groups and 51 gloo threads
# more per run (one rank, measured), 2,500 threads and 4x slower steps after ~60 grid runs.
_MEGATRON_GROUPS: list = []


def _registered_groups() -> list:
    """Every process group torch holds, the default one included (``_world.pg_map``: torch
    has no public list; torch 2.13 ``distributed_c10d.py``, read by ``destroy_process_group``)."""
    return list(dist.distributed_c10d._world.pg_map) if dist.is_initialized() else []


def destroy_model_parallel() -> None:
    """Megatron's ``destroy_model_parallel``, then the groups it left in torch's registry.

    Every rank destroys them in the order they were created, as torch's own teardown keeps a
    fixed order (``destroy_process_group``: ``ncclCommAbort`` was collective in some NCCL
    versions); on gloo it is local (``ProcessGroup.shutdown`` and the registry entries)."""
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    registered = set(_registered_groups())
    for group in _MEGATRON_GROUPS:
        if group in registered:
            dist.destroy_process_group(group)
    _MEGATRON_GROUPS.clear()


def destroy() -> None:
    """Tear down Megatron's parallel state and the default process group."""
    destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]

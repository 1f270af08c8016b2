"""Start torch.distributed (nccl on GPUs, gloo on CPU) and Megatron's parallel state."""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from megatron_adadpo import cpu
from megatron_adadpo.megatron_api import parallel_state, tensor_parallel


@dataclass(frozen=True)
class Layout:
    """A parallel layout: sizes of the tensor, pipeline, context and data-parallel groups."""

    tp: int = 1
    pp: int = 1
    vpp: int | None = None
    cp: int = 1

    def data_parallel_size(self, world_size: int) -> int:
        model = self.tp * self.pp * self.cp
        if world_size % model:
            raise ValueError(
                f"world size {world_size} is not divisible by tp*pp*cp = {model} "
                f"(tp={self.tp}, pp={self.pp}, cp={self.cp}); change the layout or the "
                "number of processes"
            )
        return world_size // model


def init_distributed(timeout_s: float = 600.0) -> None:
    """Initialise the default process group from torchrun's environment (idempotent).

    NCCL with one GPU per local rank when CUDA is present; gloo plus the CPU compatibility layer
    (``megatron_adadpo.cpu``) otherwise.
    """
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    else:
        cpu.activate()
    if dist.is_initialized():
        return
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if "RANK" not in os.environ:  # a plain `python` run: a world of one process
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))


def init_model_parallel(layout: Layout, seed: int = 1234) -> None:
    """Create Megatron's TP/PP/CP/DP groups and seed its RNG tracker for this layout."""
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=layout.tp,
        pipeline_model_parallel_size=layout.pp,
        virtual_pipeline_model_parallel_size=layout.vpp,
        context_parallel_size=layout.cp,
    )
    tensor_parallel.model_parallel_cuda_manual_seed(seed)


def destroy() -> None:
    """Tear down Megatron's parallel state and the default process group."""
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]

"""The test launcher never forks a rank after the parent touched CUDA.

torch 2.13 ``torch/cuda/__init__.py`` ``_lazy_init``: a forked child of a process that
initialised CUDA raises "Cannot re-initialize CUDA in forked subprocess. To use CUDA with
multiprocessing, you must use the 'spawn' start method". The GPU checks' ``megatron_seam``
run (``benchmarks/gpu/stack_checks.py``) sets ``ADADPO_RANK_START=spawn``; without it the
launcher spawns whenever ``torch.cuda.is_initialized()``.
"""

import os

import torch
import torch.distributed as dist

from tests import launcher


def _where(rank, world):
    return os.getpid(), dist.get_world_size()


def test_spawn_once_cuda_is_initialised(monkeypatch):
    monkeypatch.delenv("ADADPO_RANK_START", raising=False)
    assert launcher.start_method() == ("spawn" if torch.cuda.is_initialized() else "fork")
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    assert launcher.start_method() == "spawn"


def test_spawned_ranks_run(monkeypatch):
    monkeypatch.setenv("ADADPO_RANK_START", "spawn")
    out = launcher.run_ranks(_where, 2, timeout=120)
    assert [w for _, w in out] == [2, 2] and len({pid for pid, _ in out}) == 2


def test_the_seam_check_spawns():
    from pathlib import Path

    source = Path(__file__).resolve().parents[2] / "benchmarks/gpu/stack_checks.py"
    seam = source.read_text().split("def check_megatron_seam", 1)[1].split("\ndef ", 1)[0]
    assert '"ADADPO_RANK_START": "spawn"' in seam

"""``train.distributed_timeout_minutes`` is the collective timeout of every process group.

The default group is created by ``init_distributed`` with ``init_process_group(timeout=...)``
(torch 2.13 ``torch/distributed/distributed_c10d.py`` ``init_process_group``: "timeout ...
Default value is 10 minutes for NCCL and for other backends 30 minutes" is overridden by the
argument); Megatron's groups by ``initialize_model_parallel(distributed_timeout_minutes=...)``
(megatron-core 0.16.1 ``parallel_state.py`` lines 561 and 819, 0.19.2 lines 616 and 909:
``timeout = timedelta(minutes=distributed_timeout_minutes)``). The old Slurm script's
``NCCL_TIMEOUT`` was read by neither. Gloo honours the timeout, so a collective that one rank
never joins fails on the other after about the configured time, on each kind of group.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch.distributed as dist

from megatron_adadpo.layout import ExecutionConfig
from megatron_adadpo.platform import cpu
from megatron_adadpo.platform import distributed as parallel
from megatron_adadpo.platform.megatron import parallel_state
from tests.launcher import run_ranks

MINUTES = 0.05  # 3 s


def _time_a_lonely_collective(rank, world, port):
    dist.destroy_process_group()  # the launcher's group: the code under test makes its own
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    parallel.init_distributed(timeout_minutes=MINUTES)
    parallel.init_model_parallel(ExecutionConfig(), timeout_minutes=MINUTES)
    if rank == 1:
        time.sleep(20)  # never joins; its exit would end a hung barrier only after ~17 s
        return None
    waited = []
    for group in (None, parallel_state.get_data_parallel_group()):
        start = time.monotonic()
        try:
            dist.barrier(group=group)
        except RuntimeError:
            waited.append(time.monotonic() - start)
    return waited


def test_collectives_time_out_after_the_configured_minutes():
    port = parallel.free_port()
    waited = run_ranks(_time_a_lonely_collective, 2, port, timeout=60)[0]
    assert len(waited) == 2, waited  # both the default group and Megatron's DP group timed out
    assert all(0.8 * MINUTES * 60 <= w < 8 for w in waited), waited  # 3 s, not 10 or 30 min


def test_train_passes_the_config_value(monkeypatch):
    """``megatron_adadpo.train`` hands the config's value to ``init_distributed``."""
    from megatron_adadpo import train
    from megatron_adadpo.run import trainer

    seen = []  # train.main imports these inside main(): patched where they are defined
    # and the CPU compat layer stays off in this (the pytest) process: once active it would
    # change every later test's torch in this process (HF logits, on the newest stack)
    monkeypatch.setattr(cpu, "activate", lambda: False)
    monkeypatch.setattr(parallel, "init_distributed", lambda minutes: seen.append(minutes))
    monkeypatch.setattr(parallel, "destroy", lambda: None)
    monkeypatch.setattr(trainer, "open_run", lambda config: seen.append(config) or _NoTrain())
    quickstart = Path(__file__).resolve().parents[2] / "examples" / "configs" / "quickstart.yaml"
    train.main(["--config", str(quickstart), "--set", "train.distributed_timeout_minutes=45"])
    assert seen[0] == 45.0 and seen[1].train.distributed_timeout_minutes == 45.0


class _NoTrain:
    preempted = False

    def train(self):
        return None

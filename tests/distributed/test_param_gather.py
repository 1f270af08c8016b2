"""Overlapped parameter all-gather (distributed optimizer): ``align_param_gather`` and the
schedule's ``param_sync_func`` are set together, only under the interleaved schedule, as
Megatron-LM does (``megatron/training/arguments.py``: ``align_param_gather = False`` without
virtual stages; ``training.py``: ``param_sync_func`` only ``if overlap_param_gather and
align_param_gather``). With ``param_sync_func`` but no alignment, the schedule and DDP's forward
hooks both dispatch the next bucket's all-gather (``param_and_grad_buffer.py``
``finish_param_sync``: "The next bucket's parameter all-gather operation has already been
dispatched"). The training trajectory of this layout equals TP1 in
``test_train_layouts.py`` (``pp2_vpp2_distributed_optimizer_param_gather``)."""

from __future__ import annotations

import pytest

from tests.distributed.train_harness import REPO, overrides
from tests.launcher import run_ranks

pytestmark = pytest.mark.distributed

GATHER = [
    "execution.pp=2",
    "optimizer.use_distributed_optimizer=true",
    "optimizer.overlap_grad_reduce=true",
    "optimizer.overlap_param_gather=true",
]


def _sync_setup(rank, world, sets):
    from megatron_adadpo.config import load_config
    from megatron_adadpo.run.trainer import Trainer

    trainer = Trainer(load_config(REPO / "examples/configs/quickstart.yaml", sets))
    sync = trainer.policy[0].config.param_sync_func
    chunks = [chunk.start_param_sync for chunk in trainer.policy]
    aligned = [chunk.ddp_config.align_param_gather for chunk in trainer.policy]
    installed = sync == chunks if isinstance(sync, list) else sync is not None
    return aligned, installed


@pytest.mark.parametrize("vpp", [None, 2])
def test_param_sync_func_comes_with_align_param_gather(vpp, tmp_path):
    sets = overrides(
        tmp_path / "run", tmp_path / "cache", [*GATHER, f"execution.vpp={vpp or 'null'}"]
    )
    for aligned, installed in run_ranks(_sync_setup, 2, sets, timeout=240):
        assert aligned == [vpp is not None] * (vpp or 1)
        assert installed == (vpp is not None)

"""TR-DPO (``reference.sync_steps``, ``reference.mixup_alpha``) through the real trainer in
forked gloo ranks: a hard copy every step keeps every step at ln 2 (the policy is the reference
when the step starts); a soft mixup runs the same on TP2 and on DP2 with the distributed
optimizer and overlapped parameter gathers as on one rank; a resumed run continues the updated
reference exactly."""

import math
import shutil

import pytest

from megatron_adadpo.run.state.run_dir import latest_checkpoint
from tests.distributed.train_harness import (
    argv,
    assert_same_rows,
    kill_in_step,
    losses,
    read_metrics,
    run_trainer,
)
from tests.launcher import RankFailed, run_ranks

pytestmark = pytest.mark.distributed

STEPS = ["train.train_iters=4"]
SOFT = ["reference.sync_steps=2", "reference.mixup_alpha=0.5"]


def _train(tmp_path, cache_dir, name, *extra, world=1):
    run_ranks(run_trainer, world, argv(tmp_path / name, cache_dir, *STEPS, *extra), timeout=240)
    return read_metrics(tmp_path / name)


def test_hard_copy_every_step_keeps_the_policy_at_the_reference(tmp_path, cache_dir):
    synced = _train(
        tmp_path, cache_dir, "hard", "reference.sync_steps=1", "reference.mixup_alpha=1"
    )
    plain = _train(tmp_path, cache_dir, "plain")
    for row in synced:  # the step starts with policy == reference: z = 0
        assert row["loss"] == pytest.approx(math.log(2), abs=1e-5)
        assert abs(row["rewards/margins"]) < 1e-5
    assert all(abs(r["loss"] - math.log(2)) > 1e-4 for r in plain[1:])  # without: it moves


def test_soft_mixup_is_layout_invariant(tmp_path, cache_dir):
    """alpha = 0.5 every 2 steps: TP2, PP2, and DP2 with the distributed optimizer's overlapped
    parameter gathers (the reference mixes the model parameters after they are current), log
    what one rank logs; and the updates change the run (step 3 on)."""
    one = _train(tmp_path, cache_dir, "tp1", *SOFT)
    plain = _train(tmp_path, cache_dir, "plain")
    assert losses(tmp_path / "tp1")[:2] == losses(tmp_path / "plain")[:2]  # first update: step 2
    assert abs(one[2]["loss"] - plain[2]["loss"]) > 1e-4
    for layout in ("execution.tp=2", "execution.pp=2"):
        rows = _train(tmp_path, cache_dir, layout, *SOFT, layout, world=2)
        assert_same_rows(rows, one, f"TR-DPO {layout}")
    dist_opt = [
        "optimizer.use_distributed_optimizer=true",
        "optimizer.overlap_grad_reduce=true",
        "optimizer.overlap_param_gather=true",
    ]
    dp2 = _train(tmp_path, cache_dir, "dp2", *SOFT, *dist_opt, world=2)
    assert_same_rows(dp2, one, "TR-DPO DP2 distributed optimizer")


def test_resume_continues_the_updated_reference(tmp_path, cache_dir):
    """Killed in step 4 after the save at step 2 (two updates in): the resumed run's losses are
    the uninterrupted run's exactly; resuming with TR-DPO off is refused naming the field."""
    common = [*STEPS, "train.train_iters=5", "checkpoint.save_interval=2", "reference.sync_steps=1"]
    common += ["reference.mixup_alpha=0.5"]
    run_ranks(run_trainer, 1, argv(tmp_path / "full", cache_dir, *common))
    killed = tmp_path / "killed"
    with pytest.raises(RankFailed):
        run_ranks(kill_in_step, 1, argv(killed, cache_dir, *common), 4)
    assert latest_checkpoint(killed).name == "iter_0000002"
    off = tmp_path / "off"
    shutil.copytree(killed, off)
    run_ranks(run_trainer, 1, argv(killed, cache_dir, *common))
    assert losses(killed)[-3:] == losses(tmp_path / "full")[-3:]
    with pytest.raises(RankFailed, match=r"continues TR-DPO with reference.sync_steps=1"):
        run_ranks(run_trainer, 1, argv(off, cache_dir, *common[:-2]))

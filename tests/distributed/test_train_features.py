"""Trainer features through the real entry point: reference modes, resume after SIGKILL, crash
during a save, non-finite losses, refused checkpoints, evaluation."""

import json
import math
import os
import signal

import pytest

from megatron_adadpo import train
from megatron_adadpo.run import precompute, step
from megatron_adadpo.run.state import checkpoints as checkpointing
from megatron_adadpo.run.state.run_dir import latest_checkpoint
from tests.distributed.train_harness import (
    argv,
    kill_in_step,
    losses,
    read_metrics,
    run_trainer,
)
from tests.launcher import RankFailed, run_ranks

pytestmark = pytest.mark.distributed


def test_precomputed_reference_equals_resident(tmp_path, cache_dir):
    ref_dir = tmp_path / "ref"
    base = ["execution.tp=2", "train.train_iters=4"]
    run_ranks(
        lambda r, w, a: precompute.main(a),
        2,
        argv(tmp_path / "pre", cache_dir, *base) + ["--output", str(ref_dir)],
    )
    meta = json.loads((ref_dir / "meta.json").read_text())
    assert meta["num_pairs"] == 400
    run_ranks(run_trainer, 2, argv(tmp_path / "resident", cache_dir, *base))
    run_ranks(
        run_trainer,
        2,
        argv(
            tmp_path / "precomputed",
            cache_dir,
            *base,
            "reference.mode=precomputed",
            f"reference.path={ref_dir}",
        ),
    )
    resident, precomputed = losses(tmp_path / "resident"), losses(tmp_path / "precomputed")
    assert len(resident) == 4
    assert resident == precomputed  # same micro-batches in the same order: bitwise equal


def test_precomputed_reference_for_other_data_is_refused(tmp_path, cache_dir):
    ref_dir = tmp_path / "ref"
    run_ranks(
        lambda r, w, a: precompute.main(a),
        1,
        argv(tmp_path / "pre", cache_dir, "data.max_length=48") + ["--output", str(ref_dir)],
    )
    with pytest.raises(RankFailed, match="re-run tools/precompute_reference.py"):
        run_ranks(
            run_trainer,
            1,
            argv(
                tmp_path / "t", cache_dir, "reference.mode=precomputed", f"reference.path={ref_dir}"
            ),
        )


def test_resume_after_sigkill_matches_uninterrupted(tmp_path, cache_dir):
    common = ["execution.tp=2", "train.train_iters=6", "checkpoint.save_interval=3"]
    run_ranks(run_trainer, 2, argv(tmp_path / "full", cache_dir, *common))
    run_dir = tmp_path / "killed"
    with pytest.raises(RankFailed):
        run_ranks(kill_in_step, 2, argv(run_dir, cache_dir, *common), 4)
    assert latest_checkpoint(run_dir).name == "iter_0000003"
    run_ranks(run_trainer, 2, argv(run_dir, cache_dir, *common))
    full = losses(tmp_path / "full")
    resumed = [r["loss"] for r in read_metrics(run_dir) if r["split"] == "train"]
    assert len(full) == 6 and resumed[:3] == full[:3]
    assert resumed[3:] == full[3:], "steps 4-6 after resume differ from the uninterrupted run"


def _kill_during_save(rank, world, args, kill_at):
    """Run the trainer; SIGKILL this process half-way through writing ``iter_{kill_at}``."""
    real_save = checkpointing.dist_checkpointing.save

    def dying_save(state, directory, *a, **kw):
        if os.path.basename(directory).startswith(f"iter_{kill_at:07d}"):
            os.makedirs(directory, exist_ok=True)
            open(os.path.join(directory, "partial"), "w").write("half written")
            os.kill(os.getpid(), signal.SIGKILL)
        return real_save(state, directory, *a, **kw)

    checkpointing.dist_checkpointing.save = dying_save
    train.main(args)


def _files(directory):
    return {
        str(p.relative_to(directory)): p.read_bytes() for p in directory.rglob("*") if p.is_file()
    }


def test_crash_during_save_keeps_every_complete_checkpoint(tmp_path, cache_dir):
    common = ["train.train_iters=4", "checkpoint.save_interval=2", "checkpoint.save_at_end=true"]
    run_dir, root = tmp_path / "run", tmp_path / "run" / "checkpoints"
    with pytest.raises(RankFailed):
        run_ranks(_kill_during_save, 1, argv(run_dir, cache_dir, *common), 4)
    assert latest_checkpoint(run_dir).name == "iter_0000002"
    run_ranks(run_trainer, 1, argv(run_dir, cache_dir, *common))  # resumes from step 2
    steps = [r["step"] for r in read_metrics(run_dir) if r["split"] == "train"]
    assert steps == [1, 2, 3, 4]  # steps 3-4 of the killed run are not logged twice
    assert latest_checkpoint(run_dir).name == "iter_0000004"
    # A user points latest back at step 2; the re-save of the complete iter_4 is killed.
    complete = _files(root / "iter_0000004")
    (root / "latest").write_text("iter_0000002\n")
    with pytest.raises(RankFailed):
        run_ranks(_kill_during_save, 1, argv(run_dir, cache_dir, *common), 4)
    assert _files(root / "iter_0000004") == complete
    assert latest_checkpoint(run_dir).name == "iter_0000002"
    run_ranks(run_trainer, 1, argv(run_dir, cache_dir, *common))
    assert latest_checkpoint(run_dir).name == "iter_0000004"
    names = sorted(p.name for p in root.iterdir())
    assert names == ["iter_0000002", "iter_0000004", "latest"]  # no .partial / .replaced left


def test_checkpoint_of_another_model_shape_is_refused(tmp_path, cache_dir):
    run_dir = tmp_path / "run"
    run_ranks(
        run_trainer,
        1,
        argv(run_dir, cache_dir, "train.train_iters=1", "checkpoint.save_at_end=true"),
    )
    with pytest.raises(RankFailed, match="holds another model"):
        run_ranks(
            run_trainer,
            1,
            argv(
                run_dir,
                cache_dir,
                "train.train_iters=2",
                "model.hidden_size=96",
                "model.ffn_hidden_size=192",
            ),
        )
    with pytest.raises(RankFailed, match="trained on dataset"):
        run_ranks(
            run_trainer, 1, argv(run_dir, cache_dir, "train.train_iters=2", "data.max_length=48")
        )


def _poisoned(rank, world, args, bad_step):
    real = step.preference_loss
    calls = {"n": 0}

    def poisoned_loss(*a, **kw):
        losses_, metrics = real(*a, **kw)
        calls["n"] += 1
        if (calls["n"] - 1) // 4 + 1 == bad_step:  # 4 micro-batches per step
            losses_ = losses_ * float("nan")
        return losses_, metrics

    step.preference_loss = poisoned_loss
    train.main(args)


def test_nonfinite_loss_stops_naming_step_and_pairs(tmp_path, cache_dir):
    with pytest.raises(RankFailed, match=r"non-finite loss at step 2 \(pair ids \["):
        run_ranks(_poisoned, 1, argv(tmp_path / "stop", cache_dir, "train.train_iters=3"), 2)


def test_nonfinite_loss_skip_policy_skips_the_step(tmp_path, cache_dir):
    run_ranks(
        _poisoned,
        1,
        argv(tmp_path / "skip", cache_dir, "train.train_iters=3", "train.nan_policy=skip"),
        2,
    )
    rows = read_metrics(tmp_path / "skip")
    assert [r["skipped"] for r in rows] == [0.0, 1.0, 0.0]
    assert math.isfinite(rows[2]["loss"])


def test_periodic_evaluation_on_held_out_pairs(tmp_path, cache_dir):
    run_ranks(
        run_trainer,
        1,
        argv(
            tmp_path / "ev",
            cache_dir,
            "train.train_iters=2",
            "eval.interval=2",
            "eval.max_pairs=16",
            "logging.tensorboard=true",
        ),
    )
    assert list((tmp_path / "ev" / "tensorboard").glob("events.out.tfevents.*"))
    rows = [r for r in read_metrics(tmp_path / "ev") if r["split"] == "eval"]
    assert len(rows) == 1 and rows[0]["step"] == 2
    assert rows[0]["pairs/valid"] == 1.0 and 0.0 < rows[0]["loss"] < 1.0

"""Never lose a run, never train silently wrong: re-launches, refusals and exact resume of the
distributed optimizer, through the real entry point (``megatron_adadpo.train.main``) in forked
gloo ranks. Refusals come before the model is built and leave the run directory as it was."""

import json
import os
import shutil
import time

import pytest
import torch

from megatron_adadpo.config import load_config
from megatron_adadpo.data import load_preference_dataset
from megatron_adadpo.run import datasets as run_datasets
from megatron_adadpo.run.reference import write_precomputed
from megatron_adadpo.run.state.consistency import reference_model
from megatron_adadpo.run.state.run_dir import latest_checkpoint
from tests.distributed.train_harness import (
    argv,
    kill_in_step,
    losses,
    read_metrics,
    run_trainer,
    sigterm_in,
)
from tests.launcher import RankFailed, run_ranks

pytestmark = pytest.mark.distributed

SAVING = ["train.train_iters=4", "checkpoint.save_interval=2", "checkpoint.save_at_end=true"]


def _snapshot(run_dir):
    """Every file of a run directory but its lock: relative path -> (bytes, mtime)."""
    return {
        str(p.relative_to(run_dir)): (p.read_bytes(), p.stat().st_mtime_ns)
        for p in sorted(run_dir.rglob("*"))
        if p.is_file() and p.name != "run.lock"
    }


@pytest.fixture(scope="module")
def trained(tmp_path_factory, cache_dir):
    """One rank, 4 steps, checkpoints iter_2 and iter_4 (latest)."""
    run_dir = tmp_path_factory.mktemp("trained") / "run"
    run_ranks(run_trainer, 1, argv(run_dir, cache_dir, *SAVING))
    assert latest_checkpoint(run_dir).name == "iter_0000004"
    return run_dir


def _copy(trained, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(trained, run_dir)
    return run_dir


def test_relaunch_of_finished_run_changes_nothing(trained, tmp_path, cache_dir):
    run_dir = _copy(trained, tmp_path)
    before = _snapshot(run_dir)
    run_ranks(run_trainer, 1, argv(run_dir, cache_dir, *SAVING))
    assert _snapshot(run_dir) == before
    assert (run_dir / "run.lock").read_text() == ""  # taken and released


def _refused(run_dir, cache_dir, *extra):
    """The error of a launch on ``run_dir`` that must be refused (files unchanged)."""
    before = _snapshot(run_dir)
    with pytest.raises(RankFailed) as info:
        run_ranks(run_trainer, 1, argv(run_dir, cache_dir, *extra))
    assert _snapshot(run_dir) == before
    return str(info.value)


# (what is done to a copy of the trained run, extra overrides, expected message parts)
REFUSALS = {
    "latest_removed": (
        lambda root: (root / "latest").unlink(),
        ["train.train_iters=6"],
        ["no 'latest' file", "iter_0000002, iter_0000004", "echo iter_0000004 >"],
    ),
    "latest_dangling": (
        lambda root: (root / "latest").write_text("iter_0000009\n"),
        ["train.train_iters=6"],
        ["names 'iter_0000009'", "echo iter_0000004 >"],
    ),
    "resume_false": (lambda root: None, ["checkpoint.resume=false"], ["already holds checkpoints"]),
    "seed_mid_epoch": (
        lambda root: None,
        ["train.train_iters=6", "train.seed=99"],
        ["middle of an epoch with train.seed=1234", "restore train.seed=1234"],
    ),
    "optimizer_kind": (
        lambda root: None,
        ["train.train_iters=6", "optimizer.use_distributed_optimizer=true"],
        ["plain optimizer's state", "use_distributed_optimizer=false"],
    ),
    "rope_base": (
        lambda root: None,
        ["train.train_iters=6", "model.rotary_base=500000"],
        ["holds another model", "rotary_base: checkpoint 10000.0 vs config 500000.0"],
    ),
    "corrupt_common": (
        lambda root: (root / "iter_0000004" / "common.pt").write_bytes(b"\x80\x04trunc"),
        ["train.train_iters=6"],
        ["iter_0000004 cannot be loaded", "echo iter_0000002 >"],
    ),
    "corrupt_metadata": (
        lambda root: (root / "iter_0000004" / "metadata.json").write_text("{not json"),
        ["train.train_iters=6"],
        ["iter_0000004 cannot be loaded", "echo iter_0000002 >"],
    ),
}


@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_unsafe_relaunch_is_refused_before_building(case, trained, tmp_path, cache_dir):
    damage, extra, expected = REFUSALS[case]
    run_dir = _copy(trained, tmp_path)
    damage(run_dir / "checkpoints")
    message = _refused(run_dir, cache_dir, *extra)
    for part in expected:
        assert part in message, message
    assert "build_policy" not in message  # refused before the model was built


def test_corrupt_tensor_file_names_checkpoint_and_fix(trained, tmp_path, cache_dir):
    run_dir = _copy(trained, tmp_path)
    (data,) = (run_dir / "checkpoints" / "iter_0000004").glob("__0_0.distcp")
    data.write_bytes(data.read_bytes()[:1000])
    message = _refused(
        run_dir, cache_dir, "train.train_iters=6", "checkpoint.override_scheduler=true"
    )
    assert "iter_0000004 cannot be loaded" in message and "echo iter_0000002 >" in message


def test_unwritable_run_dir_is_refused_before_anything(tmp_path, cache_dir):
    (tmp_path / "file").write_text("")  # a file in the way: what root's permissions allow here
    with pytest.raises(RankFailed, match=r"logging.run_dir: cannot write to .*file/run"):
        run_ranks(run_trainer, 1, argv(tmp_path / "file" / "run", cache_dir))


def test_vocabulary_smaller_than_tokenizer_is_refused(tmp_path, cache_dir):
    with pytest.raises(RankFailed, match=r"has 640 tokens but model.vocab_size=320"):
        run_ranks(run_trainer, 1, argv(tmp_path / "run", cache_dir, "model.vocab_size=320"))
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_new_schedule_is_refused_unless_overridden(trained, tmp_path, cache_dir):
    run_dir = _copy(trained, tmp_path)
    longer = ["train.train_iters=6", "optimizer.lr=5e-4", "checkpoint.save_at_end=false"]
    message = _refused(run_dir, cache_dir, *longer)
    where = run_dir / "checkpoints" / "iter_0000004"
    assert (
        f"checkpoint {where} has another learning-rate schedule: optimizer.lr: checkpoint 0.001, "
        "config 0.0005; train.train_iters: checkpoint 4, config 6 (decay length: checkpoint 32 "
        "pairs, config 48 pairs); restore the saved values, or set "
        "checkpoint.override_scheduler=true to continue from step 4"
    ) in message
    run_ranks(
        run_trainer, 1, argv(run_dir, cache_dir, *longer, "checkpoint.override_scheduler=true")
    )
    rows = read_metrics(run_dir)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert [r["lr"] for r in rows[4:]] == [5e-4, 5e-4]  # the config's schedule from step 5


def test_longer_run_refusal_names_only_train_iters_with_warm_up_in_pairs(tmp_path, cache_dir):
    """Extending ``train.train_iters`` with a warm-up moves the warm-up too (a fraction of the
    run): the refusal names only ``train.train_iters`` (``warmup_fraction`` is unchanged) and
    gives the schedule's sample counts in pairs (not as "lr_warmup_steps")."""
    run_dir = tmp_path / "run"
    warm = ["optimizer.warmup_fraction=0.5", "optimizer.decay_style=cosine"]
    first = ["train.train_iters=2", "checkpoint.save_at_end=true", *warm]
    run_ranks(run_trainer, 1, argv(run_dir, cache_dir, *first))
    message = _refused(run_dir, cache_dir, "train.train_iters=4", *warm)
    assert (
        "has another learning-rate schedule: train.train_iters: checkpoint 2, config 4 "
        "(warm-up: checkpoint 8 pairs, config 16 pairs; decay length: checkpoint 16 pairs, "
        "config 32 pairs); restore"
    ) in message, message
    assert "warmup_fraction" not in message and "lr_warmup_steps" not in message


def _timeless(run_dir):
    """``metrics.jsonl`` rows without their timings."""
    rows = read_metrics(run_dir)
    return [{k: v for k, v in r.items() if "throughput" not in k and "time" not in k} for r in rows]


SIGTERM_RUN = ["train.train_iters=4", "eval.interval=2", "checkpoint.save_interval=2"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, cache_dir):
    run_dir = tmp_path_factory.mktemp("uninterrupted") / "run"
    run_ranks(run_trainer, 2, argv(run_dir, cache_dir, *SIGTERM_RUN, "execution.tp=2"))
    return _timeless(run_dir)


LAST = [(3, "train"), (4, "train")]
# where SIGTERM lands (on the last rank only), its call number, the step saved, rows by then
SIGTERM_POINTS = {
    "first_step": ("train_step", 1, 1, [(1, "train")]),
    "eval_reference": ("reference", 10, 2, [(1, "train"), (2, "train")]),  # in the evaluation
    "save": ("save", 1, 2, [(1, "train"), (2, "train"), (2, "eval")]),
    # the last step's evaluation (calls 37-68): the relaunch evaluates, saves, is finished
    "last_eval": ("reference", 40, 4, [(1, "train"), (2, "train"), (2, "eval")] + LAST),
}


@pytest.mark.parametrize("point", sorted(SIGTERM_POINTS))
def test_sigterm_anywhere_saves_and_the_same_command_resumes_exactly(
    point, uninterrupted, tmp_path, cache_dir
):
    """SIGTERM on one rank during step 1, inside the evaluation's reference forward, or inside
    a save: every rank stops at the next agreement point (after the step; at the next
    evaluation micro-batch, leaving the evaluation pending; right after the save), the step is
    saved, and the same command resumes to metrics equal to an uninterrupted run's."""
    where, call, saved, rows = SIGTERM_POINTS[point]
    run_dir = tmp_path / "run"
    args = argv(run_dir, cache_dir, *SIGTERM_RUN, "execution.tp=2")
    assert run_ranks(sigterm_in, 2, args, where, call) == [True, True]
    assert latest_checkpoint(run_dir).name == f"iter_{saved:07d}"
    assert [(r["step"], r["split"]) for r in _timeless(run_dir)] == rows
    run_ranks(run_trainer, 2, args)
    assert _timeless(run_dir) == uninterrupted
    if point == "last_eval":  # re-saved without the pending evaluation: now finished
        assert latest_checkpoint(run_dir).name == "iter_0000004"
        run_ranks(run_trainer, 2, args)
        assert _timeless(run_dir) == uninterrupted


def test_run_dir_in_use_is_refused_and_stale_lock_taken_over(tmp_path, cache_dir):
    from megatron_adadpo.run.state.lock import RunDirLock

    run_dir = tmp_path / "run"
    holder = RunDirLock(run_dir)
    holder.acquire()  # this pytest process is the "other run"
    try:
        with pytest.raises(
            RankFailed, match=rf"is in use by another run \(host .*, pid {os.getpid()}"
        ):
            run_ranks(run_trainer, 1, argv(run_dir, cache_dir, "train.train_iters=1"))
    finally:
        holder.release()
    gone = os.fork()  # a process that held the lock and died without releasing it
    if gone == 0:
        os._exit(0)
    os.waitpid(gone, 0)
    record = {"host": os.uname().nodename, "pid": gone, "started": "earlier"}
    (run_dir / "run.lock").write_text(json.dumps(record))
    run_ranks(run_trainer, 1, argv(run_dir, cache_dir, "train.train_iters=1"))
    assert (run_dir / "run.lock").read_text() == ""  # released at the end
    assert [r["step"] for r in read_metrics(run_dir)] == [1]


def _slow_rank0_data(rank, world, args, seconds):
    real = run_datasets.load_preference_dataset

    def slow(*a, **kw):
        time.sleep(seconds)
        return real(*a, **kw)

    if rank == 0:
        run_datasets.load_preference_dataset = slow
    run_trainer(rank, world, args)


def test_waiting_for_rank0_data_names_data_and_fix(tmp_path, cache_dir):
    args = argv(tmp_path / "run", cache_dir, "train.data_wait_minutes=0.02")
    with pytest.raises(RankFailed, match=r"rank 1 waited 0.02 min \(train.data_wait_minutes\)"):
        run_ranks(_slow_rank0_data, 2, args, 6.0)


def test_precomputed_reference_of_another_starting_model_is_refused(tmp_path, cache_dir):
    """(A file written before ``reference.checkpoint`` records ``starting_model``.)"""
    args = argv(tmp_path / "run", cache_dir, "train.train_iters=1")
    config = load_config(args[1], args[3::2])
    dataset = load_preference_dataset(config.data)
    other = reference_model(config) | {"seed": 99}
    values = torch.zeros(len(dataset), 2).numpy()
    write_precomputed(tmp_path / "ref", values, dataset.identity, {"starting_model": other})
    extra = ["reference.mode=precomputed", f"reference.path={tmp_path / 'ref'}"]
    with pytest.raises(RankFailed, match=r"another reference model \(differs in: seed\)"):
        run_ranks(run_trainer, 1, args + [x for e in extra for x in ("--set", e)])


# ---------------------------------------------------------------- distributed optimizer

DISTRIBUTED = [
    "optimizer.use_distributed_optimizer=true",
    "optimizer.overlap_grad_reduce=true",
    "train.train_iters=6",
    "checkpoint.save_interval=3",
]


def _model_tensors(rank, world, directory):
    from megatron_adadpo.platform.megatron import dist_checkpointing

    metadata = dist_checkpointing.load_tensors_metadata(str(directory))
    wanted = {k: v for k, v in metadata.items() if not k.startswith("optimizer")}
    loaded = dist_checkpointing.load(wanted, str(directory))  # + the common (non-tensor) state
    return {k: v for k, v in loaded.items() if k in wanted}


def test_distributed_optimizer_resumes_exactly_and_reshards(tmp_path, cache_dir):
    """DP2 with the distributed optimizer and overlapped param gathering, killed in step 5:
    resumed at DP2 it reproduces the uninterrupted run exactly; resumed at DP1 (dp_reshardable
    state resharded) it matches to float rounding. The weights saved after step 3 equal those of
    a run without overlapped param gathering (Megatron-LM's ``force_param_sync`` before a save:
    without it, DP rank 0 writes last step's values for the shards the other rank updated)."""
    overlap = [*DISTRIBUTED, "optimizer.overlap_param_gather=true"]
    full, killed, resharded = tmp_path / "full", tmp_path / "killed", tmp_path / "dp1"
    run_ranks(run_trainer, 2, argv(full, cache_dir, *overlap), timeout=240)
    with pytest.raises(RankFailed):
        run_ranks(kill_in_step, 2, argv(killed, cache_dir, *overlap), 5, timeout=240)
    assert latest_checkpoint(killed).name == "iter_0000003"
    shutil.copytree(killed, resharded)
    run_ranks(run_trainer, 2, argv(killed, cache_dir, *overlap), timeout=240)
    run_ranks(run_trainer, 1, argv(resharded, cache_dir, *overlap), timeout=240)
    reference = losses(full)
    assert len(reference) == 6 and reference[-1] < reference[0] - 0.01
    assert [r["step"] for r in read_metrics(killed)] == [1, 2, 3, 4, 5, 6]
    assert losses(killed) == reference, "resume at DP2 differs from the uninterrupted run"
    assert losses(resharded)[3:] == pytest.approx(reference[3:], rel=1e-5, abs=0)
    # A new learning rate on the distributed optimizer's state (megatron-core 0.19 matches its
    # param groups by max_lr / min_lr too): the config's schedule from step 7.
    longer = ["train.train_iters=8", "optimizer.lr=5e-4", "checkpoint.override_scheduler=true"]
    run_ranks(run_trainer, 1, argv(resharded, cache_dir, *overlap, *longer), timeout=240)
    assert [r["lr"] for r in read_metrics(resharded)[-2:]] == [5e-4, 5e-4]

    plain = tmp_path / "plain"
    run_ranks(run_trainer, 2, argv(plain, cache_dir, *DISTRIBUTED[:2], "train.train_iters=3",
                                   "checkpoint.save_at_end=true"), timeout=240)  # fmt: skip
    saved = run_ranks(_model_tensors, 1, full / "checkpoints" / "iter_0000003")[0]
    fresh = run_ranks(_model_tensors, 1, plain / "checkpoints" / "iter_0000003")[0]
    assert saved.keys() == fresh.keys() and saved
    for name, tensor in fresh.items():
        assert torch.equal(saved[name], tensor), f"{name}: stale weights in the checkpoint"

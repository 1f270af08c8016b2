"""Saves that scale: fully-parallel save / load and asynchronous saves, on gloo ranks.

Fully parallel (``checkpoint.fully_parallel``, Megatron's ``FullyParallelSaveStrategyWrapper``
/ ``FullyParallelLoadStrategyWrapper``, megatron-core 0.16.1 / 0.19
``dist_checkpointing/strategies/fully_parallel.py``): which rank writes which tensor is read
back from the checkpoint's own DCP metadata (every chunk names the ``__<rank>_<n>.distcp`` file
holding it), which rank reads which tensor from the storage reader's requests. Asynchronous
(``checkpoint.async_save``, Megatron's ``AsyncCallsQueue``): ``latest`` must not move while any
rank still writes, the checkpoint must hold the state of the moment of the save, and a rank
killed while a write is in flight must leave the previous checkpoint to resume from exactly.
"""

from __future__ import annotations

import shutil
import time

import pytest
import torch

from megatron_adadpo.layout import ExecutionConfig
from megatron_adadpo.platform import safe_dcp
from megatron_adadpo.run.state import checkpoint_writer, checkpoints
from megatron_adadpo.run.state import run_dir as run_files
from megatron_adadpo.run.state.run_dir import latest_checkpoint
from tests.distributed.train_harness import argv, kill_in_step, losses, read_metrics, run_trainer
from tests.launcher import RankFailed, run_ranks
from tests.megatron_helpers import TINY, tiny_model

pytestmark = pytest.mark.distributed

DP2 = [
    "optimizer.use_distributed_optimizer=true",
    "train.train_iters=4",
    "checkpoint.save_interval=2",
    "checkpoint.save_at_end=true",
]


def _shard(index) -> tuple:
    """A DCP ``MetadataIndex`` as (key, offset): one shard of a global tensor (Megatron stacks
    the layers of a chunk into one key, a layer per shard) or one object."""
    return index.fqn, tuple(index.offset or ())


def _is_model(shard: tuple) -> bool:
    """Not the optimizer's, nor megatron-core 0.19's ``common_state`` bytes item (the run and
    scheduler state every rank reads before the model is built)."""
    return not shard[0].startswith(("optimizer", "common_state"))


def _model_shards_by_rank(directory) -> dict[tuple, dict[str, int]]:
    """``{model shard: {writing rank: bytes}}`` from the checkpoint's ``.metadata``: each
    stored chunk names its file, ``__<global rank>_<n>.distcp`` (torch DCP's file naming)."""
    metadata = safe_dcp.SafeFileSystemReader(directory).read_metadata()
    out: dict[tuple, dict[str, int]] = {}
    for index, stored in metadata.storage_data.items():
        if not _is_model(_shard(index)):
            continue
        rank = stored.relative_path.split("_")[2]  # "__1_0.distcp" -> "1"
        per_rank = out.setdefault(_shard(index), {})
        per_rank[rank] = per_rank.get(rank, 0) + stored.length
    return out


def _recording_reads(rank, world, args):
    """Rank body: the trainer, recording the model tensors this rank asks the storage for."""
    read: set[tuple] = set()
    real = safe_dcp.SafeFileSystemReader.read_data

    def recording(self, plan, planner):
        read.update(_shard(item.storage_index) for item in plan.items)
        return real(self, plan, planner)

    safe_dcp.SafeFileSystemReader.read_data = recording
    run_trainer(rank, world, args)
    return {shard for shard in read if _is_model(shard)}


def test_fully_parallel_save_and_load_spread_over_dp_ranks_and_resume_exactly(tmp_path, cache_dir):
    """DP2 with the distributed optimizer. Saved fully parallel, every model tensor (replicated
    over DP: each layer's shard of it) is written once, by either rank, and the two ranks'
    bytes differ by less than the largest shard; saved without it, DP rank 0 writes them all.
    Killed in step 3 and resumed from iter 2: fully-parallel loading has the two ranks read
    disjoint halves of the model shards (without it each reads all), and both resumes, and one
    at DP1 (resharded), train on to the uninterrupted run's losses."""
    on, off = tmp_path / "on", tmp_path / "off"
    run_ranks(run_trainer, 2, argv(on, cache_dir, *DP2), timeout=240)
    run_ranks(run_trainer, 2, argv(off, cache_dir, *DP2, "checkpoint.fully_parallel=false"))
    spread = _model_shards_by_rank(on / "checkpoints" / "iter_0000004")
    rank0 = _model_shards_by_rank(off / "checkpoints" / "iter_0000004")
    assert spread.keys() == rank0.keys() and len(spread) > 10
    assert all(set(ranks) == {"0"} for ranks in rank0.values()), "off: rank 0 writes all"
    assert all(len(ranks) == 1 for ranks in spread.values()), "a shard written twice"
    written = {r: sum(b.get(r, 0) for b in spread.values()) for r in ("0", "1")}
    largest = max(sum(b.values()) for b in spread.values())
    assert min(written.values()) > 0 and abs(written["0"] - written["1"]) <= largest, written
    assert losses(on) == losses(off)

    killed = tmp_path / "killed"
    with pytest.raises(RankFailed):
        run_ranks(kill_in_step, 2, argv(killed, cache_dir, *DP2), 3, timeout=240)
    assert latest_checkpoint(killed).name == "iter_0000002"
    for copy in ("plain", "dp1"):
        shutil.copytree(killed, tmp_path / copy)
    reads = run_ranks(_recording_reads, 2, argv(killed, cache_dir, *DP2), timeout=240)
    plain = tmp_path / "plain"
    args = argv(plain, cache_dir, *DP2, "checkpoint.fully_parallel=false")
    plain_reads = run_ranks(_recording_reads, 2, args, timeout=240)
    assert reads[0] and reads[1] and not reads[0] & reads[1], "fully parallel: disjoint reads"
    assert reads[0] | reads[1] == set(spread), "fully parallel: the ranks together read all"
    assert plain_reads[0] == plain_reads[1] == set(spread), "without it: every rank reads all"
    assert losses(killed) == losses(plain) == losses(on)
    run_ranks(run_trainer, 1, argv(tmp_path / "dp1", cache_dir, *DP2), timeout=240)
    assert losses(tmp_path / "dp1")[2:] == pytest.approx(losses(on)[2:], rel=1e-5, abs=0)


# ---------------------------------------------------------------- asynchronous saves


def _slow_on_last_rank(seconds: float):
    """``dist_checkpointing.save`` whose background write on the last rank starts ``seconds``
    late (the other ranks' writes finish first)."""
    real = checkpoint_writer.dist_checkpointing.save

    def save(*args, **kwargs):
        request = real(*args, **kwargs)
        if (
            request is None
            or torch.distributed.get_rank() != torch.distributed.get_world_size() - 1
        ):
            return request
        write = request.async_fn

        def late(*a, **kw):
            time.sleep(seconds)
            return write(*a, **kw)

        return request._replace(async_fn=late)

    return save


def _async_publish(rank, world, root):
    """Rank body: an asynchronous save of a tiny model whose last rank writes late. Returns
    what rank 0 saw of ``latest`` after scheduling, after a poll while the last rank still
    wrote, after ``wait``; and whether the saved weights are those at the save (the model is
    changed right after scheduling) on a fresh model loaded from the checkpoint."""
    chunks = tiny_model(ExecutionConfig(), seed=1)
    at_save = {k: v.clone() for k, v in chunks[0].state_dict().items() if v is not None}
    checkpoint_writer.dist_checkpointing.save = _slow_on_last_rank(3.0)
    writer = checkpoint_writer.CheckpointWriter(fully_parallel=True, async_save=True)
    final = root / "checkpoints" / "iter_0000001"
    partial = run_files.partial_path(final)
    if rank == 0:
        run_files.start_partial(final)
    torch.distributed.barrier()
    state = checkpoints.model_sharded_state_dict(chunks)
    files = lambda: checkpoints.write_model_config(partial, TINY) if rank == 0 else None  # noqa: E731
    writer.write(state, partial, {}, files, lambda: run_files.publish(partial, final))
    seen = [latest_checkpoint(root)]
    with torch.no_grad():
        for param in chunks[0].parameters():
            param.add_(1.0)  # training goes on while the write is in flight
    writer.poll()
    seen.append((latest_checkpoint(root), writer.pending))
    writer.wait()
    seen.append((latest_checkpoint(root), writer.pending))
    fresh = tiny_model(ExecutionConfig(), seed=2)
    checkpoints.load_model(fresh, final, TINY, fully_parallel=True)
    loaded = fresh[0].state_dict()
    return seen, all(torch.equal(v, loaded[k]) for k, v in at_save.items())


def test_async_save_publishes_only_after_every_rank_wrote_the_state_of_the_save(tmp_path):
    seen, same = run_ranks(_async_publish, 2, tmp_path, timeout=120)[0]
    final = tmp_path / "checkpoints" / "iter_0000001"
    assert seen == [None, (None, True), (final, False)], seen
    assert same, "the checkpoint holds weights changed after the save was scheduled"


ASYNC = [*DP2[:1], "train.train_iters=6", "checkpoint.async_save=true"]


def test_async_saves_train_as_sync_and_a_kill_mid_write_resumes_from_the_previous(
    tmp_path, cache_dir
):
    """Async saves (DP2, distributed optimizer, every 2 steps) train to the synchronous run's
    losses and write the same tensors. A rank killed in step 5, while the write of iter 4 is in
    flight (it is published at the next step's poll), leaves ``latest`` at iter 2 with iter 4
    unpublished; the same command resumes from iter 2 to the uninterrupted losses."""
    sync, run = tmp_path / "sync", tmp_path / "async"
    saving = ["checkpoint.save_interval=2", "checkpoint.save_at_end=true"]
    run_ranks(run_trainer, 2, argv(sync, cache_dir, *ASYNC[:2], *saving), timeout=240)
    run_ranks(run_trainer, 2, argv(run, cache_dir, *ASYNC, *saving), timeout=240)
    assert losses(run) == losses(sync) and len(losses(sync)) == 6
    assert run_files.list_checkpoints(run) == ["iter_0000002", "iter_0000004", "iter_0000006"]
    assert latest_checkpoint(run).name == "iter_0000006"
    assert not list((run / "checkpoints").glob("*.partial"))
    for name in run_files.list_checkpoints(sync):
        saved = run_ranks(_tensors, 1, run / "checkpoints" / name)[0]
        want = run_ranks(_tensors, 1, sync / "checkpoints" / name)[0]
        assert saved.keys() == want.keys() and all(torch.equal(saved[k], want[k]) for k in want)

    killed = tmp_path / "killed"
    args = argv(killed, cache_dir, *ASYNC, *saving)
    with pytest.raises(RankFailed):
        run_ranks(kill_in_step, 2, args, 5, timeout=240)
    assert latest_checkpoint(killed).name == "iter_0000002"
    assert (killed / "checkpoints" / "iter_0000004.partial").is_dir()
    run_ranks(run_trainer, 2, args, timeout=240)
    assert losses(killed) == losses(sync)
    assert [r["step"] for r in read_metrics(killed)] == [1, 2, 3, 4, 5, 6]
    assert latest_checkpoint(killed).name == "iter_0000006"


def _tensors(rank, world, directory):
    """Every tensor of a checkpoint (model and optimizer), read on one rank."""
    metadata = safe_dcp.tensors_metadata(directory)
    loaded = safe_dcp.load(metadata, directory)
    return {k: v for k, v in loaded.items() if k in metadata}

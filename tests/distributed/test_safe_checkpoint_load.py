"""Loading never executes: a code-running payload planted in each file of a checkpoint is
refused with an error naming the file, and never runs (its marker file is never created).

Resumes go through the real entry point (``megatron_adadpo.train.main``) in forked gloo ranks
with the documented command (a longer ``train.train_iters``, ``checkpoint.override_scheduler``);
the torchrun path is ``tests/e2e/test_safe_load_cli.py``. ``dist_checkpointing`` files written
by this megatron-core (0.16.1: ``common.pt``; 0.19: a ``common_state`` bytes item) are loaded
through ``platform/safe_dcp.py``'s functions, which are what the trainer and tools call.
"""

from __future__ import annotations

import shutil

import pytest
import torch

from megatron_adadpo.platform.safe_pickle import find_unsafe
from tests import payloads
from tests.distributed.train_harness import argv, run_trainer
from tests.launcher import RankFailed, run_ranks

pytestmark = pytest.mark.distributed

SAVING = ["train.train_iters=2", "checkpoint.save_at_end=true"]
RESUME = ["train.train_iters=3", "checkpoint.override_scheduler=true"]
CKPT = "checkpoints/iter_0000002"


@pytest.fixture(scope="module")
def trained(tmp_path_factory, cache_dir):
    run_dir = tmp_path_factory.mktemp("safe_load") / "run"
    run_ranks(run_trainer, 1, argv(run_dir, cache_dir, *SAVING), timeout=300)
    return run_dir


def _rng(ckpt, marker):
    (ckpt / "rng" / "rank_0.pt").write_bytes(payloads.torch_file(marker))
    return "rng/rank_0.pt"


def _metadata(ckpt, marker):
    (ckpt / ".metadata").write_bytes(payloads.pickled(marker))
    return ".metadata"


def _common(ckpt, marker):
    if not (ckpt / "common.pt").exists():  # megatron-core 0.19: a bytes item of the DCP files
        key = payloads.plant_bytes_item(ckpt, "common_state", marker)
        return f"bytes item '{key}' in __0_"
    common = torch.load(ckpt / "common.pt", weights_only=True)
    common["run"]["planted"] = payloads.Payload(marker)
    torch.save(common, ckpt / "common.pt")
    return "common.pt"


def _extra_state(ckpt, marker):
    key = payloads.plant_bytes_item(ckpt, "_extra_state", marker)
    return f"bytes item '{key}' in __0_"


PLANTS = {"rng": _rng, "metadata": _metadata, "common": _common, "extra_state": _extra_state}


@pytest.mark.parametrize("kind", sorted(PLANTS))
def test_resume_refuses_code_in_each_checkpoint_file(kind, trained, tmp_path, cache_dir):
    run_dir = tmp_path / "run"
    shutil.copytree(trained, run_dir)
    marker = tmp_path / "payload_ran"
    where = PLANTS[kind](run_dir / CKPT, marker)
    with pytest.raises(RankFailed) as err:
        run_ranks(run_trainer, 1, argv(run_dir, cache_dir, *RESUME), timeout=300)
    message = str(err.value)
    assert "would run code when loaded" in message and where in message, message
    assert "posix.system" in message or "os.system" in message or kind == "extra_state"
    assert not marker.exists(), "the payload ran"
    assert not (run_dir / "checkpoints" / "iter_0000003").exists()


def _megatron_written(rank, world, directory, marker):
    """Save through Megatron a payload in the common state and in a sharded object, and a
    genuine sharded object; load each back through the safe functions."""
    from megatron_adadpo.platform import safe_dcp
    from megatron_adadpo.platform.megatron import dist_checkpointing

    ShardedObject = dist_checkpointing.ShardedObject
    for name in ("genuine", "object", "common"):
        (directory / name).mkdir()
    tensor = dist_checkpointing.ShardedTensor.from_rank_offsets("w", torch.arange(4.0))
    genuine = {"w": tensor, "obj": ShardedObject("obj", {"plain": [1, 2]}, (1,), (0,))}
    dist_checkpointing.save(genuine, str(directory / "genuine"))
    dist_checkpointing.save(
        {"w": tensor, "obj": ShardedObject("obj", payloads.Payload(marker), (1,), (0,))},
        str(directory / "object"),
    )
    common = {"w": tensor, "run": payloads.Payload(marker)}
    dist_checkpointing.save(common, str(directory / "common"))

    def request():
        w = dist_checkpointing.ShardedTensor.from_rank_offsets("w", torch.zeros(4))
        return {"w": w, "obj": ShardedObject("obj", None, (1,), (0,))}

    loaded = safe_dcp.load(request(), directory / "genuine")
    outcome = {"genuine": (loaded["w"].tolist(), loaded["obj"])}
    calls = {
        "object": lambda: safe_dcp.load(request(), directory / "object"),
        "common": lambda: safe_dcp.load({"w": request()["w"]}, directory / "common"),
        "common_state_dict": lambda: safe_dcp.common_state_dict(directory / "common"),
    }
    for name, call in calls.items():
        try:
            call()
            outcome[name] = "loaded"
        except BaseException as exc:  # DCP wraps a rank's failure in a CheckpointException
            unsafe = find_unsafe(exc)
            outcome[name] = str(unsafe) if unsafe else f"{type(exc).__name__}: {exc}"
    return outcome


def test_files_megatron_writes_are_read_without_running_code(tmp_path):
    marker = tmp_path / "payload_ran"
    outcome = run_ranks(_megatron_written, 1, tmp_path, marker, timeout=300)[0]
    assert outcome.pop("genuine") == ([0.0, 1.0, 2.0, 3.0], {"plain": [1, 2]})
    for name, message in outcome.items():
        assert "would run code when loaded" in message, (name, message)
    assert "bytes item 'obj/shard_0_1'" in outcome["object"]
    common = outcome["common_state_dict"]  # 0.16: common.pt; 0.19: a bytes item of the DCP files
    assert f"{tmp_path / 'common' / 'common.pt'} would" in common or "'common_state/" in common
    assert not marker.exists(), "the payload ran"

"""LoRA checkpoints: adapters only (dist_checkpointing), bound to their base model; exact resume
after SIGKILL; resumed at another TP / DP layout."""

import pytest
from torch.distributed.checkpoint import FileSystemReader

from megatron_adadpo import train
from megatron_adadpo.config import ConfigError
from megatron_adadpo.run.state.run_dir import latest_checkpoint
from tests.distributed.train_harness import argv, kill_in_step, losses, run_trainer
from tests.launcher import RankFailed, run_ranks

pytestmark = pytest.mark.distributed

LORA = ["lora.rank=8", "lora.alpha=16", "reference.mode=null"]
COMMON = [*LORA, "train.train_iters=6", "checkpoint.save_interval=3"]


def _tensor_keys(checkpoint) -> list[str]:
    return list(FileSystemReader(str(checkpoint)).read_metadata().state_dict_metadata)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, cache_dir):
    """The 6-step TP2 LoRA run's losses."""
    run_dir = tmp_path_factory.mktemp("lora_full") / "run"
    run_ranks(run_trainer, 2, argv(run_dir, cache_dir, *COMMON, "execution.tp=2"), timeout=240)
    return losses(run_dir)


@pytest.fixture(scope="module")
def killed(tmp_path_factory, cache_dir):
    """A TP2 LoRA run SIGKILL-ed in step 4 (its checkpoint: step 3)."""
    run_dir = tmp_path_factory.mktemp("lora_killed") / "run"
    with pytest.raises(RankFailed):
        args = argv(run_dir, cache_dir, *COMMON, "execution.tp=2")
        run_ranks(kill_in_step, 2, args, 4, timeout=240)
    assert latest_checkpoint(run_dir).name == "iter_0000003"
    return run_dir


def test_checkpoint_holds_adapters_only(killed):
    keys = _tensor_keys(latest_checkpoint(killed))
    # optimizer state, and (megatron-core 0.19) the common state stored as an object
    model = [k for k in keys if not k.startswith(("optimizer", "common_state/"))]
    assert model and all(k.endswith((".lora_a", ".lora_b")) for k in model), [
        k for k in model if not k.endswith((".lora_a", ".lora_b"))
    ]
    assert not any("word_embeddings" in k or k.endswith(".weight") for k in keys)


def test_resume_after_sigkill_is_exact(tmp_path, killed, uninterrupted, cache_dir):
    resumed_dir = tmp_path / "resumed"
    import shutil

    shutil.copytree(killed, resumed_dir)
    args = argv(resumed_dir, cache_dir, *COMMON, "execution.tp=2")
    run_ranks(run_trainer, 2, args, timeout=240)
    resumed = losses(resumed_dir)
    assert len(uninterrupted) == 6 and resumed == uninterrupted


@pytest.mark.parametrize("layout", [(1, []), (2, ["execution.pp=2"])], ids=["tp1", "pp2"])
def test_resharded_resume(layout, tmp_path, killed, uninterrupted, cache_dir):
    """Adapters saved at TP2 resume at TP1 and at PP2 (the plain optimizer's state reshards
    with the model): steps 4-6 equal the uninterrupted run to 1e-5."""
    import shutil

    world, extra = layout
    run_dir = tmp_path / "resharded"
    shutil.copytree(killed, run_dir)
    run_ranks(run_trainer, world, argv(run_dir, cache_dir, *COMMON, *extra), timeout=240)
    resumed = losses(run_dir)
    assert resumed[:3] == uninterrupted[:3]
    assert resumed[3:] == pytest.approx(uninterrupted[3:], rel=1e-5, abs=1e-6)


def _resume_error(rank, world, args):
    try:
        train.main(args)
    except ConfigError as err:
        return str(err)
    return None


def test_adapters_refuse_another_base(tmp_path, killed, cache_dir):
    import shutil

    run_dir = tmp_path / "other"
    shutil.copytree(killed, run_dir)
    other_base = [*COMMON, "execution.tp=2", "train.init_method=megatron"]
    error = run_ranks(_resume_error, 2, argv(run_dir, cache_dir, *other_base), timeout=240)[0]
    assert error and "another base model" in error and "train.init_method" in error
    no_lora = [a for a in argv(run_dir, cache_dir, "execution.tp=2") if not a.startswith("lora")]
    error = run_ranks(_resume_error, 2, no_lora, timeout=240)[0]
    assert error and "holds LoRA adapters only" in error

"""``reference.checkpoint``: a reference model other than the policy's start (TRL's
``ref_model``), through the real trainer and ``tools/precompute_reference.py`` in forked gloo
ranks. Checkpoints A, B and C are the tiny model at three initialisation seeds."""

import pytest
import torch

from megatron_adadpo import train
from megatron_adadpo.run import precompute
from tests.distributed.train_harness import argv, first_step, losses, read_metrics, run_trainer
from tests.launcher import RankFailed, run_ranks

pytestmark = pytest.mark.distributed


def _save_initial(rank, world, args, directory):
    """Rank body: the config's initial policy (``train.seed``) saved as an init checkpoint."""
    from megatron_adadpo.config import load_config
    from megatron_adadpo.platform.distributed import init_model_parallel
    from megatron_adadpo.platform.machine import probe_machine
    from megatron_adadpo.resolve import resolve
    from megatron_adadpo.run.state.checkpoints import save_model
    from megatron_adadpo.run.trainer import build_policy

    config = load_config(args[1], train.parse_args(args).set)
    init_model_parallel(config.execution, seed=config.train.seed)
    run = resolve(config, world, probe_machine())
    save_model(build_policy(config, run), directory, config.model)


@pytest.fixture(scope="module")
def models(tmp_path_factory, cache_dir):
    root = tmp_path_factory.mktemp("models")
    out = {}
    for name, seed in (("A", 11), ("B", 22), ("C", 33)):
        out[name] = root / name
        args = argv(root / "unused", cache_dir, f"train.seed={seed}")
        run_ranks(_save_initial, 1, args, out[name])
    return out


def _sequence_logps(result) -> torch.Tensor:
    return torch.cat([r.double() for r in result["reference_logps"]])


def test_resident_reference_is_the_checkpoints_model(tmp_path, cache_dir, models):
    """Policy from A, reference from B: the reference log-probs are those of a run whose policy
    starts from B (where step 1's policy forward, with gradients, gives the same values: margin
    0), not A's."""
    a, b = (f"train.init_checkpoint={models[k]}" for k in "AB")
    got = run_ranks(
        first_step, 1, argv(tmp_path / "ab", cache_dir, a, f"reference.checkpoint={models['B']}")
    )[0]
    from_b = run_ranks(first_step, 1, argv(tmp_path / "b", cache_dir, b))[0]
    from_a = run_ranks(first_step, 1, argv(tmp_path / "a", cache_dir, a))[0]
    want = _sequence_logps(from_b)
    assert torch.equal(_sequence_logps(got), want)
    assert (_sequence_logps(from_a) - want).abs().max() > 1e-2  # A's would differ
    assert abs(float(from_b["metrics"]["rewards/margins"][0])) < 1e-5  # policy B == reference
    assert abs(float(got["metrics"]["rewards/margins"][0])) > 1e-4  # policy A != reference B


def _precompute(tmp_path, cache_dir, name, *extra):
    out = tmp_path / name
    args = argv(tmp_path / f"pre_{name}", cache_dir, "train.train_iters=2", *extra)
    run_ranks(lambda r, w, a: precompute.main(a), 1, args + ["--output", str(out)])
    return out


def test_precomputed_from_the_reference_checkpoint_trains_from_another_start(
    tmp_path, cache_dir, models
):
    """Precomputed from B (as ``reference.checkpoint``, or the migration guide's
    ``train.init_checkpoint=B``), training from A with ``reference.checkpoint=B`` is accepted
    and equals the resident run; values precomputed from C are refused naming the field."""
    ref_b = f"reference.checkpoint={models['B']}"
    by_ref = _precompute(tmp_path, cache_dir, "by_ref", ref_b)
    by_init = _precompute(tmp_path, cache_dir, "by_init", f"train.init_checkpoint={models['B']}")
    from_c = _precompute(tmp_path, cache_dir, "c", f"reference.checkpoint={models['C']}")
    base = ["train.train_iters=2", f"train.init_checkpoint={models['A']}", ref_b]
    run_ranks(run_trainer, 1, argv(tmp_path / "resident", cache_dir, *base))
    for name, path in (("by_ref", by_ref), ("by_init", by_init)):
        extra = ["reference.mode=precomputed", f"reference.path={path}"]
        run_ranks(run_trainer, 1, argv(tmp_path / name, cache_dir, *base, *extra))
        assert losses(tmp_path / name) == losses(tmp_path / "resident")
    extra = ["reference.mode=precomputed", f"reference.path={from_c}"]
    with pytest.raises(RankFailed, match=r"differs in: checkpoint.*reference.checkpoint="):
        run_ranks(run_trainer, 1, argv(tmp_path / "refused", cache_dir, *base, *extra))


def test_resume_against_another_reference_checkpoint_is_refused(tmp_path, cache_dir, models):
    """The resident reference is reloaded from ``reference.checkpoint`` at every start: a
    resume naming another checkpoint is refused before anything is built; the same one
    resumes."""
    run_dir = tmp_path / "run"
    base = [f"train.init_checkpoint={models['A']}", "checkpoint.save_at_end=true"]
    ref_b, ref_c = (f"reference.checkpoint={models[k]}" for k in "BC")
    run_ranks(run_trainer, 1, argv(run_dir, cache_dir, *base, "train.train_iters=2", ref_b))
    longer = [*base, "train.train_iters=3", "checkpoint.override_scheduler=true"]
    with pytest.raises(RankFailed, match=r"another checkpoint than reference.checkpoint=.*/C"):
        run_ranks(run_trainer, 1, argv(run_dir, cache_dir, *longer, ref_c))
    run_ranks(run_trainer, 1, argv(run_dir, cache_dir, *longer, ref_b))
    assert [r["step"] for r in read_metrics(run_dir) if r["split"] == "train"][-1] == 3

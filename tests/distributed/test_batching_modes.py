"""``data.batching``: token-budget and packed micro-batches give the loss, metrics and gradients
of ``fixed`` (one rank) on every layout, never split a pair, and resume exactly after SIGKILL;
through the real trainer and Megatron's schedules (variable-length pipelines; packed pipelines
with one row length per step and no shape exchange), CPU + gloo.

The model has GQA (4 heads, 2 query groups) and Llama-3 RoPE scaling with non-default
parameters, so positions matter: a packed sequence at offset ``o`` of its row must see the
relative positions it has alone (block-diagonal mask, no position reset on the local spec).
"""

import pytest
import torch

from megatron_adadpo.run.state.run_dir import latest_checkpoint
from tests.distributed.train_harness import (
    REPO,
    assert_same_rows,
    kill_in_step,
    overrides,
    read_metrics,
    run_trainer,
    train_capturing_step_one,
)
from tests.launcher import RankFailed, run_ranks

pytestmark = pytest.mark.distributed

CONFIG = str(REPO / "examples/configs/quickstart.yaml")
ROPE = [
    "model.rotary_base=500000",
    "model.rope_scaling={factor: 8.0, low_freq_factor: 1.0, high_freq_factor: 4.0, "
    "original_max_position_embeddings: 16}",
]
MODES = {
    "token_budget": ["data.batching=token_budget", "data.max_tokens_per_micro_batch=160"],
    "packed": ["data.batching=packed", "data.max_tokens_per_micro_batch=160"],
}
LAYOUTS = {  # name: (world size, overrides)
    "tp1": (1, []),
    "tp2": (2, ["execution.tp=2"]),
    "pp2": (2, ["execution.pp=2"]),
    "dp2": (2, []),
    "tp2_sp": (2, ["execution.tp=2", "execution.sequence_parallel=true"]),
}


def argv(run_dir, cache_dir, *extra):
    out = ["--config", CONFIG]
    for item in overrides(run_dir, cache_dir, [*ROPE, *extra]):
        out += ["--set", item]
    return out


@pytest.fixture(scope="module")
def fixed(tmp_path_factory, cache_dir):
    """``data.batching: fixed`` on one rank: step-1 gradients and the 5 steps' metrics."""
    run_dir = tmp_path_factory.mktemp("fixed")
    results = run_ranks(train_capturing_step_one, 1, argv(run_dir, cache_dir), timeout=240)
    return results[0], read_metrics(run_dir)


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("mode", sorted(MODES))
def test_mode_matches_fixed(mode, layout, tmp_path, cache_dir, fixed):
    world, extra = LAYOUTS[layout]
    args = argv(tmp_path, cache_dir, *MODES[mode], *extra)
    results = run_ranks(train_capturing_step_one, world, args, timeout=240)
    (reference, reference_rows), rows = fixed, read_metrics(tmp_path)
    for name, ref in reference["grads"].items():
        grad = results[0]["grads"][name]
        err = (grad - ref).norm() / ref.norm().clamp(min=1e-30)
        assert err <= 1e-5, f"{mode}/{layout}: step-1 gradient of {name} differs by {err:.2e}"
    assert len(rows) == len(reference_rows) == 5
    assert_same_rows(rows, reference_rows, f"{mode}/{layout}")
    _check_step_one_layout(mode, results, world_pairs=8)
    padding = [r["throughput/padding_fraction"] for r in rows]
    fixed_padding = [r["throughput/padding_fraction"] for r in reference_rows]
    if mode == "packed" and layout == "pp2":  # fixed shapes: no shape exchange between stages
        for rank_result in results:
            assert len({segments.shape for _, _, segments in rank_result["micro_batches"]}) == 1
    elif mode == "packed" and layout != "tp2_sp":  # SP pads rows to an even length
        assert padding == [0.0] * 5
    assert sum(padding) < sum(fixed_padding)


def _check_step_one_layout(mode: str, results: list, world_pairs: int) -> None:
    """Every pair of the global batch once; chosen and rejected adjacent in one micro-batch (and
    one packed row, as sequences 2i and 2i + 1 of that row); micro-batch counts vary by mode."""
    seen = {}
    for rank_result in results:
        for pair_ids, rows, segments in rank_result["micro_batches"]:
            for pid in pair_ids:
                seen.setdefault(pid, set()).add(tuple(pair_ids))
            if mode == "packed":
                assert rows == 1
                ids = segments[0][segments[0] >= 0]
                assert torch.equal(ids.unique_consecutive(), torch.arange(2 * len(pair_ids)))
            else:
                assert rows == 2 * len(pair_ids)
    assert len(seen) == world_pairs
    assert all(len(groups) == 1 for groups in seen.values()), "a pair in two micro-batches"


@pytest.mark.parametrize(
    "mode, world, layout",
    [("token_budget", 2, []), ("packed", 2, ["execution.pp=2"])],
    ids=["token_budget-dp2", "packed-pp2"],
)
def test_resume_after_sigkill_is_exact(mode, world, layout, tmp_path, cache_dir):
    common = [*MODES[mode], *layout, "train.train_iters=6", "checkpoint.save_interval=3"]
    run_ranks(run_trainer, world, argv(tmp_path / "full", cache_dir, *common), timeout=240)
    killed = tmp_path / "killed"
    with pytest.raises(RankFailed):
        run_ranks(kill_in_step, world, argv(killed, cache_dir, *common), 4, timeout=240)
    assert latest_checkpoint(killed).name == "iter_0000003"
    run_ranks(run_trainer, world, argv(killed, cache_dir, *common), timeout=240)
    full = [r["loss"] for r in read_metrics(tmp_path / "full")]
    resumed = [r["loss"] for r in read_metrics(killed)]
    assert len(full) == 6 and resumed[:3] == full[:3]
    assert resumed[3:] == full[3:], f"{mode}: steps 4-6 after resume differ"

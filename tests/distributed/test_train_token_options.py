"""LD-DPO (``loss.ld_alpha``) and TRL's per-token metrics through the real trainer: step-1
gradients, loss, ``entropy``, ``mean_token_accuracy`` and log-prob metrics on TP2, TP2 + SP, PP2,
DP2, the chunked output layer (TP1, TP2) and packed rows (TP1; TP2 chunked) equal one rank's
fixed-batching run; a reference precomputed with ``ld_alpha`` trains exactly as the resident
one, and one precomputed without it is refused."""

import math

import pytest
import torch

from megatron_adadpo.run import precompute
from tests.distributed.train_harness import argv, first_step, read_metrics, run_trainer
from tests.launcher import RankFailed, run_ranks

pytestmark = pytest.mark.distributed

LD = "loss.ld_alpha=0.5"
METRICS = ("loss", "logps/chosen", "logps/rejected", "entropy", "mean_token_accuracy")

PACKED = ["data.batching=packed", "data.max_tokens_per_micro_batch=160"]
LAYOUTS = {  # name: (world size, overrides)
    "tp2": (2, ["execution.tp=2"]),
    "tp2_sp": (2, ["execution.tp=2", "execution.sequence_parallel=true"]),
    "pp2": (2, ["execution.pp=2"]),
    "dp2": (2, []),
    "chunked": (1, ["execution.logprob_chunk_tokens=7"]),
    "tp2_chunked": (2, ["execution.tp=2", "execution.logprob_chunk_tokens=5"]),
    "packed": (1, PACKED),
    "packed_tp2_chunked": (2, [*PACKED, "execution.tp=2", "execution.logprob_chunk_tokens=9"]),
}


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp(min=1e-30))


@pytest.fixture(scope="module")
def single(tmp_path_factory, cache_dir):
    """Step 1 on one rank, with and without LD-DPO."""
    tmp = tmp_path_factory.mktemp("single")
    with_ld = run_ranks(first_step, 1, argv(tmp / "ld", cache_dir, LD), timeout=240)[0]
    plain = run_ranks(first_step, 1, argv(tmp / "plain", cache_dir), timeout=240)[0]
    return with_ld, plain


def test_ld_alpha_changes_the_step(single):
    """Guards the layout comparisons: LD-DPO changes the gradients and the log-prob sums (policy
    and reference alike: step 1's loss stays ln 2), not the per-token metrics."""
    with_ld, plain = single
    assert with_ld["metrics"]["loss"][0] / with_ld["metrics"]["loss"][1] == pytest.approx(
        math.log(2), abs=1e-6
    )
    assert max(_relative(with_ld["grads"][n], g) for n, g in plain["grads"].items()) > 1e-3
    assert with_ld["metrics"]["logps/chosen"][0] > plain["metrics"]["logps/chosen"][0]
    for name in ("entropy", "mean_token_accuracy"):
        assert torch.equal(with_ld["metrics"][name], plain["metrics"][name])
    entropy, accuracy = (plain["metrics"][n] for n in ("entropy", "mean_token_accuracy"))
    assert 0 < entropy[0] / entropy[1] <= math.log(640)
    assert 0 <= accuracy[0] / accuracy[1] <= 1 and accuracy[1] > 0


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_layout_matches_single_rank(layout, tmp_path, cache_dir, single):
    world, extra = LAYOUTS[layout]
    want = single[0]
    got = run_ranks(first_step, world, argv(tmp_path, cache_dir, LD, *extra), timeout=240)[0]
    for name, grad in want["grads"].items():
        err = _relative(got["grads"][name], grad)
        assert err <= 1e-5, f"{layout}: step-1 gradient of {name} differs by {err:.2e}"
    for name in METRICS:
        a, b = got["metrics"][name], want["metrics"][name]
        assert _relative(a, b) <= 1e-5, f"{layout}: {name} {a.tolist()} vs {b.tolist()}"


def test_precomputed_reference_records_ld_alpha(tmp_path, cache_dir):
    steps = ["train.train_iters=2", "train.global_batch_size=4", "train.micro_batch_size=2"]
    run_ranks(run_trainer, 1, argv(tmp_path / "resident", cache_dir, LD, *steps), timeout=240)
    for name, extra in {"ld": [LD], "plain": []}.items():
        pre = argv(tmp_path / f"pre_{name}", cache_dir, *extra, *steps)
        run_ranks(lambda r, w, a: precompute.main(a), 1, [*pre, "--output", str(tmp_path / name)])
    use = ["reference.mode=precomputed", f"reference.path={tmp_path / 'ld'}"]
    run_ranks(run_trainer, 1, argv(tmp_path / "pre", cache_dir, LD, *steps, *use), timeout=240)
    want = [r["loss"] for r in read_metrics(tmp_path / "resident")]
    got = [r["loss"] for r in read_metrics(tmp_path / "pre")]
    assert len(want) == 2 and want[1] != want[0]
    assert got == pytest.approx(want, rel=1e-6)
    use = ["reference.mode=precomputed", f"reference.path={tmp_path / 'plain'}"]
    refused = argv(tmp_path / "refused", cache_dir, LD, *steps, *use)
    with pytest.raises(RankFailed, match=r"precomputed with loss.ld_alpha=None, but this run has"):
        run_ranks(run_trainer, 1, refused, timeout=240)


WPO = ("loss.use_weighting=true", LD)  # WPO's weights on top of LD-DPO's sums: options together
WPO_LAYOUTS = ("tp2_sp", "pp2", "dp2", "packed_tp2_chunked")


@pytest.fixture(scope="module")
def single_wpo(tmp_path_factory, cache_dir):
    """Step 1 on one rank with WPO + LD-DPO."""
    tmp = tmp_path_factory.mktemp("single_wpo")
    return run_ranks(first_step, 1, argv(tmp, cache_dir, *WPO), timeout=240)[0]


def test_wpo_weights_the_step_one_pair_loss(single_wpo, single):
    """At step 1 every pair's loss is ln 2 times its WPO weight exp(m_w + m_l) (m: a mean of
    log p_t - log sum_v p_v^2), so the mean loss moves off ln 2 and the gradients differ."""
    loss = single_wpo["metrics"]["loss"]
    assert loss[0] / loss[1] > 0 and abs(loss[0] / loss[1] - math.log(2)) > 1e-4
    grads = single[0]["grads"]
    assert max(_relative(single_wpo["grads"][n], g) for n, g in grads.items()) > 1e-3


@pytest.mark.parametrize("layout", WPO_LAYOUTS)
def test_wpo_layout_matches_single_rank(layout, tmp_path, cache_dir, single_wpo):
    world, extra = LAYOUTS[layout]
    got = run_ranks(first_step, world, argv(tmp_path, cache_dir, *WPO, *extra), timeout=240)[0]
    for name, grad in single_wpo["grads"].items():
        err = _relative(got["grads"][name], grad)
        assert err <= 1e-5, f"{layout}: WPO step-1 gradient of {name} differs by {err:.2e}"
    a, b = got["metrics"]["loss"], single_wpo["metrics"]["loss"]
    assert _relative(a, b) <= 1e-5, f"{layout}: WPO loss {a.tolist()} vs {b.tolist()}"

"""Chunked output layer + log-probs through the real trainer: step-1 per-sequence log-probs,
losses, metrics and every parameter's DDP ``main_grad`` equal the unchunked path's on the same
layout (TP1, TP2, TP2 + SP, PP2, DP2 with overlapped grad reduction; tied and untied
embeddings; padded vocabulary), and a short loss trajectory matches."""

import pytest
import torch

from tests.distributed.train_harness import (
    REPO,
    first_step,
    losses,
    overrides,
    run_trainer,
)
from tests.launcher import run_ranks

pytestmark = pytest.mark.distributed

CONFIG = str(REPO / "examples/configs/quickstart.yaml")
TIED = "model.tie_word_embeddings=true"
PADDED = "model.vocab_size=650"  # padded to 672 rows at TP1 and 704 at TP2 (x32 per rank)

# name: (world size, layout overrides, tokens per chunk)
CASES = {
    "tp1": (1, [], 7),
    "tp1_tied_padded": (1, [TIED, PADDED], 64),
    "tp2_padded": (2, ["execution.tp=2", PADDED], 5),
    "tp2_sp_tied_padded": (2, ["execution.tp=2", "execution.sequence_parallel=true", TIED], 16),
    "pp2": (2, ["execution.pp=2"], 32),
    "pp2_tied_padded": (2, ["execution.pp=2", TIED, PADDED], 3),
    "dp2_overlap_tied": (2, ["optimizer.overlap_grad_reduce=true", TIED], 9),
}


def _argv(run_dir, cache_dir, extra):
    argv = ["--config", CONFIG]
    for item in overrides(run_dir, cache_dir, extra):
        argv += ["--set", item]
    return argv


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-30))


@pytest.mark.parametrize("case", sorted(CASES))
def test_first_step_equals_unchunked(case, tmp_path, cache_dir):
    world, layout, chunk = CASES[case]
    runs = {}
    for tokens in (0, chunk):
        extra = [*layout, f"execution.logprob_chunk_tokens={tokens}"]
        argv = _argv(tmp_path / f"chunk{tokens}", cache_dir, extra)
        runs[tokens] = run_ranks(first_step, world, argv, timeout=240)[0]
    ref, got = runs[0], runs[chunk]
    assert set(got["grads"]) == set(ref["grads"])
    for name, grad in ref["grads"].items():
        assert grad.norm() > 0, f"{case}: {name} got no gradient"
        err = _relative(got["grads"][name], grad)
        assert err <= 1e-6, f"{case}: main_grad of {name} differs by {err:.2e}"
    ref_logps = torch.cat(ref["reference_logps"])  # per sequence, the reference's forward
    assert ref_logps.numel() and torch.isfinite(ref_logps).all()
    assert _relative(torch.cat(got["reference_logps"]), ref_logps) <= 1e-6
    assert _relative(torch.cat(got["losses"]), torch.cat(ref["losses"])) <= 1e-6
    for name in (
        "logps/chosen",
        "logps/rejected",
        "logps/chosen_per_token",
        "logits/chosen",
        "logits/rejected",
        "entropy",
        "mean_token_accuracy",
    ):
        assert _relative(got["metrics"][name], ref["metrics"][name]) <= 1e-6, name


def test_trajectory_equals_unchunked(tmp_path, cache_dir):
    """Three optimizer steps (DDP's main-grad flags reset between steps, four micro-batches
    each): the chunked run's losses follow the unchunked run's."""
    traj = {}
    for tokens in (0, 11):
        extra = [TIED, "train.train_iters=3", f"execution.logprob_chunk_tokens={tokens}"]
        run_ranks(run_trainer, 1, _argv(tmp_path / f"c{tokens}", cache_dir, extra), timeout=240)
        traj[tokens] = losses(tmp_path / f"c{tokens}")
    assert len(traj[0]) == 3 and traj[0][-1] != traj[0][0]
    assert traj[11] == pytest.approx(traj[0], rel=1e-5)

"""SFT (``loss.name: sft``): the per-token mean NLL of the chosen completions, in fp64 on CPU.

The expected value is the formula written out here: ``-sum_i l_w,i / sum_i n_w,i`` over the
valid pairs of the whole batch; the library returns per-pair losses plus the normaliser
(``metrics["loss"][1]``), which the trainer hands Megatron as the per-token-loss count.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from megatron_adadpo.config import load_config
from megatron_adadpo.losses import LossConfig, preference_loss

F64 = torch.float64
QUICKSTART = Path(__file__).resolve().parents[2] / "examples/configs/quickstart.yaml"


def _inputs(seed: int = 0, b: int = 7):
    g = torch.Generator().manual_seed(seed)
    n_w = torch.randint(1, 40, (b,), generator=g)
    n_l = torch.randint(1, 40, (b,), generator=g)
    n_w[2] = 0  # invalid pairs: a zero-length chosen, a zero-length rejected
    n_l[5] = 0
    l_w = (-(0.2 + 2 * torch.rand(b, generator=g, dtype=F64)) * n_w).requires_grad_()
    l_l = (-(0.2 + 2 * torch.rand(b, generator=g, dtype=F64)) * n_l).requires_grad_()
    return l_w, l_l, n_w, n_l


def _sft(l_w, l_l, n_w, n_l):
    return preference_loss(LossConfig(name="sft"), l_w, l_l, n_w, n_l)


def test_value_and_gradient_equal_per_token_mean_nll():
    l_w, l_l, n_w, n_l = _inputs()
    losses, metrics = _sft(l_w, l_l, n_w, n_l)
    loss = losses.sum() / metrics["loss"][1]
    valid = (n_w > 0) & (n_l > 0)
    tokens = sum(int(n) for n, ok in zip(n_w, valid, strict=True) if ok)
    expected = -sum(float(x) for x, ok in zip(l_w, valid, strict=True) if ok) / tokens
    assert metrics["loss"][1] == tokens  # the normaliser is the chosen tokens, not the pairs
    assert abs(float(loss) - expected) <= 1e-12 * abs(expected)
    g_w, g_l = torch.autograd.grad(loss, (l_w, l_l), allow_unused=True)
    want = torch.where(valid, torch.full_like(l_w, -1.0 / tokens), 0.0)
    torch.testing.assert_close(g_w, want, rtol=1e-12, atol=0)
    assert g_l is None or torch.equal(g_l, torch.zeros_like(l_l))  # rejected: no loss


def test_micro_batch_split_keeps_the_global_per_token_mean():
    """Megatron's per-token contract: summed loss sums / summed normalisers = the whole batch."""
    l_w, l_l, n_w, n_l = _inputs(seed=3, b=8)
    whole_losses, whole = _sft(l_w, l_l, n_w, n_l)
    parts = [_sft(l_w[s], l_l[s], n_w[s], n_l[s]) for s in (slice(0, 3), slice(3, 8))]
    total = sum(p[0].sum() for p in parts) / sum(p[1]["loss"][1] for p in parts)
    torch.testing.assert_close(total, whole_losses.sum() / whole["loss"][1], rtol=1e-14, atol=0)


def test_rewards_are_per_token_log_probs_and_there_is_no_adaptive_form():
    l_w, l_l, n_w, n_l = _inputs(seed=1)
    losses, metrics = _sft(l_w, l_l, n_w, n_l)
    assert float(metrics["ada/coef_min"][0]) == float(metrics["ada/coef_max"][0]) == 1.0
    with pytest.raises(ValueError, match="adaptive=True is invalid.*no pair term"):
        LossConfig(name="sft", adaptive=True)
    assert LossConfig(name="sft").adaptive is False and not LossConfig(name="sft").notices
    valid = (n_w > 0) & (n_l > 0)
    lbar_w, lbar_l = (l_w / n_w.clamp(min=1))[valid], (l_l / n_l.clamp(min=1))[valid]
    torch.testing.assert_close(metrics["rewards/chosen"][0], lbar_w.sum().detach())
    accuracy = float((lbar_w > lbar_l).sum())
    assert float(metrics["rewards/accuracies"][0]) == accuracy
    assert metrics["pairs/valid"].tolist() == [float(valid.sum()), 7.0]


def test_sft_is_reference_free():
    config = load_config(QUICKSTART, ["loss.name=sft", "loss.adaptive=false"])
    assert config.reference.mode == "resident" and config.reference_mode == "none"
    assert config.loss.normalizer == "tokens" and LossConfig().normalizer == "pairs"

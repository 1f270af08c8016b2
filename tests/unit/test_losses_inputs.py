"""LossConfig / input validation, metrics against hand computation, metric reduction helpers."""

from __future__ import annotations

import math

import pytest
import torch

from megatron_adadpo.losses import LOSSES, METRIC_NAMES, LossConfig, preference_loss, register_loss
from megatron_adadpo.run.metrics import (
    accumulate_metrics,
    reduce_metrics,
    reduce_op,
    stack_metrics,
    unstack_metrics,
)

F64 = torch.float64


# ----------------------------------------------------------------------------- LossConfig
@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"name": "kto"}, "name"),
        ({"balance_space": "both"}, "balance_space"),
        ({"normalize": "mean"}, "normalize"),
        ({"placement": "both"}, "placement"),
        ({"beta": 0.0}, "beta"),
        ({"beta": -0.1}, "beta"),
        ({"beta": float("nan")}, "beta"),
        ({"clip_max": 0.0}, "clip_max"),
        ({"clip_max": -1.0}, "clip_max"),
        ({"clip_min": -0.5}, "clip_min"),
        ({"clip_min": 3.0, "clip_max": 2.0}, "clip_min"),
        ({"target_ratio": 0.0}, "target_ratio"),
        ({"label_smoothing": -0.1}, "label_smoothing"),
        ({"label_smoothing": 0.5}, "label_smoothing"),
        ({"name": "ipo", "label_smoothing": 0.1}, "label_smoothing"),
        ({"name": "orpo", "label_smoothing": 0.1}, "label_smoothing"),
        ({"ipo_tau": 0.0}, "ipo_tau"),
        ({"cpo_alpha": -1.0}, "cpo_alpha"),
        ({"orpo_lambda": -1.0}, "orpo_lambda"),
        ({"simpo_gamma": float("inf")}, "simpo_gamma"),
        ({"rdpo_alpha": float("nan")}, "rdpo_alpha"),
        ({"adaptive": "yes"}, "adaptive"),
        ({"name": "adadpo", "adaptive": False}, "adaptive"),
        ({"name": "robust", "label_smoothing": 0.5}, "label_smoothing"),
    ],
)
def test_config_rejects_bad_values(kwargs, field):
    with pytest.raises(ValueError) as info:
        LossConfig(**kwargs)
    message = str(info.value)
    assert f"LossConfig.{field}=" in message and "accepted" in message
    assert repr(kwargs[field]) in message


def test_config_defaults_and_properties():
    cfg = LossConfig()
    assert (cfg.name, cfg.adaptive, cfg.balance_space, cfg.normalize) == (
        "adadpo",
        True,
        "reference",
        "token_mean",
    )
    assert (cfg.clip_max, cfg.clip_min, cfg.target_ratio, cfg.placement) == (
        2.0,
        None,
        1.0,
        "chosen",
    )
    reference_free = {n for n in LOSSES if not LOSSES[n].needs_reference}
    assert reference_free == {"simpo", "cpo", "orpo", "sft"}
    assert all(LossConfig(name=n).needs_reference for n in ("dpo", "ipo", "rdpo", "robust"))
    needs_nll = {n for n in LOSSES if LOSSES[n].needs_chosen_nll}
    assert needs_nll == {"cpo", "orpo"}
    assert LossConfig(name="dpo", sft_weight=0.5).needs_chosen_nll  # the SFT term reads it
    LossConfig(clip_max=None, clip_min=0.5)  # floor without ceiling is fine
    with pytest.raises(AttributeError):
        cfg.beta = 1.0  # frozen


# ----------------------------------------------------------------------------- inputs
def pairs(b=3):
    lw = torch.tensor([-3.0, -4.0, -5.0][:b], dtype=F64)
    return dict(
        policy_chosen_logps=lw,
        policy_rejected_logps=lw - 1.0,
        chosen_lengths=torch.tensor([2, 3, 4][:b]),
        rejected_lengths=torch.tensor([3, 3, 2][:b]),
        reference_chosen_logps=lw + 0.5,
        reference_rejected_logps=lw - 0.2,
        chosen_nll=torch.ones(b, dtype=F64),
    )


@pytest.mark.parametrize(
    ("change", "argument"),
    [
        ({"policy_rejected_logps": torch.zeros(2, dtype=F64)}, "policy_rejected_logps"),
        ({"chosen_lengths": torch.ones(4)}, "chosen_lengths"),
        ({"policy_chosen_logps": torch.zeros(3, 1, dtype=F64)}, "policy_chosen_logps"),
        ({"reference_chosen_logps": torch.zeros(3, 2, dtype=F64)}, "reference_chosen_logps"),
        ({"policy_chosen_logps": torch.zeros(3, dtype=torch.long)}, "policy_chosen_logps"),
        ({"chosen_nll": torch.zeros(3, dtype=torch.int32)}, "chosen_nll"),
        ({"rejected_lengths": torch.tensor([1, -1, 2])}, "rejected_lengths"),
        ({"chosen_lengths": torch.tensor([True, True, False])}, "chosen_lengths"),
        ({"reference_chosen_logps": None}, "reference_chosen_logps"),
        ({"reference_rejected_logps": None}, "reference_rejected_logps"),
        ({"policy_rejected_logps": [1.0, 2.0, 3.0]}, "policy_rejected_logps"),
    ],
)
def test_bad_inputs_raise_naming_the_argument(change, argument):
    kwargs = {**pairs(), **change}
    with pytest.raises(ValueError, match=argument):
        preference_loss(LossConfig(), **kwargs)


@pytest.mark.parametrize("name", ["dpo", "ipo", "rdpo"])
def test_missing_reference_raises(name):
    kwargs = {**pairs(), "reference_chosen_logps": None, "reference_rejected_logps": None}
    with pytest.raises(ValueError, match="reference_chosen_logps.*simpo, cpo, orpo"):
        preference_loss(LossConfig(name=name), **kwargs)


@pytest.mark.parametrize("name", ["cpo", "orpo"])
def test_missing_chosen_nll_raises(name):
    with pytest.raises(ValueError, match="chosen_nll"):
        preference_loss(LossConfig(name=name), **{**pairs(), "chosen_nll": None})


@pytest.mark.parametrize("name", ["simpo", "cpo", "orpo"])
def test_reference_free_losses_need_no_reference(name):
    kwargs = {**pairs(), "reference_chosen_logps": None, "reference_rejected_logps": None}
    loss, _ = preference_loss(LossConfig(name=name), **kwargs)
    assert torch.isfinite(loss).all()


def test_compute_dtype_and_positional_signature():
    p = pairs()
    args = [
        p[k].to(torch.bfloat16) if p[k].is_floating_point() else p[k]
        for k in (
            "policy_chosen_logps",
            "policy_rejected_logps",
            "chosen_lengths",
            "rejected_lengths",
            "reference_chosen_logps",
            "reference_rejected_logps",
            "chosen_nll",
        )
    ]
    loss, metrics = preference_loss(LossConfig(), *args)
    assert loss.dtype == torch.float32 and metrics["loss"].dtype == torch.float32
    loss64, _ = preference_loss(LossConfig(), **p)
    assert loss64.dtype == F64
    loss_f_len, _ = preference_loss(
        LossConfig(), **{**p, "chosen_lengths": p["chosen_lengths"].float()}
    )
    torch.testing.assert_close(loss_f_len, loss64)


# ----------------------------------------------------------------------------- metrics
def test_metrics_against_hand_computation():
    beta = 0.1
    lw = torch.tensor([-3.0, -4.0, -5.0, -7.0], dtype=F64)
    ll = torch.tensor([-6.0, -3.0, -2.0, -1.0], dtype=F64)
    rw = torch.tensor([-2.0, -4.5, -6.0, 0.0], dtype=F64)
    rl = torch.tensor([-5.0, -3.5, -1.0, 0.0], dtype=F64)
    nw, nl = torch.tensor([2, 4, 1, 0]), torch.tensor([3, 1, 1, 5])  # last pair invalid
    loss, m = preference_loss(LossConfig(beta=beta), lw, ll, nw, nl, rw, rl)
    assert set(m) == set(METRIC_NAMES)
    assert all(v.shape == (2,) for v in m.values())
    hw, hl = [-1.0, 0.5, 1.0], [-1.0, 0.5, -1.0]
    n_w, n_l = [2, 4, 1], [3, 1, 1]
    log_rho = [hw[i] / n_w[i] - hl[i] / n_l[i] for i in range(3)]  # [-1/6, -0.375, 2]
    c = [math.exp(min(r, math.log(2.0))) for r in log_rho]
    z = [beta * (c[i] * hw[i] - hl[i]) for i in range(3)]
    losses = [math.log1p(math.exp(-v)) for v in z]
    expected = {
        "loss": sum(losses),
        "rewards/chosen": beta * sum(hw),
        "rewards/rejected": beta * sum(hl),
        "rewards/margins": beta * (sum(hw) - sum(hl)),
        "rewards/accuracies": 1.0,  # only pair 2 has h_w > h_l
        "logps/chosen": -12.0,
        "logps/rejected": -11.0,
        "logps/chosen_per_token": -1.5 - 1.0 - 5.0,
        "logps/rejected_per_token": -2.0 - 3.0 - 2.0,
        "ada/coef_mean": sum(c),
        "ada/log_rho_mean": sum(log_rho),
        "ada/clip_frac": 1.0,
        "ada/grad_balance": sum(c),
        # log(c) + lbar_l - lbar_w per pair: the probability-space balance
        "ada/log_prob_balance": sum(
            math.log(c[i]) + [-2.0, -3.0, -2.0][i] - [-1.5, -1.0, -5.0][i] for i in range(3)
        ),
        "lengths/chosen": 7.0,
        "lengths/rejected": 5.0,
    }
    for name, value in expected.items():
        torch.testing.assert_close(m[name], torch.tensor([value, 3.0], dtype=F64), msg=name)
    torch.testing.assert_close(m["pairs/valid"], torch.tensor([3.0, 4.0], dtype=F64))
    torch.testing.assert_close(m["ada/coef_min"], torch.tensor([min(c), 1.0], dtype=F64))
    torch.testing.assert_close(m["ada/coef_max"], torch.tensor([2.0, 1.0], dtype=F64))
    assert loss[3] == 0
    torch.testing.assert_close(loss[:3], torch.tensor(losses, dtype=F64))
    assert not any(v.requires_grad for v in m.values())


def test_reduce_op_contract():
    assert reduce_op("ada/coef_min") == "min" and reduce_op("ada/coef_max") == "max"
    assert reduce_op("loss") == "sum" and reduce_op("pairs/valid") == "sum"


def test_accumulate_and_reduce_equal_whole_batch():
    g = torch.Generator().manual_seed(0)
    lw, ll = -torch.rand(8, generator=g, dtype=F64) * 5, -torch.rand(8, generator=g, dtype=F64) * 5
    rw, rl = -torch.rand(8, generator=g, dtype=F64) * 5, -torch.rand(8, generator=g, dtype=F64) * 5
    nw, nl = torch.tensor([1, 2, 0, 4, 5, 6, 7, 8]), torch.tensor([3, 2, 1, 4, 0, 6, 7, 8])
    cfg = LossConfig()
    _, whole = preference_loss(cfg, lw, ll, nw, nl, rw, rl)
    parts = [
        preference_loss(cfg, lw[s], ll[s], nw[s], nl[s], rw[s], rl[s])[1]
        for s in (slice(0, 3), slice(3, 8))
    ]
    acc = accumulate_metrics(parts)
    for name in whole:
        torch.testing.assert_close(acc[name], whole[name], msg=name)
    assert reduce_metrics(parts) == pytest.approx(reduce_metrics(whole))
    means = reduce_metrics(whole)
    assert means["pairs/valid"] == pytest.approx(6 / 8)
    assert means["loss"] == pytest.approx(whole["loss"][0].item() / 6)
    stacked = stack_metrics(whole)
    assert set(stacked) == {"sum", "min", "max"}
    assert stacked["min"][0] == ["ada/coef_min"] and stacked["sum"][1].shape == (17, 2)
    back = unstack_metrics(stacked)
    assert all(torch.equal(back[n], whole[n]) for n in whole)


def test_all_invalid_batch_gives_nan_means_not_errors():
    z = torch.zeros(2, dtype=F64)
    n0 = torch.zeros(2, dtype=torch.long)
    loss, m = preference_loss(LossConfig(), z, z, n0, n0, z, z)
    assert torch.equal(loss, z)
    assert torch.equal(m["ada/coef_min"], torch.tensor([math.inf, 1.0], dtype=F64))
    means = reduce_metrics(m)
    assert math.isnan(means["loss"]) and math.isnan(means["ada/coef_max"])
    assert means["pairs/valid"] == 0.0


# ----------------------------------------------------------------------------- registry
def test_new_loss_is_a_registered_file_not_an_elif():
    from megatron_adadpo.losses.common import FamilyOutput, config_coefficients, log_coef_ratio

    @register_loss("test_hinge", needs_reference=True)
    def hinge(batch, config):
        coefs = config_coefficients(batch.chosen_logratios * 0, config)
        h_w, h_l = batch.chosen_logratios, batch.rejected_logratios
        losses = torch.relu(1 - config.beta * (h_w - h_l))
        return FamilyOutput(
            losses, config.beta * h_w, config.beta * h_l, coefs, log_coef_ratio(coefs)
        )

    try:
        with pytest.raises(ValueError, match="already registered"):
            register_loss("test_hinge", needs_reference=True)(hinge)
        loss, _ = preference_loss(LossConfig(name="test_hinge"), **pairs())
        assert loss.shape == (3,)
    finally:
        del LOSSES["test_hinge"]


def test_all_reduce_metrics_single_rank_gloo(tmp_path):
    import torch.distributed as dist

    from megatron_adadpo.run.metrics import all_reduce_metrics

    _, m = preference_loss(LossConfig(), **pairs())
    assert all_reduce_metrics(m) == m  # no process group: returned unchanged
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        reduced = all_reduce_metrics(m)
    finally:
        dist.destroy_process_group()
    assert set(reduced) == set(m)
    assert all(torch.equal(reduced[n], m[n]) for n in m)

"""The options every family composes with (issue 23): the SFT term, f-divergences, DPO-Positive,
WPO weights, LD-DPO's field. Value and gradient against fp64 formulas written out here, base and
with the AdaDPO coefficient."""

from __future__ import annotations

import math

import pytest
import torch

from megatron_adadpo.losses import LossConfig, preference_loss
from tests.unit.loss_reference import (
    F64,
    FAMILIES,
    call,
    close,
    grads,
    make_inputs,
    ref_coefs,
    ref_log_rho,
    ref_logsig,
    ref_loss,
)


def ada_coef(x):
    log_rho = ((x["lw"] - x["rw"]) / x["nw"] - (x["ll"] - x["rl"]) / x["nl"]).detach()
    return ref_coefs(log_rho)[0]


def kept_grads(loss, x, keys):
    return torch.autograd.grad(
        loss.sum(), [x[k] for k in keys], allow_unused=True, retain_graph=True
    )


def check(got, want, x, keys=("lw", "ll", "nll")):
    close(got, want)
    for g, w in zip(kept_grads(got, x, keys), kept_grads(want, x, keys), strict=True):
        if w is None:
            assert g is None or torch.count_nonzero(g) == 0
        else:
            close(g, w)


# ----------------------------------------------------------------------------- sft_weight
@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("adaptive", [False, True])
def test_sft_weight_adds_the_chosen_nll_unweighted_by_the_coefficient(name, adaptive):
    x = make_inputs(seed=21)
    cfg = LossConfig(name=name, adaptive=adaptive, sft_weight=0.7)
    a, b = 1.0, 1.0
    if adaptive:
        space = "policy" if name in ("simpo", "cpo") else "reference"
        a, b = ref_coefs(ref_log_rho(name, x, space).detach())
    want = ref_loss(name, x, a, b, cfg) + 0.7 * x["nll"]
    check(call(cfg, x)[0], want, x)


def test_sft_weight_is_refused_for_sft_itself():
    with pytest.raises(ValueError, match="LossConfig.sft_weight=1.0 .*'sft'"):
        LossConfig(name="sft", sft_weight=1.0)
    with pytest.raises(ValueError, match="LossConfig.sft_weight=-1.0"):
        LossConfig(sft_weight=-1.0)


def test_sft_weight_requires_chosen_nll():
    x = make_inputs(seed=22)
    with pytest.raises(ValueError, match="chosen_nll is required.*sft_weight"):
        preference_loss(
            LossConfig(name="dpo", sft_weight=1.0),
            x["lw"],
            x["ll"],
            x["nw"],
            x["nl"],
            x["rw"],
            x["rl"],
        )


# ----------------------------------------------------------------------------- f-divergences
def f_score(h, kind, alpha=0.5):
    if kind == "forward_kl":
        return 1 - torch.exp(-h)
    if kind == "js_divergence":
        return torch.log(2 * torch.sigmoid(h))
    return (torch.exp((alpha - 1) * h) - 1) / (alpha - 1)


@pytest.mark.parametrize("kind", ["forward_kl", "js_divergence", "alpha_divergence"])
@pytest.mark.parametrize("adaptive", [False, True])
def test_f_divergence_scores_replace_the_log_ratios(kind, adaptive):
    x = make_inputs(seed=23, scale=0.2)  # |h| of a few nats: forward_kl's exp(-h) stays sane
    alpha = 0.3 if kind == "alpha_divergence" else 0.5
    cfg = LossConfig(
        name="dpo", adaptive=adaptive, f_divergence_type=kind, f_alpha_divergence_coef=alpha
    )
    a = ada_coef(x) if adaptive else 1.0
    s_w, s_l = f_score(x["lw"] - x["rw"], kind, alpha), f_score(x["ll"] - x["rl"], kind, alpha)
    got, metrics = call(cfg, x)
    check(got, -ref_logsig(0.1 * (a * s_w - s_l)), x, ("lw", "ll"))
    close(metrics["rewards/chosen"][0], (0.1 * (x["lw"] - x["rw"])).sum().detach())  # as TRL
    d_w, d_l = grads(got, x, ("lw", "ll"))
    balance = metrics["ada/grad_balance"]
    close(balance[0] / balance[1], (d_w.abs() / d_l.abs()).mean(), rtol=1e-8)


@pytest.mark.parametrize("name", ["ipo", "sigmoid_norm"])
def test_f_divergence_in_length_normalised_losses(name):
    x = make_inputs(seed=24, scale=0.2)
    cfg = LossConfig(name=name, f_divergence_type="js_divergence")
    nw, nl = x["nw"].to(F64), x["nl"].to(F64)
    s_w = f_score(x["lw"] - x["rw"], "js_divergence") / nw
    s_l = f_score(x["ll"] - x["rl"], "js_divergence") / nl
    want = (s_w - s_l - 1 / (2 * 0.1)) ** 2 if name == "ipo" else -ref_logsig(0.1 * (s_w - s_l))
    check(call(cfg, x)[0], want, x, ("lw", "ll"))


def test_alpha_divergence_at_one_is_reverse_kl():
    x = make_inputs(seed=25)
    cfg = LossConfig(name="dpo", f_divergence_type="alpha_divergence", f_alpha_divergence_coef=1)
    close(call(cfg, x)[0], call(LossConfig(name="dpo"), x)[0])


@pytest.mark.parametrize("name", ["simpo", "cpo", "orpo", "nca_pair", "aot", "apo_zero"])
def test_f_divergence_is_refused_where_the_difference_is_missing(name):
    kw = {"label_smoothing": 0.1} if name == "aot" else {}
    with pytest.raises(ValueError, match="LossConfig.f_divergence_type='forward_kl'"):
        LossConfig(name=name, f_divergence_type="forward_kl", **kw)
    with pytest.raises(ValueError, match="LossConfig.f_alpha_divergence_coef=0.3"):
        LossConfig(name="dpo", f_alpha_divergence_coef=0.3)  # only read by alpha_divergence


# ----------------------------------------------------------------------------- DPOP
@pytest.mark.parametrize("name", ["dpo", "rdpo", "robust"])
@pytest.mark.parametrize("adaptive", [False, True])
def test_dpop_penalty_enters_the_sigmoid(name, adaptive):
    x = make_inputs(seed=26)
    hw = x["lw"] - x["rw"]
    assert bool((hw < 0).any()) and bool((hw > 0).any())  # both sides of the hinge
    cfg = LossConfig(name=name, adaptive=adaptive, dpop_lambda=2.0, label_smoothing=0.1)
    a = ada_coef(x) if adaptive else 1.0
    hl, penalty = x["ll"] - x["rl"], 2.0 * torch.clamp(-hw, min=0.0)
    z = 0.1 * (a * hw - hl - penalty)
    if name == "rdpo":
        z = z + 0.05 * (x["nw"] - x["nl"]).to(F64)
    if name == "robust":
        want = (-0.9 * ref_logsig(z) + 0.1 * ref_logsig(-z)) / 0.8
    else:
        want = -0.9 * ref_logsig(z) - 0.1 * ref_logsig(-z)
    got, metrics = call(cfg, x)
    check(got, want, x, ("lw", "ll"))
    d_w, d_l = grads(got, x, ("lw", "ll"))
    close(metrics["ada/grad_balance"][0] / 6, (d_w.abs() / d_l.abs()).mean(), rtol=1e-8)


def test_dpop_is_refused_outside_the_sigmoid_families():
    with pytest.raises(ValueError, match="LossConfig.dpop_lambda=1.0 .*'ipo'"):
        LossConfig(name="ipo", dpop_lambda=1.0)


# ----------------------------------------------------------------------------- WPO
def wpo_inputs(x, seed=27):
    g = torch.Generator().manual_seed(seed)
    w = {k: (-torch.rand(6, generator=g, dtype=F64)).requires_grad_() for k in ("cw", "rw")}
    return w


@pytest.mark.parametrize("name", ["dpo", "ipo", "simpo", "cpo", "hinge", "nca_pair"])
def test_wpo_weights_multiply_the_pair_and_carry_no_gradient(name):
    x, adaptive = make_inputs(seed=28), name in ("dpo", "ipo", "simpo", "cpo")
    w = wpo_inputs(x)
    cfg = LossConfig(name=name, adaptive=adaptive, use_weighting=True, sft_weight=0.5)
    base, _ = call(LossConfig(name=name, adaptive=adaptive, sft_weight=0.5), x)
    got, _ = preference_loss(
        cfg,
        x["lw"],
        x["ll"],
        x["nw"],
        x["nl"],
        x["rw"],
        x["rl"],
        chosen_nll=x["nll"],
        chosen_weight_logps=w["cw"],
        rejected_weight_logps=w["rw"],
    )
    weight = torch.exp(w["cw"] + w["rw"]).detach()
    check(got, weight * base, x)
    assert all(
        g is None for g in torch.autograd.grad(got.sum(), [w["cw"], w["rw"]], allow_unused=True)
    )


def test_wpo_inputs_are_required_and_refused_when_off():
    x = make_inputs(seed=29)
    w = wpo_inputs(x)
    args = (x["lw"], x["ll"], x["nw"], x["nl"], x["rw"], x["rl"])
    with pytest.raises(ValueError, match="chosen_weight_logps is required"):
        preference_loss(LossConfig(use_weighting=True), *args)
    with pytest.raises(ValueError, match="set loss.use_weighting=true"):
        preference_loss(LossConfig(), *args, chosen_weight_logps=w["cw"])
    with pytest.raises(ValueError, match="LossConfig.use_weighting=True .*'aot'"):
        LossConfig(name="aot", use_weighting=True)


def test_wpo_weight_of_an_invalid_pair_never_leaks():
    x = make_inputs(seed=30)
    lengths = x["nl"].clone()
    lengths[1] = 0
    weights = torch.zeros(6, dtype=F64)
    weights[1] = math.inf  # whatever the step computed for an empty completion
    got, _ = preference_loss(
        LossConfig(use_weighting=True),
        x["lw"],
        x["ll"],
        x["nw"],
        lengths,
        x["rw"],
        x["rl"],
        chosen_weight_logps=weights,
        rejected_weight_logps=weights,
    )
    assert got[1] == 0 and torch.isfinite(got).all()
    assert torch.isfinite(grads(got, x, ("lw",))[0]).all()


# ----------------------------------------------------------------------------- LD-DPO field
def test_ld_alpha_is_a_field_in_zero_one():
    assert LossConfig(ld_alpha=0.5).ld_alpha == 0.5 and LossConfig().ld_alpha is None
    for bad in (0.0, 1.5, float("nan")):
        with pytest.raises(ValueError, match="LossConfig.ld_alpha="):
            LossConfig(ld_alpha=bad)
    with pytest.raises(ValueError, match="LossConfig.ld_alpha=0.5 .*'sft'"):
        LossConfig(name="sft", ld_alpha=0.5)

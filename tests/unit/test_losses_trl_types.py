"""TRL 1.16.0's other loss types, one family file each: value and gradient against fp64 formulas
written out here (the papers' / TRL's ``_compute_loss`` forms), base and adaptive, and the
analytic gradient balance metric against autograd."""

from __future__ import annotations

import math

import pytest
import torch

from megatron_adadpo.losses import LossConfig, preference_loss
from tests.unit.loss_reference import F64, call, close, grads, make_inputs, ref_coefs, ref_logsig

ADAPTIVE = ("hinge", "exo_pair", "discopop", "sigmoid_norm", "apo_down")
BASE_ONLY = ("nca_pair", "bco_pair", "sppo_hard", "apo_zero", "aot", "aot_unpaired")


def sig(x):
    return 1.0 / (1.0 + torch.exp(-x))


def ref_trl_loss(name, x, cfg, a=1.0):
    """Per-pair losses of TRL loss type ``name`` with the chosen coefficient ``a``."""
    beta, eps = cfg.beta, cfg.label_smoothing
    hw, hl = x["lw"] - x["rw"], x["ll"] - x["rl"]
    nw, nl = x["nw"].to(F64), x["nl"].to(F64)
    z = beta * (a * hw - hl)
    if name == "hinge":
        return torch.clamp(1.0 - z, min=0.0)
    if name == "exo_pair":
        return sig(z) * (ref_logsig(z) - math.log(1 - eps)) + sig(-z) * (
            ref_logsig(-z) - math.log(eps)
        )
    if name == "discopop":
        m = sig(z / cfg.discopop_tau)
        return -ref_logsig(z) * (1 - m) + torch.exp(-z) * m
    if name == "sigmoid_norm":
        return -ref_logsig(beta * (a * hw / nw - hl / nl))
    if name == "apo_down":
        return sig(beta * hw) + 1 - sig(z)
    if name == "nca_pair":
        rw, rl = beta * hw, beta * hl
        return -ref_logsig(rw) - 0.5 * ref_logsig(-rw) - 0.5 * ref_logsig(-rl)
    if name == "bco_pair":
        return -ref_logsig(beta * hw) - ref_logsig(-beta * hl)
    if name == "sppo_hard":
        return (hw - 0.5 / beta) ** 2 + (hl + 0.5 / beta) ** 2
    if name == "apo_zero":
        return 1 - sig(beta * hw) + sig(beta * hl)
    raise AssertionError(name)


def ref_aot(x, cfg, unpaired):
    """Sum over ranks k of the logistic loss on the k-th sorted difference."""
    if unpaired:
        first, second = x["lw"] - x["rw"], x["ll"] - x["rl"]
    else:
        first, second = x["lw"] - x["ll"], x["rw"] - x["rl"]
    delta = torch.sort(first).values - torch.sort(second).values
    eps, z = cfg.label_smoothing, cfg.beta * delta
    return (-(1 - eps) * ref_logsig(z) - eps * ref_logsig(-z)).sum()


def config(name, **kw):
    if name == "exo_pair":
        kw.setdefault("label_smoothing", 1e-3)
    return LossConfig(name=name, **kw)


def ada_coef(x):
    log_rho = ((x["lw"] - x["rw"]) / x["nw"] - (x["ll"] - x["rl"]) / x["nl"]).detach()
    return ref_coefs(log_rho)[0]


@pytest.mark.parametrize("name", ADAPTIVE + BASE_ONLY[:4])
def test_base_form_value_and_gradient(name):
    x = make_inputs(seed=11)
    cfg = config(name)
    got, metrics = call(cfg, x)
    want = ref_trl_loss(name, x, cfg)
    close(got, want)
    for g, w in zip(grads(got, x, ("lw", "ll")), grads(want, x, ("lw", "ll")), strict=True):
        close(g, w)
    close(metrics["rewards/chosen"][0], (0.1 * (x["lw"] - x["rw"])).sum().detach())


@pytest.mark.parametrize("name", ADAPTIVE)
def test_adaptive_form_multiplies_the_chosen_log_ratio(name):
    x = make_inputs(seed=12)
    cfg = config(name, adaptive=True)
    got, metrics = call(cfg, x)
    c = ada_coef(x)
    assert not torch.allclose(c, torch.ones_like(c))
    want = ref_trl_loss(name, x, cfg, a=c)
    close(got, want)
    for g, w in zip(grads(got, x, ("lw", "ll")), grads(want, x, ("lw", "ll")), strict=True):
        close(g, w)
    close(metrics["ada/coef_mean"][0], c.sum())


@pytest.mark.parametrize("name", BASE_ONLY)
def test_adaptive_is_refused_with_the_reason(name):
    with pytest.raises(ValueError, match=r"LossConfig.adaptive=True .*(on its own|sorts)"):
        config(name, adaptive=True)


@pytest.mark.parametrize("name", [*ADAPTIVE, *BASE_ONLY[:4]])
def test_grad_balance_metric_is_the_autograd_ratio(name):
    x = make_inputs(seed=13)
    cfg = config(name, beta=0.01, adaptive=name in ADAPTIVE)  # beta 0.01: hinge is active
    got, metrics = call(cfg, x)
    d_w, d_l = grads(got, x, ("lw", "ll"))
    ratio = (d_w.abs() / d_l.abs()).mean()
    close(metrics["ada/grad_balance"][0] / metrics["ada/grad_balance"][1], ratio, rtol=1e-8)


@pytest.mark.parametrize("unpaired", [False, True])
def test_aot_sorts_across_pairs(unpaired):
    name = "aot_unpaired" if unpaired else "aot"
    x = make_inputs(seed=14)
    cfg = config(name, label_smoothing=0.1)
    got, metrics = call(cfg, x)
    want = ref_aot(x, cfg, unpaired)
    close(got.sum(), want)
    for g, w in zip(grads(got, x, ("lw", "ll")), grads(want, x, ("lw", "ll")), strict=True):
        close(g, w)
    # the first rank's loss sits on the pair with the smallest margin (h_w for unpaired)
    if unpaired:
        first, second = x["lw"] - x["rw"], x["ll"] - x["rl"]
    else:
        first, second = x["lw"] - x["ll"], x["rw"] - x["rl"]
    z = 0.1 * (first.min() - second.min())
    close(got[int(torch.argmin(first.detach()))], -0.9 * ref_logsig(z) - 0.1 * ref_logsig(-z))
    assert math.isnan(float(metrics["ada/grad_balance"][0]))  # undefined per pair


def test_aot_excludes_invalid_pairs_from_the_sort():
    x = make_inputs(seed=15)
    lengths = x["nw"].clone()
    lengths[2] = 0
    cfg = config("aot")
    got, _ = preference_loss(cfg, **(_as_inputs(x) | {"chosen_lengths": lengths}))
    keep = [i for i in range(6) if i != 2]
    sub = {k: (v[keep] if torch.is_tensor(v) else v) for k, v in x.items()}
    close(got.sum(), ref_aot(sub, cfg, unpaired=False))
    assert got[2] == 0


def _as_inputs(x):
    return dict(
        policy_chosen_logps=x["lw"],
        policy_rejected_logps=x["ll"],
        chosen_lengths=x["nw"],
        rejected_lengths=x["nl"],
        reference_chosen_logps=x["rw"],
        reference_rejected_logps=x["rl"],
    )


def test_exo_needs_label_smoothing_and_discopop_tau_is_its_knob():
    with pytest.raises(ValueError, match="LossConfig.label_smoothing=0.0 .*exo_pair"):
        LossConfig(name="exo_pair")
    x = make_inputs(seed=16)
    cfg = LossConfig(name="discopop", discopop_tau=0.5)
    close(call(cfg, x)[0], ref_trl_loss("discopop", x, cfg))
    with pytest.raises(ValueError, match="LossConfig.discopop_tau=0.0"):
        LossConfig(name="discopop", discopop_tau=0.0)


# ----------------------------------------------------------------------------- ALGORITHM.md §5
NEW = ADAPTIVE + BASE_ONLY


@pytest.mark.parametrize("name", NEW)
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16))
def test_long_sequences_stay_finite(name, dtype):
    """Property 5: 2048 completion tokens around -12 nats, fp32 and bf16 inputs."""
    g = torch.Generator().manual_seed(1)
    nw, nl = torch.tensor([2048, 2048, 1500]), torch.tensor([2048, 1200, 2048])
    sums = []
    for n in (nw, nl, nw, nl):
        per_token = -12.0 + 2.0 * torch.randn(3, 2048, generator=g)
        sums.append((per_token * (torch.arange(2048) < n[:, None])).sum(-1).to(dtype))
    lw, ll = sums[0].clone().requires_grad_(), sums[1].clone().requires_grad_()
    cfg = config(name, adaptive=name in ADAPTIVE, clip_max=None)
    loss, metrics = preference_loss(cfg, lw, ll, nw, nl, sums[2], sums[3])
    g_w, g_l = torch.autograd.grad(loss.sum(), [lw, ll])
    assert torch.isfinite(loss).all() and torch.isfinite(g_w).all() and torch.isfinite(g_l).all()
    undefined = ("ada/grad_balance", "ada/log_prob_balance") if name.startswith("aot") else ()
    assert all(torch.isfinite(v).all() for k, v in metrics.items() if k not in undefined)


@pytest.mark.parametrize("name", NEW)
def test_margins_of_thousands_of_nats_stay_finite(name):
    lw = torch.tensor([-10.0, -5000.0], requires_grad=True)
    ll = torch.tensor([-5000.0, -10.0], requires_grad=True)
    n, ref = torch.tensor([100, 100]), torch.tensor([-100.0, -100.0])
    loss, _ = preference_loss(config(name, adaptive=name in ADAPTIVE), lw, ll, n, n, ref, ref)
    assert torch.isfinite(loss).all()
    assert all(torch.isfinite(g).all() for g in torch.autograd.grad(loss.sum(), [lw, ll]))


@pytest.mark.parametrize("name", NEW)
def test_zero_length_pairs_get_no_loss_and_no_gradient(name):
    """Property 6: garbage in an empty completion never reaches the loss or the gradient."""
    x = make_inputs(seed=17)
    x["nw"] = torch.tensor([0, 5, 7, 0, 9, 4])
    x["nl"] = torch.tensor([3, 0, 7, 0, 9, 4])
    bad = torch.tensor([True, True, False, True, False, False])
    with torch.no_grad():
        x["lw"][bad] = torch.nan
        x["ll"][bad] = -torch.inf
    loss, metrics = call(config(name, adaptive=name in ADAPTIVE), x)
    assert torch.isfinite(loss).all() and (loss[bad] == 0).all()
    for grad in grads(loss, x, ("lw", "ll")):
        assert torch.isfinite(grad).all() and (grad[bad] == 0).all()
    assert metrics["pairs/valid"].tolist() == [3.0, 6.0]


@pytest.mark.parametrize("name", ADAPTIVE + BASE_ONLY[:4])
def test_permuting_pairs_permutes_losses(name):
    """Property 7 (not for aot: it sorts across pairs by design)."""
    x = make_inputs(seed=18)
    perm = torch.tensor([3, 0, 5, 1, 4, 2])
    xp = {k: v.detach()[perm] for k, v in x.items()}
    cfg = config(name, adaptive=name in ADAPTIVE)
    close(call(cfg, x)[0].detach()[perm], call(cfg, xp)[0])

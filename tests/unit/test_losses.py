"""Properties of ALGORITHM.md section 5 for every loss family, in fp64 on CPU.

Expected values come from formulas written out here, independently of the library's helpers.
"""

from __future__ import annotations

import decimal
import itertools
import math

import pytest
import torch

import megatron_adadpo.losses.adaptive as adaptive_module
from megatron_adadpo.losses import LOSSES, LossConfig, preference_loss
from megatron_adadpo.losses.common import prepare_batch
from tests.unit.loss_reference import (
    F64,
    FAMILIES,
    NORMALIZES,
    PLACEMENTS,
    SPACES,
    call,
    close,
    grads,
    make_inputs,
    ref_coefs,
    ref_log_rho,
    ref_logsig,
    ref_loss,
)


# ----------------------------------------------------------------------------- property 1
@pytest.mark.parametrize("name", FAMILIES)
def test_non_adaptive_equals_base_form(name):
    x = make_inputs()
    cfg = LossConfig(name=name, adaptive=False)
    loss, _ = call(cfg, x)
    expected = ref_loss(name, x, cfg=cfg)
    close(loss, expected)
    for got, want in zip(grads(loss, x), grads(expected, x), strict=True):
        close(got, want)


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("space", SPACES)
def test_coefficient_one_equals_base_form(name, space):
    # Equal per-token means on both sides make every family's log rho exactly 0, so c = 1.
    x = make_inputs()
    g = torch.Generator().manual_seed(5)
    m_pol, m_ref = -0.7 - torch.rand(6, generator=g, dtype=F64), -0.9 * torch.ones(6, dtype=F64)
    x["lw"] = (m_pol * x["nw"]).requires_grad_()
    x["ll"] = (m_pol * x["nl"]).requires_grad_()
    x["rw"], x["rl"] = m_ref * x["nw"], m_ref * x["nl"]
    cfg = LossConfig(name=name, adaptive=True, balance_space=space)
    loss, metrics = call(cfg, x)
    expected = ref_loss(name, x, cfg=cfg)
    close(loss, expected)
    for got, want in zip(grads(loss, x), grads(expected, x), strict=True):
        close(got, want)
    close(metrics["ada/coef_mean"], torch.tensor([6.0, 6.0], dtype=F64))


def test_policy_equals_reference_gives_ln2_and_c_one():
    x = make_inputs()
    x["rw"], x["rl"] = x["lw"].detach().clone(), x["ll"].detach().clone()
    loss, metrics = call(LossConfig(), x)
    assert torch.equal(loss, torch.full_like(loss, math.log(2.0)))
    assert torch.equal(metrics["ada/coef_min"][0], torch.tensor(1.0, dtype=F64))
    assert torch.equal(metrics["ada/coef_max"][0], torch.tensor(1.0, dtype=F64))


# ----------------------------------------------------------------------------- general forms
@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("placement", PLACEMENTS)
def test_adaptive_forms_match_formula(name, placement):
    for space, normalize, k in itertools.product(SPACES, NORMALIZES, (1.0, 1.7)):
        if name == "orpo" and (space, normalize) != ("reference", "token_mean"):
            continue  # ORPO has one log rho
        x = make_inputs(seed=3)
        cfg = LossConfig(
            name=name,
            adaptive=True,
            balance_space=space,
            normalize=normalize,
            placement=placement,
            target_ratio=k,
            clip_max=3.0,
        )
        loss, _ = call(cfg, x)
        a, b = ref_coefs(ref_log_rho(name, x, space, normalize).detach(), 3.0, None, k, placement)
        expected = ref_loss(name, x, a, b, cfg)
        close(loss, expected)
        for got, want in zip(grads(loss, x), grads(expected, x), strict=True):
            close(got, want)


def test_label_smoothing_formula():
    x = make_inputs()
    cfg = LossConfig(name="dpo", label_smoothing=0.2, adaptive=False)
    loss, _ = call(cfg, x)
    z = cfg.beta * ((x["lw"] - x["rw"]) - (x["ll"] - x["rl"]))
    close(loss, -0.8 * ref_logsig(z) - 0.2 * ref_logsig(-z))


# ----------------------------------------------------------------------------- property 2
@pytest.mark.parametrize("name", ("dpo", "rdpo", "cpo"))
@pytest.mark.parametrize("placement", PLACEMENTS)
def test_sequence_policy_gradient_balance(name, placement):
    x = make_inputs(scale=0.1)  # |l_w - l_l| of a few nats
    cfg = LossConfig(
        name=name,
        adaptive=True,
        balance_space="policy",
        normalize="sequence",
        clip_max=None,
        placement=placement,
    )
    loss, _ = call(cfg, x)
    g_w, g_l, _ = grads(loss, x)
    c = torch.exp(x["lw"] - x["ll"]).detach()
    close(g_w.abs() / g_l.abs(), c)
    # i.e. |dL/dpi_w| = |dL/dl_w| / pi_w equals |dL/dpi_l| = |dL/dl_l| / pi_l
    close(torch.log(g_w.abs()) - x["lw"].detach(), torch.log(g_l.abs()) - x["ll"].detach())


def per_token_inputs(b=5, t=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    tok = lambda: (-1.0 - torch.rand(b, t, generator=g, dtype=F64)).requires_grad_()
    nw, nl = torch.randint(1, t + 1, (b,), generator=g), torch.randint(1, t + 1, (b,), generator=g)
    mask = lambda n: torch.arange(t)[None, :] < n[:, None]
    return tok(), tok(), tok().detach(), tok().detach(), nw, nl, mask(nw), mask(nl)


@pytest.mark.parametrize("space", SPACES)
@pytest.mark.parametrize("placement", PLACEMENTS)
@pytest.mark.parametrize("name", ("dpo", "rdpo"))
def test_per_token_gradient_balance(space, placement, name):
    pw, pl, rw, rl, nw, nl, mw, ml = per_token_inputs()
    lw, ll = (pw * mw).sum(-1), (pl * ml).sum(-1)
    ref_w, ref_l = (rw * mw).sum(-1), (rl * ml).sum(-1)
    cfg = LossConfig(
        name=name, adaptive=True, balance_space=space, clip_max=None, placement=placement
    )
    loss, _ = preference_loss(cfg, lw, ll, nw, nl, ref_w, ref_l)
    tok_gw, tok_gl = torch.autograd.grad(loss.sum(), [pw, pl])
    g_w, g_l = tok_gw[:, 0], tok_gl[:, 0]  # every row has >= 1 token
    close(tok_gw, g_w[:, None] * mw)  # every unmasked token of y_w gets g_w, masked ones 0
    close(tok_gl, g_l[:, None] * ml)
    sw, sl = lw.detach(), ll.detach()
    if space == "reference":
        sw, sl = sw - ref_w, sl - ref_l
    close(torch.log(g_w.abs()) - sw / nw, torch.log(g_l.abs()) - sl / nl)


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("placement", PLACEMENTS)
def test_grad_balance_metric_matches_autograd(name, placement):
    x = make_inputs(seed=7)
    loss, metrics = call(LossConfig(name=name, adaptive=True, placement=placement), x)
    g_w, g_l, _ = grads(loss, x)
    ratio = g_w.abs() / g_l.abs()
    close(metrics["ada/grad_balance"], torch.stack([ratio.sum(), torch.tensor(6.0, dtype=F64)]))


# ----------------------------------------------------------------------------- property 3
def detached_gradient_holds(placement="chosen"):
    x = make_inputs(seed=11)
    cfg = LossConfig(clip_max=None, placement=placement)
    loss, _ = call(cfg, x)
    g_w, _, _ = grads(loss, x)  # dL/dl_w == dL/dh_w (reference fixed)
    hw, hl = (x["lw"] - x["rw"]).detach(), (x["ll"] - x["rl"]).detach()
    a, b = ref_coefs(ref_log_rho("dpo", x).detach(), None, None, 1.0, placement)
    z = cfg.beta * (a * hw - b * hl)
    return torch.allclose(g_w, -cfg.beta * a * torch.sigmoid(-z), rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("placement", PLACEMENTS)
def test_coefficient_is_detached(placement):
    assert detached_gradient_holds(placement)


@pytest.mark.parametrize("placement", PLACEMENTS)
def test_removing_detach_breaks_gradient(monkeypatch, placement):
    monkeypatch.setattr(adaptive_module, "stop_gradient", lambda t: t)
    assert not detached_gradient_holds(placement)


# ----------------------------------------------------------------------------- property 4
def dpo_with_log_rho(log_rho, **cfg_kw):
    """DPO pairs with n = 1 so that reference-space log rho = h_w - h_l = log_rho."""
    b = log_rho.numel()
    lw = (log_rho + 0.25).clone().requires_grad_()
    ll = torch.full((b,), 0.25, dtype=F64, requires_grad=True)
    zeros, ones = torch.zeros(b, dtype=F64), torch.ones(b, dtype=torch.long)
    cfg = LossConfig(**cfg_kw)
    loss, metrics = preference_loss(cfg, lw, ll, ones, ones, zeros, zeros)
    g = torch.autograd.grad(loss.sum(), [lw, ll])
    return loss, metrics, g


def test_clip_ceiling_and_underflow():
    log_rho = torch.tensor([-5000.0, -1.0, 0.5, math.log(2.0) + 0.3, 5.0], dtype=F64)
    loss, metrics, (g_w, g_l) = dpo_with_log_rho(log_rho)
    c = torch.tensor([0.0, math.exp(-1.0), math.exp(0.5), 2.0, 2.0], dtype=F64)
    assert torch.isfinite(loss).all() and torch.isfinite(g_w).all() and torch.isfinite(g_l).all()
    close(g_w.abs(), c * g_l.abs())  # ratio == c, and exactly 0 for the underflowed pair
    assert g_w[0] == 0
    close(metrics["ada/clip_frac"], torch.tensor([2.0, 5.0], dtype=F64))
    close(metrics["ada/coef_max"][0], torch.tensor(2.0, dtype=F64))
    close(metrics["ada/coef_min"][0], torch.tensor(0.0, dtype=F64))
    close(metrics["ada/log_rho_mean"][0], log_rho.sum())


def test_clip_floor_and_target_ratio():
    log_rho = torch.tensor([-5.0, -0.1, 0.2, 3.0], dtype=F64)
    _, metrics, (g_w, g_l) = dpo_with_log_rho(log_rho, clip_min=0.5, clip_max=1.5, target_ratio=1.2)
    raw = 1.2 * torch.exp(log_rho)
    close(g_w.abs() / g_l.abs(), raw.clamp(0.5, 1.5))
    close(metrics["ada/clip_frac"], torch.tensor([2.0, 4.0], dtype=F64))


def test_balancing_coefficients_fp32_extremes_no_nan():
    log_rho = torch.tensor([-1e30, -1e4, -100.0, 0.0, 100.0, 1e4], dtype=torch.float32)
    for placement in PLACEMENTS:
        for clip in (2.0, None):
            out = adaptive_module.balancing_coefficients(
                log_rho, clip_max=clip, placement=placement
            )
            assert torch.isfinite(out.coef_chosen).all() and torch.isfinite(out.coef_rejected).all()
            if placement == "chosen":
                assert out.coef_chosen[0] == 0 and out.coef_chosen[1] == 0


# ----------------------------------------------------------------------------- property 5
@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16))
def test_long_sequences_finite_in_every_mode(name, dtype):
    b, t = 3, 2048
    g = torch.Generator().manual_seed(1)
    tok = lambda: -12.0 + 2.0 * torch.randn(b, t, generator=g)
    nw, nl = torch.tensor([2048, 2048, 1500]), torch.tensor([2048, 1200, 2048])
    mw, ml = torch.arange(t) < nw[:, None], torch.arange(t) < nl[:, None]
    sums = [(tok() * m).sum(-1).to(dtype) for m in (mw, ml, mw, ml)]
    nll = torch.full((b,), 12.0, dtype=dtype)
    for space, normalize, placement, clip in itertools.product(
        SPACES, NORMALIZES, PLACEMENTS, (2.0, None)
    ):
        lw, ll = sums[0].clone().requires_grad_(), sums[1].clone().requires_grad_()
        cfg = LossConfig(
            name=name,
            adaptive=True,
            balance_space=space,
            normalize=normalize,
            placement=placement,
            clip_max=clip,
        )
        loss, metrics = preference_loss(cfg, lw, ll, nw, nl, sums[2], sums[3], chosen_nll=nll)
        assert loss.dtype == torch.float32
        g_w, g_l = torch.autograd.grad(loss.sum(), [lw, ll])
        mode = (space, normalize, placement, clip)
        assert torch.isfinite(loss).all(), mode
        assert torch.isfinite(g_w).all() and torch.isfinite(g_l).all(), mode
        assert all(torch.isfinite(v).all() for v in metrics.values()), mode


# ----------------------------------------------------------------------------- property 6
@pytest.mark.parametrize("name", FAMILIES)
def test_zero_length_pairs_are_excluded_and_counted(name):
    x = make_inputs()
    x["nw"] = torch.tensor([0, 5, 7, 0, 9, 4])
    x["nl"] = torch.tensor([3, 0, 7, 0, 9, 4])
    bad = torch.tensor([True, True, False, True, False, False])
    with torch.no_grad():  # garbage where the completion is empty
        x["lw"][bad] = torch.nan
        x["ll"][bad] = -torch.inf
        x["nll"][bad] = torch.inf
    cfg = LossConfig(name=name, adaptive=True)
    loss, metrics = call(cfg, x)
    assert torch.isfinite(loss).all() and (loss[bad] == 0).all()
    for g in grads(loss, x):
        assert g is None or (torch.isfinite(g).all() and (g[bad] == 0).all())
    close(metrics["pairs/valid"], torch.tensor([3.0, 6.0], dtype=F64))
    keep = ~bad
    sub = {
        k: (v[keep].detach().requires_grad_() if v.is_floating_point() else v[keep])
        for k, v in x.items()
    }
    sub_loss, sub_metrics = call(cfg, sub)
    close(loss[keep], sub_loss)
    for key, value in metrics.items():
        if key != "pairs/valid":
            close(value, sub_metrics[key])


# ----------------------------------------------------------------------------- property 7
@pytest.mark.parametrize("name", FAMILIES)
def test_permutation_permutes_losses_and_coefficients(name):
    x = make_inputs(b=8, seed=2)
    perm = torch.randperm(8, generator=torch.Generator().manual_seed(0))
    xp = {k: v[perm] for k, v in x.items()}
    cfg = LossConfig(name=name, adaptive=True)
    close(call(cfg, x)[0][perm], call(cfg, xp)[0])

    def coefs(d):
        keys = ("lw", "ll", "nw", "nl", "rw", "rl", "nll")
        names = (
            "policy_chosen_logps",
            "policy_rejected_logps",
            "chosen_lengths",
            "rejected_lengths",
            "reference_chosen_logps",
            "reference_rejected_logps",
            "chosen_nll",
        )
        batch = prepare_batch(cfg, dict(zip(names, (d[k] for k in keys), strict=True)))
        return LOSSES[name].compute(batch, cfg).coefs

    a, b = coefs(x), coefs(xp)
    for got, want in zip(a, b, strict=True):
        if got.is_floating_point():
            close(got[perm], want)
        else:
            assert torch.equal(got[perm], want)


# ----------------------------------------------------------------------------- ORPO log1mexp
def exact_log1mexp(a: float) -> float:
    """log(1 - e^a) in 50-digit decimal arithmetic."""
    with decimal.localcontext() as ctx:
        ctx.prec = 50
        return float((1 - decimal.Decimal(a).exp()).ln())


@pytest.mark.parametrize("a", (-1e-6, -1e-4, -0.3, -0.69, -0.7, -2.0, -20.0, -60.0))
def test_orpo_log1mexp_accuracy(a):
    from megatron_adadpo.losses.orpo import log1mexp

    x = torch.tensor([a], dtype=F64, requires_grad=True)
    got = log1mexp(x)
    want = exact_log1mexp(a)
    assert abs(got.item() - want) <= 1e-13 * abs(want)
    (g,) = torch.autograd.grad(got.sum(), [x])
    want_grad = -1.0 / math.expm1(-a)  # d/da log(1 - e^a)
    assert abs(g.item() - want_grad) <= 1e-12 * abs(want_grad)


def test_orpo_near_zero_avg_logp_is_finite():
    # lbar -> 0 (and even > 0 from rounding) is clamped to -1e-6: finite loss and gradient.
    lw = torch.tensor([-1e-9, 0.0, 1e-7, -3.0], dtype=F64, requires_grad=True)
    ll = torch.tensor([-2.0, -1e-12, -1.0, -3.0], dtype=F64, requires_grad=True)
    n = torch.ones(4, dtype=torch.long)
    nll = torch.ones(4, dtype=F64)
    cfg = LossConfig(name="orpo", adaptive=True)
    loss, _ = preference_loss(cfg, lw, ll, n, n, chosen_nll=nll)
    gw, gl = torch.autograd.grad(loss.sum(), [lw, ll])
    assert torch.isfinite(loss).all() and torch.isfinite(gw).all() and torch.isfinite(gl).all()
    bw = lw.detach().clamp(max=-1e-6)
    bl = ll.detach().clamp(max=-1e-6)
    lo = lambda v: v - torch.tensor([exact_log1mexp(u) for u in v.tolist()], dtype=F64)
    l1 = lambda v: torch.tensor([exact_log1mexp(u) for u in v.tolist()], dtype=F64)
    c = torch.exp(((bw + l1(bw)) - (bl + l1(bl))).clamp(max=math.log(2.0)))
    close(loss, nll - 0.1 * ref_logsig(c * lo(bw) - lo(bl)), rtol=1e-9, atol=1e-12)

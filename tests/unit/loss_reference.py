"""Independent reference formulas and inputs for the loss-library tests (fp64, written out
here rather than taken from the library's helpers)."""

from __future__ import annotations

import math

import torch

from megatron_adadpo.losses import LossConfig, preference_loss

FAMILIES = ("dpo", "ipo", "simpo", "rdpo", "cpo", "orpo", "robust")
REFERENCE_FAMILIES = ("dpo", "ipo", "rdpo", "robust")
SPACES = ("reference", "policy")
NORMALIZES = ("token_mean", "sequence")
PLACEMENTS = ("chosen", "rejected", "split")
F64 = torch.float64


# ----------------------------------------------------------------------------- reference math
def ref_logsig(x):
    """log sigmoid(x), stable on both sides, with the right gradient at x = 0."""
    xp, xn = x.clamp(min=0.0), x.clamp(max=0.0)
    return torch.where(x >= 0, -torch.log1p(torch.exp(-xp)), xn - torch.log1p(torch.exp(xn)))


def ref_log1mexp(a):
    return torch.log(-torch.expm1(a))  # accurate enough for the moderate values used here


def ref_log_rho(name, x, space="reference", normalize="token_mean"):
    """log rho of ALGORITHM.md section 3/4, written out per family."""
    lw, ll, nw, nl = x["lw"], x["ll"], x["nw"].to(F64), x["nl"].to(F64)
    if name == "orpo":
        bw, bl = lw / nw, ll / nl
        return (bw + ref_log1mexp(bw)) - (bl + ref_log1mexp(bl))
    if name in REFERENCE_FAMILIES and space == "reference":
        sw, sl = lw - x["rw"], ll - x["rl"]
    else:
        sw, sl = lw, ll
    if normalize == "token_mean":
        return sw / nw - sl / nl
    return sw - sl


def ref_coefs(log_rho, clip_max=2.0, clip_min=None, k=1.0, placement="chosen"):
    log_c = math.log(k) + log_rho
    if clip_max is not None:
        log_c = torch.minimum(log_c, torch.full_like(log_c, math.log(clip_max)))
    if clip_min is not None:
        log_c = torch.maximum(log_c, torch.full_like(log_c, math.log(clip_min)))
    c = torch.exp(log_c)
    if placement == "chosen":
        return c, torch.ones_like(c)
    if placement == "rejected":
        return torch.ones_like(c), 1.0 / c
    return torch.sqrt(c), 1.0 / torch.sqrt(c)


def ref_loss(name, x, a=1.0, b=1.0, cfg=None):
    """The loss formulas of ALGORITHM.md section 4 with coefficients a (chosen), b (rejected)."""
    cfg = cfg or LossConfig(name=name)
    lw, ll, nw, nl = x["lw"], x["ll"], x["nw"].to(F64), x["nl"].to(F64)
    beta = cfg.beta
    if name in REFERENCE_FAMILIES:
        hw, hl = lw - x["rw"], ll - x["rl"]
    if name == "dpo":
        z = beta * (a * hw - b * hl)
        eps = cfg.label_smoothing
        return -(1 - eps) * ref_logsig(z) - eps * ref_logsig(-z)
    if name == "robust":  # TRL's loss_type="robust" (Chowdhury et al. 2024)
        z = beta * (a * hw - b * hl)
        eps = cfg.label_smoothing
        return (-(1 - eps) * ref_logsig(z) + eps * ref_logsig(-z)) / (1 - 2 * eps)
    if name == "rdpo":
        return -ref_logsig(beta * (a * hw - b * hl) + cfg.rdpo_alpha * (nw - nl))
    if name == "ipo":
        tau = beta if cfg.ipo_tau is None else cfg.ipo_tau  # None: TRL's beta-as-tau
        return (a * hw / nw - b * hl / nl - 1 / (2 * tau)) ** 2
    if name == "simpo":
        return -ref_logsig(beta * (a * lw / nw - b * ll / nl) - cfg.simpo_gamma)
    if name == "cpo":
        return -ref_logsig(beta * (a * lw - b * ll)) + cfg.cpo_alpha * x["nll"]
    bw, bl = lw / nw, ll / nl
    low, lol = bw - torch.log(1 - torch.exp(bw)), bl - torch.log(1 - torch.exp(bl))
    return x["nll"] - cfg.orpo_lambda * ref_logsig(a * low - b * lol)


# ----------------------------------------------------------------------------- inputs
def make_inputs(b=6, seed=0, dtype=F64, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    nw = torch.randint(3, 40, (b,), generator=g)
    nl = torch.randint(3, 40, (b,), generator=g)
    per_tok = lambda n: -(0.5 + torch.rand(b, generator=g, dtype=F64)) * n  # lbar in (-1.5, -0.5)
    x = {
        "lw": per_tok(nw) * scale,
        "ll": per_tok(nl) * scale,
        "rw": per_tok(nw) * scale,
        "rl": per_tok(nl) * scale,
        "nll": torch.rand(b, generator=g, dtype=F64) + 0.5,
        "nw": nw,
        "nl": nl,
    }
    for key in ("lw", "ll", "rw", "rl", "nll"):
        x[key] = x[key].to(dtype).requires_grad_(key in ("lw", "ll", "nll"))
    return x


def call(cfg, x):
    return preference_loss(
        cfg, x["lw"], x["ll"], x["nw"], x["nl"], x["rw"], x["rl"], chosen_nll=x["nll"]
    )


def grads(loss, x, keys=("lw", "ll", "nll")):
    return torch.autograd.grad(loss.sum(), [x[k] for k in keys], allow_unused=True)


def close(a, b, **kw):
    torch.testing.assert_close(a, b, rtol=kw.get("rtol", 1e-10), atol=kw.get("atol", 1e-12))

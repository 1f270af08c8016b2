"""Loss names say what they train, and the TRL conventions: cDPO vs robust, IPO's tau.

Formulas are written out here in fp64 (TRL's ``DPOTrainer`` 1.9 ``_compute_loss``: ``sigmoid``,
``robust``, ``ipo``), independently of the library.
"""

from __future__ import annotations

import pytest
import torch

from megatron_adadpo.config import from_dict
from megatron_adadpo.losses import LossConfig
from tests.unit.loss_reference import call, close, grads, make_inputs, ref_coefs, ref_logsig


def _logratio_margin(x):
    return (x["lw"] - x["rw"]) - (x["ll"] - x["rl"])


@pytest.mark.parametrize(
    ("kwargs", "adaptive", "family"),
    [
        ({}, True, "dpo"),  # the project default: AdaDPO
        ({"name": "adadpo"}, True, "dpo"),
        ({"name": "adadpo", "adaptive": True}, True, "dpo"),
        ({"name": "dpo"}, False, "dpo"),
        ({"name": "dpo", "adaptive": True}, True, "dpo"),
        ({"name": "ipo"}, False, "ipo"),
        ({"name": "simpo", "adaptive": True}, True, "simpo"),
        ({"name": "robust"}, False, "robust"),
    ],
)
def test_names_resolve_adaptive(kwargs, adaptive, family):
    cfg = LossConfig(**kwargs)
    assert cfg.adaptive is adaptive and cfg.family == family


def test_dpo_trains_dpo_and_adadpo_trains_adadpo():
    x = make_inputs(seed=4)
    z = 0.1 * _logratio_margin(x)
    dpo, _ = call(LossConfig(name="dpo"), x)
    close(dpo, -ref_logsig(z))
    a, b = ref_coefs(((x["lw"] - x["rw"]) / x["nw"] - (x["ll"] - x["rl"]) / x["nl"]).detach())
    ada, metrics = call(LossConfig(name="adadpo"), x)
    close(ada, -ref_logsig(0.1 * (a * (x["lw"] - x["rw"]) - b * (x["ll"] - x["rl"]))))
    assert not torch.allclose(ada, dpo)
    assert metrics["ada/coef_mean"][0] != metrics["ada/coef_mean"][1]  # c != 1 somewhere


def test_old_configs_relying_on_the_adaptive_default_get_a_notice():
    unset = LossConfig(name="dpo")
    (notice,) = unset.notices
    assert "loss.name='dpo'" in notice and "loss.name='adadpo'" in notice
    assert "loss.adaptive=false" in notice  # how to silence it
    quiet = (
        LossConfig(),
        LossConfig(name="dpo", adaptive=False),
        LossConfig(name="adadpo"),
        LossConfig(name="robust"),  # new: no old config could rely on the old default
    )
    assert all(cfg.notices == () for cfg in quiet)
    # the run config forwards it; the resolved config is explicit, so a reload is silent
    config = from_dict(_run_config({"name": "ipo"}))
    assert len(config.notices) == 1 and "plain IPO" in config.notices[0]
    assert config.loss.adaptive is False
    assert from_dict(config.to_dict()).notices == ()


def test_adadpo_with_adaptive_false_is_refused():
    with pytest.raises(ValueError, match="use name='dpo'"):
        LossConfig(name="adadpo", adaptive=False)


def test_label_smoothing_is_cdpo_and_robust_is_its_own_loss():
    x = make_inputs(seed=6)
    eps, z = 0.2, 0.1 * _logratio_margin(x)
    cdpo, _ = call(LossConfig(name="dpo", label_smoothing=eps), x)
    close(cdpo, -(1 - eps) * ref_logsig(z) - eps * ref_logsig(-z))
    robust, _ = call(LossConfig(name="robust", label_smoothing=eps), x)
    expected = (-(1 - eps) * ref_logsig(z) + eps * ref_logsig(-z)) / (1 - 2 * eps)
    close(robust, expected)
    for got, want in zip(grads(robust, x), grads(expected, x), strict=True):
        close(got, want)
    assert not torch.allclose(robust, cdpo)
    # TRL's sigmoid (>= 0.29) ignores label_smoothing: it is dpo with label_smoothing 0
    close(call(LossConfig(name="dpo"), x)[0], -ref_logsig(z))


def test_adaptive_robust_puts_c_on_the_chosen_term():
    x = make_inputs(seed=7)
    eps = 0.1
    cfg = LossConfig(name="robust", label_smoothing=eps, adaptive=True, clip_max=3.0)
    loss, _ = call(cfg, x)
    hw, hl = x["lw"] - x["rw"], x["ll"] - x["rl"]
    a, b = ref_coefs((hw / x["nw"] - hl / x["nl"]).detach(), clip_max=3.0)
    z = 0.1 * (a * hw - b * hl)
    expected = (-(1 - eps) * ref_logsig(z) + eps * ref_logsig(-z)) / (1 - 2 * eps)
    close(loss, expected)
    g_w, g_l, _ = grads(loss, x)
    close(g_w.abs() / g_l.abs(), a / b)  # |dL/dl_w| / |dL/dl_l| = c


@pytest.mark.parametrize(("beta", "ipo_tau", "tau"), [(0.5, None, 0.5), (0.5, 0.1, 0.1)])
def test_ipo_tau_is_beta_unless_set(beta, ipo_tau, tau):
    x = make_inputs(seed=8)
    cfg = LossConfig(name="ipo", adaptive=False, beta=beta, ipo_tau=ipo_tau)
    loss, metrics = call(cfg, x)
    hw, hl = x["lw"] - x["rw"], x["ll"] - x["rl"]
    close(loss, (hw / x["nw"] - hl / x["nl"] - 1 / (2 * tau)) ** 2)
    close(metrics["rewards/chosen"][0], (beta * hw).sum().detach())  # beta scales rewards
    tau_notices = [n for n in cfg.notices if "ipo_tau" in n]
    assert bool(tau_notices) == (ipo_tau is None)  # beta != 0.1: tau changed for old configs


def _run_config(loss: dict) -> dict:
    return {
        "model": {
            "num_layers": 2,
            "hidden_size": 64,
            "ffn_hidden_size": 128,
            "num_attention_heads": 4,
            "vocab_size": 640,
        },
        "loss": loss,
        "data": {"inputs": ["x.jsonl"], "tokenizer": "tok"},
    }

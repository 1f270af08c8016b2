"""f-divergence scores of the log-ratio (f-DPO, Wang et al., https://arxiv.org/abs/2309.16240).

With ``u = pi / pi_ref = exp(h)`` the reward of f-DPO is ``f'(u)``, and the loss keeps its form
on the difference ``s_w - s_l`` (the ``beta log Z`` term cancels only there: TRL 1.16.0 allows a
non-default divergence only for losses built on that difference, ``registry.LossFamily``):

    reverse_kl        s = h                                  (DPO)
    forward_kl        s = 1 - exp(-h)                        f'(u) = 1 - 1/u
    js_divergence     s = log 2 + logsig(h)                  f'(u) = log(2u / (1 + u))
    alpha_divergence  s = (exp((alpha-1) h) - 1) / (alpha-1) f'(u) = (u^(alpha-1) - 1)/(alpha-1)
                      (h for |alpha - 1| < 1e-6; (alpha-1) h clamped at 80 as TRL does)

AdaDPO with an f-divergence: ``c`` multiplies ``s_w`` (``z = beta (c s_w - s_l)``); log rho is
computed from ``h`` (or ``l``) as configured, so the balance ``|dL/dl_w| / |dL/dl_l| =
c f''(u_w) u_w / (f''(u_l) u_l)`` is exact in log-ratio space only for reverse_kl; the metric
``ada/grad_balance`` reports the analytic value with the slopes returned here. As in TRL,
``forward_kl``'s ``exp(-h)`` overflows once the policy gives an answer far less probability than
the reference (``h < -88`` nats in fp32): that divergence is unbounded there.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

ALPHA_EXP_MAX = 80.0  # TRL's clamp on (alpha - 1) h for fp32 before exp


def f_divergence_scores(h: Tensor, kind: str, alpha: float = 0.5) -> tuple[Tensor, Tensor]:
    """``(s, log ds/dh)`` for divergence ``kind`` (module docstring). Shapes: ``[b]`` each."""
    if kind == "reverse_kl" or (kind == "alpha_divergence" and abs(alpha - 1.0) < 1e-6):
        return h, torch.zeros_like(h)
    if kind == "forward_kl":
        return -torch.expm1(-h), -h
    if kind == "js_divergence":
        return math.log(2.0) + F.logsigmoid(h), F.logsigmoid(-h)
    if kind == "alpha_divergence":
        t = ((alpha - 1.0) * h).clamp(max=ALPHA_EXP_MAX)
        return torch.expm1(t) / (alpha - 1.0), t
    raise ValueError(f"f_divergence_type={kind!r} is unknown")

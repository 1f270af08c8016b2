"""The AdaDPO balancing coefficient, shared by every loss family.

AdaDPO (arXiv 2605.28440) puts a stop-gradient coefficient ``c`` on the chosen term of a
pairwise loss so that the chosen and rejected responses receive gradients of equal magnitude in
probability space (ALGORITHM.md sections 3-4):

    log c = min(log k + sg(log rho), log C)          (and max(., log clip_min) if set)
    placement "chosen":   chosen term * c,          rejected term * 1
    placement "rejected": chosen term * 1,          rejected term * 1/c   (beta_l = beta / c)
    placement "split":    chosen term * sqrt(c),    rejected term * 1/sqrt(c)

In every placement the ratio (chosen coefficient) / (rejected coefficient) equals ``c``.
Everything is computed in log space; ``exp`` of a very negative log gives 0 (no NaN). A fixed
finiteness guard keeps every coefficient <= ``exp(MAX_LOG_COEF)``: ``c <= exp(30)`` always
(it only matters with ``clip_max=None``) and, in the rejected/split placements where ``1/c`` is
a coefficient, ``c >= exp(-30)``. A pair held by the guard counts as clipped.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

MAX_LOG_COEF = 30.0  # coefficients never exceed exp(30) ~ 1e13: keeps z and gradients finite


def stop_gradient(x: Tensor) -> Tensor:
    """``sg(x)``. The single detach point of the library (tests patch it to prove it matters)."""
    return x.detach()


class Coefficients(NamedTuple):
    """Per-pair coefficients. Shapes: all ``[b]`` (per pair)."""

    coef_chosen: Tensor  # multiplies the chosen score (detached)
    coef_rejected: Tensor  # multiplies the rejected score (detached)
    log_rho: Tensor  # detached log rho, before target_ratio and clipping
    clipped: Tensor  # bool: a clip (clip_max, clip_min or the finiteness guard) was active


def log_rho_from_scores(
    chosen: Tensor,
    rejected: Tensor,
    chosen_lengths: Tensor,
    rejected_lengths: Tensor,
    normalize: str,
) -> Tensor:
    """Section-3 log rho (not yet detached): ``s_w/n_w - s_l/n_l`` or ``s_w - s_l``.

    ``chosen``/``rejected`` are ``h`` (reference space) or ``l`` (policy space).

    Shapes: all inputs and the output ``[b]`` (per pair); lengths already clamped to >= 1.
    """
    if normalize == "token_mean":
        return chosen / chosen_lengths - rejected / rejected_lengths
    return chosen - rejected


def balancing_coefficients(
    log_rho: Tensor,
    *,
    clip_max: float | None = 2.0,
    clip_min: float | None = None,
    target_ratio: float = 1.0,
    placement: str = "chosen",
    enabled: bool = True,
) -> Coefficients:
    """Detached, clipped balancing coefficients ``(coef_chosen, coef_rejected, log_rho, clipped)``.

    Formula: ``log c = clamp(log k + sg(log rho), log clip_min, log clip_max)``, then the
    placement splits ``c`` between the chosen and rejected terms (module docstring). With
    ``enabled=False`` both coefficients are 1 and nothing is clipped (the base loss), but the
    detached ``log_rho`` is still returned for logging.

    Args:
        log_rho: per-pair log rho, any float dtype; may carry gradient (it is detached here).
        clip_max: ceiling C on c, or None.
        clip_min: floor on c, or None (0 is the same as None).
        target_ratio: k > 0.
        placement: "chosen" | "rejected" | "split".
        enabled: False gives coefficients of 1 (adaptive=False).

    Shapes:
        log_rho: ``[b]`` per pair. All outputs ``[b]`` per pair.
    """
    log_rho = stop_gradient(log_rho)
    if not enabled:
        one = torch.ones_like(log_rho)
        return Coefficients(one, one, log_rho, torch.zeros_like(log_rho, dtype=torch.bool))
    log_c = log_rho + math.log(target_ratio) if target_ratio != 1.0 else log_rho
    # Ceiling: clip_max and the finiteness guard c <= exp(MAX_LOG_COEF).
    upper = MAX_LOG_COEF if clip_max is None else min(math.log(clip_max), MAX_LOG_COEF)
    # Floor: clip_min and, where 1/c is a coefficient, the guard 1/c <= exp(MAX_LOG_COEF).
    lower = math.log(clip_min) if clip_min else -math.inf
    if placement != "chosen":
        lower = max(lower, -MAX_LOG_COEF)
    clipped = log_c > upper
    if lower > -math.inf:
        clipped = clipped | (log_c < lower)
        log_c = log_c.clamp(min=lower, max=upper)
    else:
        log_c = log_c.clamp(max=upper)
    if placement == "chosen":
        return Coefficients(torch.exp(log_c), torch.ones_like(log_c), log_rho, clipped)
    if placement == "rejected":
        return Coefficients(torch.ones_like(log_c), torch.exp(-log_c), log_rho, clipped)
    half = 0.5 * log_c  # "split"; LossConfig validates the value
    return Coefficients(torch.exp(half), torch.exp(-half), log_rho, clipped)

"""Supervised fine-tuning: the per-token mean NLL of the chosen completions (no reference).

SFT     L = sum_i -l_w,i / sum_i n_w,i        over the valid pairs i of the global batch

The family returns the per-pair summed NLL ``-l_w`` and declares the ``"tokens"`` normaliser,
so the trainer divides the global batch's sum by its chosen completion tokens (Megatron's
``calculate_per_token_loss``), not by its pairs: a long answer weighs as many tokens as it has,
as in Megatron-LM's and TRL's SFT. The rejected completions are collated and scored (their
log-probs are logged) but carry no loss. The AdaDPO coefficient does not apply: an NLL term is
left unweighted (ALGORITHM.md section 4), so ``adaptive: true`` is refused and the clip options
have no effect.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from megatron_adadpo.losses.adaptive import balancing_coefficients
from megatron_adadpo.losses.common import FamilyOutput, PairBatch, policy_log_rho
from megatron_adadpo.losses.registry import register_loss

if TYPE_CHECKING:
    from megatron_adadpo.losses.config import LossConfig


def sft_loss(chosen_logps: Tensor) -> Tensor:
    """Per-pair summed NLL ``-l_w``; divide the batch's sum by its chosen token count.

    Shapes: chosen_logps ``[b]`` per pair (summed over completion tokens); returns ``[b]``.
    """
    return -chosen_logps


@register_loss(
    "sft",
    needs_reference=False,
    normalizer="tokens",
    no_adaptive="it has no pair term to balance (an NLL term is left unweighted, ALGORITHM.md "
    "section 4)",
)
def sft_family(batch: PairBatch, config: LossConfig) -> FamilyOutput:
    """SFT on a :class:`PairBatch`. Rewards: the per-token mean log-probs ``lbar = l / n``.

    ``log rho = lbar_w - lbar_l`` is logged (``ada/log_rho_mean``) with ``c = 1``; the gradient
    balance is undefined (no rejected term): NaN.
    """
    coefs = balancing_coefficients(policy_log_rho(batch, config), enabled=False)
    lbar_w = batch.chosen_logps / batch.chosen_lengths
    lbar_l = batch.rejected_logps / batch.rejected_lengths
    no_balance = torch.full_like(lbar_w, float("nan"))
    return FamilyOutput(sft_loss(batch.chosen_logps), lbar_w, lbar_l, coefs, no_balance)

"""The public entry point: per-pair preference losses and their metrics.

    L_i = w_i * ( L_family,i + sft_weight * NLL_i(y_w) )        (invalid pairs: L_i = 0)

``L_family`` is the configured family (with AdaDPO's coefficient, f-divergence scores, DPOP and
label smoothing inside it); ``NLL_i(y_w) = -l_w / n_w`` is the chosen answer's per-token mean NLL
(``loss.sft_weight``; TRL's ``loss_type=[..., "sft"]`` with ``loss_weights``, which averages the
NLL over the batch's chosen tokens instead: equal when the chosen answers have equal lengths);
``w_i = exp(sg(m_w + m_l))`` is WPO's weight (``loss.use_weighting``, arXiv 2406.11827; TRL
1.16.0's product of the two answers' weights, unclipped), ``m`` the per-sequence mean over
completion tokens of ``log p_t - log sum_v p_v^2``. How the AdaDPO coefficient composes: ``c``
multiplies ``h_w`` (or its f-divergence score) inside ``L_family`` only; the SFT term is never
multiplied by ``c`` (ALGORITHM.md section 4: NLL terms stay unweighted) and ``w`` multiplies
the whole pair, so the chosen/rejected gradient balance ``c`` of the preference term is kept.
LD-DPO (``loss.ld_alpha``) is applied to the per-token log-probs before the sums (the step), so
``l``, ``h`` and log rho here are the LD-weighted sums divided by the true lengths.
"""

from __future__ import annotations

import torch
from torch import Tensor

from megatron_adadpo.losses.adaptive import stop_gradient
from megatron_adadpo.losses.common import PairBatch, prepare_batch
from megatron_adadpo.losses.config import LossConfig
from megatron_adadpo.losses.metrics import pair_metrics
from megatron_adadpo.losses.registry import get_family


def preference_loss(
    config: LossConfig,
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    chosen_lengths: Tensor,
    rejected_lengths: Tensor,
    reference_chosen_logps: Tensor | None = None,
    reference_rejected_logps: Tensor | None = None,
    chosen_nll: Tensor | None = None,
    chosen_weight_logps: Tensor | None = None,
    rejected_weight_logps: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Per-pair losses of ``config.name`` (AdaDPO when ``adaptive``) and metric tensors.

    The family is looked up in :data:`~megatron_adadpo.losses.registry.LOSSES`. Computation is
    in fp32 (bf16/fp16 inputs are upcast; fp64 inputs stay fp64) and never syncs with the host,
    except the negative-length check on CPU tensors (or with ``config.debug_checks``).

    Args:
        config: the loss configuration.
        policy_chosen_logps, policy_rejected_logps: ``l_w``, ``l_l``: policy log-probs summed
            over completion tokens.
        chosen_lengths, rejected_lengths: completion token counts (int or float). A pair with
            a zero-length completion is invalid: its loss is exactly 0, it gets no gradient,
            it is excluded from the metrics and counted in ``pairs/valid``.
        reference_chosen_logps, reference_rejected_logps: the same for the frozen reference
            model; required when ``config.needs_reference`` (dpo, ipo, rdpo).
        chosen_nll: per-pair mean NLL of the chosen completion; required when
            ``config.needs_chosen_nll`` (cpo, orpo, or ``sft_weight > 0``).
        chosen_weight_logps, rejected_weight_logps: WPO's per-sequence mean over completion
            tokens of ``log p_t - log sum_v p_v^2`` (the policy's, detached here); required
            when ``config.use_weighting``, refused otherwise.

    Returns:
        ``(per_pair_losses, metrics)``: the losses (compute dtype; sum them and divide by the
        global batch's normaliser: its valid pairs, or for sft its valid chosen completion
        tokens; ``metrics["loss"][1]`` is this micro-batch's share) and the metric dict in
        :mod:`megatron_adadpo.losses.metrics` (each ``[2]``: ``[sum, count]``, or
        ``[value, 1]`` for names ending in ``_min`` / ``_max``).

    Raises:
        ValueError: a non-1-D input, mismatched shapes, non-floating log-probs, negative
            lengths (CPU or debug_checks), a missing reference / chosen_nll / WPO input.

    Shapes:
        every input ``[b]`` (per pair); per_pair_losses ``[b]``; each metric ``[2]``.
    """
    inputs = {k: v for k, v in locals().items() if k != "config"}  # by their public names
    family = get_family(config.name)
    batch = prepare_batch(config, inputs)
    out = family.compute(batch, config)
    losses = with_options(out.losses, batch, config, inputs)
    return losses, pair_metrics(batch, out, losses, family.normalizer)


def with_options(losses: Tensor, batch: PairBatch, config: LossConfig, inputs: dict) -> Tensor:
    """``w * (losses + sft_weight * NLL(y_w))`` (module docstring), 0 on invalid pairs.

    Shapes: losses ``[b]`` per pair; returns ``[b]``.
    """
    if config.sft_weight > 0:
        losses = losses + config.sft_weight * batch.chosen_nll
    if config.use_weighting:
        log_w = inputs["chosen_weight_logps"] + inputs["rejected_weight_logps"]
        log_w = torch.where(batch.valid, log_w.to(losses.dtype), 0.0)
        losses = losses * torch.exp(stop_gradient(log_w))
    return torch.where(batch.valid, losses, 0.0)

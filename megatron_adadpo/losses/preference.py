"""The public entry point: per-pair preference losses and their metrics."""

from __future__ import annotations

import torch
from torch import Tensor

from megatron_adadpo.losses.common import prepare_batch
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
            ``config.needs_chosen_nll`` (cpo, orpo).

    Returns:
        ``(per_pair_losses, metrics)``: the losses (compute dtype; sum them and divide by the
        global batch's normaliser: its valid pairs, or for sft its valid chosen completion
        tokens; ``metrics["loss"][1]`` is this micro-batch's share) and the metric dict in
        :mod:`megatron_adadpo.losses.metrics` (each ``[2]``: ``[sum, count]``, or
        ``[value, 1]`` for names ending in ``_min`` / ``_max``).

    Raises:
        ValueError: a non-1-D input, mismatched shapes, non-floating log-probs, negative
            lengths (CPU or debug_checks), or a missing reference / chosen_nll.

    Shapes:
        every input ``[b]`` (per pair); per_pair_losses ``[b]``; each metric ``[2]``.
    """
    family = get_family(config.name)
    batch = prepare_batch(
        config,
        {
            "policy_chosen_logps": policy_chosen_logps,
            "policy_rejected_logps": policy_rejected_logps,
            "chosen_lengths": chosen_lengths,
            "rejected_lengths": rejected_lengths,
            "reference_chosen_logps": reference_chosen_logps,
            "reference_rejected_logps": reference_rejected_logps,
            "chosen_nll": chosen_nll,
        },
    )
    out = family.compute(batch, config)
    losses = torch.where(batch.valid, out.losses, 0.0)
    return losses, pair_metrics(batch, out, losses, family.normalizer)

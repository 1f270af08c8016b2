"""The per-pair tensors shared by the loss families, and the helpers they compose from."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from megatron_adadpo.losses.adaptive import (
    Coefficients,
    balancing_coefficients,
    log_rho_from_scores,
)
from megatron_adadpo.losses.divergence import f_divergence_scores

if TYPE_CHECKING:
    from megatron_adadpo.losses.config import LossConfig


@dataclass(frozen=True)
class PairBatch:
    """Sanitised per-pair inputs in the compute dtype (fp32, or fp64 when given fp64).

    Invalid pairs (a completion of length <= 0) have their log-probs and NLL replaced by 0 and
    their lengths by 1 *before* any formula, so no NaN/inf can reach the loss or (through
    ``NaN * 0``) the gradient; their losses are zeroed afterwards.

    Shapes: every tensor ``[b]`` (per pair).
    """

    chosen_logps: Tensor  # l_w, summed over completion tokens
    rejected_logps: Tensor  # l_l
    chosen_lengths: Tensor  # n_w as float, clamped to >= 1
    rejected_lengths: Tensor  # n_l
    valid: Tensor  # bool
    reference_chosen_logps: Tensor | None = None
    reference_rejected_logps: Tensor | None = None
    chosen_nll: Tensor | None = None
    f_divergence: str = "reverse_kl"
    f_alpha: float = 0.5

    @property
    def chosen_logratios(self) -> Tensor:
        """``h_w = l_w - l_ref_w``."""
        return self.chosen_logps - self.reference_chosen_logps

    @property
    def rejected_logratios(self) -> Tensor:
        """``h_l = l_l - l_ref_l``."""
        return self.rejected_logps - self.reference_rejected_logps

    def scores(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``(s_w, s_l, log ds_w/dh_w, log ds_l/dh_l)``: the f-divergence scores of ``h``
        (``s = h`` for reverse_kl, :mod:`~megatron_adadpo.losses.divergence`)."""
        s_w, slope_w = f_divergence_scores(self.chosen_logratios, self.f_divergence, self.f_alpha)
        s_l, slope_l = f_divergence_scores(self.rejected_logratios, self.f_divergence, self.f_alpha)
        return s_w, s_l, slope_w, slope_l


class FamilyOutput(NamedTuple):
    """What a loss family returns (before invalid pairs are masked). Shapes: all ``[b]``."""

    losses: Tensor  # per-pair loss
    chosen_rewards: Tensor  # the family's own chosen score, e.g. beta * h_w
    rejected_rewards: Tensor
    coefs: Coefficients
    log_grad_balance: Tensor  # log |dL/dl_w| / |dL/dl_l| of the preference term (analytic)


def logistic_loss(z: Tensor, label_smoothing: float = 0.0) -> Tensor:
    """``-(1 - eps) logsig(z) - eps logsig(-z)``: conservative DPO (cDPO) label smoothing.

    cDPO: Mitchell, "A note on DPO with noisy preferences" (2023), TRL's ``sigmoid`` up to
    0.28. Robust DPO (a different formula) is ``losses/robust.py``. Shapes: ``[b]``.
    """
    loss = -F.logsigmoid(z)
    if label_smoothing > 0:
        loss = (1.0 - label_smoothing) * loss - label_smoothing * F.logsigmoid(-z)
    return loss


def pair_difference(
    batch: PairBatch, config: LossConfig, coefs: Coefficients, per_token: bool = False
) -> tuple[Tensor, Tensor]:
    """``(delta, log |dL/dl_w| / |dL/dl_l| for a loss of beta * delta)`` of the families built
    on the chosen-minus-rejected difference of (f-divergence) scores:

        delta = a * s_w - b * s_l - lambda * max(0, -h_w)          (per_token: s -> s / n)

    ``a / b = c`` (:func:`config_coefficients`); the last term is DPO-Positive's penalty
    (Smaug, https://arxiv.org/abs/2402.13228, ``-lambda max(0, l_ref_w - l_w)`` inside the
    sigmoid; ``config.dpop_lambda``, families registered with ``dpop=True``). The coefficient
    multiplies the chosen score only, never the penalty: DPOP's push on the chosen answer is
    added to AdaDPO's balanced pair.

    Shapes: every tensor ``[b]`` (per pair).
    """
    s_w, s_l, slope_w, slope_l = batch.scores()
    log_w = torch.log(coefs.coef_chosen) + slope_w
    log_l = torch.log(coefs.coef_rejected) + slope_l
    if per_token:
        n_w, n_l = batch.chosen_lengths, batch.rejected_lengths
        s_w, s_l = s_w / n_w, s_l / n_l
        log_w, log_l = log_w - torch.log(n_w), log_l - torch.log(n_l)
    delta = coefs.coef_chosen * s_w - coefs.coef_rejected * s_l
    if config.dpop_lambda > 0:
        h_w = batch.chosen_logratios
        delta = delta - config.dpop_lambda * torch.relu(-h_w)
        active = torch.where(h_w < 0, math.log(config.dpop_lambda), -math.inf)
        log_w = torch.logaddexp(log_w, active.to(log_w.dtype))
    return delta, log_w - log_l


def difference_family(
    batch: PairBatch,
    config: LossConfig,
    loss_of_delta: Callable[[Tensor], Tensor],
    per_token: bool = False,
) -> FamilyOutput:
    """A family whose per-pair loss is ``loss_of_delta(delta)`` of :func:`pair_difference`'s
    ``delta`` (log rho as DPO; rewards ``beta * h``, TRL's), as a :class:`FamilyOutput`.

    Shapes: every tensor ``[b]`` (per pair).
    """
    coefs = reference_coefficients(batch, config)
    delta, log_balance = pair_difference(batch, config, coefs, per_token)
    h_w, h_l = batch.chosen_logratios, batch.rejected_logratios
    beta = config.beta
    return FamilyOutput(loss_of_delta(delta), beta * h_w, beta * h_l, coefs, log_balance)


def log_rho_from_config(batch: PairBatch, config: LossConfig) -> Tensor:
    """log rho of ALGORITHM.md section 3 (dpo, ipo, rdpo), per ``balance_space``/``normalize``."""
    if config.balance_space == "reference":
        chosen, rejected = batch.chosen_logratios, batch.rejected_logratios
    else:
        chosen, rejected = batch.chosen_logps, batch.rejected_logps
    return log_rho_from_scores(
        chosen, rejected, batch.chosen_lengths, batch.rejected_lengths, config.normalize
    )


def policy_log_rho(batch: PairBatch, config: LossConfig) -> Tensor:
    """Reference-free log rho (simpo, cpo): ``lbar_w - lbar_l`` (``l_w - l_l`` if sequence)."""
    return log_rho_from_scores(
        batch.chosen_logps,
        batch.rejected_logps,
        batch.chosen_lengths,
        batch.rejected_lengths,
        config.normalize,
    )


def _check_vector(name: str, x: object, size: int | None, floating: bool) -> None:
    if not isinstance(x, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor of shape [b]; got {type(x).__name__}")
    if x.dim() != 1:
        raise ValueError(
            f"{name} must be 1-D (shape [b], one value per pair); got shape {tuple(x.shape)}"
        )
    if size is not None and x.shape[0] != size:
        raise ValueError(
            f"{name} has {x.shape[0]} pairs but policy_chosen_logps has {size}; "
            "all per-pair inputs must have the same shape [b]"
        )
    if floating and not x.is_floating_point():
        raise ValueError(
            f"{name} must be a floating tensor (fp32, bf16, fp16 or fp64); got {x.dtype}"
        )
    if not floating and (x.is_complex() or x.dtype == torch.bool):
        raise ValueError(f"{name} must hold integer or floating token counts; got {x.dtype}")


def _check_lengths(name: str, lengths: Tensor, config: LossConfig) -> None:
    # A value check needs a device->host sync on accelerators: CPU always, else debug only.
    if lengths.device.type == "cpu" or config.debug_checks:
        if bool((lengths < 0).any()):
            raise ValueError(
                f"{name} must be >= 0 (completion token counts); got a negative length"
            )


OPTIONAL_INPUTS = (
    "reference_chosen_logps",
    "reference_rejected_logps",
    "chosen_nll",
    "chosen_weight_logps",
    "rejected_weight_logps",
)


def prepare_batch(
    config: LossConfig,
    inputs: dict[str, Tensor | None],
) -> PairBatch:
    """Validate the public inputs and build the sanitised :class:`PairBatch`."""
    inputs = dict.fromkeys(OPTIONAL_INPUTS) | inputs
    l_w = inputs["policy_chosen_logps"]
    _check_vector("policy_chosen_logps", l_w, None, True)
    size = l_w.shape[0]
    for name in ("policy_rejected_logps", *OPTIONAL_INPUTS):
        if inputs[name] is not None:
            _check_vector(name, inputs[name], size, True)
    for name in ("chosen_lengths", "rejected_lengths"):
        _check_vector(name, inputs[name], size, False)
        _check_lengths(name, inputs[name], config)
    _check_required(config, inputs)
    dtype = (
        torch.float64
        if any(t is not None and t.dtype == torch.float64 for t in inputs.values())
        else torch.float32
    )
    n_w, n_l = inputs["chosen_lengths"].to(dtype), inputs["rejected_lengths"].to(dtype)
    valid = (n_w > 0) & (n_l > 0)

    def clean(t: Tensor | None) -> Tensor | None:
        return None if t is None else torch.where(valid, t.to(dtype), 0.0)

    use_ref = config.needs_reference
    return PairBatch(
        chosen_logps=clean(l_w),
        rejected_logps=clean(inputs["policy_rejected_logps"]),
        chosen_lengths=n_w.clamp(min=1.0),
        rejected_lengths=n_l.clamp(min=1.0),
        valid=valid,
        reference_chosen_logps=clean(inputs["reference_chosen_logps"]) if use_ref else None,
        reference_rejected_logps=clean(inputs["reference_rejected_logps"]) if use_ref else None,
        chosen_nll=clean(inputs["chosen_nll"]) if config.needs_chosen_nll else None,
        f_divergence=config.f_divergence_type,
        f_alpha=config.f_alpha_divergence_coef,
    )


def _check_required(config: LossConfig, inputs: dict[str, Tensor | None]) -> None:
    ref = ("reference_chosen_logps", "reference_rejected_logps")
    if config.needs_reference:
        for name in ref:
            if inputs[name] is None:
                raise ValueError(
                    f"{name} is required for loss name={config.name!r} (it uses "
                    "reference log-probs); pass a [b] tensor, or use a "
                    "reference-free loss: simpo, cpo, orpo"
                )
    if config.needs_chosen_nll and inputs["chosen_nll"] is None:
        raise ValueError(
            f"chosen_nll is required for loss name={config.name!r} (or loss.sft_weight > 0): "
            "pass the per-pair mean NLL of the chosen completion as a [b] tensor"
        )
    for name in ("chosen_weight_logps", "rejected_weight_logps"):
        if config.use_weighting and inputs[name] is None:
            raise ValueError(
                f"{name} is required with loss.use_weighting=true (WPO): pass the per-sequence "
                "mean over completion tokens of log p_t - log sum_v p_v^2 as a [b] tensor"
            )
        if not config.use_weighting and inputs[name] is not None:
            raise ValueError(
                f"{name} was given but loss.use_weighting is false: set loss.use_weighting=true "
                "to weight the pairs (WPO), or do not pass it"
            )


def reference_coefficients(batch: PairBatch, config: LossConfig) -> Coefficients:
    """The coefficients of the families balancing as DPO does (``log_rho_from_config``)."""
    return config_coefficients(log_rho_from_config(batch, config), config)


def config_coefficients(log_rho: Tensor, config: LossConfig) -> Coefficients:
    """:func:`balancing_coefficients` with the options of ``config``."""
    return balancing_coefficients(
        log_rho,
        clip_max=config.clip_max,
        clip_min=config.clip_min,
        target_ratio=config.target_ratio,
        placement=config.placement,
        enabled=config.adaptive,
    )


def log_coef_ratio(coefs: Coefficients) -> Tensor:
    """``log(a / b) = log c``, the log-space gradient ratio of ``a * s_w - b * s_l``."""
    return torch.log(coefs.coef_chosen) - torch.log(coefs.coef_rejected)

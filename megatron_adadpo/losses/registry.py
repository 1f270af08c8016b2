"""Registry of preference-loss families.

A new loss is a new file that decorates its compute function with :func:`register_loss`; the
dispatcher (:func:`megatron_adadpo.losses.preference_loss`) looks the family up in
:data:`LOSSES` and never branches on the name.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from megatron_adadpo.losses.common import FamilyOutput, PairBatch
    from megatron_adadpo.losses.config import LossConfig

FamilyFn = Callable[["PairBatch", "LossConfig"], "FamilyOutput"]


@dataclass(frozen=True)
class LossFamily:
    """One registered loss family.

    Attributes:
        name: the value of ``LossConfig.name`` that selects it.
        compute: ``(PairBatch, LossConfig) -> FamilyOutput``; per-pair losses, rewards and
            adaptive coefficients, before invalid pairs are masked.
        needs_reference: the loss uses reference log-probs (``h = l - l_ref``).
        needs_chosen_nll: the loss adds an NLL(y_w) term (``chosen_nll`` input required).
        supports_label_smoothing: the loss is a logistic loss ``-logsig(z)`` that can take
            robust/cDPO label smoothing.
        uses_balance_options: ``balance_space``/``normalize`` select its log rho (section 3 of
            ALGORITHM.md); families with their own log rho ignore ``balance_space``.
    """

    name: str
    compute: FamilyFn
    needs_reference: bool
    needs_chosen_nll: bool
    supports_label_smoothing: bool
    uses_balance_options: bool


LOSSES: dict[str, LossFamily] = {}


def register_loss(
    name: str,
    *,
    needs_reference: bool,
    needs_chosen_nll: bool = False,
    supports_label_smoothing: bool = False,
    uses_balance_options: bool = True,
) -> Callable[[FamilyFn], FamilyFn]:
    """Decorator registering ``fn`` as loss family ``name`` in :data:`LOSSES`."""

    def decorate(fn: FamilyFn) -> FamilyFn:
        if name in LOSSES:
            raise ValueError(f"loss family {name!r} is already registered")
        LOSSES[name] = LossFamily(
            name=name,
            compute=fn,
            needs_reference=needs_reference,
            needs_chosen_nll=needs_chosen_nll,
            supports_label_smoothing=supports_label_smoothing,
            uses_balance_options=uses_balance_options,
        )
        return fn

    return decorate


def get_family(name: str) -> LossFamily:
    """The registered family ``name``; ValueError listing the accepted names otherwise."""
    try:
        return LOSSES[name]
    except KeyError:
        raise ValueError(f"unknown loss name {name!r}; accepted: {sorted(LOSSES)}") from None

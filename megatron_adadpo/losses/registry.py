"""Registry of preference-loss families.

A new loss is a new file that decorates its compute function with :func:`register_loss`; the
dispatcher (:func:`megatron_adadpo.losses.preference_loss`) looks the family up in
:data:`LOSSES` and never branches on the name. :data:`ADAPTIVE_NAMES` are names that select a
family's adaptive form (``adadpo`` = ``dpo`` with ``adaptive: true``).
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
        supports_label_smoothing: the loss reads ``label_smoothing`` (cDPO's ``eps`` for the
            logistic families; the flip rate of ``robust``).
        normalizer: what the global batch's summed per-pair losses are divided by (the count
            the trainer hands Megatron's ``calculate_per_token_loss`` contract):
            ``"pairs"`` (valid pairs: every preference loss) or ``"tokens"`` (valid chosen
            completion tokens: sft, a per-token mean).
        adaptive_form: the family has an adaptive form (``adaptive: true``); False for sft.
    """

    name: str
    compute: FamilyFn
    needs_reference: bool
    needs_chosen_nll: bool
    supports_label_smoothing: bool
    normalizer: str = "pairs"
    adaptive_form: bool = True


NORMALIZERS = ("pairs", "tokens")
LOSSES: dict[str, LossFamily] = {}

# The modules that register a family (a new loss is a new file, added here).
FAMILY_MODULES = ("dpo", "ipo", "simpo", "rdpo", "cpo", "orpo", "robust", "sft")

# Names that select the adaptive form of a family: name -> family.
ADAPTIVE_NAMES = {"adadpo": "dpo"}


def load_families() -> dict[str, LossFamily]:
    """Import every family module (each registers itself); returns :data:`LOSSES`."""
    import importlib

    for name in FAMILY_MODULES:
        importlib.import_module(f"megatron_adadpo.losses.{name}")
    return LOSSES


def register_loss(
    name: str,
    *,
    needs_reference: bool,
    needs_chosen_nll: bool = False,
    supports_label_smoothing: bool = False,
    normalizer: str = "pairs",
    adaptive_form: bool = True,
) -> Callable[[FamilyFn], FamilyFn]:
    """Decorator registering ``fn`` as loss family ``name`` in :data:`LOSSES`."""
    if normalizer not in NORMALIZERS:
        raise ValueError(f"normalizer={normalizer!r}; accepted: {list(NORMALIZERS)}")

    def decorate(fn: FamilyFn) -> FamilyFn:
        if name in LOSSES:
            raise ValueError(f"loss family {name!r} is already registered")
        LOSSES[name] = LossFamily(
            name=name,
            compute=fn,
            needs_reference=needs_reference,
            needs_chosen_nll=needs_chosen_nll,
            supports_label_smoothing=supports_label_smoothing,
            normalizer=normalizer,
            adaptive_form=adaptive_form,
        )
        return fn

    return decorate


def loss_names() -> list[str]:
    """Every accepted ``LossConfig.name``: the families and :data:`ADAPTIVE_NAMES`."""
    return sorted([*load_families(), *ADAPTIVE_NAMES])


def get_family(name: str) -> LossFamily:
    """The family ``name`` selects; ValueError listing the accepted names otherwise."""
    try:
        return load_families()[ADAPTIVE_NAMES.get(name, name)]
    except KeyError:
        raise ValueError(f"unknown loss name {name!r}; accepted: {loss_names()}") from None

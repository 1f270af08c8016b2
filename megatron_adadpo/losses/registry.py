"""Registry of preference-loss families: what each family is, needs and accepts.

A new loss is a new file that decorates its compute function with :func:`register_loss`
(declaring its own knobs as a frozen dataclass) and is listed in :data:`FAMILY_MODULES`; the
dispatcher (:func:`megatron_adadpo.losses.preference_loss`) looks the family up in
:data:`LOSSES` and never branches on the name. :data:`ADAPTIVE_NAMES` are names that select a
family's adaptive form (``adadpo`` = ``dpo`` with ``adaptive: true``).

This module imports nothing else from ``losses/`` (and no torch): the configuration reads it,
the family modules register into it, and :func:`load_families` is the one place that imports
the family modules, by name.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

FamilyFn = Callable[[Any, Any], Any]  # (PairBatch, LossConfig) -> FamilyOutput


@dataclass(frozen=True)
class LossFamily:
    """One registered loss family.

    Attributes:
        name: the value of ``LossConfig.name`` that selects it (TRL's ``loss_type`` name where
            TRL has the loss).
        compute: ``(PairBatch, LossConfig) -> FamilyOutput``; per-pair losses, rewards and
            adaptive coefficients, before invalid pairs are masked.
        needs_reference: the loss uses reference log-probs (``h = l - l_ref``).
        needs_chosen_nll: the loss adds an NLL(y_w) term (``chosen_nll`` input required).
        supports_label_smoothing: the loss reads ``label_smoothing`` (cDPO's ``eps`` for the
            logistic families; the flip rate of ``robust``; EXO's target distribution).
        normalizer: what the global batch's summed per-pair losses are divided by:
            ``"pairs"`` (valid pairs) or ``"tokens"`` (valid chosen completion tokens: sft).
        no_adaptive: None when the family has an adaptive form; else why not (the refusal
            names it): the coefficient multiplies ``h_w`` in a chosen-minus-rejected difference.
        knobs: the frozen dataclass of the family's own options (``loss.<field>`` in YAML), or
            None. Its ``errors()`` returns one line per invalid value.
        f_divergence: the loss is built on the chosen-minus-rejected reward difference, so
            ``loss.f_divergence_type`` may replace ``h`` by ``f'(pi / pi_ref)`` (TRL's rule).
        dpop: the loss is ``-logsig(beta * (h_w - h_l) + ...)``, so DPO-Positive's penalty
            ``loss.dpop_lambda`` can enter its sigmoid.
        weighting: ``loss.use_weighting`` (WPO) may weight its per-pair losses (False where
            the per-pair losses are not a pair's own, e.g. sorted across pairs).
        checks: ``(LossConfig) -> list[str]``: the family's rules on shared options, or None.
    """

    name: str
    compute: FamilyFn
    needs_reference: bool
    needs_chosen_nll: bool = False
    supports_label_smoothing: bool = False
    normalizer: str = "pairs"
    no_adaptive: str | None = None
    knobs: type | None = None
    f_divergence: bool = False
    dpop: bool = False
    weighting: bool = True
    checks: Callable[[Any], list[str]] | None = None

    @property
    def adaptive_form(self) -> bool:
        """The family has an adaptive form (``adaptive: true`` is accepted)."""
        return self.no_adaptive is None


NORMALIZERS = ("pairs", "tokens")
LOSSES: dict[str, LossFamily] = {}

# The modules that register a family (a new loss is a new file, added here).
FAMILY_MODULES = (
    "dpo",
    "ipo",
    "simpo",
    "rdpo",
    "cpo",
    "orpo",
    "robust",
    "sft",
    "hinge",
    "exo_pair",
    "nca_pair",
    "bco_pair",
    "sppo_hard",
    "aot",
    "aot_unpaired",
    "apo_zero",
    "apo_down",
    "discopop",
    "sigmoid_norm",
)

# Names that select the adaptive form of a family: name -> family.
ADAPTIVE_NAMES = {"adadpo": "dpo"}


def load_families() -> dict[str, LossFamily]:
    """Import every family module (each registers itself); returns :data:`LOSSES`."""
    for name in FAMILY_MODULES:
        importlib.import_module(f"megatron_adadpo.losses.{name}")
    return LOSSES


def register_loss(name: str, *, needs_reference: bool, **traits) -> Callable[[FamilyFn], FamilyFn]:
    """Decorator registering ``fn`` as loss family ``name``; ``traits``: :class:`LossFamily`."""
    if traits.get("normalizer", "pairs") not in NORMALIZERS:
        raise ValueError(f"normalizer={traits['normalizer']!r}; accepted: {list(NORMALIZERS)}")

    def decorate(fn: FamilyFn) -> FamilyFn:
        if name in LOSSES:
            raise ValueError(f"loss family {name!r} is already registered")
        LOSSES[name] = LossFamily(name=name, compute=fn, needs_reference=needs_reference, **traits)
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


def knob_owners() -> dict[str, str]:
    """``{knob field: family name}`` over every registered family's knobs."""
    import dataclasses

    return {
        f.name: family.name
        for family in load_families().values()
        if family.knobs is not None
        for f in dataclasses.fields(family.knobs)
    }

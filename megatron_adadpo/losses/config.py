"""Configuration of the preference loss (AdaDPO and the DPO family)."""

from __future__ import annotations

import math
from dataclasses import dataclass

BALANCE_SPACES = ("reference", "policy")
NORMALIZE_MODES = ("token_mean", "sequence")
PLACEMENTS = ("chosen", "rejected", "split")


def _bad(field: str, value: object, accepted: str) -> ValueError:
    return ValueError(f"LossConfig.{field}={value!r} is invalid; accepted: {accepted}")


@dataclass(frozen=True)
class LossConfig:
    """Which preference loss to compute and how (ALGORITHM.md sections 3-4).

    The project default is AdaDPO: ``name="dpo", adaptive=True`` with the per-token,
    reference-space coefficient clipped at ``C = 2``. ``adaptive=False`` gives the base loss.

    Attributes:
        name: loss family, one of the registered names (dpo, ipo, simpo, rdpo, cpo, orpo).
        beta: inverse temperature (> 0). IPO uses ``ipo_tau`` in its loss and ``beta`` only to
            scale the logged rewards.
        adaptive: put the detached balancing coefficient ``c`` on the pair (AdaDPO).
        balance_space: ``"reference"`` (log rho from ``h = l - l_ref``) or ``"policy"``
            (from ``l``). Used by dpo/ipo/rdpo; reference-free families balance in policy
            space.
        normalize: ``"token_mean"`` (divide by completion lengths: stable AdaDPO) or
            ``"sequence"`` (exact sequence-level coefficient). Used by dpo/ipo/rdpo and, for
            simpo/cpo, ``"sequence"`` replaces ``lbar`` by ``l`` in log rho. ORPO's log rho
            has one fixed form.
        clip_max: ceiling ``C`` on ``c = k * rho`` (> 0), or None for no ceiling (a fixed
            finiteness guard ``exp(30)`` on every coefficient still applies).
        clip_min: floor on ``c`` (>= 0, <= clip_max), or None for no floor.
        target_ratio: ``k`` in ``c = k * rho`` (> 0).
        placement: ``"chosen"`` (chosen term times c), ``"rejected"`` (rejected term times
            1/c) or ``"split"`` (chosen times sqrt(c), rejected times 1/sqrt(c)).
        label_smoothing: robust/cDPO ``eps`` in ``[0, 0.5)``; logistic families only
            (dpo, rdpo, simpo, cpo).
        ipo_tau: IPO's tau (> 0); target margin ``1 / (2 tau)``.
        simpo_gamma: SimPO's target reward margin gamma. Default 0.05 = 0.5 * beta, the
            gamma/beta ratio the SimPO paper recommends; for its recipe use beta=2.0,
            simpo_gamma=1.0.
        rdpo_alpha: R-DPO's length coefficient alpha (default 0.05, the low end of the grid
            {0.05, 0.1, 0.5, 1.0} that the SimPO paper searched for R-DPO).
        cpo_alpha: weight of CPO's NLL(y_w) term (>= 0; CPO paper: 1.0).
        orpo_lambda: weight of ORPO's odds-ratio term (>= 0; ORPO paper: 0.1).
        debug_checks: also run value checks that need a device->host sync (negative lengths on
            accelerator tensors). CPU tensors are always checked; on accelerators, without this
            flag a negative length simply marks the pair invalid.
    """

    name: str = "dpo"
    beta: float = 0.1
    adaptive: bool = True
    balance_space: str = "reference"
    normalize: str = "token_mean"
    clip_max: float | None = 2.0
    clip_min: float | None = None
    target_ratio: float = 1.0
    placement: str = "chosen"
    label_smoothing: float = 0.0
    ipo_tau: float = 0.1
    simpo_gamma: float = 0.05
    rdpo_alpha: float = 0.05
    cpo_alpha: float = 1.0
    orpo_lambda: float = 0.1
    debug_checks: bool = False

    def __post_init__(self) -> None:
        family = self._family()  # raises on an unknown name
        self._check_choice("balance_space", BALANCE_SPACES)
        self._check_choice("normalize", NORMALIZE_MODES)
        self._check_choice("placement", PLACEMENTS)
        for field in ("adaptive", "debug_checks"):
            if not isinstance(getattr(self, field), bool):
                raise _bad(field, getattr(self, field), "True or False")
        self._check_positive("beta")
        self._check_positive("target_ratio")
        self._check_positive("ipo_tau")
        if self.clip_max is not None:
            self._check_positive("clip_max", "a float > 0 or None")
        if self.clip_min is not None:
            upper = "clip_max" if self.clip_max is not None else "inf"
            ok = _finite(self.clip_min) and self.clip_min >= 0
            if not ok or (self.clip_max is not None and self.clip_min > self.clip_max):
                raise _bad("clip_min", self.clip_min, f"None or a float in [0, {upper}]")
        if not (_finite(self.label_smoothing) and 0.0 <= self.label_smoothing < 0.5):
            raise _bad("label_smoothing", self.label_smoothing, "a float in [0, 0.5)")
        if self.label_smoothing > 0 and not family.supports_label_smoothing:
            from megatron_adadpo.losses.registry import load_families

            families = load_families()
            ok_names = sorted(n for n, f in families.items() if f.supports_label_smoothing)
            raise _bad(
                "label_smoothing",
                self.label_smoothing,
                f"0.0 for name={self.name!r}; label smoothing is supported by {ok_names}",
            )
        for field in ("cpo_alpha", "orpo_lambda"):
            value = getattr(self, field)
            if not (_finite(value) and value >= 0):
                raise _bad(field, value, "a finite float >= 0")
        for field in ("simpo_gamma", "rdpo_alpha"):
            if not _finite(getattr(self, field)):
                raise _bad(field, getattr(self, field), "a finite float")

    def _family(self):
        from megatron_adadpo.losses.registry import load_families

        families = load_families()
        if self.name not in families:
            raise _bad("name", self.name, str(sorted(families)))
        return families[self.name]

    def _check_choice(self, field: str, accepted: tuple[str, ...]) -> None:
        if getattr(self, field) not in accepted:
            raise _bad(field, getattr(self, field), str(list(accepted)))

    def _check_positive(self, field: str, accepted: str = "a finite float > 0") -> None:
        value = getattr(self, field)
        if not (_finite(value) and value > 0):
            raise _bad(field, value, accepted)

    @property
    def needs_reference(self) -> bool:
        """The loss uses reference log-probs (False for simpo, cpo, orpo)."""
        return self._family().needs_reference

    @property
    def needs_chosen_nll(self) -> bool:
        """The loss needs ``chosen_nll`` (cpo, orpo)."""
        return self._family().needs_chosen_nll


def _finite(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)

"""Configuration of the preference loss (AdaDPO and the DPO family)."""

from __future__ import annotations

import math
from dataclasses import dataclass

BALANCE_SPACES = ("reference", "policy")
NORMALIZE_MODES = ("token_mean", "sequence")
PLACEMENTS = ("chosen", "rejected", "split")
# Names that trained their adaptive form by default while ``adaptive`` defaulted to true: named
# without ``adaptive`` they now train the base loss, with a notice (LossConfig.notices).
ADAPTIVE_DEFAULT_NAMES = ("dpo", "ipo", "simpo", "rdpo", "cpo", "orpo")


def _bad(field: str, value: object, accepted: str) -> ValueError:
    return ValueError(f"LossConfig.{field}={value!r} is invalid; accepted: {accepted}")


@dataclass(frozen=True)
class LossConfig:
    """Which preference loss to compute and how (ALGORITHM.md sections 3-4).

    Names say what they train: ``name="adadpo"`` (the default) is AdaDPO, DPO with the
    per-token, reference-space coefficient clipped at ``C = 2``; ``name="dpo"`` is DPO.
    ``adaptive=True`` gives any family its adaptive form; left unset (None) it is True for
    ``adadpo`` and False for every other name, and it is resolved to that bool here.
    Configs written when ``adaptive`` defaulted to true and that name a family without setting
    it now train the base loss: :attr:`notices` says so (the trainer prints it on rank 0).

    Attributes:
        name: ``adadpo`` or a loss family (dpo, ipo, simpo, rdpo, cpo, orpo, robust; sft: the
            per-token mean NLL of the chosen completions, for a warm start, which has no
            adaptive form and ignores the coefficient options).
        beta: inverse temperature (> 0). IPO's tau is ``ipo_tau`` when set, else ``beta``.
        adaptive: put the detached balancing coefficient ``c`` on the pair (AdaDPO); None:
            the name decides (see above). ``adadpo`` with ``adaptive=False`` is refused.
        balance_space: ``"reference"`` (log rho from ``h = l - l_ref``) or ``"policy"``
            (from ``l``). Used by dpo/ipo/rdpo/robust; reference-free families balance in
            policy space.
        normalize: ``"token_mean"`` (divide by completion lengths: stable AdaDPO) or
            ``"sequence"`` (exact sequence-level coefficient). Used by dpo/ipo/rdpo/robust
            and, for simpo/cpo, ``"sequence"`` replaces ``lbar`` by ``l`` in log rho. ORPO's
            log rho has one fixed form.
        clip_max: ceiling ``C`` on ``c = k * rho`` (> 0), or None for no ceiling (a fixed
            finiteness guard ``exp(30)`` on every coefficient still applies).
        clip_min: floor on ``c`` (>= 0, <= clip_max), or None for no floor.
        target_ratio: ``k`` in ``c = k * rho`` (> 0).
        placement: ``"chosen"`` (chosen term times c), ``"rejected"`` (rejected term times
            1/c) or ``"split"`` (chosen times sqrt(c), rejected times 1/sqrt(c)).
        label_smoothing: ``eps`` in ``[0, 0.5)``. For dpo, rdpo, simpo, cpo it is conservative
            DPO (cDPO): ``-(1-eps) logsig(z) - eps logsig(-z)``; for ``robust`` it is the
            assumed label-flip rate of robust DPO (``losses/robust.py``). Other families
            refuse it.
        ipo_tau: IPO's tau (> 0; target margin ``1 / (2 tau)``), or None to use ``beta`` as
            tau (TRL's convention). With ``ipo_tau`` set, ``beta`` only scales the logged
            rewards.
        simpo_gamma: SimPO's target reward margin gamma. Default 0.05 = 0.5 * beta, the
            gamma/beta ratio the SimPO paper recommends; for its recipe use beta=2.0,
            simpo_gamma=1.0.
        rdpo_alpha: R-DPO's length coefficient alpha (default 0.05, the low end of the grid
            {0.05, 0.1, 0.5, 1.0} that the SimPO paper searched for R-DPO).
        cpo_alpha: weight of CPO's NLL(y_w) term (>= 0; CPO paper: 1.0).
        orpo_lambda: weight of ORPO's odds-ratio term (>= 0; ORPO paper: 0.1).
        ld_alpha: LD-DPO's alpha (arXiv 2409.06411; TRL's ``ld_alpha``), in (0, 1], or None
            (off): in each pair, the log-probs of the longer response's tokens beyond the
            shorter one's completion length are scaled by alpha in the sequence sums of the
            policy and the reference (``logprobs.ld_token_weights``). Every pair-scored family
            uses the weighted sums (the AdaDPO coefficient is computed from them, and the
            lengths stay the token counts); sft refuses it.
        use_weighting: WPO (arXiv 2406.11827; TRL's ``use_weighting``): each pair's loss is
            weighted by the policy's own per-token-mean probability of both responses, from
            per-token ``log p_t - log sum_v p_v^2`` (``run/sequences.py``).
        debug_checks: also run value checks that need a device->host sync (negative lengths on
            accelerator tensors). CPU tensors are always checked; on accelerators, without this
            flag a negative length simply marks the pair invalid.
    """

    name: str = "adadpo"
    beta: float = 0.1
    adaptive: bool | None = None
    balance_space: str = "reference"
    normalize: str = "token_mean"
    clip_max: float | None = 2.0
    clip_min: float | None = None
    target_ratio: float = 1.0
    placement: str = "chosen"
    label_smoothing: float = 0.0
    ipo_tau: float | None = None
    simpo_gamma: float = 0.05
    rdpo_alpha: float = 0.05
    cpo_alpha: float = 1.0
    orpo_lambda: float = 0.1
    ld_alpha: float | None = None
    use_weighting: bool = False
    debug_checks: bool = False

    def __post_init__(self) -> None:
        family = self._family()  # raises on an unknown name
        self._resolve_adaptive()
        self._check_choice("balance_space", BALANCE_SPACES)
        self._check_choice("normalize", NORMALIZE_MODES)
        self._check_choice("placement", PLACEMENTS)
        for flag in ("debug_checks", "use_weighting"):
            if not isinstance(getattr(self, flag), bool):
                raise _bad(flag, getattr(self, flag), "True or False")
        self._check_ld_alpha()
        self._check_positive("beta")
        self._check_positive("target_ratio")
        if self.ipo_tau is not None:
            self._check_positive("ipo_tau", "a float > 0, or None to use beta as tau")
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

            ok_names = sorted(n for n, f in load_families().items() if f.supports_label_smoothing)
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

    def _check_ld_alpha(self) -> None:
        """``ld_alpha``: None, or a float in (0, 1] for a pair-scored family (not sft)."""
        alpha = self.ld_alpha
        if alpha is None:
            return
        if not (_finite(alpha) and 0 < alpha <= 1):
            raise _bad("ld_alpha", alpha, "None (off) or a float in (0, 1]")
        if self.family == "sft":
            raise _bad(
                "ld_alpha",
                alpha,
                "None for name='sft': its loss is the chosen answers' per-token NLL, with no "
                "rejected answer whose length to match",
            )

    def _family(self):
        from megatron_adadpo.losses.registry import get_family, loss_names

        try:
            return get_family(self.name)
        except ValueError:
            raise _bad("name", self.name, str(loss_names())) from None

    def _resolve_adaptive(self) -> None:
        """``adaptive`` None -> the name's default (True only for adaptive names)."""
        from megatron_adadpo.losses.registry import ADAPTIVE_NAMES

        if self.adaptive is not None and not isinstance(self.adaptive, bool):
            raise _bad("adaptive", self.adaptive, "True, False or None (the name decides)")
        named_adaptive = self.name in ADAPTIVE_NAMES
        if named_adaptive and self.adaptive is False:
            family = ADAPTIVE_NAMES[self.name]
            raise _bad(
                "adaptive",
                False,
                f"True or None for name={self.name!r}; for "
                f"{family.upper()} without the coefficient use name={family!r}",
            )
        if self.adaptive and not self._family().adaptive_form:
            raise _bad(
                "adaptive",
                True,
                f"False or None for name={self.name!r}: it has no pair term to balance (an NLL "
                "term is left unweighted, ALGORITHM.md section 4)",
            )
        object.__setattr__(self, "_adaptive_from_name", self.adaptive is None)
        if self.adaptive is None:
            object.__setattr__(self, "adaptive", named_adaptive)

    @property
    def family(self) -> str:
        """The loss family the name selects (``adadpo`` -> ``dpo``)."""
        return self._family().name

    @property
    def tau(self) -> float:
        """IPO's tau: ``ipo_tau``, or ``beta`` when it is None (TRL's convention)."""
        return self.beta if self.ipo_tau is None else self.ipo_tau

    @property
    def notices(self) -> tuple[str, ...]:
        """One-line notices about defaults whose meaning changed (printed by the trainer)."""
        out = []
        if self._adaptive_from_name and self.name in ADAPTIVE_DEFAULT_NAMES:
            out.append(
                f"loss.name={self.name!r} with loss.adaptive unset trains plain "
                f"{self.name.upper()}; configs written when adaptive defaulted to true trained "
                f"its adaptive form. For AdaDPO use loss.name='adadpo' (any family: "
                f"loss.adaptive=true); set loss.adaptive=false to silence this notice"
            )
        if self.family == "ipo" and self.ipo_tau is None and self.beta != 0.1:
            out.append(
                f"loss.ipo_tau unset: IPO uses tau = beta = {self.beta} (TRL's convention); "
                "configs written when ipo_tau defaulted to 0.1 used tau = 0.1. Set loss.ipo_tau "
                "to choose tau apart from beta (then beta only scales the logged rewards)"
            )
        return tuple(out)

    def _check_choice(self, field: str, accepted: tuple[str, ...]) -> None:
        if getattr(self, field) not in accepted:
            raise _bad(field, getattr(self, field), str(list(accepted)))

    def _check_positive(self, field: str, accepted: str = "a finite float > 0") -> None:
        value = getattr(self, field)
        if not (_finite(value) and value > 0):
            raise _bad(field, value, accepted)

    @property
    def needs_reference(self) -> bool:
        """The loss uses reference log-probs (False for simpo, cpo, orpo, sft)."""
        return self._family().needs_reference

    @property
    def normalizer(self) -> str:
        """What the summed losses are divided by: ``"pairs"``, or ``"tokens"`` (sft)."""
        return self._family().normalizer

    @property
    def needs_chosen_nll(self) -> bool:
        """The loss needs ``chosen_nll`` (cpo, orpo)."""
        return self._family().needs_chosen_nll


def _finite(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)

"""Configuration of the preference loss (AdaDPO and the DPO family); torch-free to import.

The options every family shares are the fields of :class:`LossConfig`; a family's own knobs
(``ipo_tau``, ``simpo_gamma``, ``discopop_tau``, ...) are declared in its file as a frozen
dataclass registered with the family (:mod:`megatron_adadpo.losses.registry`). In YAML both sit
flat under ``loss:``; ``LossConfig(name="ipo", ipo_tau=0.2)`` likewise.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from megatron_adadpo.losses.checks import bad, choice, finite, non_negative, positive
from megatron_adadpo.losses.registry import ADAPTIVE_NAMES, get_family, knob_owners, loss_names

BALANCE_SPACES = ("reference", "policy")
NORMALIZE_MODES = ("token_mean", "sequence")
PLACEMENTS = ("chosen", "rejected", "split")
F_DIVERGENCES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")
# Names that trained their adaptive form by default while ``adaptive`` defaulted to true: named
# without ``adaptive`` they now train the base loss, with a notice (LossConfig.notices).
ADAPTIVE_DEFAULT_NAMES = ("dpo", "ipo", "simpo", "rdpo", "cpo", "orpo")


@dataclass(frozen=True, init=False)
class LossConfig:
    """Which preference loss to compute and how (ALGORITHM.md sections 3-4).

    Names say what they train: ``name="adadpo"`` (the default) is AdaDPO, DPO with the
    per-token, reference-space coefficient clipped at ``C = 2``; ``name="dpo"`` is DPO.
    ``adaptive=True`` gives any family with a chosen-minus-rejected difference its adaptive
    form; left unset (None) it is True for ``adadpo`` and False for every other name.

    Attributes:
        name: ``adadpo`` or a family of :data:`~megatron_adadpo.losses.registry.LOSSES` (TRL's
            ``loss_type`` names where TRL has the loss; sft: the per-token mean NLL of the
            chosen completions).
        beta: inverse temperature (> 0).
        adaptive: put the detached balancing coefficient ``c`` on the pair (AdaDPO); None:
            the name decides. Refused for families without a pair difference (the reason
            names why) and for ``adadpo`` with False.
        balance_space, normalize, clip_max, clip_min, target_ratio, placement: the
            coefficient's options (ALGORITHM.md section 3; ``adaptive.py``).
        label_smoothing: ``eps`` in ``[0, 0.5)``: cDPO for the logistic families, robust's flip
            rate, EXO's target; refused by families that do not read it.
        sft_weight: weight of the chosen answer's per-token mean NLL added to every pair's loss
            (TRL ``loss_type=[..., "sft"]`` + ``loss_weights``; NeMo-RL ``sft_loss_weight``);
            0 = off. Never multiplied by the coefficient.
        f_divergence_type: ``reverse_kl`` (DPO) or ``forward_kl`` / ``js_divergence`` /
            ``alpha_divergence`` (f-DPO, arXiv 2309.16240): ``h`` becomes ``f'(exp h)`` in
            the families built on the reward difference; refused elsewhere (TRL's rule).
        f_alpha_divergence_coef: alpha of ``alpha_divergence`` (TRL default 0.5).
        dpop_lambda: DPO-Positive's lambda (arXiv 2402.13228), ``>= 0``; 0 = off.
        use_weighting: WPO (arXiv 2406.11827): weight each pair's loss by the policy's own
            detached probability of its two answers (``chosen_weight_logps`` inputs).
        ld_alpha: LD-DPO's alpha in ``(0, 1]`` (arXiv 2409.06411), applied to the per-token
            log-probs before the sums by the step; None = off.
        debug_checks: also run value checks that need a device->host sync.
        knobs: the family's own knobs (its registered dataclass), or None.
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
    sft_weight: float = 0.0
    f_divergence_type: str = "reverse_kl"
    f_alpha_divergence_coef: float = 0.5
    dpop_lambda: float = 0.0
    use_weighting: bool = False
    ld_alpha: float | None = None
    debug_checks: bool = False
    knobs: object | None = None

    def __init__(self, name: str = "adadpo", **values) -> None:
        shared = {f.name for f in dataclasses.fields(self)} - {"knobs"}
        knob_values = {k: values.pop(k) for k in list(values) if k not in shared | {"knobs"}}
        if values.get("knobs") is not None:  # dataclasses.replace passes the knobs instance
            knob_values = dataclasses.asdict(values.pop("knobs")) | knob_values
        for f in dataclasses.fields(self):
            object.__setattr__(self, f.name, values.get(f.name, f.default))
        object.__setattr__(self, "name", name)
        try:
            family = get_family(name)
        except ValueError:
            raise ValueError(bad("name", name, str(loss_names()))) from None
        errors = self._knob_errors(family, knob_values)
        errors += self._adaptive_errors(family) + self._shared_errors() + option_errors(self)
        if errors:
            raise ValueError("\n".join(errors))

    def _knob_errors(self, family, given: dict) -> list[str]:
        """Build ``knobs`` from the family's dataclass; name the owner of a misplaced knob."""
        owners, errors, own = knob_owners(), [], {}
        for key, value in given.items():
            owner = owners.get(key)
            if owner is None:
                accepted = sorted(self.accepted_keys())
                errors.append(f"unknown loss option LossConfig.{key}; accepted: {accepted}")
                continue
            value_errors = _family_knobs(owner, {key: value})[1]
            errors += value_errors
            if owner == family.name:
                own[key] = value
            elif not value_errors and value != _knob_default(owner, key):
                # (configs written before the knobs moved held every family's knob at its
                # default: a knob of another family at its default is accepted and dropped)
                errors.append(
                    bad(
                        key,
                        value,
                        f"only with loss.name={owner!r}, the family that owns it "
                        f"(loss.name={self.name!r} does not read it): remove it",
                    )
                )
        if family.knobs is not None and not errors:
            object.__setattr__(self, "knobs", _family_knobs(family.name, own)[0])
        return errors

    def _adaptive_errors(self, family) -> list[str]:
        """``adaptive`` None -> the name's default (True only for adaptive names)."""
        if self.adaptive is not None and not isinstance(self.adaptive, bool):
            return [bad("adaptive", self.adaptive, "True, False or None (the name decides)")]
        named_adaptive = self.name in ADAPTIVE_NAMES
        object.__setattr__(self, "_adaptive_from_name", self.adaptive is None)
        if self.adaptive is None:
            object.__setattr__(self, "adaptive", named_adaptive)
        if named_adaptive and self.adaptive is False:
            base = ADAPTIVE_NAMES[self.name]
            return [
                bad(
                    "adaptive",
                    False,
                    f"True or None for name={self.name!r}; for {base.upper()} without the "
                    f"coefficient use name={base!r}",
                )
            ]
        if self.adaptive and not family.adaptive_form:
            why = family.no_adaptive
            return [bad("adaptive", True, f"False or None for name={self.name!r}: {why}")]
        return []

    def _shared_errors(self) -> list[str]:
        errors = choice("balance_space", self.balance_space, BALANCE_SPACES)
        errors += choice("normalize", self.normalize, NORMALIZE_MODES)
        errors += choice("placement", self.placement, PLACEMENTS)
        if not isinstance(self.debug_checks, bool):
            errors.append(bad("debug_checks", self.debug_checks, "True or False"))
        errors += positive("beta", self.beta) + positive("target_ratio", self.target_ratio)
        if self.clip_max is not None:
            errors += positive("clip_max", self.clip_max, "a float > 0 or None")
        if self.clip_min is not None:
            upper = "clip_max" if self.clip_max is not None else "inf"
            ok = finite(self.clip_min) and self.clip_min >= 0
            if not ok or (finite(self.clip_max) and self.clip_min > self.clip_max):
                errors.append(bad("clip_min", self.clip_min, f"None or a float in [0, {upper}]"))
        if not (finite(self.label_smoothing) and 0.0 <= self.label_smoothing < 0.5):
            errors.append(bad("label_smoothing", self.label_smoothing, "a float in [0, 0.5)"))
        elif self.label_smoothing > 0 and not self._family().supports_label_smoothing:
            ok_names = _names_with("supports_label_smoothing")
            errors.append(
                bad(
                    "label_smoothing",
                    self.label_smoothing,
                    f"0.0 for name={self.name!r}; label smoothing is supported by {ok_names}",
                )
            )
        return errors

    def __getattr__(self, key: str):
        """A knob of the selected family (``config.ipo_tau`` for ``name: ipo``)."""
        knobs = self.__dict__.get("knobs")
        if knobs is not None and key in {f.name for f in dataclasses.fields(knobs)}:
            return getattr(knobs, key)
        raise AttributeError(f"LossConfig has no option {key!r} for name={self.name!r}")

    def _family(self):
        return get_family(self.name)

    @classmethod
    def accepted_keys(cls) -> set[str]:
        """Every key accepted under ``loss:``: the shared fields and every family's knobs."""
        return ({f.name for f in dataclasses.fields(cls)} - {"knobs"}) | set(knob_owners())

    def to_dict(self) -> dict:
        """The flat ``loss:`` mapping (shared fields and this family's knobs)."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        knobs = out.pop("knobs")
        return out | (dataclasses.asdict(knobs) if knobs is not None else {})

    @property
    def family(self) -> str:
        """The loss family the name selects (``adadpo`` -> ``dpo``)."""
        return self._family().name

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
        if hasattr(self.knobs, "notices"):
            out += self.knobs.notices(self)
        return tuple(out)

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
        """The loss needs ``chosen_nll``: cpo, orpo, or any family with ``sft_weight > 0``."""
        return self._family().needs_chosen_nll or self.sft_weight > 0


def option_errors(config: LossConfig) -> list[str]:
    """The cross-family options (issue 23): ranges, and which families' math allows them."""
    family = config._family()
    errors = non_negative("sft_weight", config.sft_weight)
    errors += non_negative("dpop_lambda", config.dpop_lambda)
    errors += choice("f_divergence_type", config.f_divergence_type, F_DIVERGENCES)
    if not finite(config.f_alpha_divergence_coef):
        errors.append(bad("f_alpha_divergence_coef", config.f_alpha_divergence_coef, "a float"))
    if not isinstance(config.use_weighting, bool):
        errors.append(bad("use_weighting", config.use_weighting, "True or False"))
    alpha = config.ld_alpha
    if alpha is not None and not (finite(alpha) and 0 < alpha <= 1):
        errors.append(bad("ld_alpha", alpha, "a float in (0, 1], or None (off)"))
    if errors:
        return errors
    name = config.name
    if config.sft_weight > 0 and family.normalizer == "tokens":
        errors.append(bad("sft_weight", config.sft_weight, f"0 for name={name!r}: it is the NLL"))
    if config.ld_alpha is not None and family.normalizer == "tokens":
        errors.append(bad("ld_alpha", alpha, f"None for name={name!r}: it has no answer pair"))
    if config.f_divergence_type != "reverse_kl" and not family.f_divergence:
        errors.append(
            bad(
                "f_divergence_type",
                config.f_divergence_type,
                f"'reverse_kl' for name={name!r}: f-divergences need a loss built on the "
                f"chosen-minus-rejected log-ratio difference, {_names_with('f_divergence')}",
            )
        )
    if config.f_alpha_divergence_coef != 0.5 and config.f_divergence_type != "alpha_divergence":
        errors.append(
            bad(
                "f_alpha_divergence_coef",
                config.f_alpha_divergence_coef,
                "0.5 (unused) unless f_divergence_type='alpha_divergence': set that, or remove it",
            )
        )
    if config.dpop_lambda > 0 and not family.dpop:
        errors.append(
            bad(
                "dpop_lambda",
                config.dpop_lambda,
                f"0 for name={name!r}; DPOP enters the sigmoid of {_names_with('dpop')}",
            )
        )
    if family.checks is not None:
        errors += family.checks(config)
    if config.use_weighting and not family.weighting:
        errors.append(
            bad(
                "use_weighting",
                True,
                f"False for name={name!r}: it sorts log-ratios across "
                "pairs, so a pair's weight would not meet its own loss (as TRL refuses)",
            )
        )
    return errors


def _names_with(trait: str) -> list[str]:
    from megatron_adadpo.losses.registry import load_families

    return sorted(n for n, f in load_families().items() if getattr(f, trait))


def _family_knobs(family_name: str, values: dict):
    """``(knobs instance or None, errors)`` of family ``family_name`` built from ``values``."""
    cls = get_family(family_name).knobs
    numbers = {}
    for key, value in values.items():  # YAML writes 1e-3 as a string
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                return None, [bad(key, value, "a number")]
        numbers[key] = value
    knobs = cls(**numbers)
    return knobs, knobs.errors()


def _knob_default(family_name: str, key: str):
    fields = {f.name: f.default for f in dataclasses.fields(get_family(family_name).knobs)}
    return fields[key]

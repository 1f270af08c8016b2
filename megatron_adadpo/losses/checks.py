"""Field-local checks of loss options, as error strings (torch-free).

Each check returns the one-line error for a field, or nothing; :class:`LossConfig` and the
families' knob dataclasses collect them, so a config reports every bad field at once.
"""

from __future__ import annotations

import math


def bad(field: str, value: object, accepted: str) -> str:
    """``LossConfig.<field>=<value> is invalid; accepted: <accepted>``."""
    return f"LossConfig.{field}={value!r} is invalid; accepted: {accepted}"


def finite(value: object) -> bool:
    """A finite int or float (not a bool)."""
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def positive(field: str, value: object, accepted: str = "a finite float > 0") -> list[str]:
    return [] if finite(value) and value > 0 else [bad(field, value, accepted)]


def non_negative(field: str, value: object) -> list[str]:
    return [] if finite(value) and value >= 0 else [bad(field, value, "a finite float >= 0")]


def finite_float(field: str, value: object) -> list[str]:
    return [] if finite(value) else [bad(field, value, "a finite float")]


def choice(field: str, value: object, accepted: tuple[str, ...]) -> list[str]:
    return [] if value in accepted else [bad(field, value, str(list(accepted)))]

"""Config text -> nested dicts -> typed field values: the YAML reader and its errors.

``read_yaml(path, overrides)`` is the file's document with ``--set a.b=c`` overrides applied;
``coerce(cls, section, values)`` turns one section's YAML values into its dataclass's field types
(numbers written as strings, integral floats), refusing a wrong type or a non-finite float. Each
error is a ``ConfigError`` naming the file, the override or the field. Imports neither torch nor
Megatron.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from pathlib import Path

import yaml


class ConfigError(ValueError):
    """A configuration value that cannot work; the message names the field and the fix."""


def coerce(cls, section: str, values: dict) -> dict:
    """Numbers written as YAML strings (``1e-3``) become floats; a value of the wrong type
    (``train_iters: abc``, ``seed: [1]``) or a float that is not finite (``lr: inf``, ``nan``)
    is refused naming the field, before the section's own checks; nested sections
    (``model.rope_scaling``) likewise. Unknown keys are left to the section to name."""
    hints = typing.get_type_hints(cls)
    out = dict(values)
    for key, value in values.items():
        if key not in hints:
            continue
        kinds = set(typing.get_args(hints[key])) or {hints[key]}
        nested = [k for k in kinds if dataclasses.is_dataclass(k)]
        if nested and isinstance(value, dict):
            out[key] = coerce(nested[0], f"{section}.{key}", value)
        elif float in kinds and isinstance(value, (str, int)) and not isinstance(value, bool):
            try:
                out[key] = float(value)
            except ValueError:
                raise ConfigError(f"{section}.{key}={value!r} must be a number") from None
        elif int in kinds and float not in kinds and isinstance(value, float):
            if not value.is_integer():
                raise ConfigError(f"{section}.{key}={value!r} must be an integer")
            out[key] = int(value)
        elif value is not None or type(None) not in kinds:
            _check_type(f"{section}.{key}", value, kinds)
        if isinstance(out[key], float) and not math.isfinite(out[key]):
            raise ConfigError(f"{section}.{key}={out[key]!r} must be a finite number")
    return out


# Plain field types the YAML value must have, and how the error names them.
_TYPE_WORDS = {
    bool: "true or false",
    int: "an integer",
    str: "a string",
    dict: "a mapping",
    list: "a list",
}


def _check_type(name: str, value, kinds: set) -> None:
    checked = [k for k in kinds if k in _TYPE_WORDS]
    if not checked or len(checked) != len(kinds - {type(None)}):
        return  # a section's own type (e.g. RopeScaling) or a generic: checked where defined
    if any(isinstance(value, k) and not (k is int and isinstance(value, bool)) for k in checked):
        return
    words = " or ".join(_TYPE_WORDS[k] for k in checked)
    raise ConfigError(f"{name}={value!r} must be {words}")


def read_yaml(path: str | Path | None, overrides: list[str] = ()) -> dict:
    """The file's nested dicts (``{}`` for ``path=None``) with ``a.b=c`` overrides applied.

    Raises ``ConfigError`` naming the file or the override and the fix.
    """
    values: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        values = _parse_yaml(_read_text(path), str(path)) or {}
        if not isinstance(values, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections")
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. --set train.seed=3")
        key, raw = item.split("=", 1)
        node = values
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {key}: '{part}' is not a section")
        node[parts[-1]] = _parse_yaml(raw, f"--set {item}")
    return values


def _read_text(path: Path) -> str:
    """The UTF-8 text of a config file; ``ConfigError`` naming it when it is not text (a binary
    file, another encoding)."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise ConfigError(
            f"{path}: not a UTF-8 YAML file (byte {err.start}, line {line}: {err.reason}); pass "
            "the run's YAML config (a binary file or another encoding was given)"
        ) from None


def _parse_yaml(text: str, where: str):
    """``yaml.safe_load`` whose syntax errors name ``where`` (the file, or the override), the
    line and the column."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"{where}: YAML syntax error{at}: {problem}") from None

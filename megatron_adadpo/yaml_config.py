"""Read a YAML config and apply ``--set a.b=c`` overrides (pure Python: the planner uses it)."""

from __future__ import annotations

from pathlib import Path

import yaml


def read_yaml(path: str | Path | None, overrides: list[str] = ()) -> dict:
    """The file's nested dicts (``{}`` for ``path=None``) with the overrides applied in order.

    Raises ``ValueError`` naming the file or the override and the fix.
    """
    values: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"config file {path} does not exist")
        values = yaml.safe_load(path.read_text()) or {}
        if not isinstance(values, dict):
            raise ValueError(f"{path}: the top level must be a mapping of sections")
    return apply_overrides(values, list(overrides))


def apply_overrides(values: dict, overrides: list[str]) -> dict:
    """Apply ``a.b=c`` overrides (``c`` parsed as YAML) to a nested dict, in order."""
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"--set {item!r}: expected KEY=VALUE, e.g. --set train.seed=3")
        key, raw = item.split("=", 1)
        node = values
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ValueError(f"--set {key}: '{part}' is not a section")
        node[parts[-1]] = yaml.safe_load(raw)
    return values

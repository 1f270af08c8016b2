"""Lazy package exports (PEP 562): a package's public names are imported on first use, so
importing one light submodule (``megatron_adadpo.config``) never pulls in torch or Megatron."""

from __future__ import annotations

import importlib
from collections.abc import Callable


def lazy_exports(package: str, exports: dict[str, str], on_import: Callable | None = None):
    """A module ``__getattr__`` resolving ``name`` to ``getattr(import_module(exports[name]),
    name)``; module paths starting with ``.`` are relative to ``package``. ``on_import(module)``
    runs after each import (e.g. to register plug-ins)."""

    def __getattr__(name: str):
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        module = importlib.import_module(exports[name], package)
        if on_import is not None:
            on_import(module)
        return getattr(module, name)

    return __getattr__

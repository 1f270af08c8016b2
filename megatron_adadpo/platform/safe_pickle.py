"""Reading pickled files without running their code.

Unpickling calls whatever callables a file names (``os.system`` included), so every file the
project can be handed is read by one of these, never by plain ``pickle`` /
``torch.load(weights_only=False)`` / ``np.load(allow_pickle=True)``:

- ``torch_load``: ``torch.load(weights_only=True)`` (tensors, numbers, strings and containers;
  also ``io.BytesIO``, which Transformer Engine before 2.0 stored as ``_extra_state``).
- ``MetadataUnpickler``: torch DCP's ``.metadata`` (torch reads it with plain ``pickle.load``,
  ``torch/distributed/checkpoint/filesystem.py`` ``FileSystemReader.read_metadata``). It admits
  DCP's own metadata classes (the dataclasses and enums of ``torch.distributed.checkpoint``'s
  ``metadata`` / ``planner`` / ``filesystem`` modules) and the torch values they hold (``Size``,
  dtypes, layouts, memory formats), ``collections.OrderedDict`` and ``pathlib`` paths (a
  writer's ``checkpoint_id``). Nothing else: a global outside the list is refused before it is
  looked up.
- ``load_npy``: ``np.load(allow_pickle=False)``.

A refusal raises ``UnsafeFileError`` naming the file and what it tried to call; ``find_unsafe``
finds it behind the errors that wrap it (torch DCP gathers each rank's failures).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import enum
import functools
import importlib
import io
import pathlib
import pickle
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch


class UnsafeFileError(ValueError):
    """A file that would run code when loaded (build with ``refused``); the message names it."""


def refused(name: str, culprit: str) -> UnsafeFileError:
    """The error for file ``name`` that loading would make call ``culprit``."""
    return UnsafeFileError(
        f"{name} would run code when loaded ({culprit}); refused: the project loads only "
        "tensors and plain data from the files it is handed. Do not use files from a source you "
        "do not trust; re-create this one (or resume from an earlier checkpoint)"
    )


def find_unsafe(err: BaseException) -> UnsafeFileError | None:
    """The ``UnsafeFileError`` behind ``err``: itself, a cause or context, or a failure that
    torch DCP gathered into a ``CheckpointException``."""
    stack, seen = [err], set()
    while stack:
        exc = stack.pop()
        if exc is None or id(exc) in seen:
            continue
        seen.add(id(exc))
        if isinstance(exc, UnsafeFileError):
            return exc
        failures = getattr(exc, "failures", None)
        if isinstance(failures, dict):
            stack += [pair[0] for pair in failures.values() if isinstance(pair, tuple)]
        stack += [exc.__cause__, exc.__context__]
    return None


# Allowed in torch files besides weights_only's defaults (Transformer Engine < 2.0 extra state).
_TORCH_FILE_GLOBALS = [io.BytesIO]
if hasattr(torch.serialization, "safe_globals"):  # torch >= 2.5: for the call only
    _extra_globals = functools.partial(torch.serialization.safe_globals, _TORCH_FILE_GLOBALS)
else:  # torch 2.4: process-wide (constructing a BytesIO runs nothing)
    torch.serialization.add_safe_globals(_TORCH_FILE_GLOBALS)
    _extra_globals = contextlib.nullcontext


def torch_load(source: str | Path | IO[bytes], name: str | None = None) -> Any:
    """``torch.load(source, map_location="cpu", weights_only=True)``.

    ``name`` (default: ``source``) is what an ``UnsafeFileError`` names when the file holds a
    callable that ``weights_only`` refuses; other errors (a missing or truncated file) pass
    through unchanged.
    """
    name = str(source) if name is None else name
    try:
        with _extra_globals():
            return torch.load(source, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if "Weights only load failed" not in str(err):
            raise
        raise refused(name, _weights_only_culprit(str(err))) from None


def _weights_only_culprit(message: str) -> str:
    """The line of torch's long weights_only message that says what was refused."""
    for line in message.splitlines():
        if "Unsupported" in line or "GLOBAL" in line:
            return line.strip().rstrip(".")[:200]
    return "a global that weights_only refuses"


_DCP_MODULES = (
    "torch.distributed.checkpoint.metadata",
    "torch.distributed.checkpoint.planner",
    "torch.distributed.checkpoint.filesystem",
)
_OTHER_GLOBALS = {
    ("torch", "Size"): torch.Size,
    ("torch.serialization", "_get_layout"): torch.serialization._get_layout,
    ("collections", "OrderedDict"): collections.OrderedDict,
}
_PATH_CLASSES = ("PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath")
_TORCH_VALUE_TYPES = (torch.dtype, torch.layout, torch.memory_format)


def _admitted(module: str, name: str) -> Any | None:
    """The object ``module.name`` when the metadata unpickler admits it, else None."""
    if "." in name:  # protocol 4 dotted names reach attributes of attributes: never needed
        return None
    if (module, name) in _OTHER_GLOBALS:
        return _OTHER_GLOBALS[(module, name)]
    if module in ("pathlib", "pathlib._local") and name in _PATH_CLASSES:
        return getattr(pathlib, name)
    if module == "torch":
        value = getattr(torch, name, None)
        return value if isinstance(value, _TORCH_VALUE_TYPES) else None
    if module in _DCP_MODULES:
        value = getattr(importlib.import_module(module), name, None)
        is_data = isinstance(value, type) and (
            dataclasses.is_dataclass(value) or issubclass(value, enum.Enum)
        )
        return value if is_data else None
    return None


class MetadataUnpickler(pickle.Unpickler):
    """Unpickles a DCP ``.metadata`` admitting only the globals listed in the module docstring."""

    def __init__(self, file: IO[bytes], name: str) -> None:
        super().__init__(file)
        self.name = name

    def find_class(self, module: str, name: str) -> Any:
        admitted = _admitted(module, name)
        if admitted is None:
            raise refused(self.name, f"it names {module}.{name}")
        return admitted


def load_npy(path: str | Path, mmap_mode: str | None = None) -> np.ndarray:
    """``np.load(path, mmap_mode, allow_pickle=False)``; an object array (pickled Python
    objects) raises ``UnsafeFileError`` naming ``path``."""
    try:
        return np.load(path, mmap_mode=mmap_mode, allow_pickle=False)
    except ValueError as err:
        if "allow_pickle" not in str(err) and "Python objects" not in str(err):
            raise
        raise refused(str(path), "it holds pickled Python objects") from None

"""Run Megatron-Core's own code on a machine without CUDA (CPU + gloo).

Megatron-Core 0.16.1 assumes a GPU in a handful of places that no config flag avoids:
``torch.cuda.current_device()``, the CUDA RNG state helpers, streams and events, tensors created
with a literal ``device="cuda"`` (or ``.cuda()``), and a ``param.type() ==
'torch.cuda.FloatTensor'`` assertion. This module redirects exactly those to the CPU so that the
real ``GPTModel``, schedules, DDP, optimizer and ``dist_checkpointing`` run in CPU tests and the
CPU quickstart. Nothing in the plugin depends on it; on a CUDA host it is never activated.

Every redirect is counted per Megatron call site (``redirect_counts()``). ``KNOWN_REDIRECTS``
lists the kinds of redirect this layer was written for; a redirect of an unknown kind raises
(``strict``), so a Megatron upgrade that needs something new fails loudly in the tests instead of
silently running different code. Written for megatron-core 0.16.1 (``SUPPORTED_MEGATRON``).
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import sys
import threading

import torch
from torch.overrides import TorchFunctionMode

log = logging.getLogger(__name__)

SUPPORTED_MEGATRON = ("0.16",)

# Kinds of redirect this layer knows. A test runs a tiny training (model, schedules, DDP,
# optimizer, checkpoint) and fails if Megatron needs a kind outside this set.
KNOWN_REDIRECTS = frozenset(
    {
        "torch.cuda.current_device",
        "torch.cuda.synchronize",
        "torch.cuda.get_rng_state",
        "torch.cuda.set_rng_state",
        "torch.cuda.manual_seed",
        "torch.cuda.Stream",
        "torch.cuda.stream",
        "torch.cuda.current_stream",
        "torch.cuda.default_stream",
        "torch.cuda.Event",
        "torch.cuda.empty_cache",
        "torch.cuda.device_count",
        "torch.cuda.memory_allocated",
        "torch.cuda.max_memory_allocated",
        "megatron._get_cuda_rng_state",
        "megatron._set_cuda_rng_state",
        "device=cuda",
        "Tensor.cuda",
        "Tensor.to(cuda)",
        "pin_memory",
        "Tensor.type",
    }
)

_lock = threading.Lock()
_counts: collections.Counter = collections.Counter()
_active = False
_mode: _CudaToCpuMode | None = None
_THIS_FILE = os.path.abspath(__file__)
_TORCH_DIR = os.path.dirname(os.path.abspath(torch.__file__))


def is_active() -> bool:
    """True when the redirects are installed in this process."""
    return _active


def redirect_counts() -> dict[tuple[str, str], int]:
    """``{(kind, "megatron/core/file.py:line"): count}`` of every redirect since activation."""
    with _lock:
        return dict(_counts)


def reset_counts() -> None:
    with _lock:
        _counts.clear()


def _call_site() -> str:
    """First frame outside torch and this module: the code that asked for CUDA."""
    frame = sys._getframe(2)
    while frame is not None:
        path = frame.f_code.co_filename
        if path != _THIS_FILE and not path.startswith(_TORCH_DIR) and "<" not in path[:1]:
            marker = path.rfind("megatron/")
            short = path[marker:] if marker >= 0 else os.path.basename(path)
            return f"{short}:{frame.f_lineno}"
        frame = frame.f_back
    return "?"


def _record(kind: str) -> None:
    if kind not in KNOWN_REDIRECTS:
        raise RuntimeError(
            f"megatron_adadpo.platform.cpu: Megatron asked for an unknown CUDA feature {kind!r} at "
            f"{_call_site()}. The CPU compatibility layer was written for megatron-core "
            f"{SUPPORTED_MEGATRON}; extend KNOWN_REDIRECTS deliberately after checking it."
        )
    site = _call_site()
    with _lock:
        _counts[(kind, site)] += 1


def _is_cuda_device(device) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    # A bare int is a CUDA ordinal (torch.cuda.current_device() returns one).
    return isinstance(device, int) and not isinstance(device, bool)


class _NullStream:
    """Stands in for ``torch.cuda.Stream`` / ``Event``: every operation is a no-op."""

    def __init__(self, *args, **kwargs):
        pass

    def __getattr__(self, name):
        return lambda *args, **kwargs: None

    def elapsed_time(self, other) -> float:
        return 0.0

    def query(self) -> bool:
        return True


def _cpu_kwargs(kwargs: dict) -> dict:
    """``device="cuda"`` -> ``"cpu"`` and ``pin_memory=True`` -> ``False``, counted."""
    kwargs = dict(kwargs)
    if _is_cuda_device(kwargs.get("device")):
        _record("device=cuda")
        kwargs["device"] = "cpu"
    if kwargs.get("pin_memory"):
        _record("pin_memory")
        kwargs["pin_memory"] = False
    return kwargs


class _CudaToCpuMode(TorchFunctionMode):
    """Rewrites CUDA device arguments to CPU in every torch call made while it is active."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = _cpu_kwargs(kwargs or {})
        if func is torch.Tensor.cuda:
            _record("Tensor.cuda")
            return args[0]
        if func is torch.Tensor.to and args[1:] and _is_cuda_device(args[1]):
            _record("Tensor.to(cuda)")
            args = (args[0], "cpu", *args[2:])
        if func is torch.Tensor.pin_memory:
            _record("pin_memory")
            return args[0]
        result = func(*args, **kwargs)
        if func is torch.Tensor.type and len(args) == 1 and not kwargs and _from_megatron():
            # Megatron asserts on CUDA tensor type names ('torch.cuda.FloatTensor').
            _record("Tensor.type")
            return result.replace("torch.", "torch.cuda.", 1)
        return result


def _from_megatron() -> bool:
    frame = sys._getframe(2)
    while frame is not None and (
        frame.f_code.co_filename == _THIS_FILE or frame.f_code.co_filename.startswith(_TORCH_DIR)
    ):
        frame = frame.f_back
    return frame is not None and "megatron/core/" in frame.f_code.co_filename


# Factory functions also wrapped at module level: a TorchFunctionMode is suspended while its
# own handler runs, so code executed *inside* an intercepted call (``autograd.Function.apply``,
# ``torch.autograd.backward``: activation recompute, Megatron's custom backward passes) would
# otherwise reach CUDA.
_FACTORIES = ("empty", "zeros", "ones", "full", "tensor", "arange", "rand", "randn", "randint")


def _cpu_factory(impl):
    def factory(*args, **kwargs):
        return impl(*args, **_cpu_kwargs(kwargs))

    factory.__name__ = getattr(impl, "__name__", "factory")
    factory.__doc__ = getattr(impl, "__doc__", None)
    return factory


def _counted(kind: str, impl):
    def wrapper(*args, **kwargs):
        _record(kind)
        return impl(*args, **kwargs)

    wrapper.__name__ = kind.rsplit(".", 1)[-1]
    wrapper._megatron_adadpo_cpu = True
    return wrapper


def _counted_type(kind: str) -> type:
    """A ``_NullStream`` subclass standing in for the CUDA type ``kind`` (``torch.cuda.Stream``,
    ``Event``), counting each construction. A class, not a function, so that code which uses
    the name as a type keeps working (transformers 5 evaluates ``torch.cuda.Stream | None`` in
    a signature at import time: ``|`` on a function raises ``TypeError``)."""

    def __init__(self, *args, **kwargs):
        _record(kind)

    name = kind.rsplit(".", 1)[-1]
    return type(name, (_NullStream,), {"__init__": __init__, "_megatron_adadpo_cpu": True})


def _cpu_rng_get(*args, **kwargs):
    return torch.get_rng_state()


def _cpu_rng_set(state, *args, **kwargs):
    torch.set_rng_state(state.cpu() if isinstance(state, torch.Tensor) else state)


def _cuda_replacements() -> dict[str, object]:
    none = lambda *args, **kwargs: None  # noqa: E731
    return {
        # A CPU device (not the ordinal 0) so that allocations made while the function mode is
        # suspended (inside autograd's backward) land on the CPU too.
        "current_device": _counted("torch.cuda.current_device", lambda: torch.device("cpu")),
        "synchronize": _counted("torch.cuda.synchronize", none),
        "get_rng_state": _counted("torch.cuda.get_rng_state", _cpu_rng_get),
        "set_rng_state": _counted("torch.cuda.set_rng_state", _cpu_rng_set),
        "manual_seed": _counted("torch.cuda.manual_seed", lambda seed: torch.manual_seed(seed)),
        "Stream": _counted_type("torch.cuda.Stream"),
        "stream": _counted("torch.cuda.stream", lambda s=None: contextlib.nullcontext()),
        "current_stream": _counted("torch.cuda.current_stream", _NullStream),
        "default_stream": _counted("torch.cuda.default_stream", _NullStream),
        "Event": _counted_type("torch.cuda.Event"),
        "empty_cache": _counted("torch.cuda.empty_cache", none),
        "device_count": _counted("torch.cuda.device_count", lambda: 1),
        "memory_allocated": _counted("torch.cuda.memory_allocated", lambda *a, **k: 0),
        "max_memory_allocated": _counted("torch.cuda.max_memory_allocated", lambda *a, **k: 0),
    }


def activate(strict: bool = True) -> bool:
    """Install the redirects in this process if CUDA is absent. Idempotent.

    Returns True when the layer is active. ``strict=False`` is only for exploring a new
    Megatron version: unknown kinds are then counted instead of raising.
    """
    global _active, _mode
    if torch.cuda.is_available():
        return False
    if _active:
        return True
    from megatron_adadpo.platform.megatron import MEGATRON_VERSION, megatron_rng_module

    if not MEGATRON_VERSION.startswith(SUPPORTED_MEGATRON):
        log.warning("written for megatron-core %s, found %s", SUPPORTED_MEGATRON, MEGATRON_VERSION)
    if not strict:
        global KNOWN_REDIRECTS
        KNOWN_REDIRECTS = _GrowingSet(KNOWN_REDIRECTS)
    for name, impl in _cuda_replacements().items():
        setattr(torch.cuda, name, impl)
    torch.cuda.random.get_rng_state = torch.cuda.get_rng_state
    torch.cuda.random.set_rng_state = torch.cuda.set_rng_state
    for name in _FACTORIES:
        setattr(torch, name, _cpu_factory(getattr(torch, name)))
    rng = megatron_rng_module()
    rng._get_cuda_rng_state = _counted("megatron._get_cuda_rng_state", _cpu_rng_get)
    rng._set_cuda_rng_state = _counted("megatron._set_cuda_rng_state", _cpu_rng_set)
    _mode = _CudaToCpuMode()
    _mode.__enter__()
    _active = True
    return True


class _GrowingSet(frozenset):
    """Non-strict mode: every kind counts as known."""

    def __contains__(self, item) -> bool:
        return True

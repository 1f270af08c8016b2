"""What this machine has installed: Transformer Engine, compiled extensions, and the message
for a missing Megatron-Core. No Megatron import (``platform/machine.probe_machine`` reads them;
the rules they feed are ``resolve/kernels.py``'s).
"""

from __future__ import annotations


def megatron_import_error(err: ModuleNotFoundError) -> str:
    """The message for a failed ``import megatron.core``, naming the fix.

    megatron-core >= 0.17 imports ``triton`` unconditionally (0.19.2: ``megatron/core/__init__``
    -> ``distributed`` -> ``pipeline_parallel.schedules`` -> ``transformer/moe/paged_stash`` ->
    ``import triton``) without declaring it. CUDA builds of torch install triton; CPU-only torch
    does not.
    """
    if err.name == "triton":
        from importlib.metadata import PackageNotFoundError, version

        try:
            found = version("megatron-core")
        except PackageNotFoundError:
            found = "?"
        return (
            f"megatron-core {found} needs the triton package, which CUDA builds of torch "
            "install and CPU-only torch does not: on a GPU machine install CUDA torch (or pip "
            "install triton); on a CPU-only machine use megatron-core==0.16.1 "
            "(requirements/cpu.txt)"
        )
    return f"{err}: install megatron-core (pip install 'megatron-core>=0.16.1,<0.20')"


def module_available(name: str) -> bool:
    """True when ``name`` can be imported (a compiled extension such as apex's, probed without
    importing it)."""
    import importlib.util

    return importlib.util.find_spec(name) is not None


def te_available() -> bool:
    """True when Transformer Engine imports (it raises more than ImportError when broken)."""
    try:
        import transformer_engine  # noqa: F401
        import transformer_engine.pytorch  # noqa: F401
    except Exception:
        return False
    return True

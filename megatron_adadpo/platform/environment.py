"""What this machine can run: CUDA, Transformer Engine, and the checks a config needs of them.

No Megatron import: the config's environment check (``config.check_environment``) runs before
anything is allocated, and the planner never calls it (it plans for another machine).
"""

from __future__ import annotations

from megatron_adadpo.layout import ExecutionConfig


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


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


def uses_transformer_engine(execution: ExecutionConfig) -> bool:
    """``transformer_impl`` resolved: ``auto`` means TE on a CUDA machine that has it."""
    if execution.transformer_impl == "auto":
        return cuda_available() and te_available()
    return execution.transformer_impl == "transformer_engine"


def attention_impl(execution: ExecutionConfig) -> str:
    """``execution.attention`` resolved: ``auto`` is Transformer Engine's attention with the TE
    layer spec, torch's ``scaled_dot_product_attention`` ("sdpa") with the local spec."""
    if execution.attention != "auto":
        return execution.attention
    return "transformer_engine" if uses_transformer_engine(execution) else "sdpa"


def environment_errors(execution: ExecutionConfig) -> list[str]:
    """Reasons this machine cannot run ``execution`` (each names the field and the fix)."""
    errors = []
    if execution.fp8 or execution.transformer_impl == "transformer_engine":
        if not (cuda_available() and te_available()):
            errors.append(
                "execution.fp8 / transformer_impl=transformer_engine need Transformer Engine on "
                "a CUDA GPU (pip install 'megatron_adadpo[gpu]'); set execution.fp8=null and "
                "execution.transformer_impl=local to run without it"
            )
    if execution.fp8 and cuda_available():
        import torch

        from megatron_adadpo.platform.hardware import fp8_recipe_error

        name = torch.cuda.get_device_name()
        error = fp8_recipe_error(execution.fp8_recipe, torch.cuda.get_device_capability(), name)
        errors += [error] if error else []
    if execution.cp > 1 and attention_impl(execution) != "transformer_engine":
        errors.append(
            "execution.cp > 1 needs Transformer Engine attention (GPU); set execution.cp=1"
        )
    return errors

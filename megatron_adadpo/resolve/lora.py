"""LoRA's rules with the rest of the run, and the reference mode it implies (torch-free).

The ``lora:`` section itself (its fields and their checks) is ``model/lora_config.py``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from megatron_adadpo.model.lora_config import LoraSection


# Transformer Engine's layer spec fuses these linears with the norm before them
# (``TELayerNormColumnParallelLinear``); the norm each reads from.
FUSED_NORM_LINEARS = {"linear_qkv": "input_layernorm", "linear_fc1": "pre_mlp_layernorm"}


def lora_run_errors(
    lora: LoraSection | None,
    reference_mode: str,
    chunk_tokens: int,
    tied: bool,
    fp8: str | None,
) -> list[str]:
    """Rules between ``lora`` and the rest of the run: ``adapters_off`` needs adapters; on
    ``output_layer`` the chunked log-prob path (which applies the output weight itself) and
    tied embeddings (the weight comes from the embedding) would bypass the adapter; FP8 is
    refused (the adapters' GEMMs would run outside Transformer Engine's FP8 recipe, and no
    FP8 run with adapters has been checked). Transformer Engine's spec is accepted: the
    targeted linears that fuse a norm are built apart from it (``split_norm_linears``)."""
    if lora is None:
        if reference_mode == "adapters_off":
            return ["reference.mode=adapters_off needs a lora: section (adapters to switch off)"]
        return []
    errors = []
    if fp8:
        errors.append(
            f"lora: with execution.fp8={fp8!r} the adapters would run outside Transformer "
            "Engine's FP8 recipe (not supported); set execution.fp8=null"
        )
    if "output_layer" in lora.target_modules and (chunk_tokens or tied):
        errors.append(
            "lora.target_modules output_layer needs execution.logprob_chunk_tokens=0 and "
            "untied embeddings (otherwise the output weight is applied without the adapter); "
            "remove output_layer from lora.target_modules"
        )
    return errors


def split_norm_linears(lora: LoraSection | None, uses_te: bool) -> tuple[str, ...]:
    """The targeted linears built apart from their norm: on Transformer Engine's spec
    ``linear_qkv`` / ``linear_fc1`` fuse the preceding norm, so an adapter beside the fused
    layer would read the un-normalised input; the spec then has the norm as its own module
    (``model/lora_spec.py``). ``()`` without LoRA, on the local spec, or untargeted."""
    if lora is None or not uses_te:
        return ()
    return tuple(name for name in FUSED_NORM_LINEARS if name in lora.target_modules)


def resolved_reference_mode(mode: str | None, lora: LoraSection | None) -> str:
    """``reference.mode`` as given, or unset: ``adapters_off`` with LoRA, else ``resident``."""
    if mode is not None:
        return mode
    return "adapters_off" if lora is not None else "resident"

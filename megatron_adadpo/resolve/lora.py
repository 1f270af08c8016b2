"""LoRA's rules with the rest of the run, and the reference mode it implies (torch-free).

The ``lora:`` section itself (its fields and their checks) is ``model/lora_config.py``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from megatron_adadpo.model.lora_config import LoraSection


def lora_run_errors(
    lora: LoraSection | None, reference_mode: str, uses_te: bool, chunk_tokens: int, tied: bool
) -> list[str]:
    """Rules between ``lora`` and the rest of the run: ``adapters_off`` needs adapters; the
    adapters wrap the local spec's linears (Transformer Engine's ``linear_qkv`` / ``linear_fc1``
    fuse the preceding norm, so an adapter beside them would read the un-normalised input);
    on ``output_layer`` the chunked log-prob path (which applies the output weight itself) and
    tied embeddings (the weight comes from the embedding) would bypass the adapter."""
    if lora is None:
        if reference_mode == "adapters_off":
            return ["reference.mode=adapters_off needs a lora: section (adapters to switch off)"]
        return []
    errors = []
    if uses_te:
        errors.append(
            "lora: adapters wrap the local layer spec's linears; set execution.transformer_impl"
            "=local (Transformer Engine's linear_qkv / linear_fc1 fuse the input norm)"
        )
    if "output_layer" in lora.target_modules and (chunk_tokens or tied):
        errors.append(
            "lora.target_modules output_layer needs execution.logprob_chunk_tokens=0 and "
            "untied embeddings (otherwise the output weight is applied without the adapter); "
            "remove output_layer from lora.target_modules"
        )
    return errors


def resolved_reference_mode(mode: str | None, lora: LoraSection | None) -> str:
    """``reference.mode`` as given, or unset: ``adapters_off`` with LoRA, else ``resident``."""
    if mode is not None:
        return mode
    return "adapters_off" if lora is not None else "resident"

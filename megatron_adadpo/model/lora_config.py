"""The ``lora:`` config section and its rules. Torch-free (the planner and resolver read it).

A present section turns LoRA on (``model/lora.py``): adapters of rank ``rank`` and scale
``alpha / rank`` on the named Megatron linears, the base frozen, and the reference, by default,
the same model with the adapters off (``reference.mode: adapters_off``). Each rule is a small
function returning error strings (the field and the fix), so the resolver can take them over.
"""

from __future__ import annotations

from dataclasses import dataclass, field

LAYER_TARGETS = ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2")
TARGETS = (*LAYER_TARGETS, "output_layer")


@dataclass(frozen=True)
class LoraSection:
    rank: int = 16  # r: adapter width
    alpha: float = 32.0  # the update is scaled by alpha / rank
    dropout: float = 0.0  # dropout on the adapter's input (the base layer sees none)
    target_modules: list = field(default_factory=lambda: list(LAYER_TARGETS))  # Megatron names

    def __post_init__(self):
        errors = field_errors(self)
        if errors:
            raise ValueError(errors[0])


def field_errors(lora: LoraSection) -> list[str]:
    """Field-local checks of the section."""
    errors = []
    if isinstance(lora.rank, bool) or not isinstance(lora.rank, int) or lora.rank < 1:
        errors.append(f"lora.rank={lora.rank!r} must be an integer >= 1")
    if not lora.alpha > 0:
        errors.append(f"lora.alpha={lora.alpha!r} must be > 0")
    if not 0.0 <= lora.dropout < 1.0:
        errors.append(f"lora.dropout={lora.dropout!r} must be in [0, 1)")
    targets = lora.target_modules
    unknown = [t for t in targets if t not in TARGETS] if isinstance(targets, list) else targets
    if not targets or unknown or len(set(targets)) != len(targets):
        errors.append(
            f"lora.target_modules={targets!r}: name each once, from {list(TARGETS)} "
            "(Megatron's layer names)"
        )
    return errors


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

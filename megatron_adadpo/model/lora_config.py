"""The ``lora:`` config section and its rules. Torch-free (the planner and resolver read it).

A present section turns LoRA on (``model/lora.py``): adapters of rank ``rank`` and scale
``alpha / rank`` on the named Megatron linears, the base frozen, and the reference, by default,
the same model with the adapters off (``reference.mode: adapters_off``). Field checks here;
the rules between the adapters and the rest of the run are the resolver's (``resolve/lora.py``).
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

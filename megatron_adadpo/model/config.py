"""The Llama-family model description shared by training, conversion and the planner.

One frozen dataclass, serialisable to YAML, from which ``model.py`` builds Megatron's
``TransformerConfig`` and ``GPTModel`` and from which the HF converters derive ``config.json``.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path

import yaml

MODEL_CONFIG_FILE = "model.yaml"  # stored with every checkpoint


@dataclass(frozen=True)
class RopeScaling:
    """Llama-3.1-style RoPE frequency scaling (HF ``rope_scaling = {"rope_type": "llama3"}``)."""

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclass(frozen=True)
class ModelConfig:
    """A decoder-only Llama-family transformer (Llama 2/3, Mistral, Qwen2).

    RMSNorm, SwiGLU MLP, RoPE (optionally Llama-3 scaled), grouped-query attention, optional
    QKV bias (Qwen2), tied or untied input/output embeddings.
    """

    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    num_attention_heads: int
    vocab_size: int
    num_query_groups: int | None = None  # None: multi-head attention (= num_attention_heads)
    kv_channels: int | None = None  # None: hidden_size // num_attention_heads
    max_position_embeddings: int = 4096
    rotary_base: float = 10000.0
    rope_scaling: RopeScaling | None = None
    norm_epsilon: float = 1e-5
    add_qkv_bias: bool = False
    tie_word_embeddings: bool = False
    make_vocab_size_divisible_by: int = 128
    init_method_std: float = 0.02
    hf_architecture: str = "LlamaForCausalLM"  # the HF class a conversion writes back
    hf_extra: dict = field(default_factory=dict)  # HF config fields kept for the round trip

    def __post_init__(self) -> None:
        for name in ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads"):
            _positive(name, getattr(self, name))
        _positive("vocab_size", self.vocab_size)
        groups = self.query_groups
        if self.num_attention_heads % groups:
            raise ValueError(
                f"model.num_query_groups={groups} must divide model.num_attention_heads="
                f"{self.num_attention_heads}"
            )
        if self.kv_channels is None and self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"model.hidden_size={self.hidden_size} is not divisible by "
                f"model.num_attention_heads={self.num_attention_heads}; set model.kv_channels"
            )
        if isinstance(self.rope_scaling, dict):  # from YAML
            object.__setattr__(self, "rope_scaling", _rope_scaling(self.rope_scaling))
        if not isinstance(self.rope_scaling, (RopeScaling, type(None))):
            raise ValueError(
                f"model.rope_scaling={self.rope_scaling!r} must be a mapping (factor, "
                "low_freq_factor, high_freq_factor, original_max_position_embeddings) or unset"
            )

    @property
    def query_groups(self) -> int:
        return self.num_query_groups or self.num_attention_heads

    @property
    def head_dim(self) -> int:
        return self.kv_channels or self.hidden_size // self.num_attention_heads

    def padded_vocab_size(self, tp: int) -> int:
        """Vocab rows in Megatron's embedding: a multiple of ``make_vocab_size_divisible_by*tp``."""
        multiple = self.make_vocab_size_divisible_by * tp
        return int(math.ceil(self.vocab_size / multiple) * multiple)

    def num_parameters(self, include_embeddings: bool = True) -> int:
        """Parameter count of the unpadded model (what HF reports)."""
        h, f, d = self.hidden_size, self.ffn_hidden_size, self.head_dim
        q, kv = self.num_attention_heads * d, self.query_groups * d
        attn = h * (q + 2 * kv) + q * h + (q + 2 * kv if self.add_qkv_bias else 0)
        layer = attn + 3 * h * f + 2 * h
        total = self.num_layers * layer + h
        if include_embeddings:
            total += self.vocab_size * h * (1 if self.tie_word_embeddings else 2)
        return total

    def forward_flops(self, seq_length: float, tp: int = 1) -> float:
        """Model FLOPs of one forward pass over one sequence of ``seq_length`` tokens.

        Megatron-LM's ``num_floating_point_operations`` convention (2 FLOPs per multiply-add,
        the full ``s x s`` attention square, the TP-padded output layer):
        ``s * [2L(h(q + 2kv) + qh + 3hf) + 2h V_pad] + 4 s^2 q L``. The trainer's MFU and the
        planner's step time both use it.
        """
        h, f, L = self.hidden_size, self.ffn_hidden_size, self.num_layers
        q, kv = self.num_attention_heads * self.head_dim, self.query_groups * self.head_dim
        linear = 2 * L * (h * (q + 2 * kv) + q * h + 3 * h * f) + 2 * h * self.padded_vocab_size(tp)
        return seq_length * linear + 4 * seq_length**2 * q * L

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> ModelConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown model config keys {unknown}; accepted: {sorted(known)}")
        return cls(**values)


def _rope_scaling(values: dict) -> RopeScaling:
    known = [f.name for f in dataclasses.fields(RopeScaling)]
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ValueError(f"model.rope_scaling: unknown keys {unknown}; accepted: {known}")
    for key, value in values.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"model.rope_scaling.{key}={value!r} must be a number")
    return RopeScaling(**values)


def _positive(name: str, value) -> None:
    if not isinstance(value, int) or value <= 0:
        raise ValueError(f"model.{name} must be a positive integer, got {value!r}")


def write_model_config(directory: str | Path, model: ModelConfig) -> None:
    path = Path(directory) / MODEL_CONFIG_FILE
    path.write_text(yaml.safe_dump(model.to_dict(), sort_keys=False))


def read_model_config(directory: str | Path) -> ModelConfig:
    """The ``ModelConfig`` stored with a checkpoint (clear error when absent)."""
    path = Path(directory) / MODEL_CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: {directory} is not a megatron_adadpo checkpoint (convert an HF "
            "model with tools/convert_hf_to_megatron.py, or point at a run's checkpoint)"
        )
    return ModelConfig.from_dict(yaml.safe_load(path.read_text()))


def check_same_architecture(stored: ModelConfig, wanted: ModelConfig, where: str) -> None:
    """Raise when a checkpoint's model differs from the configured one: its shape, or a value
    that changes what the weights compute (RoPE base and scaling, norm epsilon, positions) or
    what an export writes to ``config.json``."""
    fields = (
        "num_layers",
        "hidden_size",
        "ffn_hidden_size",
        "num_attention_heads",
        "query_groups",
        "head_dim",
        "vocab_size",
        "add_qkv_bias",
        "tie_word_embeddings",
        "rotary_base",
        "rope_scaling",
        "norm_epsilon",
        "max_position_embeddings",
        "hf_architecture",
    )
    diff = [
        f"{f}: checkpoint {getattr(stored, f)} vs config {getattr(wanted, f)}"
        for f in fields
        if getattr(stored, f) != getattr(wanted, f)
    ]
    if diff:
        raise ValueError(
            f"checkpoint {where} holds another model ({'; '.join(diff)}); use its "
            f"{MODEL_CONFIG_FILE} as the model section or pick the matching checkpoint"
        )

"""Tiny Llama-shaped models and parallel-state set-up for tests."""

from __future__ import annotations

from megatron_adadpo.layout import ExecutionConfig
from megatron_adadpo.model.build import build_model
from megatron_adadpo.model.config import ModelConfig
from megatron_adadpo.model.initialization import init_layout_invariant
from megatron_adadpo.platform import distributed as parallel

TINY = ModelConfig(
    num_layers=4,
    hidden_size=64,
    ffn_hidden_size=128,
    num_attention_heads=4,
    num_query_groups=2,
    vocab_size=250,
    max_position_embeddings=128,
    make_vocab_size_divisible_by=64,
)


def tiny_model(run: ExecutionConfig, model: ModelConfig = TINY, seed: int = 7):
    """Parallel state for ``run``'s layout + model chunks with layout-independent weights."""
    parallel.init_model_parallel(run)
    chunks = build_model(model, run)
    init_layout_invariant(chunks, seed=seed, vocab_size=model.vocab_size)
    return chunks

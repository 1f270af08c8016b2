"""Tiny Llama-shaped models and parallel-state set-up for tests."""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch

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


@dataclass
class WeightedBatch:
    """A micro-batch of ``weighted_logprob_step``: rows, their per-token weights and mask;
    ``tokens`` and ``sequence_length`` are what ``run_schedule`` reads of a ``MicroBatch``."""

    tokens: torch.Tensor
    labels: torch.Tensor
    weights: torch.Tensor
    position_ids: torch.Tensor
    attention_mask: torch.Tensor | None = None

    @property
    def sequence_length(self) -> int:
        return self.tokens.shape[1]


def schedule_batches(vocab_size: int = TINY.vocab_size, seq: int = 24) -> list[WeightedBatch]:
    """Two micro-batches of 2 rows for ``run_schedule`` with ``weighted_logprob_step``: random
    tokens, labels and per-token weights; the second packs two sequences per row (a
    block-diagonal causal ``attention_mask``, bool ``[2, 1, s, s]``, True = masked out)."""
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, vocab_size, (4, seq), generator=g)
    labels = torch.randint(0, vocab_size, (4, seq), generator=g)
    weights = torch.randn(4, seq, generator=g)
    positions = torch.arange(seq).expand(4, seq)
    rows = [slice(0, 2), slice(2, 4)]
    batches = [WeightedBatch(tokens[r], labels[r], weights[r], positions[r]) for r in rows]
    causal_out = torch.ones(seq, seq, dtype=torch.bool).triu(1)
    batches[1].attention_mask = packed_rows_mask(seq, [seq // 3, 2 * seq // 3]) | causal_out
    return batches


def weighted_logprob_step(records: list, data_iterator, model):
    """A ``forward_step`` whose loss is ``sum(per-token log-prob * weight)``; appends the
    last stage's logits and per-token log-probs to ``records``."""
    from megatron_adadpo.logprobs import token_logprobs
    from megatron_adadpo.platform.megatron import parallel_state

    batch = next(data_iterator)

    def loss_func(logits):
        records.append(("logits", logits.detach().clone()))
        tp_group = parallel_state.get_tensor_model_parallel_group()
        logps = token_logprobs(logits.transpose(0, 1), batch.labels, tp_group)
        records.append(("logps", logps.detach()))
        return (logps * batch.weights).sum(), torch.tensor(1), {}

    logits = model(batch.tokens, batch.position_ids, batch.attention_mask)
    return logits, partial(loss_func)


def packed_rows_mask(seq: int, second_starts: list[int]) -> torch.Tensor:
    """Block-diagonal mask ``[b, 1, s, s]`` (bool, True = masked out, not causal): row ``i``
    packs two sequences, the second from position ``second_starts[i]`` (``>= seq``: one)."""
    segments = (torch.arange(seq) >= torch.tensor(second_starts)[:, None]).long()
    return segments[:, None, :, None] != segments[:, None, None, :]


def attention_inputs(seq: int, batch: int, heads: int, groups: int, head_dim: int):
    """Random ``q [s, b, np, hn]``, ``k, v [s, b, ng, hn]`` and the causal mask ``[s, s]``
    (True = masked out)."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(seq, batch, heads, head_dim, generator=g)
    k, v = (torch.randn(seq, batch, groups, head_dim, generator=g) for _ in range(2))
    return q, k, v, torch.ones(seq, seq, dtype=torch.bool).triu(1)


def core_attention_module(cls, heads=4, groups=2, head_dim=8, dropout=0.0, softmax_scale=None):
    """A core-attention module (``DotProductAttention``'s constructor) of a one-layer config."""
    from megatron_adadpo.platform.megatron import AttnMaskType, TransformerConfig

    cfg = TransformerConfig(
        num_layers=1,
        hidden_size=heads * head_dim,
        num_attention_heads=heads,
        num_query_groups=groups,
        attention_dropout=dropout,
        use_cpu_initialization=True,
    )
    return cls(
        config=cfg,
        layer_number=1,
        attn_mask_type=AttnMaskType.causal,
        attention_type="self",
        softmax_scale=softmax_scale,
    )


def attention_reference(q, k, v, masked_out, scale):
    """fp64 ``softmax(q k^T * scale, masked) v`` with K/V repeated per group; [sq, b, np*hn]."""
    q, k, v = (t.double().permute(1, 2, 0, 3) for t in (q, k, v))
    rep = q.size(1) // k.size(1)
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    scores = (q @ k.transpose(-1, -2)) * scale
    scores = scores.masked_fill(masked_out, float("-inf"))
    out = scores.softmax(-1) @ v
    return out.permute(2, 0, 1, 3).reshape(q.size(2), q.size(0), -1)

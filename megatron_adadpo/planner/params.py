"""Parameters per rank, exactly as Megatron-Core builds a Llama-family ``GPTModel``.

Validated against megatron-core 0.16.1 models (tests/unit/test_planner_params.py): tiny models at
TP1/TP2/PP2/TP2xPP2 and a Llama-3-70B-width layer built as TP rank 0 of 8.

Per TP rank, one transformer layer holds ``h*(q+2kv)/t`` (fused QKV), ``q*h/t`` (output
projection), ``2*f*h/t`` (SwiGLU fc1 = [gate, up]), ``f*h/t`` (fc2) and two RMSNorm weights
``h`` (replicated over TP); ``q = heads*head_dim``, ``kv = groups*head_dim``. The first pipeline
stage adds the vocab-parallel embedding ``V_pad/t * h``; the last adds the final norm ``h`` and
the output layer ``V_pad/t * h`` (with tied embeddings and PP > 1 the last stage still holds a
copy of the embedding for the output layer, kept in sync by Megatron's embedding group).
"""

from __future__ import annotations

from dataclasses import dataclass

from megatron_adadpo.model.config import ModelConfig


@dataclass(frozen=True)
class StageParams:
    """Parameters on one (TP rank, PP rank), by part."""

    embedding: int
    layers: int
    num_layers: int
    final_norm: int
    output_layer: int

    @property
    def total(self) -> int:
        return self.embedding + self.layers + self.final_norm + self.output_layer


def layer_params(model: ModelConfig, tp: int = 1) -> int:
    """Parameters of one transformer layer on one TP rank."""
    h, f, d = model.hidden_size, model.ffn_hidden_size, model.head_dim
    q, kv = model.num_attention_heads * d, model.query_groups * d
    qkv = (q + 2 * kv) * h // tp + ((q + 2 * kv) // tp if model.add_qkv_bias else 0)
    proj = q * h // tp
    mlp = 3 * f * h // tp
    return qkv + proj + mlp + 2 * h


def layers_per_stage(model: ModelConfig, pp: int) -> int:
    """Transformer layers on one pipeline rank, ``L / PP`` (all its virtual stages together)."""
    return model.num_layers // pp


def stage_params(
    model: ModelConfig, tp: int = 1, pp: int = 1, pp_rank: int = 0, vpp: int | None = None
) -> StageParams:
    """Parameters held by one rank at pipeline position ``pp_rank`` (any TP rank: all equal).

    The count does not depend on ``vpp``: with virtual stages the first rank owns the embedding
    (virtual stage 0) and the last rank owns the head (the last virtual stage), the same ranks
    as without them, and each rank still holds ``L / PP`` layers.
    """
    h = model.hidden_size
    vocab = model.padded_vocab_size(tp) // tp * h
    first, last = pp_rank == 0, pp_rank == pp - 1
    n = layers_per_stage(model, pp)
    tied_head_here = model.tie_word_embeddings and first
    return StageParams(
        embedding=vocab if first else 0,
        layers=n * layer_params(model, tp),
        num_layers=n,
        final_norm=h if last else 0,
        output_layer=vocab if last and not tied_head_here else 0,
    )


def adapter_params(model: ModelConfig, lora, tp: int = 1, pp: int = 1, pp_rank: int = 0) -> int:
    """LoRA parameters on one (TP rank, PP rank) (``model/lora.py``): rank ``r`` on a
    column-parallel base ``[out, in]`` holds ``A`` ``r*in`` (replicated) and ``B`` ``out/t*r``;
    on a row-parallel base ``A`` ``r*in/t`` and ``B`` ``out*r`` (replicated)."""
    h, f, d, r = model.hidden_size, model.ffn_hidden_size, model.head_dim, lora.rank
    q, kv = model.num_attention_heads * d, model.query_groups * d
    shapes = {  # (out, in, column-parallel)
        "linear_qkv": (q + 2 * kv, h, True),
        "linear_proj": (h, q, False),
        "linear_fc1": (2 * f, h, True),
        "linear_fc2": (h, f, False),
    }
    per_layer = 0
    for name in lora.target_modules:
        if name in shapes:
            out, inp, column = shapes[name]
            per_layer += r * inp + out // tp * r if column else r * inp // tp + out * r
    total = layers_per_stage(model, pp) * per_layer
    if "output_layer" in lora.target_modules and pp_rank == pp - 1:
        total += r * h + model.padded_vocab_size(tp) // tp * r
    return total


def total_params(model: ModelConfig, tp: int = 1) -> int:
    """All parameters of the vocab-padded model at TP ``tp`` (a tied embedding counted once)."""
    heads = 1 if model.tie_word_embeddings else 2
    h = model.hidden_size
    return model.num_layers * layer_params(model, 1) + h + heads * model.padded_vocab_size(tp) * h

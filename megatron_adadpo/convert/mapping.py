"""Tensor-by-tensor mapping between HF Llama-family names and Megatron ``GPTModel`` names.

Megatron names are those of a TP1 / PP1 ``GPTModel`` (layer index = global layer number); the
checkpoint keys behind them are layout independent. Layout differences:

- ``linear_qkv`` fuses q, k and v per query group: ``[q heads of group 0, k0, v0, q heads of
  group 1, k1, v1, ...]`` (weight and, for Qwen2, bias);
- ``linear_fc1 = cat[gate_proj, up_proj]`` along the output dimension;
- embedding / output rows are padded with zeros to ``padded_vocab_size(1)``; padding rows are
  dropped on export.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megatron_adadpo.model.config import ModelConfig


@dataclass(frozen=True)
class Entry:
    """One Megatron tensor and the HF tensors it is made of.

    ``kind``: ``copy`` (same tensor), ``qkv`` (q, k, v fused per group), ``fc1`` (gate, up
    concatenated), ``vocab`` (rows padded / unpadded).
    """

    megatron: str
    hf: tuple[str, ...]
    kind: str


def tensor_map(model: ModelConfig) -> list[Entry]:
    """Every tensor of the model, in HF order (embeddings, layers, final norm, head)."""
    out = [Entry("embedding.word_embeddings.weight", ("model.embed_tokens.weight",), "vocab")]
    for i in range(model.num_layers):
        m, h = f"decoder.layers.{i}.", f"model.layers.{i}."
        attn = h + "self_attn."
        out.append(Entry(m + "input_layernorm.weight", (h + "input_layernorm.weight",), "copy"))
        qkv = tuple(f"{attn}{p}_proj.weight" for p in "qkv")
        out.append(Entry(m + "self_attention.linear_qkv.weight", qkv, "qkv"))
        if model.add_qkv_bias:
            qkv_b = tuple(f"{attn}{p}_proj.bias" for p in "qkv")
            out.append(Entry(m + "self_attention.linear_qkv.bias", qkv_b, "qkv"))
        out.append(
            Entry(m + "self_attention.linear_proj.weight", (attn + "o_proj.weight",), "copy")
        )
        out.append(
            Entry(m + "pre_mlp_layernorm.weight", (h + "post_attention_layernorm.weight",), "copy")
        )
        fc1 = (h + "mlp.gate_proj.weight", h + "mlp.up_proj.weight")
        out.append(Entry(m + "mlp.linear_fc1.weight", fc1, "fc1"))
        out.append(Entry(m + "mlp.linear_fc2.weight", (h + "mlp.down_proj.weight",), "copy"))
    out.append(Entry("decoder.final_layernorm.weight", ("model.norm.weight",), "copy"))
    if not model.tie_word_embeddings:
        out.append(Entry("output_layer.weight", ("lm_head.weight",), "vocab"))
    return out


# HF tensors that carry no weights of their own (recomputed buffers, tied copies).
def ignorable_hf_tensor(name: str, model: ModelConfig) -> bool:
    if name.endswith("rotary_emb.inv_freq"):
        return True
    return model.tie_word_embeddings and name == "lm_head.weight"


def to_megatron(entry: Entry, hf: list[torch.Tensor], model: ModelConfig) -> torch.Tensor:
    """The Megatron tensor of ``entry`` from its HF tensors (in ``entry.hf`` order)."""
    if entry.kind == "copy":
        return hf[0]
    if entry.kind == "fc1":
        return torch.cat(hf, dim=0)
    if entry.kind == "vocab":
        rows = model.padded_vocab_size(1) - hf[0].shape[0]
        return torch.nn.functional.pad(hf[0], (0, 0, 0, rows)) if rows else hf[0]
    if entry.kind == "qkv":
        return fuse_qkv(*hf, model)
    raise ValueError(f"unknown mapping kind {entry.kind!r}")


def to_hf(entry: Entry, tensor: torch.Tensor, model: ModelConfig) -> list[torch.Tensor]:
    """The HF tensors of ``entry`` (in ``entry.hf`` order) from its Megatron tensor."""
    if entry.kind == "copy":
        return [tensor]
    if entry.kind == "fc1":
        return list(tensor.chunk(2, dim=0))
    if entry.kind == "vocab":
        return [tensor[: model.vocab_size]]
    if entry.kind == "qkv":
        return split_qkv(tensor, model)
    raise ValueError(f"unknown mapping kind {entry.kind!r}")


def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, model: ModelConfig):
    """q ``[nh*d, ...]``, k / v ``[ng*d, ...]`` -> ``[ng*(nh/ng + 2)*d, ...]`` per query group."""
    ng, d = model.query_groups, model.head_dim
    per = model.num_attention_heads // ng
    rest = q.shape[1:]
    parts = [q.reshape(ng, per * d, *rest), k.reshape(ng, d, *rest), v.reshape(ng, d, *rest)]
    return torch.cat(parts, dim=1).reshape(ng * (per + 2) * d, *rest)


def split_qkv(qkv: torch.Tensor, model: ModelConfig) -> list[torch.Tensor]:
    """Inverse of ``fuse_qkv``: ``[q, k, v]`` in HF layout."""
    ng, d = model.query_groups, model.head_dim
    per = model.num_attention_heads // ng
    rest = qkv.shape[1:]
    q, k, v = qkv.reshape(ng, (per + 2) * d, *rest).split([per * d, d, d], dim=1)
    return [t.reshape(-1, *rest) for t in (q, k, v)]


def hf_shape(name: str, model: ModelConfig) -> tuple[int, ...]:
    """Shape of an HF tensor (used to plan output shards before loading anything)."""
    h, f, d, v = model.hidden_size, model.ffn_hidden_size, model.head_dim, model.vocab_size
    q, kv = model.num_attention_heads * d, model.query_groups * d
    tail = name.rsplit(".", 2)[-2:]
    if name in ("model.embed_tokens.weight", "lm_head.weight"):
        return (v, h)
    if name.endswith("norm.weight"):
        return (h,)
    shapes = {
        ("q_proj", "weight"): (q, h),
        ("k_proj", "weight"): (kv, h),
        ("v_proj", "weight"): (kv, h),
        ("q_proj", "bias"): (q,),
        ("k_proj", "bias"): (kv,),
        ("v_proj", "bias"): (kv,),
        ("o_proj", "weight"): (h, q),
        ("gate_proj", "weight"): (f, h),
        ("up_proj", "weight"): (f, h),
        ("down_proj", "weight"): (h, f),
    }
    return shapes[tuple(tail)]

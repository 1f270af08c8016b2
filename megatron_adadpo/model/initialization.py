"""Layout-independent deterministic initialisation of Megatron model chunks.

Every parameter's FULL (unsharded) tensor is drawn from a generator seeded by its global name
(layer indices renumbered to global layer numbers), then this rank's tensor-parallel shard is
taken. The same seed therefore gives the same model for every TP / PP / virtual-pipeline layout,
which is what the layout-equivalence tests (and reproducible debugging runs) need.
"""

from __future__ import annotations

import re
import zlib

import torch

from megatron_adadpo.platform.megatron import parallel_state

_LAYER = re.compile(r"(decoder\.layers\.)(\d+)(\.)")


def global_param_names(chunk: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """``{global name: parameter}``: local layer indices replaced by ``layer_number - 1``."""
    offsets = {}
    for name, module in chunk.named_modules():
        match = re.fullmatch(r"decoder\.layers\.(\d+)", name)
        if match and hasattr(module, "layer_number"):
            offsets[int(match.group(1))] = module.layer_number - 1
    out = {}
    for name, param in chunk.named_parameters():
        key = _LAYER.sub(lambda m: f"{m.group(1)}{offsets[int(m.group(2))]}{m.group(3)}", name)
        out[key] = param
    return out


def shard_of_full(full: torch.Tensor, param: torch.nn.Parameter, gated_fc1: bool) -> torch.Tensor:
    """This TP rank's shard of ``full`` for a parameter with Megatron's TP attributes.

    Gated MLP ``linear_fc1`` holds ``[gate_shard; up_shard]`` per rank, so the full
    ``[gate; up]`` tensor is split per half.
    """
    if not getattr(param, "tensor_model_parallel", False):
        return full
    tp = parallel_state.get_tensor_model_parallel_world_size()
    rank = parallel_state.get_tensor_model_parallel_rank()
    dim = param.partition_dim
    if gated_fc1:
        halves = full.chunk(2, dim=dim)
        return torch.cat([h.chunk(tp, dim=dim)[rank] for h in halves], dim=dim)
    return full.chunk(tp, dim=dim)[rank]


@torch.no_grad()
def init_layout_invariant(
    chunks: list[torch.nn.Module], seed: int, vocab_size: int, std: float = 0.02
) -> None:
    """Re-initialise every parameter of ``chunks`` identically for any parallel layout.

    Weights ~ N(0, std) (norm weights = 1, biases = 0), drawn per full tensor on CPU in fp32.
    Embedding and output rows past the true ``vocab_size`` (TP padding, whose amount depends
    on TP) are zero. With tied embeddings the last pipeline stage's own copy of the output
    weight is drawn as the word embedding (the one tensor it is on a single stage).
    """
    tp = parallel_state.get_tensor_model_parallel_world_size()
    for chunk in chunks:
        for name, param in global_param_names(chunk).items():
            if (
                name.endswith("layer_norm_weight")
                or "layernorm" in name
                or name.endswith("final_layernorm.weight")
            ):
                param.fill_(1.0)
                continue
            if name.endswith("bias"):
                param.zero_()
                continue
            shape = list(param.shape)
            if getattr(param, "tensor_model_parallel", False):
                shape[param.partition_dim] *= tp
            gen = torch.Generator().manual_seed(seed ^ zlib.crc32(_drawn_as(chunk, name).encode()))
            vocab_rows = "word_embeddings" in name or "output_layer" in name
            draw = [vocab_size, *shape[1:]] if vocab_rows else shape
            full = torch.randn(draw, generator=gen, dtype=torch.float32) * std
            if vocab_rows:
                full = torch.nn.functional.pad(full, (0, 0, 0, shape[0] - vocab_size))
            shard = shard_of_full(full, param, gated_fc1="linear_fc1.weight" in name)
            param.copy_(shard.to(param.dtype))


TIED_OUTPUT = ("output_layer.weight", "embedding.word_embeddings.weight")


def _drawn_as(chunk: torch.nn.Module, name: str) -> str:
    """The name whose seed draws ``name``: with tied embeddings (``GPTModel``'s
    ``share_embeddings_and_output_weights``), a pipeline's last stage holds ``output_layer.weight``
    as a copy of the first stage's word embedding (Megatron keeps their gradients summed)."""
    if name == TIED_OUTPUT[0] and getattr(chunk, "share_embeddings_and_output_weights", False):
        return TIED_OUTPUT[1]
    return name

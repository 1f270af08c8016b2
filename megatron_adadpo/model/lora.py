"""LoRA adapters on Megatron-Core's tensor-parallel linears, with the base frozen.

``y = W x + (alpha / r) B A dropout(x)``, ``A: [r, in]``, ``B: [out, r]`` (Hu et al. 2021,
https://arxiv.org/abs/2106.09685); ``B = 0`` at the start, so the adapted model starts as the
base model, and switching the adapters off (:func:`adapters_disabled`) gives the base model
back: the DPO reference without a second copy of the weights.

Tensor parallelism (nothing of model width is gathered; one rank-``r`` collective beside the
base layer's):

- column-parallel base (``linear_qkv``, ``linear_fc1``, ``output_layer``; output split over TP):
  ``A`` replicated, ``B`` split like the base's output rows (gated ``linear_fc1``: each rank's
  ``[gate; up]`` halves, as the base). ``u = A x`` enters the TP region through Megatron's
  ``copy_to_tensor_model_parallel_region`` (identity forward, all-reduce of ``du`` backward);
  with sequence parallelism ``x`` is ``[s/tp, b, h]`` and ``u`` is all-gathered (``[s, b, r]``).
- row-parallel base (``linear_proj``, ``linear_fc2``; input split over TP): ``A`` split like the
  base's input columns, ``B`` replicated. ``u = A_shard x_shard`` is all-reduced (``[s, b, r]``),
  or reduce-scattered over the sequence with sequence parallelism.

Replicated adapter weights that see only this rank's part of the sequence (``A`` of a column
base, ``B`` of a row base, under sequence parallelism) carry ``sequence_parallel = True``:
Megatron's ``finalize_model_grads`` all-reduces their gradients over TP, as for layer norms
(megatron-core 0.16.1 ``distributed/finalize_model_grads.py:354``). Split ones carry Megatron's
tensor-parallel attributes, so the optimizer's gradient norm counts them once per shard.

Why not PEFT's ``LoraParallelLinear`` (peft 0.21.2 ``tuners/lora/tp_layer.py``), which builds
the same split (``B`` a ``ColumnParallelLinear`` on a column base, ``A`` a ``RowParallelLinear``
on a row base): it leaves the sequence-parallel marker off its replicated halves (their
gradients would be one rank's sequence part only); it is not a Megatron module, so
``sharded_state_dict`` falls back to ``sharded_state_dict_default``, which saves the split
halves as replicated tensors and the base under renamed keys; it draws its initial ``A`` on each
rank's shard (no layout-independent start); it dispatches only ``megatron.core.tensor_parallel``
linears, not Transformer Engine's (on TE's spec the targeted ``linear_qkv`` / ``linear_fc1``
are built apart from their norm, ``model/lora_spec.py``, and wrapped here); and it sets
``params_dtype`` on the config it is given. PEFT is used where it serves: the exported adapter
is PEFT's format.

Shapes: ``x`` ``[s, b, in]`` (``[s, b, in/tp]`` into a row base; ``[s/tp, b, in]`` into a column
base with sequence parallelism); the output is the base layer's ``(y, bias)``.
"""

from __future__ import annotations

import contextlib
import zlib
from collections.abc import Iterator

import torch

from megatron_adadpo.model.initialization import global_param_names, shard_of_full
from megatron_adadpo.platform.megatron import (
    apply_swiglu_sharded_factory,
    make_sharded_tensors_for_checkpoint,
    parallel_state,
    replace_prefix_for_sharding,
    sharded_state_dict_default,
    tensor_parallel,
)

COLUMN_TARGETS = ("linear_qkv", "linear_fc1", "output_layer")
ROW_TARGETS = ("linear_proj", "linear_fc2")
ADAPTER_NAMES = ("lora_a", "lora_b")


class LoraLinear(torch.nn.Module):
    """A Megatron ``ColumnParallelLinear`` / ``RowParallelLinear`` (or Transformer Engine's
    ``TEColumnParallelLinear`` / ``TERowParallelLinear``) plus a low-rank update.

    The base's contract, which Megatron's and TE's linears share: ``weight`` ``[out/tp, in]``
    (column) or ``[out, in/tp]`` (row), ``forward(x) -> (y, bias or None)``, and the attributes
    ``sequence_parallel`` and ``tp_group``.

    The base is ``self.base`` (frozen); its checkpoint keys are unchanged (see
    ``sharded_state_dict``), so base checkpoints load into it and adapters save apart.
    """

    def __init__(
        self, base: torch.nn.Module, rank: int, alpha: float, dropout: float, gated: bool = False
    ):
        """``gated``: the base is a gated MLP's ``linear_fc1`` (each TP shard ``[gate; up]``)."""
        super().__init__()
        self.base, self.gated = base, gated
        self.row = is_row_parallel(base)
        if not self.row and getattr(base, "gather_output", False):
            raise ValueError("LoRA on a ColumnParallelLinear with gather_output is not supported")
        self.scaling = alpha / rank
        self.enabled = True
        self.sequence_parallel = bool(getattr(base, "sequence_parallel", False))
        self.tp_group = getattr(base, "tp_group", None)
        tp = parallel_state.get_tensor_model_parallel_world_size()
        out_local, in_local = base.weight.shape
        self.lora_a = torch.nn.Parameter(base.weight.new_zeros(rank, in_local))
        self.lora_b = torch.nn.Parameter(base.weight.new_zeros(out_local, rank))
        split, whole = (self.lora_a, self.lora_b) if self.row else (self.lora_b, self.lora_a)
        dim = 1 if self.row else 0
        tensor_parallel.set_tensor_model_parallel_attributes(split, True, dim, 1)
        if self.sequence_parallel and tp > 1:
            whole.sequence_parallel = True
        self.dropout = torch.nn.Dropout(dropout) if dropout > 0 else torch.nn.Identity()

    def forward(self, x: torch.Tensor, *args, **kwargs):
        out, bias = self.base(x, *args, **kwargs)
        if not self.enabled:
            return out, bias
        return out + self.delta(x).to(out.dtype), bias

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        """``(alpha / r) B A dropout(x)`` in the base output's layout (see the module doc)."""
        maps, group = tensor_parallel, self.tp_group
        with self._dropout_rng():
            u = torch.nn.functional.linear(self.dropout(x), self.lora_a.to(x.dtype))
        if self.row and self.sequence_parallel:
            u = maps.reduce_scatter_to_sequence_parallel_region(u, group=group)
        elif self.row:
            u = maps.reduce_from_tensor_model_parallel_region(u, group=group)
        elif self.sequence_parallel:
            u = maps.gather_from_sequence_parallel_region(u, True, group=group)
        else:
            u = maps.copy_to_tensor_model_parallel_region(u, group=group)
        return torch.nn.functional.linear(u, self.lora_b.to(u.dtype)) * self.scaling

    def _dropout_rng(self):
        """Dropout on a TP-split input (row base, or sequence parallel) draws from Megatron's
        per-rank tracker; on a replicated input from the default generator, which TP ranks
        share, so replicated activations get the same mask."""
        split_input = self.row or self.sequence_parallel
        if isinstance(self.dropout, torch.nn.Dropout) and split_input:
            return tensor_parallel.get_cuda_rng_tracker().fork()
        return contextlib.nullcontext()

    def sharded_state_dict(self, prefix: str = "", sharded_offsets=(), metadata=None) -> dict:
        """The base's entries under its own checkpoint keys (``<prefix>weight``: the torch key
        is ``<prefix>base.weight``) and the adapters as ``<prefix>lora_a`` / ``<prefix>lora_b``,
        split along their TP dimension (``B`` rows of a column base, ``A`` columns of a row
        base) or replicated. A gated ``linear_fc1``'s weight and ``B`` are saved as Megatron's
        MLP saves the weight (``apply_swiglu_sharded_factory``: gate and up halves sharded
        apart, megatron-core 0.16.1 ``transformer/mlp.py:261``), so they reshard to any TP."""
        base = sharded_state_dict_default(self.base, f"{prefix}base.", sharded_offsets, metadata)
        replace_prefix_for_sharding(base, f"{prefix}base.", prefix)
        axis = {"lora_a": 1} if self.row else {"lora_b": 0}
        adapters = {"lora_a": self.lora_a, "lora_b": self.lora_b}
        base.update(make_sharded_tensors_for_checkpoint(adapters, prefix, axis, sharded_offsets))
        if self.gated:
            singleton = (metadata or {}).get("singleton_local_shards", False)
            for key in (f"{prefix}base.weight", f"{prefix}base.bias", f"{prefix}lora_b"):
                if key in base:
                    base[key] = apply_swiglu_sharded_factory(base[key], sharded_offsets, singleton)
        return base


def is_row_parallel(base: torch.nn.Module) -> bool:
    """A row-parallel base: Megatron's ``RowParallelLinear``, or a Transformer Engine linear
    built row-parallel (``TERowParallelLinear`` passes ``parallel_mode="row"``, which TE keeps
    as ``parallel_mode``; megatron-core 0.16.1 ``extensions/transformer_engine.py`` line 1074).
    Everything else LoRA targets is column-parallel."""
    row = isinstance(base, tensor_parallel.RowParallelLinear)
    return row or getattr(base, "parallel_mode", None) == "row"


def add_adapters(chunks: list, lora, seed: int) -> list[LoraLinear]:
    """Wrap every ``lora.target_modules`` linear of ``chunks`` in a :class:`LoraLinear`, freeze
    everything else (no DDP gradient buffer or optimizer state for it) and draw ``A``
    (``B = 0``) layout-independently (:func:`init_adapters`). Call after the base weights are
    loaded and before Megatron DDP wraps the chunks. Returns the adapted layers."""
    added = []
    for chunk in chunks:
        chunk.requires_grad_(False)
        targets = [
            (name, module)
            for name, module in chunk.named_modules()
            if name.rsplit(".", 1)[-1] in lora.target_modules
        ]
        for name, module in targets:
            parent_name, _, child = name.rpartition(".")
            parent = chunk.get_submodule(parent_name) if parent_name else chunk
            gated = child == "linear_fc1" and chunk.config.gated_linear_unit
            wrapped = LoraLinear(module, lora.rank, lora.alpha, lora.dropout, gated)
            setattr(parent, child, wrapped)
            added.append(wrapped)
        _inputs_require_grad(chunk)
    init_adapters(chunks, seed)
    return added


def _inputs_require_grad(chunk) -> None:
    """Under full recompute Megatron runs each layer group through a reentrant checkpoint
    (``tensor_parallel.checkpoint``, an autograd Function): with the embedding frozen its
    output needs no gradient, so neither does the group's output, and its backward (the
    recomputation that reaches the adapters) would never run. The embedding's output is marked
    as requiring a gradient, as HF's ``enable_input_require_grads`` does for PEFT."""
    embedding = getattr(chunk, "embedding", None)
    if embedding is not None and chunk.config.recompute_granularity == "full":
        embedding.register_forward_hook(lambda _module, _inputs, out: out.requires_grad_(True))


@torch.no_grad()
def init_adapters(chunks: list, seed: int) -> None:
    """``A ~ U(-1/sqrt(in), 1/sqrt(in))`` (PEFT's default, ``kaiming_uniform_(a=sqrt(5))``),
    drawn per full tensor from a generator seeded by its global name, then this rank's shard:
    the same adapters for every TP / PP / VPP layout. ``B = 0``."""
    tp = parallel_state.get_tensor_model_parallel_world_size()
    for chunk in chunks:
        for name, param in global_param_names(chunk).items():
            if name.endswith(".lora_b"):
                param.zero_()
            if not name.endswith(".lora_a"):
                continue
            shape = list(param.shape)
            if getattr(param, "tensor_model_parallel", False):
                shape[param.partition_dim] *= tp
            bound = shape[1] ** -0.5
            gen = torch.Generator().manual_seed(seed ^ zlib.crc32(name.encode()))
            full = (torch.rand(shape, generator=gen, dtype=torch.float64) * 2 - 1) * bound
            param.copy_(shard_of_full(full, param, gated_fc1=False).to(param.dtype))


def lora_layers(chunks: list) -> Iterator[LoraLinear]:
    for chunk in chunks:
        yield from (m for m in chunk.modules() if isinstance(m, LoraLinear))


def has_adapters(chunks: list) -> bool:
    return next(lora_layers(chunks), None) is not None


@contextlib.contextmanager
def adapters_disabled(chunks: list):
    """The base model: every adapter of ``chunks`` off inside the block (restored after)."""
    layers = list(lora_layers(chunks))
    for layer in layers:
        layer.enabled = False
    try:
        yield
    finally:
        for layer in layers:
            layer.enabled = True


def adapter_state_only(sharded: dict) -> dict:
    """Only the adapters' entries of a chunk's ``sharded_state_dict`` (an adapter checkpoint);
    the frozen base stays in its own checkpoint."""
    return {k: v for k, v in sharded.items() if k.rsplit(".", 1)[-1] in ADAPTER_NAMES}

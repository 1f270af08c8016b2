"""Per-GPU memory of one training step, by part, for every pipeline rank.

Model (bytes; ``e`` = 2 for bf16, 4 for fp32; ``P`` = parameters on the rank):

- weights ``e*P`` (+ ``2*P_layers`` with FP8: TE's cached FP8 weight and its transpose);
- gradients: Megatron DDP's main-grad buffer, ``grad_bytes*P`` (fp32: grads are accumulated
  and reduced in fp32), never sharded;
- optimizer: fp32 master weights (bf16 runs) + Adam ``m``, ``v``: ``(4 + 8)*P``, divided by
  ``DP*CP`` with the distributed optimizer (Megatron shards over the data x context group);
- activations: per layer and micro-batch (``s`` = seq/CP, ``b`` = rows, ``t`` = TP, ``q`` =
  heads*head_dim, ``kv`` = groups*head_dim, ``f`` = ffn):
  ``[2e*sbh (two RMSNorm inputs) + 2e'*sbh (QKV and fc1 inputs)] / t_sp``
  ``+ [e*sb(q + 2kv) + e'*sbq (proj input) + 2e*sbf (SwiGLU input) + e'*sbf (fc2 input)] / t``
  ``+ e*sbf/t`` when SwiGLU is not fused (``execution.fusions: false``; the trainer fuses it
  on GPUs: unfused, autograd also keeps ``silu(gate)``; the fused op keeps only its input),
  plus ``2.5e * (a/t) * s^2 * b`` for the attention scores when they are stored (local spec
  without selective recompute) or ``4 * b * (a/t) * s`` (flash-attention softmax statistics).
  ``t_sp`` = t with sequence parallelism, else 1; ``e'`` = 1 for FP8 linear inputs. For GPT
  shapes (f = 4h, MHA) this is Korthikanti et al. 2022's ``sbh(34 + 5as/h)`` less the dropout
  masks (Llama uses no dropout). Full recompute keeps ``e*sbh/t_sp`` per group of
  ``recompute_num_layers`` layers;
- in flight: rank ``r`` of 1F1B holds ``min(PP - r, M)`` micro-batches of its ``L/PP`` layers;
  the interleaved schedule holds ``min(M*V, 2(PP - r - 1) + (V - 1)*PP + 1)`` chunks of
  ``L/(PP*V)`` layers (rank 0: ``L*(1 + (PP-1)/(PP*V))`` layers, as in Korthikanti et al.);
- the largest micro-batch's shape ``[b, s]`` (``PlanInput.micro_batch_shape``): ``[2 x pairs,
  max_length]`` (fixed), at most ``max_tokens_per_micro_batch`` tokens in rows of up to
  ``max_length`` (token_budget), one row of ``max_tokens_per_micro_batch`` (packed);
- logits (last rank): ``[s, b, V_pad/t]`` bf16 logits + their fp32 copy kept by
  ``vocab_parallel_cross_entropy`` for backward (6 bytes/element; 8 in fp32 runs). With
  chunked log-probs (``execution.logprob_chunk_tokens``) one chunk's ``[c, V_pad/t]``
  transients instead (``c = min(chunk, s*b)``; 6 bytes/element in bf16: the fp32 logits turned
  into the softmax and the gradient in place, the bf16 logits while cast and the bf16
  gradient; 4 in fp32), or at the end of backward DDP's dummy ``e*(V_pad/t)*h`` weight
  gradient, whichever is larger, plus the output layer's gathered input, its selected tokens
  and their gradient (``3e*sbh``);
- workspace: one more layer's full activations (backward / recompute of the current layer);
- reference: resident = ``e*P`` frozen weights (its forward keeps no activations);
  precomputed / none / adapters_off (the LoRA policy with its adapters off) = 0;
- LoRA (``lora:``, ``planner/params.adapter_params``: ``P_a`` adapter parameters on the rank):
  weights ``e*(P + P_a)``; gradients ``grad_bytes*P_a`` and optimizer ``(4 + 8)*P_a`` (the
  frozen base has neither); the adapters' rank-``r`` activations are not counted (``r/h`` of
  a layer's linear inputs).

``allocated`` models ``torch.cuda.max_memory_allocated``; ``reserved`` adds allocator slack
(5 % of the dynamic part) and ``RUNTIME_GIB`` for the CUDA context, NCCL and cuBLAS workspaces:
compare it with the GPU's memory.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from megatron_adadpo.layout import chunk_bytes_per_logit
from megatron_adadpo.planner.inputs import PlanInput
from megatron_adadpo.planner.params import adapter_params, stage_params

GIB = 1024**3
RUNTIME_GIB = 2.0  # CUDA context + NCCL communicators + cuBLAS/TE workspaces, outside torch
ALLOCATOR_SLACK = 0.05  # fragmentation of the caching allocator on the dynamic part

PARTS = (
    "weights",
    "gradients",
    "optimizer",
    "activations",
    "logits",
    "workspace",
    "reference",
)


@dataclass(frozen=True)
class StageMemory:
    """Memory of one pipeline rank (all TP / DP ranks at that position are alike)."""

    pp_rank: int
    params: int
    layers: int
    in_flight_layers: float  # layer-micro-batches of activations held at the peak
    weights: float
    gradients: float
    optimizer: float
    activations: float
    logits: float
    workspace: float
    reference: float

    @property
    def allocated(self) -> float:
        return sum(getattr(self, p) for p in PARTS)

    @property
    def reserved(self) -> float:
        dynamic = self.activations + self.logits + self.workspace
        return self.allocated + ALLOCATOR_SLACK * dynamic + RUNTIME_GIB * GIB

    def to_dict(self) -> dict:
        return asdict(self) | {"allocated": self.allocated, "reserved": self.reserved}


def elem_bytes(p: PlanInput) -> int:
    return 2 if p.execution.bf16 else 4


def layer_activation_bytes(p: PlanInput, stored: bool = True) -> float:
    """Bytes one transformer layer keeps for backward, for one micro-batch on one rank.

    ``stored=False`` gives the full activations (no recompute): the transient working set of
    the layer being recomputed or back-propagated.
    """
    m, x = p.model, p.execution
    t, e = x.tp, elem_bytes(p)
    lin = 1 if x.fp8 else e
    rows, seq = p.micro_batch_shape
    s, b, h, f = seq / x.cp, rows, m.hidden_size, m.ffn_hidden_size
    q = m.num_attention_heads * m.head_dim
    kv = m.query_groups * m.head_dim
    t_sp = t if x.sequence_parallel else 1
    recompute = x.recompute if stored else None
    if recompute == "full":
        return e * s * b * h / t_sp / max(1, x.recompute_num_layers)
    replicated = (2 * e + 2 * lin) * s * b * h / t_sp
    swiglu = 2 * e * f if x.fusions else 3 * e * f  # fused SwiGLU saves only its input
    sharded = (e * (q + 2 * kv) + lin * q + swiglu + lin * f) * s * b / t
    heads = m.num_attention_heads / t
    if p.flash_attention:
        core = 4 * b * heads * s
    elif recompute == "selective":
        core = 0.0
    else:
        core = 2.5 * e * heads * s * s * b
    return replicated + sharded + core


def in_flight_layers(p: PlanInput, num_micro: int, pp_rank: int) -> float:
    """Layer-micro-batches of activations held by ``pp_rank`` at its peak (1F1B schedules)."""
    L, pp, vpp = p.model.num_layers, p.execution.pp, p.execution.vpp
    if vpp:
        chunks = min(num_micro * vpp, 2 * (pp - pp_rank - 1) + (vpp - 1) * pp + 1)
        return chunks * L / (pp * vpp)
    return min(pp - pp_rank, num_micro) * L / pp


def logits_bytes(p: PlanInput, chunk: int) -> float:
    """The last stage's log-prob transients for one micro-batch: the ``[s, 2b, V_pad/t]``
    logits, or with chunked log-probs (``chunk`` tokens, the resolved run's; 0: unchunked)
    one ``[chunk, V_pad/t]`` chunk (see the module doc)."""
    x = p.execution
    padded = p.model.padded_vocab_size(x.tp)
    vocab = padded / x.tp
    rows, seq = p.micro_batch_shape
    tokens = seq / x.cp * rows
    if not chunk:
        return tokens * vocab * (6 if x.bf16 else 8)
    e, h = elem_bytes(p), p.model.hidden_size
    transients = min(chunk, tokens) * vocab * chunk_bytes_per_logit(x.bf16)
    return max(transients, e * vocab * h) + 3 * e * tokens * h


def stage_memory(p: PlanInput, dp: int, num_micro: int, pp_rank: int, chunk: int) -> StageMemory:
    """Memory of pipeline rank ``pp_rank`` for ``dp`` data-parallel replicas (``chunk``: the
    resolved log-prob chunk tokens)."""
    x = p.execution
    sp = stage_params(p.model, x.tp, x.pp, pp_rank, x.vpp)
    n, e = sp.total, elem_bytes(p)
    trained = n
    if p.lora is not None:
        trained = adapter_params(p.model, p.lora, x.tp, x.pp, pp_rank)
        n += trained
    weights = e * n + (2 * sp.layers if x.fp8 else 0)
    optimizer = ((4 if x.bf16 else 0) + 8) * trained
    if p.distributed_optimizer:
        optimizer /= dp * x.cp
    layers = in_flight_layers(p, num_micro, pp_rank)
    workspace = layer_activation_bytes(p, stored=False) * (
        x.recompute_num_layers if x.recompute == "full" else 1
    )
    return StageMemory(
        pp_rank=pp_rank,
        params=n,
        layers=sp.num_layers,
        in_flight_layers=layers,
        weights=weights,
        gradients=p.grad_bytes * trained,
        optimizer=optimizer,
        activations=layers * layer_activation_bytes(p),
        logits=logits_bytes(p, chunk) if pp_rank == x.pp - 1 else 0.0,
        workspace=workspace,
        reference=e * n if p.reference == "resident" else 0.0,
    )


def memory_plan(p: PlanInput, dp: int, num_micro: int, chunk: int) -> list[StageMemory]:
    """Memory of every pipeline rank, first to last (``chunk``: the resolved log-prob chunk
    tokens, ``ResolvedRun.step.logprob_chunk_tokens``)."""
    return [stage_memory(p, dp, num_micro, r, chunk) for r in range(p.execution.pp)]

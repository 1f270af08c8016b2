"""The output layer and the vocab-parallel log-probs over chunks of tokens.

The micro-batch's ``[s, b, v/tp]`` logits never exist: for the tokens of the loss mask, ``c`` at
a time (``x`` = the output layer's input, ``W`` = its ``[v/tp, h]`` weight shard, or the tied
embedding's),

    logits_c = x_c W^T                                   [c, v/tp]
    log p(y_t) = -vocab_parallel_cross_entropy(logits_c)  (TP padding columns masked)

(``logprobs.consume_logits``: Megatron's CE, two scalar all-reduces per token, no vocab
gather). Per-token metrics asked for (``stats``: the shard's logit sums, and the entropy, arg-max
hit and ``log sum_v p_v^2`` of ``token_stats``) are taken from each chunk's logits before the CE
overwrites them; they carry no gradient, so backward does not recompute them. Forward keeps
only ``x``, the per-token results and each token's log-sum-exp over the true vocabulary,
``lse_t = logit_t[y_t] - log p(y_t)`` (``[n]`` fp32; the target logit is taken from the shard
that holds it before the CE overwrites the logits, and summed over TP in one ``[n]``
all-reduce). Backward recomputes each chunk's logits and applies the CE's gradient in
closed form, with no collective,

    d log p(y_t) / d logits_t = onehot(y_t) - exp(logits_t - lse_t)   (0 on TP padding columns)

(what Megatron's CE backward computes from its saved softmax), and accumulates

    dx_c = dlogits_c W,        dW += dlogits_c^T x_c

so at most one chunk's logits and their gradient exist at once. Tokens outside the loss mask
get no logits at all: their log-prob is returned as 0 (gradient 0). Selecting them costs one
host sync per micro-batch (their count sets the number of chunks).

Parallelism as Megatron's ``ColumnParallelLinear`` output layer: with sequence parallelism
``x`` arrives as ``[s/tp, b, h]``, is all-gathered over TP (again in backward: only the shard
is saved) and its gradient reduce-scattered; without, the gradient is all-reduced over TP.
Context parallelism needs nothing here (each CP rank has its slice of ``x`` and of the labels;
``sequence_logprobs`` reduces the sums). The weight gradient follows Megatron DDP's contract
for layers that accumulate into the fp32 grad buffer themselves (``ColumnParallelLinear`` with
gradient-accumulation fusion): each chunk's ``dW`` is added to ``weight.main_grad``,
``grad_added_to_main_grad`` is set and a dummy gradient is returned — zeros when
``zero_out_wgrad`` (tied embeddings on one stage: the embedding's own gradient arrives through
``.grad`` and DDP's hook adds it). Without ``main_grad`` (no DDP) it is returned as ``.grad``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from megatron_adadpo.logprobs import consume_logits, shard_logit_sums, true_vocab_columns
from megatron_adadpo.platform.megatron import output_layer_weight, tensor_parallel
from megatron_adadpo.token_stats import TOKEN_STATS, vocab_parallel_token_stats

LOGIT_SUM = "logit_sum"  # this TP shard's sum of logits over its true vocabulary columns
CHUNK_STATS = (LOGIT_SUM, *TOKEN_STATS)


@dataclass(frozen=True)
class OutputLayer:
    """What the chunked path needs of a model's output layer."""

    weight: torch.Tensor  # [v/tp, h]: the output layer's shard (or the tied embedding's)
    sequence_parallel: bool = False  # its input is [s/tp, b, h], all-gathered over TP


def model_output_layer(model) -> OutputLayer | None:
    """The output layer of a (DDP-wrapped) ``GPTModel`` chunk; None off the last stage."""
    found = output_layer_weight(model)
    return None if found is None else OutputLayer(*found)


@dataclass(frozen=True)
class _Plan:
    chunk_tokens: int
    tp_group: object
    vocab_size: int | None
    sequence_parallel: bool
    stats: tuple[str, ...]


def chunked_token_logprobs(
    hidden: torch.Tensor,
    layer: OutputLayer,
    labels: torch.Tensor,
    loss_mask: torch.Tensor | None,
    *,
    chunk_tokens: int,
    tp_group,
    vocab_size: int | None = None,
    stats: tuple[str, ...] = (),
):
    """Per-token log-probs of ``labels`` under ``hidden``'s logits, ``chunk_tokens`` at a time.

    Equal to ``token_logprobs(output_layer(hidden), labels, tp_group, vocab_size)`` on the loss
    mask (0 elsewhere), with the memory of one ``[chunk_tokens, v/tp]`` chunk. Labels may hold
    ignore markers (< 0). ``stats`` (names of :data:`CHUNK_STATS`) also returns, per token and
    without gradient, ``logit_sum``: the sum of logits over this TP shard's real vocabulary
    (``logprobs.shard_logit_sums``; all-reduce it over TP for the full vocabulary), and the
    ``token_stats`` of the same logits (already reduced over TP).

    Shapes:
        hidden: ``[s, b, h]`` (``[s/tp, b, h]`` with sequence parallelism), per token.
        labels, loss_mask: ``[b, s]`` (mask None: every token).
        returns: ``[b, s]`` fp32 per-token log-probs; with ``stats`` a pair
        ``(log-probs, {name: [b, s] fp32})`` (0 outside the mask).
    """
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
    unknown = sorted(set(stats) - set(CHUNK_STATS))
    if unknown:
        raise ValueError(f"unknown per-token stats {unknown}; known: {list(CHUNK_STATS)}")
    tp = dist.get_world_size(tp_group) if layer.sequence_parallel else 1
    seq = hidden.shape[0] * tp
    if hidden.dim() != 3 or labels.shape != (hidden.shape[1], seq):
        raise ValueError(
            f"hidden must be [s, b, h] ([s/tp, b, h] with sequence parallel) and labels [b, s]; "
            f"got hidden {tuple(hidden.shape)} (TP gather x{tp}) and labels {tuple(labels.shape)}"
        )
    keep = torch.ones_like(labels, dtype=torch.bool) if loss_mask is None else loss_mask > 0
    rows = keep.t().reshape(-1).nonzero().squeeze(1)  # flat [s * b] indices, s-major as hidden
    target = labels.t().reshape(-1).index_select(0, rows).clamp(min=0)
    plan = _Plan(chunk_tokens, tp_group, vocab_size, layer.sequence_parallel, tuple(stats))
    logps, values = _ChunkedOutputLogprobs.apply(hidden, layer.weight, rows, target, plan)
    logps = _to_batch_major(logps, rows, labels.shape)
    if not stats:
        return logps
    per_token = (_to_batch_major(v, rows, labels.shape) for v in values)
    return logps, dict(zip(stats, per_token, strict=True))


def _to_batch_major(values: torch.Tensor, rows: torch.Tensor, shape) -> torch.Tensor:
    """``[n]`` values at flat s-major ``rows`` -> ``[b, s]`` with 0 elsewhere."""
    b, s = shape
    full = values.new_zeros(s * b).index_copy(0, rows, values)
    return full.view(s, b).t()


class _ChunkedOutputLogprobs(torch.autograd.Function):
    """``(hidden, weight, rows, target) -> (log-probs [n], per-token stats [k, n])``."""

    @staticmethod
    def forward(ctx, hidden, weight, rows, target, plan: _Plan):
        x = _tokens(hidden, rows, plan)  # [n, h]
        n = x.shape[0]
        logps = torch.empty(n, dtype=torch.float32, device=x.device)
        target_logits = torch.empty_like(logps)  # this shard's logit of y_t, 0 elsewhere
        stats = torch.empty(len(plan.stats), n, dtype=torch.float32, device=x.device)
        for chunk in _chunks(n, plan.chunk_tokens):
            outputs = logps[chunk], target_logits[chunk], stats[:, chunk]
            _chunk_forward(x[chunk], weight, target[chunk], plan, *outputs)
        if dist.get_world_size(plan.tp_group) > 1:
            dist.all_reduce(target_logits, group=plan.tp_group)
        ctx.save_for_backward(hidden, weight, rows, target, target_logits - logps)  # lse [n]
        ctx.plan = plan
        ctx.mark_non_differentiable(stats)
        return logps, stats

    @staticmethod
    def backward(ctx, grad_logps, _grad_stats):
        hidden, weight, rows, target, lse = ctx.saved_tensors
        plan = ctx.plan
        x = _tokens(hidden, rows, plan)  # re-gathered over TP with sequence parallelism
        grad_x = torch.empty_like(x)
        weight_grad = _WeightGrad(weight)
        for chunk in _chunks(x.shape[0], plan.chunk_tokens):
            dlogits = _logits_grad(
                x[chunk], weight, target[chunk], lse[chunk], grad_logps[chunk], plan
            )
            torch.matmul(dlogits, weight, out=grad_x[chunk])
            weight_grad.add(dlogits, x[chunk])
            del dlogits  # before the next chunk's logits exist
        grad_hidden = _input_grad(grad_x, rows, hidden, plan)
        return grad_hidden, weight_grad.result(), None, None, None


def _chunks(n: int, size: int) -> list[slice]:
    """``ceil(n / size)`` slices of ``[0, n)`` of near-equal length (none longer than ``size``;
    no short tail chunk, whose matmuls would run below full speed)."""
    count = -(-n // size)
    return [slice(n * i // count, n * (i + 1) // count) for i in range(count)]


def _tokens(hidden: torch.Tensor, rows: torch.Tensor, plan: _Plan) -> torch.Tensor:
    """The output layer's input at ``rows``: ``[n, h]`` (all-gathered over TP with SP)."""
    if plan.sequence_parallel:
        hidden = tensor_parallel.gather_from_sequence_parallel_region(
            hidden, tensor_parallel_output_grad=True, group=plan.tp_group
        )
    return hidden.reshape(-1, hidden.shape[-1]).index_select(0, rows)


def _chunk_logits(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``[c, v/tp]`` fp32 logits of ``c`` tokens (matmul in the weight's dtype)."""
    return torch.matmul(x, weight.t()).float()


def _shard_targets(target: torch.Tensor, shard: int, plan: _Plan):
    """``(rows, columns)``: the tokens whose target lies in this rank's ``shard`` vocabulary
    columns (Megatron's ``[rank * shard, (rank + 1) * shard)``) and its local column. ``[k]``."""
    local = target - dist.get_rank(plan.tp_group) * shard
    rows = ((local >= 0) & (local < shard)).nonzero().squeeze(1)
    return rows, local.index_select(0, rows)


def _chunk_forward(x, weight, target, plan: _Plan, logps_out, target_out, stats_out) -> None:
    """One chunk's log-probs, this shard's target logits (0 where another rank holds the
    target) and per-token stats (``[k, c]``) into the output slices; its logits die here."""
    logits = _chunk_logits(x, weight)
    _chunk_stats(logits, target, plan, stats_out)
    rows, columns = _shard_targets(target, logits.shape[-1], plan)
    target_out.zero_().index_copy_(0, rows, logits[rows, columns])
    logps_out.copy_(consume_logits(logits, target, plan.tp_group, plan.vocab_size))


def _chunk_stats(logits, target, plan: _Plan, out: torch.Tensor) -> None:
    """``plan.stats`` of one chunk's ``[c, v/tp]`` logits into ``out`` ``[k, c]``."""
    if not plan.stats:
        return
    softmax = tuple(name for name in plan.stats if name != LOGIT_SUM)
    values = {}
    if softmax:
        values = vocab_parallel_token_stats(logits, target, softmax, plan.vocab_size, plan.tp_group)
    if LOGIT_SUM in plan.stats:
        values[LOGIT_SUM] = shard_logit_sums(logits, plan.vocab_size, plan.tp_group)
    for row, name in enumerate(plan.stats):
        out[row].copy_(values[name])


def _logits_grad(x, weight, target, lse, grad, plan: _Plan) -> torch.Tensor:
    """``d(sum_t grad_t log p(y_t)) / d logits = grad_t (onehot(y_t) - exp(logits_t - lse_t))``
    of one chunk, its logits recomputed; TP padding columns (outside the softmax) get 0.
    ``[c, h]`` x, ``[c]`` target, lse, grad -> ``[c, v/tp]`` in the weight's dtype."""
    dlogits = _chunk_logits(x, weight)
    dlogits.sub_(lse.unsqueeze(1)).exp_().mul_(grad.neg().unsqueeze(1))
    shard = dlogits.shape[-1]
    dlogits[:, true_vocab_columns(shard, plan.vocab_size, dist.get_rank(plan.tp_group)) :] = 0
    rows, columns = _shard_targets(target, shard, plan)
    dlogits.index_put_((rows, columns), grad.index_select(0, rows), accumulate=True)
    return dlogits.to(weight.dtype)


def _input_grad(grad_x: torch.Tensor, rows, hidden: torch.Tensor, plan: _Plan) -> torch.Tensor:
    """``[n, h]`` token gradients -> the gradient of ``hidden``, reduced over TP as the output
    layer's input gradient is (reduce-scatter with SP, all-reduce without)."""
    h = hidden.shape[-1]
    tp = dist.get_world_size(plan.tp_group)
    seq = hidden.shape[0] * (tp if plan.sequence_parallel else 1)
    full = grad_x.new_zeros(seq * hidden.shape[1], h).index_copy_(0, rows, grad_x)
    full = full.view(seq, hidden.shape[1], h)
    if plan.sequence_parallel:
        return tensor_parallel.reduce_scatter_to_sequence_parallel_region(full, group=plan.tp_group)
    if tp > 1:
        return tensor_parallel.reduce_from_tensor_model_parallel_region(full, group=plan.tp_group)
    return full


WGRAD_BLOCK_BYTES = 64 * 2**20  # largest param-dtype dW product held at once (bf16 runs)


class _WeightGrad:
    """``dW`` summed over chunks: into Megatron DDP's ``main_grad`` when the weight has one
    (see the module docstring), else into an fp32 buffer returned as ``.grad``."""

    def __init__(self, weight: torch.Tensor):
        self.weight = weight
        self.to_main_grad = hasattr(weight, "main_grad") and hasattr(
            weight, "grad_added_to_main_grad"
        )
        if self.to_main_grad:
            self.buffer = weight.main_grad
        else:
            self.buffer = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)

    def add(self, dlogits: torch.Tensor, x: torch.Tensor) -> None:
        """``buffer += dlogits^T x``; ``[c, v/tp]``, ``[c, h]`` -> ``[v/tp, h]``."""
        if self.buffer.dtype == dlogits.dtype:
            self.buffer.addmm_(dlogits.t(), x)
            return
        # bf16 products (as the unchunked layer's dW) summed in fp32, a block of vocabulary
        # rows at a time: never a whole [v/tp, h] bf16 product besides the buffer
        rows = max(1, WGRAD_BLOCK_BYTES // (x.shape[1] * x.element_size()))
        for block in _chunks(self.buffer.shape[0], rows):
            self.buffer[block].add_(torch.matmul(dlogits[:, block].t(), x))

    def result(self) -> torch.Tensor:
        weight = self.weight
        if not self.to_main_grad:
            return self.buffer.to(weight.dtype)
        weight.grad_added_to_main_grad = True
        if getattr(weight, "zero_out_wgrad", False):
            return torch.zeros_like(weight)
        return torch.empty_like(weight)

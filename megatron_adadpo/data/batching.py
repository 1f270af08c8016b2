"""Micro-batching policies: which pairs of a global batch each data-parallel rank runs, and how
they are grouped into micro-batches (pure Python + numpy; no torch, no collective).

The global batch is the ``G`` pairs the sampler gives for one optimizer step, in the sampler's
order (identical on every rank). ``lengths`` is int ``[G, 2]``: the chosen and rejected rows'
token counts (prompt + completion, BOS and EOS included). A plan is, per DP rank, a list of
micro-batches, each a tuple of positions into the global batch (collate order). Every rank
computes the whole plan from the same lengths, so the micro-batch count is identical on every
rank of a pipeline / tensor / context group without any communication, and a resumed run
(``consumed_samples`` unchanged) rebuilds the same plan.

Policies (``data.batching``):

- ``fixed``: ``train.micro_batch_size`` pairs per micro-batch in sampler order; micro-batch
  ``m`` of rank ``r`` holds positions ``[(m*DP + r)*mbs, (m*DP + r + 1)*mbs)`` (Megatron's
  ``MegatronPretrainingSampler`` layout). Rows ``[2*mbs, S]``, ``S`` = the micro-batch's longest
  row padded to ``pad_multiple``.
- ``token_budget``: pairs are dealt to DP ranks longest first, each to the rank with the fewest
  tokens so far (so ranks are balanced by tokens, not pairs); each rank's pairs, longest first,
  fill micro-batches while ``2 * pairs * S <= max_tokens_per_micro_batch``. Sorting makes the
  rows of a micro-batch similar in length, so little is padding.
- ``packed``: the same deal; each rank's pairs are packed first-fit decreasing into rows of at
  most ``max_tokens_per_micro_batch`` tokens, one row per micro-batch, a pair's chosen and
  rejected adjacent (``data/packing.py`` collates it with a segment id per token). Each
  sequence is padded to ``segment_multiple`` (Transformer Engine's THD format with context
  parallelism: ``2*CP``), the row to ``pad_multiple``. Under a pipeline (``fixed_rows``) all
  micro-batches of a rank's step have one shape, so the pipeline sends activations without
  exchanging shapes first (``model/build.py``): the first-fit rows are rebalanced (pairs
  dealt longest first onto ``n`` rows, the ``n`` with the least ``n x longest row``), and
  every row is padded to the step's longest (``step_row_tokens``, at most the budget).

A pair is never split across ranks, micro-batches or rows. ``microbatch_multiple`` (the
interleaved schedule's ``PP``) rounds each rank's micro-batch count up to a multiple by
splitting the micro-batches holding most pairs; ranks then get equal pair counts (a multiple of
``PP`` by the layout rules) so the split always exists.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

import numpy as np

from megatron_adadpo.data.config import BATCHING

Plan = list[list[tuple[int, ...]]]  # [DP rank][micro-batch] -> positions in the global batch


def round_up(n, multiple: int):
    """``n`` rounded up to a multiple of ``multiple`` (ints or int arrays)."""
    return -(-n // multiple) * multiple


@dataclass(frozen=True)
class BatchingPolicy:
    """How one global batch becomes micro-batches (see the module docstring).

    Attributes:
        mode: "fixed" | "token_budget" | "packed".
        micro_batch_size: pairs per micro-batch (fixed only).
        max_tokens: tokens per micro-batch, padding included (token_budget, packed).
        pad_multiple: the layout's sequence multiple (``ExecutionConfig.pad_multiple``).
        segment_multiple: packed sequences are each padded to this (THD with CP: ``2*CP``).
        microbatch_multiple: each rank's micro-batch count is a multiple of this (the
            interleaved schedule's ``PP``; 1 otherwise).
        fixed_rows: packed rows of one rank's step all have the same length (pipelines).
    """

    mode: str = "fixed"
    micro_batch_size: int = 1
    max_tokens: int | None = None
    pad_multiple: int = 1
    segment_multiple: int = 1
    microbatch_multiple: int = 1
    fixed_rows: bool = False

    def padded_tokens(self, lengths: np.ndarray, micro: tuple[int, ...]) -> int:
        """Tokens the model processes for one micro-batch, padding included."""
        rows = lengths[list(micro)]
        if self.mode == "packed":
            return int(
                round_up(int(round_up(rows, self.segment_multiple).sum()), self.pad_multiple)
            )
        return 2 * len(micro) * int(round_up(int(rows.max()), self.pad_multiple))

    def pair_tokens(self, lengths: np.ndarray) -> np.ndarray:
        """int ``[G]``: the tokens each pair needs alone in a micro-batch (budget units)."""
        if self.mode == "packed":
            return round_up(lengths, self.segment_multiple).sum(axis=1)
        return 2 * round_up(lengths.max(axis=1), self.pad_multiple)

    def step_row_tokens(self, lengths: np.ndarray, micro_batches: list[tuple[int, ...]]):
        """The length every packed row of one rank's step is padded to (``fixed_rows``): the
        longest, a multiple of ``pad_multiple`` within the budget; None: each its own."""
        if not (self.fixed_rows and micro_batches):
            return None
        return max(self.padded_tokens(lengths, micro) for micro in micro_batches)

    def longest_pair_tokens(self, max_length: int) -> int:
        """Budget units of the longest pair ``data.max_length`` allows (two rows of it)."""
        return self.padded_tokens(np.array([[max_length, max_length]]), (0,))


def plan_global_batch(policy: BatchingPolicy, lengths: np.ndarray, dp_size: int) -> Plan:
    """Every DP rank's micro-batches for one global batch (``lengths`` int ``[G, 2]``)."""
    lengths = np.asarray(lengths, dtype=np.int64).reshape(-1, 2)
    if policy.mode == "fixed":
        return _fixed_plan(len(lengths), policy.micro_batch_size, dp_size)
    if policy.mode not in BATCHING:
        raise ValueError(f"data.batching={policy.mode!r}: use one of {', '.join(BATCHING)}")
    _check_budget(policy, lengths)
    cap = len(lengths) // dp_size if policy.microbatch_multiple > 1 else None
    ranks = deal_by_tokens(lengths.sum(axis=1), dp_size, cap)
    group = _pack_rows if policy.mode == "packed" else _fill_budget
    plan = [group(policy, lengths, positions) for positions in ranks]
    return [_split_to_multiple(micro, policy.microbatch_multiple) for micro in plan]


def _fixed_plan(num_pairs: int, mbs: int, dp_size: int) -> Plan:
    step = mbs * dp_size
    return [
        [tuple(range(s + r * mbs, s + (r + 1) * mbs)) for s in range(0, num_pairs, step)]
        for r in range(dp_size)
    ]


def deal_by_tokens(tokens: np.ndarray, dp_size: int, cap: int | None = None) -> list[list[int]]:
    """Positions per rank: longest first, each to the rank with the fewest tokens so far
    (ties: lower rank; equal tokens: earlier position). ``cap``: at most this many pairs per
    rank (with ``G = cap * dp_size``, every rank gets exactly ``cap``)."""
    order = np.lexsort((np.arange(len(tokens)), -np.asarray(tokens)))
    heap = [(0, rank) for rank in range(dp_size)]
    ranks: list[list[int]] = [[] for _ in range(dp_size)]
    for position in order.tolist():
        load, rank = heapq.heappop(heap)
        ranks[rank].append(position)
        if cap is None or len(ranks[rank]) < cap:
            heapq.heappush(heap, (load + int(tokens[position]), rank))
    return ranks


def _longest_first(policy: BatchingPolicy, lengths: np.ndarray, positions: list[int]):
    """``(position, budget units)`` of the positions, longest first (ties: earlier first)."""
    need = policy.pair_tokens(lengths)
    return sorted(((p, int(need[p])) for p in positions), key=lambda pn: (-pn[1], pn[0]))


def _fill_budget(policy: BatchingPolicy, lengths: np.ndarray, positions: list[int]):
    """Consecutive longest-first pairs while ``2 * pairs * padded_longest <= max_tokens`` (the
    first pair of a micro-batch is its longest: ``need`` = its ``2 * padded_longest``)."""
    micro: list[tuple[int, ...]] = []
    current: list[int] = []
    row = 0  # 2 x the padded longest row of the current micro-batch
    for p, need in _longest_first(policy, lengths, positions):
        if current and (len(current) + 1) * row > policy.max_tokens:
            micro.append(tuple(current))
            current = []
        row = row if current else need
        current.append(p)
    if current:
        micro.append(tuple(current))
    return micro


def _pack_rows(policy: BatchingPolicy, lengths: np.ndarray, positions: list[int]):
    """First-fit decreasing into rows of at most ``max_tokens`` (padding included)."""
    rows: list[list[int]] = []
    used = np.zeros(len(positions), dtype=np.int64)  # segment-padded tokens of each row
    for p, need in _longest_first(policy, lengths, positions):
        fits = round_up(used[: len(rows)] + need, policy.pad_multiple) <= policy.max_tokens
        k = int(np.argmax(fits)) if fits.any() else len(rows)
        if k == len(rows):
            rows.append([])
        rows[k].append(p)
        used[k] += need
    if policy.fixed_rows:
        return _balanced(policy, lengths, [tuple(row) for row in rows])
    return [tuple(row) for row in rows]


def _balanced(policy: BatchingPolicy, lengths: np.ndarray, rows: list[tuple[int, ...]]):
    """Rows of one length for a fixed-shape step, with as little padding as found: for each
    row count ``n`` from the first-fit count up to twice it (multiples of
    ``microbatch_multiple``, which needs no split), the pairs dealt longest first onto ``n``
    rows, each to the row with the fewest tokens so far; of those and the first-fit rows
    (when their count needs no split), the least ``rows * longest row`` (fewest rows on ties),
    every row within the budget."""
    positions = [p for row in rows for p in row]
    need = policy.pair_tokens(lengths)[positions]
    step = policy.microbatch_multiple
    best, cost = rows, None
    if len(rows) % step == 0:
        cost = len(rows) * max(policy.padded_tokens(lengths, r) for r in rows)
    for n in range(round_up(len(rows), step), min(len(positions), 2 * len(rows)) + 1, step):
        dealt = [tuple(positions[i] for i in r) for r in deal_by_tokens(need, n)]
        longest = max(policy.padded_tokens(lengths, r) for r in dealt)
        if longest <= policy.max_tokens and (cost is None or n * longest < cost):
            best, cost = dealt, n * longest
    return best


def _split_to_multiple(micro: list[tuple[int, ...]], multiple: int) -> list[tuple[int, ...]]:
    """Split the micro-batches holding most pairs in halves until ``len % multiple == 0``."""
    micro = list(micro)
    while len(micro) % multiple:
        widest = max(range(len(micro)), key=lambda i: (len(micro[i]), -i))
        pairs = micro[widest]
        if len(pairs) < 2:
            raise ValueError(
                f"{sum(map(len, micro))} pairs cannot form a multiple of {multiple} "
                "micro-batches (interleaved pipeline); raise train.global_batch_size"
            )
        half = (len(pairs) + 1) // 2
        micro[widest : widest + 1] = [pairs[:half], pairs[half:]]
    return micro


def _check_budget(policy: BatchingPolicy, lengths: np.ndarray) -> None:
    """A pair that alone exceeds the budget (data longer than ``data.max_length``)."""
    need = policy.pair_tokens(lengths)
    worst = int(np.argmax(need))
    if need[worst] > policy.max_tokens:
        raise ValueError(
            f"data.max_tokens_per_micro_batch={policy.max_tokens} is smaller than a pair of "
            f"{need[worst]} tokens (rows of {lengths[worst].tolist()} tokens, padded); a pair is "
            "never split: raise it to at least 2 x the longest row"
        )

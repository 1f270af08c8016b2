"""Sequence-length padding a parallel layout needs (pure Python: the planner imports it)."""

from __future__ import annotations

import math


def pad_multiple(tp: int = 1, cp: int = 1, sequence_parallel: bool = False) -> int:
    """Multiple the sequence length must be padded to.

    `tp` when sequence parallel (the sequence is split over TP ranks), times `2 * cp` when
    context parallel (Megatron's load-balanced CP splits the sequence into 2 * CP chunks);
    combined with lcm.
    """
    m = 1
    if sequence_parallel and tp > 1:
        m = math.lcm(m, tp)
    if cp > 1:
        m = math.lcm(m, 2 * cp)
    return m

"""Fit a tokenized pair into `max_length` / `max_prompt_length`.

Policy `truncate`:
  1. A prompt longer than `max_prompt_length` keeps its END (the question nearest the answer);
     its BOS stays in front: `[BOS] + prompt[-(max_prompt_length - 1):]`.
  2. Each completion keeps its START, cut to `max_length - len(prompt)` tokens (a cut
     completion loses its EOS).
  3. If no room is left for a completion (the prompt alone reaches `max_length`, possible when
     `max_prompt_length` is None or equals `max_length`), the pair is dropped:
     `RowRejected("completion_emptied", ...)`.
Policy `drop`: a pair whose prompt exceeds `max_prompt_length` or whose prompt + longer
completion exceeds `max_length` is dropped: `RowRejected("overlength_dropped", ...)`.
Every truncation and drop is counted by the caller (see report.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .report import RowRejected
from .tokenize import TokenizedPair


@dataclass(frozen=True)
class Truncated:
    """Result of `truncate_pair`: the pair that fits, and which of its parts were cut."""

    pair: TokenizedPair
    prompt_truncated: bool = False
    chosen_truncated: bool = False
    rejected_truncated: bool = False


def _keep_prompt_end(prompt: np.ndarray, limit: int, bos_id: int | None) -> np.ndarray:
    if bos_id is not None and len(prompt) and prompt[0] == bos_id:
        keep = limit - 1
        tail = prompt[len(prompt) - keep :] if keep > 0 else prompt[:0]
        return np.concatenate([prompt[:1], tail])
    return prompt[len(prompt) - limit :]


def truncate_pair(
    pair: TokenizedPair,
    max_length: int,
    max_prompt_length: int | None,
    overlength: str = "truncate",
    bos_id: int | None = None,
) -> Truncated:
    """Apply the over-length policy to one pair (token counts include BOS and EOS).

    Raises:
        RowRejected: `overlength_dropped` or `completion_emptied` (see the module docstring).
    """
    p, c, r = len(pair.prompt), len(pair.chosen), len(pair.rejected)
    prompt_over = max_prompt_length is not None and p > max_prompt_length
    if overlength == "drop":
        if prompt_over or p + max(c, r) > max_length:
            raise RowRejected(
                "overlength_dropped",
                f"prompt {p} tokens (limit {max_prompt_length}), prompt + longer "
                f"completion {p + max(c, r)} tokens (limit {max_length})",
            )
        return Truncated(pair)
    prompt = pair.prompt
    if prompt_over:
        prompt = _keep_prompt_end(prompt, max_prompt_length, bos_id)
    room = max_length - len(prompt)
    if room <= 0:
        raise RowRejected(
            "completion_emptied",
            f"the prompt has {len(prompt)} tokens, leaving no room for a completion "
            f"under max_length={max_length}; lower max_prompt_length",
        )
    out = TokenizedPair(prompt, pair.chosen[:room], pair.rejected[:room], pair.pair_id)
    return Truncated(out, prompt_over, c > room, r > room)

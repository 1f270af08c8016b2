"""Fit a tokenized pair into `max_length` / `max_prompt_length`.

Policy `truncate`:
  1. A prompt longer than `max_prompt_length` keeps its END (the question nearest the answer);
     its BOS stays in front: `[BOS] + prompt[-(max_prompt_length - 1):]`.
  2. `truncation_mode: keep_start` (TRL's default, `DataCollatorForPreference`: each sequence
     keeps `ids[:max_length]`): each completion keeps its START, cut to
     `max_length - len(prompt)` tokens (a cut completion loses its EOS). If no room is left for
     a completion (the prompt alone reaches `max_length`, possible when `max_prompt_length` is
     None or equals `max_length`), the pair is dropped: `RowRejected("completion_emptied")`
     (TRL 1.16 drops such rows too, `DPOTrainer._prepare_dataset`).
  3. `truncation_mode: keep_end` (TRL: each sequence keeps `ids[-max_length:]`): the sequence
     loses its START. With L = `max_length` and m = max(len(chosen), len(rejected)): a
     completion longer than L - 1 keeps its last L - 1 tokens, and the prompt keeps its last
     L - min(m, L - 1) tokens (BOS included in the cut, as in TRL). The longer sequence is then
     exactly TRL's; the chosen and rejected sequences share one prompt here, so the shorter one
     keeps the same prompt suffix where TRL keeps up to m - its length more prompt tokens
     (fewer context tokens, the same completion). A prompt keeps at least one token (the token
     before the first scored one), where TRL, for a completion of L tokens or more, keeps none
     and scores the completion's last L - 1 tokens after its own token L from the end.
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
    truncation_mode: str = "keep_start",
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
    if truncation_mode == "keep_end":
        return _keep_sequence_end(pair, prompt, max_length, prompt_over)
    room = max_length - len(prompt)
    if room <= 0:
        raise RowRejected(
            "completion_emptied",
            f"the prompt has {len(prompt)} tokens, leaving no room for a completion "
            f"under max_length={max_length}; lower max_prompt_length",
        )
    out = TokenizedPair(prompt, pair.chosen[:room], pair.rejected[:room], pair.pair_id)
    return Truncated(out, prompt_over, c > room, r > room)


def _keep_sequence_end(
    pair: TokenizedPair, prompt: np.ndarray, max_length: int, prompt_over: bool
) -> Truncated:
    """`truncation_mode: keep_end` (module docstring, 3.) on a prompt already cut to
    `max_prompt_length`."""
    keep = max_length - 1  # the most completion tokens: one prompt token stays in front
    chosen, rejected = pair.chosen[-keep:], pair.rejected[-keep:]
    room = max_length - max(len(chosen), len(rejected))
    cut = len(prompt) > room
    prompt = prompt[len(prompt) - room :] if cut else prompt
    out = TokenizedPair(prompt, chosen, rejected, pair.pair_id)
    return Truncated(out, prompt_over or cut, len(pair.chosen) > keep, len(pair.rejected) > keep)

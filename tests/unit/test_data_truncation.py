"""Truncation edge cases against hand-written expectations, and the counts in the manifest."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from megatron_adadpo.data import (
    DataConfig,
    RowRejected,
    TokenizedPair,
    load_preference_dataset,
    preprocess,
)
from megatron_adadpo.data.truncation import truncate_pair

DATA = Path(__file__).resolve().parents[2] / "examples" / "data"


def pair(prompt, chosen, rejected):
    a = lambda x: np.asarray(x, dtype=np.int64)  # noqa: E731
    return TokenizedPair(a(prompt), a(chosen), a(rejected), pair_id=0)


P = [1, 5, 6, 7, 8, 9]  # BOS + 5 prompt tokens
C = [20, 21, 22, 2]  # chosen answer + EOS
R = [30, 2]


def test_prompt_longer_than_the_limit_keeps_bos_and_its_end():
    out = truncate_pair(pair(P, C, R), max_length=20, max_prompt_length=4, bos_id=1)
    assert out.pair.prompt.tolist() == [1, 7, 8, 9]
    assert out.pair.chosen.tolist() == C and out.pair.rejected.tolist() == R
    assert (out.prompt_truncated, out.chosen_truncated, out.rejected_truncated) == (1, 0, 0)


def test_prompt_exactly_at_the_limit_is_untouched():
    out = truncate_pair(
        pair(P, C, R), max_length=len(P) + len(C), max_prompt_length=len(P), bos_id=1
    )
    assert out.pair.prompt.tolist() == P and out.pair.chosen.tolist() == C
    assert not (out.prompt_truncated or out.chosen_truncated or out.rejected_truncated)
    kept = truncate_pair(pair(P, C, R), len(P) + len(C), len(P), overlength="drop", bos_id=1)
    assert kept.pair is not None


def test_completions_keep_their_start():
    out = truncate_pair(pair(P, C, R), max_length=len(P) + 2, max_prompt_length=None, bos_id=1)
    assert out.pair.prompt.tolist() == P
    assert out.pair.chosen.tolist() == [20, 21] and out.pair.rejected.tolist() == R
    assert (out.chosen_truncated, out.rejected_truncated) == (True, False)


def test_completion_emptied_is_dropped():
    with pytest.raises(RowRejected) as err:
        truncate_pair(pair(P, C, R), max_length=len(P), max_prompt_length=None, bos_id=1)
    assert err.value.reason == "completion_emptied"
    assert err.value.detail.startswith(f"the prompt has {len(P)} tokens")
    with pytest.raises(RowRejected) as err:
        truncate_pair(pair(P, C, R), max_length=4, max_prompt_length=4, bos_id=1)
    assert err.value.reason == "completion_emptied"
    # The prompt was truncated first (6 -> 4 tokens), then left no room.
    assert err.value.detail.startswith("the prompt has 4 tokens") and len(P) > 4


def test_drop_policy():
    for max_len, mpl in ((20, 5), (len(P) + len(C) - 1, None)):
        with pytest.raises(RowRejected) as err:
            truncate_pair(pair(P, C, R), max_len, mpl, overlength="drop", bos_id=1)
        assert err.value.reason == "overlength_dropped"


def test_manifest_counts_match_lengths_counted_by_hand(tmp_path):
    src = (str(DATA / "prefs_train.jsonl"),)
    tok = str(DATA / "tokenizer")
    full = load_preference_dataset(
        DataConfig(
            inputs=src,
            tokenizer=tok,
            max_length=512,
            max_prompt_length=256,
            cache_dir=str(tmp_path),
        )
    )
    lens = full.lengths()  # [n, 3]: prompt, chosen, rejected (untruncated here)
    max_len, mpl = 24, 14
    p = np.minimum(lens[:, 0], mpl)
    room = max_len - p
    expect = {
        "prompt_truncated": int((lens[:, 0] > mpl).sum()),
        "chosen_truncated": int((lens[:, 1] > room).sum()),
        "rejected_truncated": int((lens[:, 2] > room).sum()),
        "pairs_written": len(full),
    }
    cfg = DataConfig(inputs=src, tokenizer=tok, max_length=max_len, max_prompt_length=mpl)
    manifest, _ = preprocess(cfg, str(tmp_path / "cut"), progress=False)
    assert expect["prompt_truncated"] > 0 and expect["chosen_truncated"] > 0
    assert {k: manifest["counts"][k] for k in expect} == expect
    assert sum(manifest["length_histogram"]["counts"]) == len(full)

    drop = cfg.replace(overlength="drop")
    over = (lens[:, 0] > mpl) | (lens[:, 0] + lens[:, 1:].max(1) > max_len)
    manifest, report = preprocess(drop, str(tmp_path / "drop"), progress=False)
    assert manifest["counts"]["dropped_overlength_dropped"] == int(over.sum())
    assert manifest["num_pairs"] == len(full) - int(over.sum())
    assert {i.reason for i in report.issues} == {"overlength_dropped"}

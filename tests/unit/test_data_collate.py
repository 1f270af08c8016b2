"""collate_pairs: the docstring example, masks on real data, padding rules."""

from __future__ import annotations

import doctest
from pathlib import Path

import pytest
import torch

import megatron_adadpo.data.collate as collate_module
from megatron_adadpo.data import (
    DataConfig,
    PreferenceSampler,
    collate_pairs,
    load_preference_dataset,
    pad_multiple,
)

DATA = Path(__file__).resolve().parents[2] / "examples" / "data"
EX = {
    "chosen_ids": [1, 10, 11, 20, 2],
    "rejected_ids": [1, 10, 11, 30, 31, 2],
    "prompt_length": 3,
    "pair_id": 7,
}


def test_docstring_example_runs():
    result = doctest.testmod(collate_module, verbose=False)
    assert result.attempted >= 6 and result.failed == 0


def test_example_tensors_written_by_hand():
    b = collate_pairs([EX, {**EX, "pair_id": 9}], pad_token_id=0, pad_to_multiple_of=4)
    assert set(b) == {"tokens", "labels", "loss_mask", "position_ids", "pair_ids", "real_tokens"}
    t = torch.tensor
    assert torch.equal(
        b["tokens"][:2], t([[1, 10, 11, 20, 2, 0, 0, 0], [1, 10, 11, 30, 31, 2, 0, 0]])
    )
    assert torch.equal(
        b["labels"][:2], t([[10, 11, 20, 2, 0, 0, 0, 0], [10, 11, 30, 31, 2, 0, 0, 0]])
    )
    assert torch.equal(
        b["loss_mask"][:2], t([[0.0, 0, 1, 1, 0, 0, 0, 0], [0.0, 0, 1, 1, 1, 0, 0, 0]])
    )
    assert torch.equal(b["tokens"][2:], b["tokens"][:2])  # pair 2 at rows 2, 3
    assert torch.equal(b["pair_ids"], t([7, 9]))
    assert torch.equal(b["loss_mask"].sum(1), t([2.0, 3, 2, 3]))  # completion lengths
    assert b["tokens"].dtype == b["labels"].dtype == b["position_ids"].dtype == torch.int64
    assert b["loss_mask"].dtype == torch.float32 and "attention_mask" not in b


def test_masks_on_bundled_data(tmp_path):
    cfg = DataConfig(
        inputs=(str(DATA / "prefs_train.jsonl"),),
        tokenizer=str(DATA / "tokenizer"),
        max_length=64,
        max_prompt_length=32,
        cache_dir=str(tmp_path),
        chat_template="always",
        chat_template_tail="strip",  # every completion ends at EOS
    )
    ds = load_preference_dataset(cfg)
    pad = ds.pad_id
    for idx in itertools_take(PreferenceSampler(len(ds), 8, 4, 0, 1, seed=0), 20):
        exs = [ds[i] for i in idx]
        b = collate_pairs(exs, pad, pad_to_multiple_of=8)
        s = b["tokens"].shape[1]
        assert s % 8 == 0 and b["tokens"].shape[0] == 2 * len(idx)
        for row in range(2 * len(idx)):
            ex = exs[row // 2]
            ids = ex["chosen_ids"] if row % 2 == 0 else ex["rejected_ids"]
            p, n = ex["prompt_length"], len(ids)
            # Position t predicts token t + 1: completion tokens are ids[p:] (EOS included).
            expected = torch.zeros(s)
            expected[p - 1 : n - 1] = 1
            assert torch.equal(b["loss_mask"][row], expected)
            assert b["labels"][row, n - 2].item() == 2  # the last label with loss is EOS
            assert (b["tokens"][row, n:] == pad).all() and (b["labels"][row, n - 1 :] == pad).all()
        completion_lengths = [
            len(ex[key]) - ex["prompt_length"]
            for ex in exs
            for key in ("chosen_ids", "rejected_ids")
        ]
        assert b["loss_mask"].sum(1).long().tolist() == completion_lengths


def itertools_take(sampler, n):
    it = iter(sampler)
    return [next(it) for _ in range(n)]


def test_padding_multiple_and_refusal():
    b = collate_pairs([EX], pad_token_id=0, pad_to_multiple_of=16)
    assert b["tokens"].shape == (2, 16) and b["position_ids"][1, 15].item() == 15
    with pytest.raises(ValueError, match="prompt_length"):
        collate_pairs([{**EX, "prompt_length": 5}], pad_token_id=0)


def test_pad_multiple():
    assert pad_multiple(1, 1, False) == 1
    assert pad_multiple(4, 1, False) == 1  # no sequence parallel: any length works
    assert pad_multiple(4, 1, True) == 4
    assert pad_multiple(2, 2, False) == 4
    assert pad_multiple(4, 2, True) == 8  # (S/CP) % TP: tests/unit/test_layout_padding.py
    assert pad_multiple(6, 2, True) == 12

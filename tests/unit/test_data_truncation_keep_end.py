"""``data.truncation_mode`` against TRL 1.16.0's own definition (its ``DataCollatorForPreference``
truncates each sequence: ``ids[:max_length]`` under keep_start, ``ids[-max_length:]`` under
keep_end), and its place in the recorded truncation policy of preprocessed data."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from megatron_adadpo.data import DataConfig, TokenizedPair, load_preference_dataset, preprocess
from megatron_adadpo.data.truncation import truncate_pair

DATA = Path(__file__).resolve().parents[2] / "examples" / "data"


def trl_sequences(prompt, chosen, rejected, max_length: int, mode: str) -> list[tuple]:
    """TRL's (ids, completion mask) of the chosen and the rejected sequence, padding removed."""
    dpo_trainer = pytest.importorskip("trl.trainer.dpo_trainer", reason="TRL is the oracle")
    collator = dpo_trainer.DataCollatorForPreference(
        pad_token_id=0, max_length=max_length, truncation_mode=mode
    )
    example = {"prompt_ids": prompt, "chosen_ids": chosen, "rejected_ids": rejected}
    out = collator.torch_call([example])
    rows = []
    for i in range(2):
        n = int(out["attention_mask"][i].sum())
        rows.append((out["input_ids"][i, :n].tolist(), out["completion_mask"][i, :n].tolist()))
    return rows


def ours(prompt, chosen, rejected, max_length: int, mode: str) -> list[tuple]:
    a = lambda x: np.asarray(x, dtype=np.int64)  # noqa: E731
    pair = TokenizedPair(a(prompt), a(chosen), a(rejected), pair_id=0)
    cut = truncate_pair(pair, max_length, None, bos_id=1, truncation_mode=mode).pair
    p = cut.prompt.tolist()
    return [(p + c.tolist(), [0] * len(p) + [1] * len(c)) for c in (cut.chosen, cut.rejected)]


def scored(ids: list, mask: list) -> list:
    """The tokens a next-token log-prob scores: completion tokens after the first position."""
    return [t for t, m in zip(ids[1:], mask[1:], strict=True) if m]


def _random_pairs(n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    for _ in range(n):
        p, c, r = (int(x) for x in rng.integers(1, 14, size=3))
        prompt = [1, *rng.integers(3, 99, size=p - 1).tolist()] if p > 1 else [1]
        chosen = [*rng.integers(100, 199, size=c - 1).tolist(), 2]
        rejected = [*rng.integers(200, 299, size=r - 1).tolist(), 2]
        yield prompt, chosen, rejected, int(rng.integers(2, 24))


def test_keep_end_matches_trl_on_the_longer_sequence_and_scores_trl_tokens():
    """The longer sequence equals TRL's wherever TRL keeps a prompt token; the shorter one
    keeps the same completion and a suffix of TRL's context; every sequence scores exactly the
    completion tokens TRL scores (``docs/data.md``: the one prompt shared by both answers)."""
    cases = {"longer_exact": 0, "shorter_suffix": 0, "completion_over": 0}
    for prompt, chosen, rejected, length in _random_pairs(400):
        trl = trl_sequences(prompt, chosen, rejected, length, "keep_end")
        mine = ours(prompt, chosen, rejected, length, "keep_end")
        longest = max(len(chosen), len(rejected))
        for (ids, mask), (want_ids, want_mask), completion in zip(
            mine, trl, (chosen, rejected), strict=True
        ):
            assert len(ids) <= length
            assert scored(ids, mask) == scored(want_ids, want_mask)
            if longest >= length:  # TRL keeps no prompt; one prompt token stays here
                cases["completion_over"] += 1
            elif len(completion) == longest:
                assert (ids, mask) == (want_ids, want_mask)
                cases["longer_exact"] += len(prompt) + longest > length
            else:
                assert want_ids[len(want_ids) - len(ids) :] == ids
                cases["shorter_suffix"] += len(ids) < len(want_ids)
    assert all(cases.values()), cases  # every branch was exercised


def test_keep_start_matches_trl_where_a_completion_token_survives():
    for prompt, chosen, rejected, length in _random_pairs(400, seed=1):
        if len(prompt) >= length:  # TRL drops these rows too (its _prepare_dataset filter)
            continue
        trl = trl_sequences(prompt, chosen, rejected, length, "keep_start")
        assert ours(prompt, chosen, rejected, length, "keep_start") == trl


def test_keep_end_reports_what_it_cut():
    a = lambda x: np.asarray(x, dtype=np.int64)  # noqa: E731
    pair = TokenizedPair(a([1, 5, 6, 7]), a([20, 21, 22, 2]), a([30, 2]), pair_id=0)
    out = truncate_pair(pair, 6, None, bos_id=1, truncation_mode="keep_end")
    assert out.pair.prompt.tolist() == [6, 7] and out.pair.chosen.tolist() == [20, 21, 22, 2]
    assert (out.prompt_truncated, out.chosen_truncated, out.rejected_truncated) == (1, 0, 0)
    out = truncate_pair(pair, 4, None, bos_id=1, truncation_mode="keep_end")
    assert out.pair.prompt.tolist() == [7] and out.pair.chosen.tolist() == [21, 22, 2]
    assert (out.prompt_truncated, out.chosen_truncated, out.rejected_truncated) == (1, 1, 0)


def test_keep_end_under_drop_is_refused_naming_both_fields():
    with pytest.raises(ValueError, match="data.truncation_mode=keep_end.*data.overlength=drop"):
        DataConfig(
            inputs=("x.jsonl",), tokenizer="t", overlength="drop", truncation_mode="keep_end"
        )
    with pytest.raises(ValueError, match="data.truncation_mode='keep_middle'"):
        DataConfig(inputs=("x.jsonl",), tokenizer="t", truncation_mode="keep_middle")


def test_the_recorded_policy_includes_the_mode(tmp_path):
    """A preprocessed directory made with one mode is refused under the other (naming the
    field); an on-the-fly cache is a new entry (another identity); keep_start records nothing
    new, so directories made before the option still load."""
    cfg = DataConfig(
        inputs=(str(DATA / "prefs_train.jsonl"),),
        tokenizer=str(DATA / "tokenizer"),
        max_length=24,
        max_prompt_length=None,
        cache_dir=str(tmp_path / "cache"),
    )
    end = cfg.replace(truncation_mode="keep_end")
    assert "truncation_mode" not in cfg.identity_settings()
    assert end.identity_settings()["truncation_mode"] == "keep_end"
    start_set, end_set = load_preference_dataset(cfg), load_preference_dataset(end)
    assert start_set.identity != end_set.identity
    assert any(
        start_set[i]["chosen_ids"].tolist() != end_set[i]["chosen_ids"].tolist()
        for i in range(len(end_set))
    )
    for made, used in ((end, cfg), (cfg, end)):
        out = tmp_path / made.truncation_mode
        preprocess(made, str(out), progress=False)
        load_preference_dataset(made.replace(preprocessed=str(out)))
        with pytest.raises(ValueError, match=f"truncation_mode='{made.truncation_mode}'"):
            load_preference_dataset(used.replace(preprocessed=str(out)))

"""Micro-batching policies (``data/batching.py``), their config refusals and the length
profiles (``data/length_profile.py``): pure functions, checked against independent references
(the per-rank ``PreferenceSampler`` layout, brute-force budget and coverage checks)."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest

from megatron_adadpo.config import ConfigError, load_config
from megatron_adadpo.data import PreferenceSampler
from megatron_adadpo.data.batching import BatchingPolicy, deal_by_tokens, plan_global_batch
from megatron_adadpo.data.length_profile import (
    PROMPT_MEAN,
    RESPONSE_MEAN,
    TEMPLATE_TOKENS,
    HistogramProfile,
    UltraFeedbackProfile,
)

QUICKSTART = str(Path(__file__).resolve().parents[2] / "examples/configs/quickstart.yaml")
LENGTHS = UltraFeedbackProfile(max_length=512, max_prompt_length=256).row_lengths(64, seed=3)


def _covered_once(plan, num_pairs):
    positions = [p for rank in plan for micro in rank for p in micro]
    return sorted(positions) == list(range(num_pairs))


def test_fixed_plan_is_the_per_rank_sampler_layout():
    """``fixed`` slices the global batch exactly as ``PreferenceSampler`` does per rank."""
    gbs, mbs, dp = 12, 2, 3
    order = next(iter(PreferenceSampler(40, gbs, gbs, 0, 1, seed=5)))
    plan = plan_global_batch(BatchingPolicy("fixed", mbs), np.ones((gbs, 2), int), dp)
    for rank in range(dp):
        sampler = iter(PreferenceSampler(40, gbs, mbs, rank, dp, seed=5))
        expected = [next(sampler) for _ in range(gbs // (mbs * dp))]
        assert [[order[p] for p in micro] for micro in plan[rank]] == expected


@pytest.mark.parametrize("mode", ["token_budget", "packed"])
@pytest.mark.parametrize("dp", [1, 3])
def test_budget_policies_cover_every_pair_within_budget(mode, dp):
    policy = BatchingPolicy(mode, max_tokens=1536, pad_multiple=8)
    plan = plan_global_batch(policy, LENGTHS, dp)
    assert _covered_once(plan, len(LENGTHS))
    for micro in itertools.chain.from_iterable(plan):
        rows = LENGTHS[list(micro)]
        if mode == "packed":
            used = -(-int(rows.sum()) // 8) * 8  # one row: every sequence back to back
        else:
            used = 2 * len(micro) * -(-int(rows.max()) // 8) * 8  # [2B, S] padded rows
        assert policy.padded_tokens(LENGTHS, micro) == used <= 1536
    assert plan == plan_global_batch(policy, LENGTHS.copy(), dp)  # deterministic


def test_token_budget_sorts_by_length_and_fills_greedily():
    policy = BatchingPolicy("token_budget", max_tokens=2048, pad_multiple=1)
    (micro_batches,) = plan_global_batch(policy, LENGTHS, 1)
    longest = [int(LENGTHS[list(m)].max()) for m in micro_batches]
    assert longest == sorted(longest, reverse=True)
    for this, after in itertools.pairwise(micro_batches):  # the next pair did not fit
        assert policy.padded_tokens(LENGTHS, (*this, after[0])) > 2048


def test_packed_rows_are_first_fit_decreasing_and_nearly_full():
    policy = BatchingPolicy("packed", max_tokens=2048)
    (rows,) = plan_global_batch(policy, LENGTHS, 1)
    used = [policy.padded_tokens(LENGTHS, r) for r in rows]
    assert sum(used) == LENGTHS.sum()  # no padding at all without multiples
    assert sum(u <= 1024 for u in used) <= 1  # first fit: no two rows both half empty
    sizes = [LENGTHS[list(r)].sum(1) for r in rows]  # pairs placed longest first
    assert all(a >= b for size in sizes for a, b in itertools.pairwise(size))


def test_dp_ranks_are_balanced_by_tokens_not_pairs():
    tokens = np.array([1000, 10, 10, 10, 10, 10, 10, 10])
    ranks = deal_by_tokens(tokens, 2)
    assert ranks == [[0], [1, 2, 3, 4, 5, 6, 7]]  # 1000 vs 70 tokens, 1 vs 7 pairs
    pair_tokens = LENGTHS.sum(1)
    load = [int(pair_tokens[r].sum()) for r in deal_by_tokens(pair_tokens, 4)]
    assert max(load) - min(load) <= pair_tokens.max()  # LPT bound: one pair at most
    assert [len(r) for r in deal_by_tokens(tokens, 2, cap=4)] == [4, 4]


def test_interleaved_pipelines_get_a_multiple_of_pp_micro_batches():
    """Megatron's interleaved schedule needs ``M % PP == 0`` (0.16.1 schedules.py): ranks get
    equal pair counts and micro-batches are split until the count is a multiple."""
    for mode, budget in itertools.product(("token_budget", "packed"), (1024, 1536, 4096)):
        policy = BatchingPolicy(mode, max_tokens=budget, microbatch_multiple=4)
        plan = plan_global_batch(policy, LENGTHS[:32], 2)
        assert _covered_once(plan, 32)
        assert all(len(rank) % 4 == 0 for rank in plan)
        assert [sum(map(len, rank)) for rank in plan] == [16, 16]


def test_a_pair_over_the_budget_is_refused_naming_the_field():
    policy = BatchingPolicy("token_budget", max_tokens=100)
    with pytest.raises(ValueError, match="data.max_tokens_per_micro_batch=100 is smaller"):
        plan_global_batch(policy, np.array([[30, 60]]), 1)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["data.batching=budget"], "data.batching='budget'"),
        (["data.batching=token_budget"], "needs data.max_tokens_per_micro_batch"),
        (
            ["data.batching=token_budget", "data.max_tokens_per_micro_batch=255"],
            r"data.max_tokens_per_micro_batch=255 is smaller than the longest pair "
            r"data.max_length=128 allows \(256 tokens",
        ),
        (
            [
                "data.batching=token_budget",
                "data.max_tokens_per_micro_batch=257",
                "execution.sequence_parallel=true",
                "data.max_length=127",
            ],  # rows pad to 128 (TP2 + SP): 2 x 128 = 256 <= 257 is fine
            None,
        ),
        (
            ["data.batching=packed", "data.max_tokens_per_micro_batch=512", "execution.cp=2"],
            "data.batching=packed with execution.cp > 1 needs Transformer Engine attention: the "
            r"local spec \(execution.transformer_impl=local\) has none",
        ),
        (
            [
                "data.batching=packed",
                "data.max_tokens_per_micro_batch=512",
                "execution.cp=2",
                "execution.transformer_impl=auto",
            ],  # auto resolves to the local spec on this machine
            "data.batching=packed with execution.cp > 1 needs Transformer Engine",
        ),
    ],
)
def test_bad_batching_settings_are_refused_naming_the_field(overrides, message):
    if message is None:
        load_config(QUICKSTART, overrides)
        return
    with pytest.raises(ConfigError, match=message):
        load_config(QUICKSTART, overrides)


def test_ultrafeedback_profile_follows_the_published_means():
    profile = UltraFeedbackProfile(max_length=2048, max_prompt_length=1800)
    pairs = profile.sample(61135, seed=0)
    prompt, chosen, rejected = pairs.T
    assert prompt.mean() == pytest.approx(PROMPT_MEAN + TEMPLATE_TOKENS[0], rel=0.05)
    for completion in (chosen, rejected):
        assert completion.mean() == pytest.approx(RESPONSE_MEAN + TEMPLATE_TOKENS[1], rel=0.05)
        assert completion.min() >= 1 and np.percentile(completion, 99) > 1000
    assert prompt.max() <= 1800 and (pairs[:, :1] + pairs[:, 1:]).max() <= 2048
    rows = profile.row_lengths(100, seed=1)
    assert rows.shape == (100, 2) and np.array_equal(rows, profile.row_lengths(100, seed=1))


def test_histogram_profile_draws_within_the_manifest_bins(tmp_path):
    manifest = {"length_histogram": {"bin_upper_edges": [16, 32, 48], "counts": [0, 5, 0]}}
    (tmp_path / "manifest.json").write_text(__import__("json").dumps(manifest))
    rows = HistogramProfile.from_manifest(tmp_path).row_lengths(200)
    assert rows.min() >= 17 and rows.max() <= 32 and np.array_equal(rows[:, 0], rows[:, 1])


@pytest.mark.parametrize("mode", ["token_budget", "packed"])
@pytest.mark.parametrize("pp, vpp", [(1, None), (2, None), (2, 2)])
def test_global_batch_rule_of_budget_modes_is_what_the_plan_needs(mode, pp, vpp):
    """``layout_errors``' rule for the budget modes (micro_batch_size ignored) against the plan
    itself: every global batch the rule admits gives each DP rank a non-empty plan covering
    every pair once, a multiple of PP micro-batches when interleaved, on realistic lengths and
    on the worst case (every pair fills a micro-batch alone); every one it refuses breaks one
    of these on the worst case (a rank without pairs, a lost pair, no split into PP
    multiples)."""
    from megatron_adadpo.layout import ExecutionConfig
    from megatron_adadpo.model.config import ModelConfig
    from megatron_adadpo.resolve.layout import layout_errors

    model = ModelConfig(num_layers=4, hidden_size=64, ffn_hidden_size=128,
                        num_attention_heads=4, vocab_size=256)  # fmt: skip
    dp = 3
    execution = ExecutionConfig(pp=pp, vpp=vpp)
    policy = BatchingPolicy(mode, max_tokens=1024, microbatch_multiple=pp if vpp else 1)
    worst = np.full((24, 2), 512)

    def works(lengths, gbs):
        try:
            plan = plan_global_batch(policy, lengths[:gbs], dp)
        except (ValueError, IndexError):  # no split into PP multiples; more pairs than caps
            return False
        multiple = all(len(rank) % policy.microbatch_multiple == 0 for rank in plan)
        return _covered_once(plan, gbs) and all(plan) and multiple

    for gbs in range(1, 25):
        errors = layout_errors(model, execution, micro_batch_size=5, global_batch_size=gbs,
                               world_size=dp * pp, batching=mode)  # fmt: skip
        if errors:
            assert not works(worst, gbs), (gbs, errors)
        else:
            assert works(LENGTHS, gbs) and works(worst, gbs), gbs


def test_budget_under_fixed_batching_is_refused():
    with pytest.raises(ConfigError, match=r"data.max_tokens_per_micro_batch=512 has no effect"):
        load_config(QUICKSTART, ["data.max_tokens_per_micro_batch=512"])

"""Options together: every pair of the execution options that interact, through the real
trainer, equals the plain run (no overlap, no chunking, fixed batching, plain optimizer, one
rank) in every logged metric and every final parameter to 1e-5, and no step leaves a DDP
parameter all-gather in flight.

The runs are a pairwise covering set of the option space (``covering_set``: greedy, seeded
with the 8B recipe's combination, cheapest world first), checked by
``test_covering_set_covers_every_allowed_pair``. ``optimizer.ddp_bucket_size`` is small
(``BUCKET``) wherever buckets exist, so on one pipeline stage the untied output layer
(640 x 64 parameters) sits in a bucket group of its own: the case where the chunked log-prob
path, which never runs ``output_layer.forward``, left that bucket's all-gather unwaited and
step 2 died on ``assert self.param_gather_handle is None`` (issue 21).

Megatron-Core disables bucketing on pipeline ranks > 0 (``distributed_data_parallel.py``:
``if disable_bucketing or pp_rank > 0: self.bucket_size = None``), so with PP the last stage
has one bucket group and the pre-hooks of the decoder's modules wait for the output layer's
gather too.
"""

from __future__ import annotations

import itertools
import json

import pytest

from megatron_adadpo.config import ConfigError, from_dict, read_yaml
from megatron_adadpo.run import precompute
from tests.distributed.train_harness import (
    QUICKSTART,
    argv,
    assert_same_run,
    overrides,
    read_metrics,
    train_checked,
)
from tests.launcher import run_ranks

pytestmark = pytest.mark.distributed

FACTORS = {
    "distributed_optimizer": (False, True),
    "overlap_grad_reduce": (False, True),
    "overlap_param_gather": (False, True),
    "chunked_logprobs": (False, True),
    "batching": ("fixed", "token_budget", "packed"),
    "pipeline": ("none", "pp2", "pp2_vpp2"),
    "sequence_parallel": (False, True),
    "reference": ("resident", "precomputed"),
    "tied_embeddings": (False, True),
}
# The options that cannot combine, with the config's reason (a part of its error message).
REFUSED = {
    ("distributed_optimizer", False, "overlap_param_gather", True): (
        "optimizer.overlap_param_gather needs optimizer.use_distributed_optimizer"
    ),
}
# The 8B recipe's combination, which crashed at step 2 (issue 21): the covering set's first run.
RECIPE_8B = {
    "distributed_optimizer": True,
    "overlap_grad_reduce": True,
    "overlap_param_gather": True,
    "chunked_logprobs": True,
    "batching": "packed",
    "pipeline": "none",
    "sequence_parallel": False,
    "reference": "resident",
    "tied_embeddings": False,
}
BUCKET = 20_000  # parameters per DDP bucket: below the output layer's 40,960
CHUNK = 16  # tokens per chunk of the chunked output layer
STEPS = 3
# lr 1e-4: each step moves a weight by ~0.5 % (Adam: ~lr per element, weights ~N(0, 0.02)), so
# a wrong update shows far above 1e-5; rounding through Adam stayed <= 1.2e-6 (at 1e-3: 1.2e-5)
LR = "optimizer.lr=1e-4"
BUDGET = 160  # tokens per micro-batch under token_budget / packed (pairs are <= 128)


def refusal(combo: dict) -> str | None:
    """The reason ``combo`` cannot run (``REFUSED``), or None."""
    for (a, x, b, y), reason in REFUSED.items():
        if combo[a] == x and combo[b] == y:
            return reason
    return None


def pairs_of(combo: dict) -> set:
    return {((a, combo[a]), (b, combo[b])) for a, b in itertools.combinations(FACTORS, 2)}


def world_size(combo: dict) -> int:
    """TP2 with sequence parallelism, PP2 with a pipeline, DP2 where two ranks leave room."""
    model_parallel = (2 if combo["sequence_parallel"] else 1) * (
        2 if combo["pipeline"] != "none" else 1
    )
    return max(model_parallel, 2)


def covering_set() -> list[dict]:
    """A small set of runnable combinations holding every pair of option values that some
    runnable combination holds: greedy (AETG-style), seeded with ``RECIPE_8B``; among the
    combinations covering most new pairs the one on fewest ranks, then the first."""
    names = list(FACTORS)
    runnable = [
        combo
        for values in itertools.product(*FACTORS.values())
        if refusal(combo := dict(zip(names, values, strict=True))) is None
    ]
    chosen = [RECIPE_8B]
    needed = set().union(*map(pairs_of, runnable)) - pairs_of(RECIPE_8B)
    while needed:
        best = max(runnable, key=lambda c: (len(pairs_of(c) & needed), -world_size(c)))
        chosen.append(best)
        needed -= pairs_of(best)
    return chosen


def overrides_of(combo: dict) -> list[str]:
    """``--set`` items of a combination (on ``train_harness``'s tiny quickstart model)."""
    out = [f"train.train_iters={STEPS}", LR]
    out.append(f"model.tie_word_embeddings={combo['tied_embeddings']}")
    out.append(f"optimizer.use_distributed_optimizer={combo['distributed_optimizer']}")
    out.append(f"optimizer.overlap_param_gather={combo['overlap_param_gather']}")
    if combo["overlap_grad_reduce"]:
        out += ["optimizer.overlap_grad_reduce=true", f"optimizer.ddp_bucket_size={BUCKET}"]
    out.append(f"execution.logprob_chunk_tokens={CHUNK if combo['chunked_logprobs'] else 0}")
    out.append(f"data.batching={combo['batching']}")
    if combo["batching"] != "fixed":
        out.append(f"data.max_tokens_per_micro_batch={BUDGET}")
    if combo["pipeline"] != "none":
        out.append("execution.pp=2")
    if combo["pipeline"] == "pp2_vpp2":
        out.append("execution.vpp=2")
    if combo["sequence_parallel"]:
        out += ["execution.tp=2", "execution.sequence_parallel=true"]
    return out


def label(combo: dict) -> str:
    on = [k for k, v in combo.items() if v is True]
    other = [f"{k}={v}" for k, v in combo.items() if not isinstance(v, bool)]
    return ",".join(on + other)


COMBOS = covering_set()


def test_covering_set_covers_every_allowed_pair():
    """Each pair of option values is in a run unless the pair is refused, and the set is
    small: independent of ``covering_set``'s greedy search, from the full product."""
    allowed, refused = set(), set()
    for a, b in itertools.combinations(FACTORS, 2):
        for x, y in itertools.product(FACTORS[a], FACTORS[b]):
            key = (a, x, b, y)
            (refused if key in REFUSED else allowed).add(((a, x), (b, y)))
    covered = set().union(*map(pairs_of, COMBOS))
    assert allowed <= covered, f"pairs in no run: {sorted(allowed - covered)}"
    assert not refused & covered
    assert COMBOS[0] == RECIPE_8B
    assert all(refusal(c) is None for c in COMBOS)
    assert len(COMBOS) <= 12, len(COMBOS)  # 3 x 3 levels need >= 9


def test_refused_combinations_name_the_reason(tmp_path):
    """What cannot combine is refused by the config, before anything is built."""

    def config(extra: list[str]) -> dict:
        return read_yaml(QUICKSTART, overrides(tmp_path / "run", tmp_path / "cache", extra))

    for (a, x, b, y), reason in REFUSED.items():
        values = config(overrides_of({**RECIPE_8B, a: x, b: y}))
        with pytest.raises(ConfigError, match=reason):
            from_dict(values)
    assert from_dict(config(overrides_of(RECIPE_8B)))  # the same values otherwise run
    values = config([f"optimizer.ddp_bucket_size={BUCKET}"])
    with pytest.raises(ConfigError, match="ddp_bucket_size applies only with"):
        from_dict(values)


@pytest.fixture(scope="module")
def plain(tmp_path_factory, cache_dir):
    """Per embedding tie: the plain run on one rank, and the precomputed reference."""
    out = {}
    for tied in (False, True):
        tmp = tmp_path_factory.mktemp(f"plain_tied{tied}")
        base = [f"train.train_iters={STEPS}", LR, f"model.tie_word_embeddings={tied}"]
        result = run_ranks(train_checked, 1, argv(tmp / "run", cache_dir, *base), timeout=240)
        pre = argv(tmp / "pre", cache_dir, *base) + ["--output", str(tmp / "ref")]
        run_ranks(lambda r, w, a: precompute.main(a), 1, pre, timeout=240)
        assert json.loads((tmp / "ref" / "meta.json").read_text())["num_pairs"] == 400
        out[tied] = result[0], read_metrics(tmp / "run"), tmp / "ref"
    return out


@pytest.mark.parametrize("combo", COMBOS, ids=[f"c{i}" for i in range(len(COMBOS))])
def test_combination_equals_plain_run(combo, tmp_path, cache_dir, plain):
    want, want_rows, reference = plain[combo["tied_embeddings"]]
    extra = overrides_of(combo)
    if combo["reference"] == "precomputed":
        extra += ["reference.mode=precomputed", f"reference.path={reference}"]
    world = world_size(combo)
    results = run_ranks(train_checked, world, argv(tmp_path, cache_dir, *extra), timeout=240)
    name = label(combo)
    assert all(r["pending"] == [] for r in results), f"{name}: gathers in flight {results}"
    alone = [r["own_bucket"] for r in results if r["own_bucket"] is not None]
    if combo["overlap_grad_reduce"] and combo["pipeline"] == "none":
        if not combo["tied_embeddings"]:
            assert alone and all(alone), f"{name}: the output layer shares its bucket"
    assert_same_run(results[0], want, read_metrics(tmp_path), want_rows, name)

"""Options together: every pair of the execution options that interact, through the real
trainer, equals the plain run (no overlap, no chunking, fixed batching, plain optimizer, one
rank) in every logged metric and every final parameter to 1e-5, and no step leaves a DDP
parameter all-gather in flight.

The runs are a pairwise covering set of the option space (``covering_set``: a seeded hill
climb from the 8B recipe's combination, on the fewest plain runs and ranks), checked by
``test_covering_set_covers_every_allowed_pair``. Options that change what is computed are
compared with a plain run that has them too, one per ``plain_key`` (computed once): LoRA
(``reference: adapters_off``, a ``lora:`` section), TR-DPO (``reference_sync``:
``reference.sync_steps=1``, ``mixup_alpha=0.5``, so steps 2 and 3 see an updated reference),
WPO with LD-DPO (``loss_options: wpo_ld``; a precomputed reference is made with the same
``ld_alpha``). ``token_metrics`` off is compared with the plain run's rows less ``entropy`` and
``mean_token_accuracy``, which it must not log.

``optimizer.ddp_bucket_size`` is small (``BUCKET``) wherever buckets exist, so on one pipeline
stage the untied output layer (640 x 64 parameters) sits in a bucket group of its own: the case
where the chunked log-prob path, which never runs ``output_layer.forward``, left that bucket's
all-gather unwaited and step 2 died on ``assert self.param_gather_handle is None`` (issue 21).
With LoRA the output layer is frozen and has no bucket.

Megatron-Core disables bucketing on pipeline ranks > 0 (``distributed_data_parallel.py``:
``if disable_bucketing or pp_rank > 0: self.bucket_size = None``), so with PP the last stage
has one bucket group and the pre-hooks of the decoder's modules wait for the output layer's
gather too.

Saves are not a factor: these runs write no checkpoint (a save leaves the training it
interrupts unchanged, so here it could only be shown not to disturb it). What a save does with
the options is tested where it is read back: ``test_saves.py`` (``checkpoint.fully_parallel``,
``checkpoint.async_save`` on DP2 with the distributed optimizer, resume after a kill mid-write),
``test_resume.py`` (the distributed optimizer with overlapped parameter gathers, resharded),
``test_lora_checkpoints.py`` (LoRA) and ``test_reference_sync.py`` (TR-DPO's reference).
"""

from __future__ import annotations

import collections
import itertools
import json
import random

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
    "reference": ("resident", "precomputed", "adapters_off"),  # adapters_off: LoRA on
    "reference_sync": (False, True),  # TR-DPO
    "loss_options": ("none", "wpo_ld"),
    "token_metrics": (True, False),
    "tied_embeddings": (False, True),
}
# The options that cannot combine, with the config's reason (a part of its error message).
REFUSED = {
    ("distributed_optimizer", False, "overlap_param_gather", True): (
        "optimizer.overlap_param_gather needs optimizer.use_distributed_optimizer"
    ),
    ("reference", "precomputed", "reference_sync", True): (
        "precomputed log-probs were made once from a fixed model"
    ),
    ("reference", "adapters_off", "reference_sync", True): (
        "reference.mode=adapters_off .* is the policy's own frozen base"
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
    "reference_sync": False,
    "loss_options": "none",
    "token_metrics": True,
    "tied_embeddings": False,
}
RUNS = 11  # runs in the covering set: 3 x 3 levels need >= 9
BUCKET = 20_000  # parameters per DDP bucket: below the output layer's 40,960
CHUNK = 16  # tokens per chunk of the chunked output layer
STEPS = 3
# lr 1e-4: each step moves a weight by ~0.5 % (Adam: ~lr per element, weights ~N(0, 0.02)), so
# a wrong update shows far above 1e-5; rounding through Adam stayed <= 1.2e-6 (at 1e-3: 1.2e-5)
LR = "optimizer.lr=1e-4"
BUDGET = 160  # tokens per micro-batch under token_budget / packed (pairs are <= 128)
LORA = ["lora.rank=8", "lora.alpha=16", "reference.mode=adapters_off"]
SYNC = ["reference.sync_steps=1", "reference.mixup_alpha=0.5"]  # steps 2 and 3 see an update
WPO_LD = ["loss.use_weighting=true", "loss.ld_alpha=0.5"]
TOKEN_METRICS = ("entropy", "mean_token_accuracy")  # logged with logging.token_metrics only
# LoRA's B starts at 0, so its norm is its three Adam updates alone (~lr per element and step:
# ~1/100 of a weight's norm), and Adam's rounding of the few elements whose gradients nearly
# cancel between steps (~1e-7 absolute) is not diluted by a weight around it: measured on PP2
# VPP2 with the distributed optimizer, 1.5e-5 of B's own norm, 1.6e-7 of a weight's (B missing
# one step's update: 3.6e-3). ``assert_same_run`` compares it against a weight's norm.
ZERO_START = ("lora_b",)


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


def plain_key(combo: dict) -> tuple:
    """What the plain run must share with ``combo`` (the model, the loss, the reference's
    updates): ``(tied_embeddings, lora, reference_sync, loss_options)``. A precomputed
    reference holds the resident one's values; token metrics only add logged keys."""
    lora = combo["reference"] == "adapters_off"
    return combo["tied_embeddings"], lora, combo["reference_sync"], combo["loss_options"]


def cost(combos: list[dict], counts: collections.Counter, allowed: list) -> tuple:
    """(pairs in no run, plain runs needed, ranks in all): what ``covering_set`` lowers."""
    missing = sum(1 for pair in allowed if not counts[pair])
    return missing, len(set(map(plain_key, combos))), sum(map(world_size, combos))


def allowed_pairs() -> list:
    """Every pair of option values that ``REFUSED`` does not refuse, in ``FACTORS`` order."""
    return [
        ((a, x), (b, y))
        for a, b in itertools.combinations(FACTORS, 2)
        for x, y in itertools.product(FACTORS[a], FACTORS[b])
        if (a, x, b, y) not in REFUSED
    ]


def covering_set(runs: int = RUNS, seed: int = 0, moves: int = 1000) -> list[dict]:
    """``runs`` runnable combinations holding every allowed pair of option values, the first
    ``RECIPE_8B``: hill climbing (seeded, so the same set every time) on ``cost``. A move sets
    one run (not the first) to both values of a pair in no run, or one option of it to a random
    value (which can free a plain run or ranks); it is kept unless the cost rises. Greedy
    (AETG) needed 13-14 runs and 7-8 plain runs here."""
    rng, allowed = random.Random(seed), allowed_pairs()
    combos = [dict(RECIPE_8B)]
    while len(combos) < runs:
        combo = {name: rng.choice(values) for name, values in FACTORS.items()}
        combos += [] if refusal(combo) else [combo]
    counts = collections.Counter(p for combo in combos for p in pairs_of(combo))
    best = cost(combos, counts, allowed)
    for _ in range(moves):
        i = rng.randrange(1, runs)
        missing = [pair for pair in allowed if not counts[pair]]
        new = dict(combos[i])
        if missing and rng.random() < 0.7:
            new.update(rng.choice(missing))
        else:
            name = rng.choice(list(FACTORS))
            new[name] = rng.choice(FACTORS[name])
        if refusal(new):
            continue
        old, combos[i] = combos[i], new
        counts.subtract(pairs_of(old))
        counts.update(pairs_of(new))
        now = cost(combos, counts, allowed)
        if now <= best:
            best = now
        else:
            combos[i] = old
            counts.subtract(pairs_of(new))
            counts.update(pairs_of(old))
    return combos


def plain_overrides(key: tuple) -> list[str]:
    """``--set`` items of the plain run of ``plain_key`` ``key`` (one rank, token metrics on)."""
    tied, lora, sync, loss_options = key
    out = [f"train.train_iters={STEPS}", LR, f"model.tie_word_embeddings={tied}"]
    return (
        out
        + (LORA if lora else [])
        + (SYNC if sync else [])
        + (WPO_LD if loss_options == "wpo_ld" else [])
    )


def overrides_of(combo: dict, reference_path) -> list[str]:
    """``--set`` items of a combination (on ``train_harness``'s tiny quickstart model);
    ``reference_path``: the precomputed reference's directory."""
    out = plain_overrides(plain_key(combo))
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
    if combo["reference"] == "precomputed":
        out += ["reference.mode=precomputed", f"reference.path={reference_path}"]
    if not combo["token_metrics"]:
        out.append("logging.token_metrics=false")
    return out


def label(combo: dict) -> str:
    on = [k for k, v in combo.items() if v is True]
    other = [f"{k}={v}" for k, v in combo.items() if not isinstance(v, bool)]
    return ",".join(on + other)


COMBOS = covering_set()


def test_covering_set_covers_every_allowed_pair():
    """Each pair of option values is in a run unless the pair is refused, and the set is
    small: independent of ``covering_set``'s search, from the full product."""
    allowed, refused = set(), set()
    for a, b in itertools.combinations(FACTORS, 2):
        for x, y in itertools.product(FACTORS[a], FACTORS[b]):
            key = (a, x, b, y)
            (refused if key in REFUSED else allowed).add(((a, x), (b, y)))
    covered = set().union(*map(pairs_of, COMBOS))
    assert allowed <= covered, f"pairs in no run: {sorted(allowed - covered, key=str)}"
    assert not refused & covered
    assert COMBOS[0] == RECIPE_8B
    assert all(refusal(c) is None for c in COMBOS)
    assert len(COMBOS) <= 12, len(COMBOS)
    assert len(set(map(plain_key, COMBOS))) <= 6  # (tied x lora / TR-DPO / neither) needs 6


def test_refused_combinations_name_the_reason(tmp_path):
    """What cannot combine is refused by the config, before anything is built."""

    def config(extra: list[str]) -> dict:
        return read_yaml(QUICKSTART, overrides(tmp_path / "run", tmp_path / "cache", extra))

    reference = tmp_path / "ref"
    for (a, x, b, y), reason in REFUSED.items():
        values = config(overrides_of({**RECIPE_8B, a: x, b: y}, reference))
        with pytest.raises(ConfigError, match=reason):
            from_dict(values)
    for combo in COMBOS:  # the same values otherwise run
        assert from_dict(config(overrides_of(combo, reference)))
    values = config([f"optimizer.ddp_bucket_size={BUCKET}"])
    with pytest.raises(ConfigError, match="ddp_bucket_size applies only with"):
        from_dict(values)


@pytest.fixture(scope="module")
def plain(tmp_path_factory, cache_dir):
    """``plain(key)``: the plain run of a ``plain_key`` on one rank (its rank-0 result and
    logged rows) and, for a precomputed reference, the values precomputed with its loss
    options; each computed once, on first use."""
    runs, references = {}, {}

    def reference(tied: bool, loss_options: str):
        if (tied, loss_options) not in references:
            tmp = tmp_path_factory.mktemp(f"reference_tied{tied}_{loss_options}")
            key = (tied, False, False, loss_options)
            pre = argv(tmp / "pre", cache_dir, *plain_overrides(key)) + ["--output", str(tmp)]
            run_ranks(lambda r, w, a: precompute.main(a), 1, pre, timeout=240)
            assert json.loads((tmp / "meta.json").read_text())["num_pairs"] == 400
            references[tied, loss_options] = tmp
        return references[tied, loss_options]

    def run(key: tuple) -> tuple:
        if key not in runs:
            tmp = tmp_path_factory.mktemp("plain")
            args = argv(tmp, cache_dir, *plain_overrides(key))
            runs[key] = run_ranks(train_checked, 1, args, timeout=240)[0], read_metrics(tmp)
        return runs[key]

    return run, reference


@pytest.mark.parametrize("combo", COMBOS, ids=[f"c{i}" for i in range(len(COMBOS))])
def test_combination_equals_plain_run(combo, tmp_path, cache_dir, plain):
    run_plain, reference = plain
    want, want_rows = run_plain(plain_key(combo))
    path = None
    if combo["reference"] == "precomputed":
        path = reference(combo["tied_embeddings"], combo["loss_options"])
    world, extra = world_size(combo), overrides_of(combo, path)
    results = run_ranks(train_checked, world, argv(tmp_path, cache_dir, *extra), timeout=240)
    name, rows = label(combo), read_metrics(tmp_path)
    assert all(r["pending"] == [] for r in results), f"{name}: gathers in flight {results}"
    alone = [r["own_bucket"] for r in results if r["own_bucket"] is not None]
    trains_output = not combo["tied_embeddings"] and combo["reference"] != "adapters_off"
    if combo["overlap_grad_reduce"] and combo["pipeline"] == "none" and trains_output:
        assert alone and all(alone), f"{name}: the output layer shares its bucket"
    if not combo["token_metrics"]:  # the plain run logs them: compare the rest
        assert not any(key in row for row in rows for key in TOKEN_METRICS), name
        want_rows = [{k: v for k, v in row.items() if k not in TOKEN_METRICS} for row in want_rows]
    assert_same_run(results[0], want, rows, want_rows, name, zero_start=ZERO_START)

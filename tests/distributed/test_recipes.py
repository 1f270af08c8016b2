"""Every shipped recipe (``examples/recipes/*.yaml``) runs in CI, miniaturized.

``miniature`` is the one rule from a recipe to what gloo runs on a CPU: every execution,
optimizer, batching, reference and loss option of the recipe is kept; the model, data, world,
batch and step counts shrink; GPU-only options are replaced by their CPU counterparts (the
``REPLACED`` notes, printed by the test). Each miniature trains several steps through the
real trainer's CLI, is SIGKILL-ed after a checkpoint, resumes, and equals the plain run (one
rank, no overlap, no chunking, fixed batching, plain optimizer, resident reference) in every
logged metric and every final parameter to 1e-5, with no DDP parameter all-gather left in
flight. A recipe holding a field ``miniature`` has no rule for fails
``test_every_recipe_has_a_miniature``.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import yaml

from megatron_adadpo.config import from_dict
from megatron_adadpo.resolve import run_errors
from megatron_adadpo.run import precompute
from megatron_adadpo.run.state.run_dir import latest_checkpoint
from tests.distributed.train_harness import (
    REPO,
    TINY_OVERRIDES,
    assert_same_run,
    kill_in_step,
    read_metrics,
    train_checked,
)
from tests.launcher import RankFailed, run_ranks

pytestmark = pytest.mark.distributed

RECIPES = sorted((REPO / "examples/recipes").glob("*.yaml"))
STEPS, SAVE_EVERY, KILLED_IN = 4, 2, 3
MINI_MAX_LENGTH = 64
BUCKET = 20_000  # DDP bucket: below the miniature output layer's 40,960 parameters (see
# test_option_combinations.py): the untied output layer sits in a bucket of its own
TINY_MODEL = {
    item.split("=", 1)[0].split(".", 1)[1]: yaml.safe_load(item.split("=", 1)[1])
    for item in TINY_OVERRIDES
    if item.startswith("model.")
}
# Fields kept as the recipe has them: the options under test.
KEPT = {
    "model": {"tie_word_embeddings", "rotary_base", "rope_scaling", "norm_epsilon"},
    "execution": {
        "sequence_parallel",
        "recompute",
        "recompute_num_layers",
        "logprob_chunk_tokens",
        "fusions",
        "attention",
    },
    "loss": None,  # None: every field
    "data": {"chat_template", "batching", "overlength", "on_error"},
    "reference": {"mode"},
    "lora": None,  # adapters as the recipe has them (the plain run keeps them too)
    "optimizer": None,  # lr, min_lr and ddp_bucket_size then shrunk (SHRUNK)
    "train": {"micro_batch_size", "epochs", "seed", "nan_policy"},
    "checkpoint": {"save_at_end", "resume", "override_scheduler"},
    "logging": {"log_interval", "tensorboard"},
}
# Fields shrunk to the miniature, and fields replaced by a CPU counterpart, with the reason.
SHRUNK = {
    "model": "the tiny model of tests/distributed/train_harness.py",
    "execution.tp/pp/vpp": "each degree > 1 becomes 2; DP 2 where TP x PP leaves room in 4 ranks",
    "data": "the bundled pairs and tokenizer, max_length 64 (prompt 32), the token budget "
    "scaled by 64 / max_length (at least one pair)",
    "train": "8 pairs per step, 4 steps, layout-invariant initialisation (no converted "
    "checkpoint at this size)",
    "checkpoint.save_interval": "every 2 steps (killed in step 3, resumed)",
    "optimizer.lr": "1e-4: the recipe's rate would not move a tiny random model in 4 steps",
    "optimizer.min_lr": "at most 1e-4",
    "optimizer.ddp_bucket_size": f"{BUCKET} parameters with overlap_grad_reduce",
    "reference.path": "precomputed by tools/precompute_reference.py's main for the miniature",
    "logging": "run_dir in the test's directory, no progress bar",
}
REPLACED = {
    "execution.bf16": "fp32: equality to 1e-5 across layouts needs fp32 (CPU bf16 GEMMs round "
    "differently per layout)",
    "execution.fp8 (and fp8_*)": "off: Transformer Engine FP8 (its rule is tested in "
    "tests/unit/test_gpu_options.py)",
    "execution.transformer_impl": "local: Megatron's local layer spec, SDPA core attention "
    "for TE's; packed batching uses the block-diagonal mask instead of TE's THD",
    "execution.cp": "1 (recipes > 1 have no CPU counterpart here: CP attention needs TE)",
}
# Fields ``miniature`` sets itself (shrunk or replaced); "*": every field not in ``KEPT``.
RULED = {
    "model": "*",
    "execution": {"tp", "pp", "vpp", "cp", "bf16", "transformer_impl", "fp8", "fp8_recipe"}
    | {"fp8_amax_history_len", "fp8_amax_compute_algo", "fp8_margin"},
    "data": {"preprocessed", "inputs", "tokenizer", "max_length", "max_prompt_length"}
    | {"max_tokens_per_micro_batch", "cache_dir"},
    "reference": {"path", "eval_path"},
    "optimizer": set(),
    "train": {"global_batch_size", "train_iters", "init_checkpoint", "init_method"},
    "checkpoint": {"save_interval"},
    "logging": {"run_dir", "progress"},
}


def miniature(recipe: dict, run_dir: Path, cache_dir: Path) -> tuple[int, dict]:
    """``(world size, config values)``: the recipe shrunk to gloo on a CPU (module docstring,
    ``KEPT`` / ``SHRUNK`` / ``REPLACED``). Raises ``KeyError`` naming a recipe section or
    field with no rule."""
    unknown = set(recipe) - set(KEPT)
    if unknown:
        raise KeyError(f"no miniature rule for the sections {sorted(unknown)}")
    mini = {section: _kept(recipe.get(section) or {}, section) for section in KEPT}
    if "lora" not in recipe:
        del mini["lora"]  # no section: no adapters
    mini["model"] |= TINY_MODEL
    execution = recipe.get("execution", {})
    if execution.get("cp", 1) != 1:
        raise KeyError("no miniature rule for execution.cp > 1 (CP attention needs TE)")
    tp, pp = min(execution.get("tp", 1), 2), min(execution.get("pp", 1), 2)
    mini["execution"] |= {"tp": tp, "pp": pp, "vpp": 2 if execution.get("vpp") else None}
    mini["execution"] |= {"transformer_impl": "local", "bf16": False, "fp8": None}
    dp = 2 if tp * pp <= 2 else 1
    data = recipe["data"]
    budget = data.get("max_tokens_per_micro_batch")
    if budget is not None:
        scaled = budget * MINI_MAX_LENGTH // data["max_length"]
        mini["data"]["max_tokens_per_micro_batch"] = max(scaled, 2 * MINI_MAX_LENGTH)
    mini["data"] |= {
        "inputs": [str(REPO / "examples/data/prefs_train.jsonl")],
        "tokenizer": str(REPO / "examples/data/tokenizer"),
        "max_length": MINI_MAX_LENGTH,
        "max_prompt_length": MINI_MAX_LENGTH // 2,
        "cache_dir": str(cache_dir),
    }
    optimizer = mini["optimizer"]
    optimizer |= {"lr": 1e-4, "min_lr": min(optimizer.get("min_lr", 0.0), 1e-4)}
    if optimizer.get("overlap_grad_reduce"):
        optimizer["ddp_bucket_size"] = BUCKET
    mini["train"] |= {"global_batch_size": 8, "train_iters": STEPS}
    mini["train"] |= {"init_method": "layout_invariant", "init_checkpoint": None}
    mini["checkpoint"]["save_interval"] = SAVE_EVERY
    mini["logging"] |= {"run_dir": str(run_dir), "progress": False}
    return tp * pp * dp, mini


def _kept(values: dict, section: str) -> dict:
    """The fields of a recipe's ``section`` that ``KEPT`` keeps; raises ``KeyError`` for a
    field with neither a kept nor a ``RULED`` rule."""
    kept, ruled = KEPT[section], RULED.get(section, set())
    if kept is None:
        return copy.deepcopy(values)
    unknown = set() if ruled == "*" else set(values) - kept - ruled
    if unknown:
        raise KeyError(f"no miniature rule for {sorted(f'{section}.{k}' for k in unknown)}")
    return {k: copy.deepcopy(v) for k, v in values.items() if k in kept}


def plain(values: dict) -> dict:
    """The plain run of a miniature: one rank, no overlap, no chunking, fixed batching, plain
    optimizer, resident reference (the same model, data, loss and schedule)."""
    out = copy.deepcopy(values)
    out["execution"] |= {"tp": 1, "pp": 1, "vpp": None, "sequence_parallel": False}
    out["execution"]["logprob_chunk_tokens"] = 0
    out["data"] |= {"batching": "fixed", "max_tokens_per_micro_batch": None}
    out["reference"] = {"mode": "resident"}
    out["optimizer"] |= {"use_distributed_optimizer": False, "overlap_grad_reduce": False}
    out["optimizer"] |= {"overlap_param_gather": False, "ddp_bucket_size": None}
    out["checkpoint"]["save_interval"] = 0
    return out


def _write(values: dict, path: Path) -> list[str]:
    path.write_text(yaml.safe_dump(values, sort_keys=False))
    return ["--config", str(path)]


@pytest.mark.parametrize("recipe", RECIPES, ids=[p.stem for p in RECIPES])
def test_every_recipe_has_a_miniature(recipe, tmp_path):
    """Each shipped recipe miniaturizes into a valid config that keeps its options."""
    values = yaml.safe_load(recipe.read_text())
    world, mini = miniature(values, tmp_path / "run", tmp_path / "cache")
    if mini["reference"]["mode"] == "precomputed":
        mini["reference"]["path"] = str(tmp_path / "ref")
    config = from_dict(mini)
    assert run_errors(config, world) == []  # no machine: a recipe's TE / FP8 are not refused
    assert world <= 4
    for section in ("loss", "optimizer"):
        for key, value in values.get(section, {}).items():
            if f"{section}.{key}" not in SHRUNK:
                assert getattr(getattr(config, section), key) == value, f"{section}.{key}"
    for key in ("sequence_parallel", "logprob_chunk_tokens", "recompute"):
        assert getattr(config.execution, key) == values["execution"].get(key), key
    assert config.data.batching == values["data"]["batching"]
    assert config.reference.mode == values["reference"]["mode"]
    assert config.model.tie_word_embeddings == values["model"]["tie_word_embeddings"]


@pytest.fixture(scope="module")
def runs() -> dict:
    """Runs by config: recipes whose miniatures are the same config (e.g. a recipe and its FP8
    variant, FP8 replaced) share one run, as they would share its result."""
    return {}


def _once(runs: dict, values: dict, name: str, run):
    key = yaml.safe_dump({**values, "logging": {}})  # run_dir apart
    if key not in runs:
        runs[key] = name, run()
    elif runs[key][0] != name:
        print(f"[{name}] the same config as {runs[key][0]}'s: its run is reused")
    return runs[key][1]


def _plain_run(values: dict, tmp_path: Path) -> tuple[dict, list]:
    values = values | {"logging": {**values["logging"], "run_dir": str(tmp_path / "plain")}}
    result = run_ranks(train_checked, 1, _write(values, tmp_path / "plain.yaml"), timeout=240)
    return result[0], read_metrics(tmp_path / "plain")


def _resumed_run(world: int, mini: dict, tmp_path: Path) -> tuple[dict, list]:
    """The miniature trained, SIGKILL-ed in step ``KILLED_IN`` after the checkpoint of step
    ``SAVE_EVERY``, and resumed to the end: rank 0's ``train_checked`` result and the rows."""
    if mini["reference"]["mode"] == "precomputed":  # tools/precompute_reference.py's main
        pre = _write(mini, tmp_path / "pre.yaml") + ["--output", str(tmp_path / "ref")]
        run_ranks(lambda r, w, a: precompute.main(a), world, pre, timeout=240)
        mini = mini | {"reference": {**mini["reference"], "path": str(tmp_path / "ref")}}
    args = _write(mini, tmp_path / "mini.yaml")
    with pytest.raises(RankFailed):
        run_ranks(kill_in_step, world, args, KILLED_IN, timeout=240)
    assert latest_checkpoint(tmp_path / "run").name == f"iter_{SAVE_EVERY:07d}"
    results = run_ranks(train_checked, world, args, timeout=240)
    assert all(r["pending"] == [] for r in results), f"gathers in flight: {results}"
    rows = read_metrics(tmp_path / "run")
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    return results[0], rows


@pytest.mark.parametrize("recipe", RECIPES, ids=[p.stem for p in RECIPES])
def test_miniature_trains_resumes_and_equals_plain_run(recipe, tmp_path, cache_dir, runs):
    world, mini = miniature(yaml.safe_load(recipe.read_text()), tmp_path / "run", cache_dir)
    print(f"\n[{recipe.name}] world {world}; replaced: {json.dumps(REPLACED, indent=1)}")
    base = plain(mini)
    want, want_rows = _once(runs, base, recipe.name, lambda: _plain_run(base, tmp_path))
    got, rows = _once(runs, mini, recipe.name, lambda: _resumed_run(world, mini, tmp_path))
    assert_same_run(got, want, rows, want_rows, recipe.name)


@pytest.mark.parametrize(
    "section, field, value",
    [
        ("execution", "cp", 2),  # no CPU counterpart
        ("execution", "new_kernel", True),  # a new execution field: keep it or rule it
        ("data", "new_sampler", "x"),
        ("eval", "interval", 10),  # a section with no rule
    ],
)
def test_a_recipe_field_without_a_rule_fails(section, field, value, tmp_path):
    """A new recipe (or a new field in one) that ``miniature`` cannot shrink fails, naming it."""
    values = yaml.safe_load(RECIPES[0].read_text())
    values.setdefault(section, {})[field] = value
    with pytest.raises(KeyError, match=section):
        miniature(values, tmp_path / "run", tmp_path / "cache")

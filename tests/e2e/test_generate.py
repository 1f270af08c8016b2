"""tools/generate.py: greedy output equals ``transformers`` ``generate`` on the exported model.

A checkpoint trained and saved at TP=2 by the real trainer is (a) decoded by
``tools/generate.py`` in one TP1 process with Megatron's KV cache, and (b) exported with
``tools/convert_megatron_to_hf.py`` and decoded by ``LlamaForCausalLM.generate`` one prompt at
a time, its prompts rendered with the HF tokenizer's own chat template (not the plugin's
renderer). The texts must be equal. In-process checks cover batching, EOS and sampling seeds.
"""

import json
import subprocess
import sys

import pytest
import torch

from tests.distributed.train_harness import REPO, overrides, run_trainer
from tests.launcher import run_ranks

pytestmark = [pytest.mark.e2e, pytest.mark.distributed]

PROMPTS = [
    {"prompt": "What is 8 + 24?"},
    {"prompt": [{"role": "user", "content": "Repeat the word 'maple' two times."}]},
    {
        "prompt": [
            {"role": "system", "content": "Answer briefly and correctly."},
            {"role": "user", "content": "Sort the letters of 'vzbfi' alphabetically."},
        ],
        "dataset": "kept",
    },
    {"instruction": "Name the capital city of Velmora.", "dataset": "alpaca_eval"},
    {"prompt": "Is 496 even or odd?"},
]
NEW_TOKENS = 12


def _tool(*args: str) -> None:
    out = subprocess.run(
        [sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-3000:]


def _trained(tmp, layout: str):
    """A checkpoint written by the trainer with 2 ranks at ``layout`` after one step at a tiny
    lr: near the random init, whose greedy outputs are diverse (a few steps at lr 1e-3 collapse
    them onto a token)."""
    extra = [layout, "train.train_iters=1", "checkpoint.save_at_end=true"]
    extra += ["optimizer.lr=1e-6", "optimizer.min_lr=0"]
    argv = ["--config", str(REPO / "examples/configs/quickstart.yaml")]
    for item in overrides(tmp / "run", tmp / "cache", extra):
        argv += ["--set", item]
    run_ranks(run_trainer, 2, argv, timeout=300)
    return tmp / "run"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """Saved at TP=2."""
    return _trained(tmp_path_factory.mktemp("generate"), "execution.tp=2")


def _hf_greedy(hf_dir, row) -> str:
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(str(hf_dir))
    model = transformers.AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32)
    prompt = row.get("prompt", row.get("instruction"))
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = tok.encode(text, add_special_tokens=False)
    ids = ids if ids[:1] == [tok.bos_token_id] else [tok.bos_token_id, *ids]
    out = model.generate(
        torch.tensor([ids]),
        max_new_tokens=NEW_TOKENS,
        do_sample=False,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )[0, len(ids) :].tolist()
    if tok.eos_token_id in out:
        out = out[: out.index(tok.eos_token_id)]
    return tok.decode(out).strip()


def test_greedy_equals_transformers_generate(run_dir, tmp_path):
    _assert_greedy_equals_hf(run_dir, tmp_path)


def test_pipeline_parallel_checkpoint_generates_like_its_hf_export(tmp_path):
    """Saved at PP=2 (each stage's layers under their global numbers): read whole into one
    process as well."""
    _assert_greedy_equals_hf(_trained(tmp_path, "execution.pp=2"), tmp_path)


def _assert_greedy_equals_hf(run_dir, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(p) + "\n" for p in PROMPTS))
    output = tmp_path / "out.jsonl"
    _tool(
        "tools/generate.py",
        *("--checkpoint", str(run_dir), "--prompts", str(prompts), "--output", str(output)),
        *("--max-new-tokens", str(NEW_TOKENS), "--batch-size", "3", "--generator", "tiny"),
    )
    hf_dir = tmp_path / "hf"
    _tool(
        "tools/convert_megatron_to_hf.py",
        *("--checkpoint", str(run_dir), "--output", str(hf_dir), "--dtype", "fp32"),
        "--no-progress",
    )
    records = [json.loads(line) for line in output.read_text().splitlines()]
    assert len(records) == len(PROMPTS)
    for row, record in zip(PROMPTS, records, strict=True):
        assert record["generator"] == "tiny"
        assert {k: v for k, v in row.items() if k != "prompt"}.items() <= record.items()
        assert record["output"] == _hf_greedy(hf_dir, row), record["instruction"]
    assert records[1]["instruction"] == "Repeat the word 'maple' two times."
    assert any(r["output"] for r in records)  # something was generated


def decode_checks(rank: int, world: int, run_dir: str) -> dict:
    """Rank body: batching, EOS and seed behaviour of ``generate`` (world of one)."""
    from megatron_adadpo.generation.decode import SamplingConfig, generate
    from megatron_adadpo.generation.policy import checkpoint_tokenizer, load_policy
    from megatron_adadpo.generation.prompts import _prompt, prompt_token_ids

    model, config, directory = load_policy(run_dir)
    tok = checkpoint_tokenizer(directory)
    ids = prompt_token_ids(tok, [_prompt(p, "test") for p in PROMPTS])

    def run(**kw):
        sampling = SamplingConfig(**{"max_new_tokens": NEW_TOKENS, **kw})
        return generate(model, ids, kw.pop("eos", None), config.vocab_size, sampling)

    one_by_one = run(batch_size=1)
    # A token that greedy decoding first emits after >= 1 other token: as EOS, it ends the output
    # there (that row stops early while the rows of its batch go on).
    row, k = next(
        (r, k)
        for r, out in enumerate(one_by_one)
        for k in range(1, len(out))
        if out[k] not in out[:k]
    )
    stop = one_by_one[row][k]
    with_eos = generate(model, ids, stop, config.vocab_size, SamplingConfig(NEW_TOKENS))
    return {
        "one_by_one": one_by_one,
        "batched": run(batch_size=4),
        "stop": stop,
        "stop_at": (row, k),
        "with_eos": with_eos,
        "seed3": run(temperature=1.0, seed=3),
        "seed3_again": run(temperature=1.0, seed=3),
        "seed4": run(temperature=1.0, seed=4),
    }


def test_batching_eos_and_seeds(run_dir):
    out = run_ranks(decode_checks, 1, str(run_dir), timeout=300)[0]
    assert out["batched"] == out["one_by_one"]
    assert all(len(ids) == NEW_TOKENS for ids in out["one_by_one"])  # no EOS: budget used up
    for ids, full in zip(out["with_eos"], out["one_by_one"], strict=True):
        cut = full.index(out["stop"]) if out["stop"] in full else len(full)
        assert ids == full[:cut]
    row, k = out["stop_at"]
    assert out["with_eos"][row] == out["one_by_one"][row][:k] and k >= 1
    assert out["seed3"] == out["seed3_again"]
    assert out["seed3"] != out["seed4"]


def bundled_answers(rank: int, world: int, prompts: list[str]) -> list[str]:
    """Rank body: greedy answers of the bundled SFT checkpoint (its own tokenizer/ directory)."""
    from megatron_adadpo.generation.decode import SamplingConfig, generate
    from megatron_adadpo.generation.policy import checkpoint_tokenizer, load_policy
    from megatron_adadpo.generation.prompts import Prompt, prompt_token_ids

    model, config, directory = load_policy(REPO / "examples/checkpoints/sft_tiny")
    tok = checkpoint_tokenizer(directory)
    rows = [Prompt([{"role": "user", "content": p}], {}) for p in prompts]
    ids = generate(
        model,
        prompt_token_ids(tok, rows),
        tok.eos_id,
        config.vocab_size,
        SamplingConfig(max_new_tokens=24),
    )
    return [tok.decode(x).strip() for x in ids]


def test_bundled_sft_checkpoint_answers_held_out_prompts():
    """The quickstart's start (examples/miniature, --sft-only --bundle) loads with its tokenizer
    and answers prompts it never trained on (held out by examples/miniature/data.py)."""
    expected = {
        "Is 62 even or odd?": "62 is even.",
        "Repeat the word 'willow' two times.": "willow willow",
        "Sort the letters of 'lchdp' alphabetically.": "In order: c d h l p.",
    }
    assert run_ranks(bundled_answers, 1, list(expected), timeout=300)[0] == list(expected.values())

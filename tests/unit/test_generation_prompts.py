"""Generation prompts are the tokens training puts before a completion, in both template modes.

Reference 1: the training pipeline itself (``tokenize_record`` of a pair with that prompt).
Reference 2: the HF tokenizer used directly (``apply_chat_template`` / ``encode``).
"""

import json
from pathlib import Path

import pytest

from megatron_adadpo.data.records import normalize_row
from megatron_adadpo.data.tokenize import load_tokenizer, tokenize_record
from megatron_adadpo.generation.prompts import (
    output_records,
    prompt_token_ids,
    read_prompts,
    write_records,
)

TOKENIZER = Path(__file__).resolve().parents[2] / "examples/data/tokenizer"
ROWS = [
    {"prompt": "What is 8 + 24?"},
    {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"}]},
    {"instruction": "Name the capital city of Velmora.", "dataset": "x"},
]


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "p.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return read_prompts(path)


@pytest.mark.parametrize("mode", ["auto", "always"])
def test_prompt_ids_equal_the_training_pipelines(prompts, mode):
    tok = load_tokenizer(str(TOKENIZER))
    ids = prompt_token_ids(tok, prompts, mode)
    for row, got in zip(ROWS, ids, strict=True):
        pair = {"prompt": row.get("prompt", row.get("instruction")), "chosen": "A", "rejected": "B"}
        if "instruction" in row:  # an AlpacaEval instruction is a user turn (conversational)
            pair = {
                "prompt": [{"role": "user", "content": row["instruction"]}],
                "chosen": [{"role": "assistant", "content": "A"}],
                "rejected": [{"role": "assistant", "content": "B"}],
            }
        trained = tokenize_record(tok, normalize_row(pair, 0), chat_template=mode)
        assert got == trained.prompt.tolist(), (mode, row)


def test_prompt_ids_equal_the_hf_tokenizer(prompts):
    import transformers

    hf = transformers.AutoTokenizer.from_pretrained(str(TOKENIZER))
    tok = load_tokenizer(str(TOKENIZER))
    auto, always = (prompt_token_ids(tok, prompts, m) for m in ("auto", "always"))
    raw = [hf.bos_token_id, *hf.encode(ROWS[0]["prompt"], add_special_tokens=False)]
    assert auto[0] == raw  # a string prompt under auto: raw text, as TRL trains it
    for k, messages in enumerate(
        [[{"role": "user", "content": ROWS[0]["prompt"]}], ROWS[1]["prompt"]]
    ):
        text = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        want = hf.encode(text, add_special_tokens=False)  # the template renders BOS itself
        assert always[k] == want and want[0] == hf.bos_token_id
    assert auto[1:] == always[1:]  # messages and instructions are templated in both modes


def test_records_and_files(prompts, tmp_path):
    records = output_records(prompts, ["a", "b", "c"], "gen")
    assert records[0] == {"prompt": ROWS[0]["prompt"], "instruction": ROWS[0]["prompt"],
                          "output": "a", "generator": "gen"}  # fmt: skip
    assert records[1]["instruction"] == "Hi?" and records[2]["dataset"] == "x"
    write_records(tmp_path / "o.json", records)
    assert json.loads((tmp_path / "o.json").read_text()) == records  # a list: alpaca_eval's form
    write_records(tmp_path / "o.jsonl", records)
    lines = (tmp_path / "o.jsonl").read_text().splitlines()
    assert [json.loads(x) for x in lines] == records
    (tmp_path / "list.json").write_text(json.dumps(ROWS))
    assert [p.messages for p in read_prompts(tmp_path / "list.json")] == [
        p.messages for p in prompts
    ]


@pytest.mark.parametrize(
    "text, message",
    [
        ('{"question": "x"}\n', "expected an object with a 'prompt'"),
        ("not json\n", ":1: not JSON"),
        ('{"prompt": 3}\n', "p.jsonl:1: prompt is int"),
        ("\n", "holds no prompts"),
    ],
)
def test_bad_prompt_files_name_the_row(tmp_path, text, message):
    (tmp_path / "p.jsonl").write_text(text)
    with pytest.raises(ValueError, match=message):
        read_prompts(tmp_path / "p.jsonl")

"""The project's token ids equal TRL's for the same rows, or differ only as docs/data.md says.

TRL is not imported: its tokenization rules (``trl/trainer/dpo_trainer.py`` 1.9,
``DPOTrainer._prepare_dataset``; ``trl/data_utils.py`` ``is_conversational``, ``_tokenize``,
``extract_prompt``) are written out below, over the same ``transformers`` tokenizer.

- standard row (every field a string): EOS *text* appended to each completion unless it ends
  with it; ``prompt_ids = tokenizer(prompt)``, ``chosen_ids = tokenizer(prompt + chosen)`` minus
  the first ``len(prompt_ids)`` tokens (the tokenizer's own special tokens, e.g. BOS, included);
- conversational row: ``prompt_ids = apply_chat_template(prompt, add_generation_prompt=True)``,
  ``chosen_ids = apply_chat_template(prompt + chosen)`` minus the first ``len(prompt_ids)``;
- no prompt column: ``extract_prompt``, the longest common prefix (characters, or messages).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from megatron_adadpo.data import load_tokenizer, normalize_row, tokenize_record

DATA = Path(__file__).resolve().parents[2] / "examples" / "data"


# ----------------------------------------------------------------------------- TRL's rules
def trl_is_conversational(row: dict) -> bool:
    for key in ("prompt", "chosen", "rejected"):  # TRL looks at one of them
        if key in row:
            value = row[key]
            return isinstance(value, list) and isinstance(value[0], dict) and "role" in value[0]
    return False


def trl_extract_prompt(row: dict) -> dict:
    chosen, rejected = row["chosen"], row["rejected"]
    idx = 0
    for idx in range(min(len(chosen), len(rejected))):
        if chosen[idx] != rejected[idx]:
            if chosen[idx - 1] == " ":  # remove space before the prompt
                idx -= 1
            break
    return {"prompt": chosen[:idx], "chosen": chosen[idx:], "rejected": rejected[idx:]}


def trl_tokenize(hf, row: dict) -> tuple[list[int], list[int], list[int]]:
    """(prompt_ids, chosen_ids, rejected_ids) as TRL 1.9's DPOTrainer computes them."""
    if "prompt" not in row:
        row = trl_extract_prompt(row)
    if trl_is_conversational(row):

        def ids(messages, **kw):
            out = hf.apply_chat_template(messages, tokenize=True, return_dict=True, **kw)
            return list(out["input_ids"])

        prompt = ids(row["prompt"], add_generation_prompt=True)
        chosen = ids(row["prompt"] + row["chosen"])
        rejected = ids(row["prompt"] + row["rejected"])
    else:
        eos = hf.eos_token
        c, r = (x if x.endswith(eos) else x + eos for x in (row["chosen"], row["rejected"]))
        prompt = hf(text=row["prompt"])["input_ids"]
        chosen = hf(text=row["prompt"] + c)["input_ids"]
        rejected = hf(text=row["prompt"] + r)["input_ids"]
    n = len(prompt)
    return prompt, chosen[n:], rejected[n:]


def trl_prefix_check_passes(hf, row: dict) -> bool:
    """TRL warns "Mismatch between tokenized prompt and the start of tokenized prompt+chosen"
    when this is False."""
    prompt = hf(text=row["prompt"])["input_ids"]
    full = hf(text=row["prompt"] + row["chosen"] + hf.eos_token)["input_ids"]
    return full[: len(prompt)] == prompt


# ----------------------------------------------------------------------------- the project
def project_ids(tok_dir: str, row: dict, **settings) -> tuple[list[int], list[int], list[int]]:
    pair = tokenize_record(load_tokenizer(tok_dir), normalize_row(row, 0), **settings)
    return pair.prompt.tolist(), pair.chosen.tolist(), pair.rejected.tolist()


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    """{name: (directory, transformers tokenizer)}: the bundled tokenizer, whose post-processor
    adds no BOS, and a copy whose post-processor adds BOS as Llama's does."""
    from transformers import AutoTokenizer

    bos_dir = tmp_path_factory.mktemp("tok") / "adds_bos"
    shutil.copytree(DATA / "tokenizer", bos_dir)
    spec = json.loads((bos_dir / "tokenizer.json").read_text())
    bos, seq = (
        {"SpecialToken": {"id": "<s>", "type_id": 0}},
        {"Sequence": {"id": "A", "type_id": 0}},
    )
    spec["post_processor"] = {
        "type": "TemplateProcessing",
        "single": [bos, seq],
        "pair": [bos, seq, {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {"<s>": {"id": "<s>", "ids": [1], "tokens": ["<s>"]}},
    }
    (bos_dir / "tokenizer.json").write_text(json.dumps(spec))
    dirs = {"bundled": str(DATA / "tokenizer"), "adds_bos": str(bos_dir)}
    return {name: (d, AutoTokenizer.from_pretrained(d)) for name, d in dirs.items()}


def bundled_rows(kind: str) -> list[dict]:
    """The bundled eval rows of one TRL format: 'standard' (all strings) or 'conversational'
    (prompt and completions as message lists)."""
    rows = [json.loads(x) for x in (DATA / "prefs_eval.jsonl").read_text().splitlines()]
    types = {"standard": str, "conversational": list}
    return [r for r in rows if all(isinstance(r[k], types[kind]) for k in r)]


STANDARD = [{"prompt": "The sky is", "chosen": " blue.", "rejected": " green."}]  # TRL's docs
CONVERSATIONAL = [
    {
        "prompt": [
            {"role": "system", "content": "Answer briefly."},
            {"role": "user", "content": "What color is the sky?"},
        ],
        "chosen": [{"role": "assistant", "content": "It is blue."}],
        "rejected": [{"role": "assistant", "content": "It is green."}],
    },
    {  # implicit prompt: whole conversations
        "chosen": [{"role": "user", "content": "2 + 2?"}, {"role": "assistant", "content": "4."}],
        "rejected": [{"role": "user", "content": "2 + 2?"}, {"role": "assistant", "content": "5"}],
    },
]


# ----------------------------------------------------------------------------- standard
def test_standard_rows_are_raw_text_with_trls_ids(tokenizers):
    tok_dir, hf = tokenizers["adds_bos"]
    rows = STANDARD + bundled_rows("standard")
    assert len(rows) > 30
    for row in rows:
        assert project_ids(tok_dir, row) == trl_tokenize(hf, row), row


def test_bos_is_added_even_when_the_tokenizer_adds_none(tokenizers):
    # Documented difference: one BOS whenever the tokenizer defines a BOS token; TRL adds what
    # the tokenizer's post-processor adds (here nothing).
    tok_dir, hf = tokenizers["bundled"]
    for row in STANDARD + bundled_rows("standard"):
        prompt, chosen, rejected = trl_tokenize(hf, row)
        assert project_ids(tok_dir, row) == ([hf.bos_token_id] + prompt, chosen, rejected)


def test_prompt_completion_token_merge_is_where_trl_misaligns(tokenizers):
    # "A: " + "4." tokenizes jointly as "A:", " 4", "."; alone as "A:", " ". TRL warns and cuts
    # the joint ids at the prompt's length; the project encodes prompt and completion apart.
    tok_dir, hf = tokenizers["adds_bos"]
    row = {"prompt": "Q: what is 2 + 2? A: ", "chosen": "4.", "rejected": "5."}
    assert not trl_prefix_check_passes(hf, row)
    prompt, chosen, _ = project_ids(tok_dir, row)
    trl_prompt, trl_chosen, _ = trl_tokenize(hf, row)
    assert prompt == trl_prompt
    assert hf.decode(chosen, skip_special_tokens=True) == row["chosen"]  # every character
    assert hf.decode(trl_chosen, skip_special_tokens=True) != row["chosen"]  # TRL lost some


def test_transcript_rows_split_at_the_last_assistant_turn(tokenizers):
    tok_dir, hf = tokenizers["adds_bos"]
    same_start = {
        "chosen": "\n\nHuman: Capital of Feyland?\n\nAssistant: The capital is Ostra.",
        "rejected": "\n\nHuman: Capital of Feyland?\n\nAssistant: The capital is Tarsk.",
    }
    differ_at_once = {k: v.replace("The capital is ", "") for k, v in same_start.items()}
    assert project_ids(tok_dir, differ_at_once) == trl_tokenize(hf, differ_at_once)
    # Documented difference: TRL's character-level common prefix puts "The capital is" into the
    # prompt; the project's prompt ends at the last "Assistant:", so the answer is all completion.
    prompt, chosen, _ = project_ids(tok_dir, same_start)
    assert hf.decode(prompt, skip_special_tokens=True).endswith("Assistant:")
    assert hf.decode(chosen, skip_special_tokens=True) == " The capital is Ostra."
    assert "The capital is" in trl_extract_prompt(same_start)["prompt"]


def test_always_templates_standard_rows_as_a_user_turn(tokenizers):
    tok_dir, hf = tokenizers["bundled"]
    for row in STANDARD + bundled_rows("standard")[:8]:
        as_chat = {
            "prompt": [{"role": "user", "content": row["prompt"]}],
            "chosen": [{"role": "assistant", "content": row["chosen"]}],
            "rejected": [{"role": "assistant", "content": row["rejected"]}],
        }
        assert project_ids(tok_dir, row, chat_template="always") == trl_tokenize(hf, as_chat)


# ----------------------------------------------------------------------------- conversational
def test_conversational_rows_match_trl_with_the_template_tail_kept(tokenizers):
    tok_dir, hf = tokenizers["bundled"]
    rows = CONVERSATIONAL + bundled_rows("conversational")
    assert len(rows) > 10
    newline = hf("\n", add_special_tokens=False)["input_ids"]
    for row in rows:
        trl = trl_tokenize(hf, row)
        assert trl[1][-2:] == [hf.eos_token_id, *newline]  # the template's "</s>\n"
        assert project_ids(tok_dir, row) == trl, row
        # Documented switch: "strip" ends each completion at EOS, without the tail.
        stripped = project_ids(tok_dir, row, chat_template_tail="strip")
        assert stripped == (trl[0], trl[1][:-1], trl[2][:-1])


# ----------------------------------------------------------------------------- truncation
def trl_keep_start(prompt: list[int], completion: list[int], max_length: int):
    """TRL 1.9: pairs whose prompt fills max_length are filtered out (``_prepare_dataset``);
    ``DataCollatorForPreference`` cuts prompt + completion to its first max_length tokens.
    Returns (ids, completion mask) or None for a dropped pair."""
    if len(prompt) >= max_length:
        return None
    return (prompt + completion)[:max_length], ([0] * len(prompt) + [1] * len(completion))[
        :max_length
    ]


def test_max_prompt_length_null_truncates_as_trls_keep_start(tokenizers):
    from megatron_adadpo.data import RowRejected, truncate_pair

    tok_dir, _ = tokenizers["adds_bos"]
    tok = load_tokenizer(tok_dir)
    rows = STANDARD + bundled_rows("standard") + bundled_rows("conversational")
    outcomes = set()
    for row in rows:
        pair = tokenize_record(tok, normalize_row(row, 0))
        prompt = pair.prompt.tolist()
        for max_length in (14, 20):
            want = [
                trl_keep_start(prompt, c.tolist(), max_length) for c in (pair.chosen, pair.rejected)
            ]
            try:
                got = truncate_pair(pair, max_length, None, "truncate", tok.bos_id).pair
            except RowRejected as e:
                assert e.reason == "completion_emptied" and want == [None, None]
                outcomes.add("dropped")
                continue
            for completion, trl in zip((got.chosen, got.rejected), want, strict=True):
                ids = got.prompt.tolist() + completion.tolist()
                assert (ids, [0] * len(got.prompt) + [1] * len(completion)) == trl
                outcomes.add("cut" if len(ids) == max_length else "kept")
    assert outcomes == {"dropped", "cut", "kept"}  # every case occurred


def test_bad_format_settings_name_the_field_and_the_fix():
    from megatron_adadpo.data import DataConfig

    base = {"inputs": ("x.jsonl",), "tokenizer": "tok"}
    with pytest.raises(ValueError, match=r"data.chat_template='chatml'.*auto, always.*jinja"):
        DataConfig(**base, chat_template="chatml")
    with pytest.raises(ValueError, match=r"data.chat_template_tail='drop'.*keep, strip"):
        DataConfig(**base, chat_template_tail="drop")

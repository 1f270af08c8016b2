"""Every input shape and schema gives the same tokenized pairs; bad rows are reported by location.

The expected token ids are built here by hand: the bundled chat template written out as a
string and encoded with the raw `tokenizers.Tokenizer` (not transformers' apply_chat_template).
Every row is templated and ends at EOS (`chat_template: always`, `chat_template_tail: strip`);
the TRL conventions (`auto`, `keep`) are tested in test_data_trl_tokenization.py.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest

from megatron_adadpo.data import (
    DataConfig,
    DataError,
    RowRejected,
    load_preference_dataset,
    preprocess,
)

DATA = Path(__file__).resolve().parents[2] / "examples" / "data"
TOK = str(DATA / "tokenizer")


@pytest.fixture(scope="module")
def raw_tok():
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(DATA / "tokenizer" / "tokenizer.json"))


def by_hand(raw_tok, prompt_turns, answer):
    """`<s>` + turns + `<|assistant|>\\n` + answer + `</s>` encoded piecewise, as documented."""
    text = "".join(f"<|{role}|>\n{content}\n" for role, content in prompt_turns)
    prompt = [1] + raw_tok.encode(text + "<|assistant|>\n", add_special_tokens=False).ids
    return prompt, prompt + raw_tok.encode(answer + "</s>", add_special_tokens=False).ids


def string_rows(n=24):
    rows = [json.loads(x) for x in (DATA / "prefs_train.jsonl").read_text().splitlines()]
    rows = [r for r in rows if all(isinstance(r[k], str) for k in ("prompt", "chosen", "rejected"))]
    return rows[:n]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def load(tmp_path, inputs, **kw):
    cfg = DataConfig(
        inputs=tuple(inputs),
        tokenizer=kw.pop("tokenizer", TOK),
        max_length=128,
        max_prompt_length=64,
        cache_dir=str(tmp_path / "cache"),
        chat_template=kw.pop("chat_template", "always"),
        chat_template_tail=kw.pop("chat_template_tail", "strip"),
        **kw,
    )
    return load_preference_dataset(cfg)


def as_lists(ds):
    return [
        (
            ds[i]["chosen_ids"].tolist(),
            ds[i]["rejected_ids"].tolist(),
            ds[i]["prompt_length"],
            ds[i]["pair_id"],
        )
        for i in range(len(ds))
    ]


def test_every_input_shape_gives_the_hand_tokenized_pairs(tmp_path, raw_tok):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = string_rows()
    expected = []
    for k, r in enumerate(rows):
        prompt, chosen = by_hand(raw_tok, [("user", r["prompt"])], r["chosen"])
        _, rejected = by_hand(raw_tok, [("user", r["prompt"])], r["rejected"])
        expected.append((chosen, rejected, len(prompt), k))

    jsonl = write_jsonl(tmp_path / "a.jsonl", rows)
    (tmp_path / "b.json").write_text(json.dumps(rows), encoding="utf-8")
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "c.parquet")
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved"))
    splits = {
        "train": datasets.Dataset.from_list(rows),
        "test": datasets.Dataset.from_list(rows[:1]),
    }
    datasets.DatasetDict(splits).save_to_disk(str(tmp_path / "saved_dict"))
    (tmp_path / "dir").mkdir()
    write_jsonl(tmp_path / "dir" / "part0.jsonl", rows[:10])
    write_jsonl(tmp_path / "dir" / "part1.jsonl", rows[10:])
    spec = {"path": "json", "data_files": jsonl, "cache_dir": str(tmp_path / "hf")}
    shapes = {
        "jsonl": jsonl,
        "json": str(tmp_path / "b.json"),
        "parquet": str(tmp_path / "c.parquet"),
        "save_to_disk": str(tmp_path / "saved"),
        "save_to_disk_dict": str(tmp_path / "saved_dict"),
        "directory": str(tmp_path / "dir"),
        "load_dataset": spec,
        "dataset_object": datasets.Dataset.from_list(rows),
    }
    for name, spec in shapes.items():
        assert as_lists(load(tmp_path / name, [spec])) == expected, name
    # Several inputs: pair ids continue across them, in input order.
    both = as_lists(load(tmp_path / "two", [jsonl, str(tmp_path / "c.parquet")]))
    assert [p[3] for p in both] == list(range(2 * len(rows)))


def test_schemas_message_prompts_and_field_names(tmp_path, raw_tok):
    sys_user = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}]
    answer = lambda text: [{"role": "assistant", "content": text}]  # noqa: E731
    rows_a = [
        {"q": sys_user, "good": answer("4."), "bad": answer("5.")},  # chat prompt
        {
            "q": "2+2?",
            "good": [sys_user[1], *answer("4.")],  # UltraFeedback shape
            "bad": [sys_user[1], *answer("5.")],
        },
    ]
    rows_b = [
        {"good": sys_user + answer("4."), "bad": sys_user + answer("5.")},  # implicit, messages
        {"good": "\n\nHuman: 2+2?\n\nAssistant: 4.", "bad": "\n\nHuman: 2+2?\n\nAssistant: 5."},
    ]
    fields = {"prompt_field": "q", "chosen_field": "good", "rejected_field": "bad"}
    ds_a = load(tmp_path / "a", [write_jsonl(tmp_path / "a.jsonl", rows_a)], **fields)
    ds_b = load(
        tmp_path / "b", [write_jsonl(tmp_path / "b.jsonl", rows_b)], schema="implicit", **fields
    )
    turns_sys = [("system", "Be brief."), ("user", "2+2?")]
    for ds, turns in (
        (ds_a, [turns_sys, [("user", "2+2?")]]),
        (ds_b, [turns_sys, [("user", "2+2?")]]),
    ):
        for i, t in enumerate(turns):
            prompt, chosen = by_hand(raw_tok, t, "4.")
            _, rejected = by_hand(raw_tok, t, "5.")
            assert ds[i]["chosen_ids"].tolist() == chosen
            assert ds[i]["rejected_ids"].tolist() == rejected
            assert ds[i]["prompt_length"] == len(prompt)


BAD_LINES = [
    (b'{"prompt": "ok", "chosen": "yes", "rejected": "no"}', None),
    (b'{"prompt": "x", "chosen": "a", ', "malformed_json"),
    (b'{"prompt": "x", "chosen": "a"}', "missing_field"),
    (b'{"prompt": 5, "chosen": "a", "rejected": "b"}', "wrong_type"),
    (b'{"prompt": "x", "chosen": "  ", "rejected": "b"}', "empty_completion"),
    (b'{"prompt": "x", "chosen": "same", "rejected": "same"}', "chosen_equals_rejected"),
    (b'{"prompt": "x", "chosen": "caf\xe9", "rejected": "b"}', "undecodable_text"),
    (b"", None),  # blank lines are not rows
    (b'{"prompt": "x", "chosen": "\\ud800", "rejected": "b"}', "undecodable_text"),
    (b'{"prompt": "<s>x", "chosen": "a", "rejected": "b"}', "double_bos"),
    (b'{"prompt": "x", "chosen": "a</s>b", "rejected": "b"}', "control_token"),
    (
        b'{"chosen": [{"role": "user", "content": "p"}, {"role": "assistant", "content": "a"}], '
        b'"rejected": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "b"}]}',
        "prompt_mismatch",
    ),
    (b'["a", "b"]', "wrong_type"),
]


def test_every_bad_row_kind_is_reported_with_its_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b"\n".join(line for line, _ in BAD_LINES) + b"\n")
    expected = [(n, reason) for n, (_, reason) in enumerate(BAD_LINES, start=1) if reason]
    cfg = DataConfig(inputs=(str(path),), tokenizer=TOK, max_length=64, max_prompt_length=32)
    with pytest.raises(DataError) as err:  # on_error="fail": nothing is written
        preprocess(cfg, str(tmp_path / "fail"), progress=False)
    assert [(i.index, i.reason) for i in err.value.issues] == expected
    assert all(i.source == str(path) and i.index_kind == "line" for i in err.value.issues)
    assert "line 2: malformed_json" in str(err.value)
    assert not (tmp_path / "fail" / "manifest.json").exists()

    manifest, report = preprocess(
        cfg.replace(on_error="skip"), str(tmp_path / "skip"), progress=False
    )
    assert manifest["num_pairs"] == 1 and manifest["counts"]["bad_rows"] == len(expected)
    assert manifest["counts"]["rows_read"] == len(expected) + 1
    written = json.loads((tmp_path / "skip" / "data_report.json").read_text())
    assert [(i["index"], i["reason"]) for i in written["issues"]] == expected


def test_bad_rows_in_parquet_and_json_array_report_row_index(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [
        {"prompt": "p", "chosen": "a", "rejected": "b"},
        {"prompt": "p", "chosen": None, "rejected": "b"},
        {"prompt": "p", "chosen": "a", "rejected": "a"},
    ]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "x.parquet")
    (tmp_path / "y.json").write_text(json.dumps(rows))
    (tmp_path / "z.json").write_text('[\n{"prompt": "p",\n "chosen": }\n]')
    cfg = DataConfig(
        inputs=(str(tmp_path / "x.parquet"), str(tmp_path / "y.json"), str(tmp_path / "z.json")),
        tokenizer=TOK,
        on_error="skip",
        max_length=64,
        max_prompt_length=32,
    )
    _, report = preprocess(cfg, str(tmp_path / "out"), progress=False)
    got = [(Path(i.source).name, i.index_kind, i.index, i.reason) for i in report.issues]
    assert got == [
        ("x.parquet", "row", 1, "missing_field"),
        ("x.parquet", "row", 2, "chosen_equals_rejected"),
        ("y.json", "row", 1, "missing_field"),
        ("y.json", "row", 2, "chosen_equals_rejected"),
        ("z.json", "line", 3, "malformed_json"),
    ]
    assert report.pairs_written == 2


def test_utf8_byte_order_mark_costs_no_row(tmp_path):
    """Windows editors start UTF-8 files with a BOM; every row must still be read."""
    rows = string_rows(3)
    bom = "\ufeff"
    (tmp_path / "a.jsonl").write_text(bom + "".join(json.dumps(r) + "\n" for r in rows), "utf-8")
    (tmp_path / "b.json").write_text(bom + json.dumps(rows), "utf-8")
    (tmp_path / "c.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), "utf-8")
    with_bom = load(tmp_path, [tmp_path / "a.jsonl", tmp_path / "b.json"])
    without = load(tmp_path, [tmp_path / "c.jsonl", tmp_path / "c.jsonl"])
    assert len(with_bom) == 6 and as_lists(with_bom) == as_lists(without)


def test_row_rejected_carries_reason_and_detail_across_processes():
    err = pickle.loads(pickle.dumps(RowRejected("missing_field", "no 'chosen' field")))
    assert err.reason == "missing_field" and err.detail == str(err) == "no 'chosen' field"
    with pytest.raises(ValueError, match="unknown row rejection reason 'typo'"):
        RowRejected("typo", "detail")


def test_config_validation_names_the_field():
    with pytest.raises(ValueError, match="data.overlength"):
        DataConfig(inputs=("x",), tokenizer=TOK, overlength="cut")
    with pytest.raises(ValueError, match="data.max_prompt_length"):
        DataConfig(inputs=("x",), tokenizer=TOK, max_length=64, max_prompt_length=65)
    with pytest.raises(ValueError, match="does not exist"):
        preprocess(DataConfig(inputs=("/nonexistent.jsonl",), tokenizer=TOK), "/tmp/never")

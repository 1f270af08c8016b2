"""``--format arena-hard``: Arena-Hard (arena-hard-auto v0.1) questions in, its answer records
out, checked field by field against the schema its ``gen_answer.py`` writes, and read back the
way its judging reads an answer file (JSON lines keyed by ``question_id``; the answer text at
``choices[0]["turns"][0]["content"]``)."""

import json

import pytest

from megatron_adadpo.generation.arena_hard import ANSWER_FIELDS, arena_hard_records
from megatron_adadpo.generation.prompts import read_prompts, write_records

QUESTIONS = [
    {
        "question_id": "328c149ed45a41c0b9d6f14659e63599",
        "category": "arena-hard-v0.1",
        "cluster": "ABC Sequence Puzzles & Groups",
        "turns": [{"content": "Use ABC notation to write a melody."}],
    },
    {"question_id": 7, "category": "c", "cluster": "x", "turns": [{"content": "Is 62 even?"}]},
]


def _load_model_answers(path) -> dict:
    """Arena-Hard's reading of a model_answer file: question_id -> record."""
    return {
        r["question_id"]: r for r in (json.loads(x) for x in path.read_text().splitlines() if x)
    }


def test_records_follow_the_schema_and_round_trip(tmp_path):
    (tmp_path / "question.jsonl").write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS))
    prompts = read_prompts(tmp_path / "question.jsonl")
    assert [p.messages for p in prompts] == [
        [{"role": "user", "content": q["turns"][0]["content"]}] for q in QUESTIONS
    ]
    outputs, lens = ["X:1\nT:tune", "62 is even."], [9, 5]
    records = arena_hard_records([p.row for p in prompts], outputs, lens, "tiny-dpo")
    out = tmp_path / "model_answer" / "tiny-dpo.jsonl"
    write_records(out, records)
    answers = _load_model_answers(out)
    assert list(answers) == [q["question_id"] for q in QUESTIONS]
    for q, text, n in zip(QUESTIONS, outputs, lens, strict=True):
        record = answers[q["question_id"]]
        assert tuple(record) == ANSWER_FIELDS
        assert record["model_id"] == "tiny-dpo" and isinstance(record["tstamp"], float)
        assert record["choices"] == [{"index": 0, "turns": [{"content": text, "token_len": n}]}]
        assert isinstance(record["answer_id"], str) and len(record["answer_id"]) == 22
    assert len({r["answer_id"] for r in records}) == 2
    again = arena_hard_records([p.row for p in prompts], outputs, lens, "tiny-dpo")
    assert [r["answer_id"] for r in again] == [r["answer_id"] for r in records]


@pytest.mark.parametrize(
    "turns",
    [[], [{"content": "a"}, {"content": "b"}], [{"text": "a"}], "a"],
)
def test_questions_other_than_one_turn_are_refused_naming_the_line(tmp_path, turns):
    (tmp_path / "q.jsonl").write_text(json.dumps({"question_id": 1, "turns": turns}) + "\n")
    with pytest.raises(ValueError, match=r"q.jsonl:1: 'turns' must be one Arena-Hard turn"):
        read_prompts(tmp_path / "q.jsonl")


def test_a_row_without_question_id_is_refused():
    with pytest.raises(ValueError, match="prompt 1 has no question_id"):
        arena_hard_records([{"question_id": 1}, {"prompt": "x"}], ["a", "b"], [1, 1], "m")

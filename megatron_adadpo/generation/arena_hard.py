"""Arena-Hard answer records (arena-hard-auto v0.1, ``gen_answer.py``): one JSON line per
question in ``data/arena-hard-v0.1/model_answer/<model_id>.jsonl``.

A question (``question.jsonl``) is ``{"question_id", "category", "cluster", "turns":
[{"content": ...}]}``; ``generation/prompts.py`` reads it as one user turn. Its answer is::

    {"question_id": ..., "answer_id": ..., "model_id": ...,
     "choices": [{"index": 0, "turns": [{"content": answer, "token_len": n}]}],
     "tstamp": unix time}

``answer_id``: arena-hard-auto draws a ``shortuuid``; here it is a hash of model id, question id
and answer (a re-run writes the same id for the same answer). ``token_len``: arena-hard-auto
counts the answer with tiktoken's gpt-3.5-turbo encoding (a length statistic, read by its
style control); here it is the number of tokens the model generated (EOS excluded).
"""

from __future__ import annotations

import hashlib
import time

ANSWER_FIELDS = ("question_id", "answer_id", "model_id", "choices", "tstamp")


def answer_id(model_id: str, question_id, content: str) -> str:
    """22 hex characters (a ``shortuuid``'s length) of sha256 over the three."""
    text = f"{model_id}\0{question_id}\0{content}".encode()
    return hashlib.sha256(text).hexdigest()[:22]


def check_questions(rows: list[dict]) -> None:
    """Refuse rows without ``question_id`` (Arena-Hard matches answers to questions by it),
    naming the first by its index."""
    missing = [k for k, row in enumerate(rows) if "question_id" not in row]
    if missing:
        raise ValueError(
            f"--format arena-hard: prompt {missing[0]} has no question_id ({len(missing)} "
            "without); give Arena-Hard's question.jsonl, whose rows carry one"
        )


def arena_hard_records(
    rows: list[dict], outputs: list[str], token_lens: list[int], model_id: str
) -> list[dict]:
    """One answer record per question ``rows[k]`` (its ``question_id``) with ``outputs[k]``
    (``token_lens[k]`` generated tokens); ``check_questions`` refuses rows without an id."""
    check_questions(rows)
    now = time.time()
    return [
        {
            "question_id": row["question_id"],
            "answer_id": answer_id(model_id, row["question_id"], text),
            "model_id": model_id,
            "choices": [{"index": 0, "turns": [{"content": text, "token_len": n}]}],
            "tstamp": now,
        }
        for row, text, n in zip(rows, outputs, token_lens, strict=True)
    ]

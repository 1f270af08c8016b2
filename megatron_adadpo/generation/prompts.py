"""Prompts in, AlpacaEval-style records out.

A prompts file is JSON lines, or a ``.json`` list of objects (AlpacaEval's evaluation set is
one). Each object gives its prompt in ``prompt`` (a string or chat messages, as in the training
data), ``instruction`` (AlpacaEval: one user turn) or ``turns`` (an Arena-Hard question:
``[{"content": ...}]``, one user turn). A prompt is rendered exactly as training
renders a pair's prompt (``data.templates.render_prompt_text``, under the run's
``data.chat_template``): a string ``prompt`` is raw text under ``auto`` (TRL's standard format)
and a user turn under ``always``; chat messages and instructions get the tokenizer's chat
template with the generation prompt (or the plain template); then ``[BOS] + tokens``
(``data.tokenize.encode_prompt``). Each output record is the input object with
``instruction``, ``output`` (the generated text) and ``generator`` set, so other fields
(``dataset``, a reference answer) travel along.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from megatron_adadpo.data.records import prompt_messages
from megatron_adadpo.data.report import RowRejected
from megatron_adadpo.data.templates import render_prompt_text
from megatron_adadpo.data.tokenize import PairTokenizer, encode_prompt

PROMPT_FIELDS = ("prompt", "instruction", "turns")


@dataclass(frozen=True)
class Prompt:
    """One prompt: its chat messages, its raw text (a string ``prompt``: TRL's standard format;
    else None) and the input object it came from."""

    messages: list[dict[str, str]]
    row: dict
    text: str | None = None

    @property
    def instruction(self) -> str:
        """AlpacaEval's ``instruction``: the given one, else the last user turn's text."""
        if isinstance(self.row.get("instruction"), str):
            return self.row["instruction"]
        users = [m["content"] for m in self.messages if m["role"] == "user"]
        return users[-1] if users else self.messages[-1]["content"]


def read_prompts(path: str | Path) -> list[Prompt]:
    """Every prompt of a ``.jsonl`` / ``.json`` file; ValueError naming the row and the fix.

    JSON lines are split at ``"\n"`` only (JSON strings may hold U+2028 and other characters
    that ``str.splitlines`` breaks at); blank lines are skipped, an empty prompt is refused.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--prompts {path} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(
            f"--prompts {path} is not UTF-8 text ({e.reason} at byte {e.start})"
        ) from None
    if path.suffix == ".json":
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(
                f"{path}:{e.lineno}: not JSON ({e.msg}); a .json file holds one list"
            ) from None
        if not isinstance(rows, list):
            raise ValueError(f"{path}: a .json prompts file must hold a list of objects")
        where = [f"{path} item {k}" for k in range(len(rows))]
    else:
        lines = [(k, line) for k, line in enumerate(text.split("\n"), 1) if line.strip()]
        rows = [_json_line(path, k, line) for k, line in lines]
        where = [f"{path}:{k}" for k, _ in lines]
    if not rows:
        raise ValueError(f"{path} holds no prompts")
    return [_prompt(row, place) for row, place in zip(rows, where, strict=True)]


def check_output(output: str | Path, prompts: str | Path) -> None:
    """Refuse an ``--output`` that is the ``--prompts`` file (by any path: relative, through a
    symlink, a hard link): writing the records would overwrite the prompts."""
    out, source = Path(output), Path(prompts)
    same = out.resolve() == source.resolve()
    if same or (out.exists() and source.exists() and os.path.samefile(out, source)):
        raise ValueError(
            f"--output {output} is the --prompts file {prompts}: writing the answers would "
            "overwrite the prompts; choose another --output"
        )


def _json_line(path: Path, number: int, line: str):
    try:
        return json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{number}: not JSON ({e.msg}); one object per line") from None


def _prompt(row, where: str) -> Prompt:
    field = next((f for f in PROMPT_FIELDS if isinstance(row, dict) and f in row), None)
    if field is None:
        raise ValueError(
            f"{where}: expected an object with a 'prompt' (string or chat messages), an "
            "'instruction' (AlpacaEval) or 'turns' (Arena-Hard) field"
        )
    value = row[field]
    if field == "turns":
        value = _question_turn(value, where)
    try:
        messages = prompt_messages(value, field)
    except RowRejected as e:
        raise ValueError(f"{where}: {e.detail}") from None
    if not any(m["content"].strip() for m in messages):
        raise ValueError(f"{where}: the {field} is empty; give every row a non-empty {field}")
    standard = field == "prompt" and isinstance(row[field], str)
    return Prompt(messages, row, messages[0]["content"] if standard else None)


def _question_turn(turns, where: str) -> str:
    """The one user turn of an Arena-Hard question (``turns: [{"content": ...}]``)."""
    ok = isinstance(turns, list) and len(turns) == 1 and isinstance(turns[0], dict)
    if not ok or not isinstance(turns[0].get("content"), str):
        raise ValueError(
            f'{where}: \'turns\' must be one Arena-Hard turn, [{{"content": "..."}}] '
            "(multi-turn questions are not generated here)"
        )
    return turns[0]["content"]


def prompt_token_ids(
    tokenizer: PairTokenizer, prompts: list[Prompt], chat_template: str = "auto"
) -> list[list[int]]:
    """``[BOS] + prompt tokens`` of each prompt, rendered as training renders prompts under
    ``data.chat_template`` (``auto`` or ``always``)."""
    ids = []
    for k, prompt in enumerate(prompts):
        try:
            text = render_prompt_text(tokenizer, prompt.messages, prompt.text, chat_template)
            ids.append(encode_prompt(tokenizer, text))
        except RowRejected as e:
            raise ValueError(f"prompt {k}: {e.detail}") from None
    return ids


def output_records(prompts: list[Prompt], outputs: list[str], generator: str) -> list[dict]:
    """AlpacaEval records: each input object with ``instruction``, ``output``, ``generator``."""
    return [
        {**p.row, "instruction": p.instruction, "output": text, "generator": generator}
        for p, text in zip(prompts, outputs, strict=True)
    ]


def write_records(path: str | Path, records: list[dict]) -> None:
    """JSON lines, or for a ``.json`` path one JSON list (what ``alpaca_eval`` reads)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        if path.suffix == ".json":
            json.dump(records, f, ensure_ascii=False, indent=1)
            return
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")

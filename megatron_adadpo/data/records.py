"""Row (dict or JSON-line bytes) -> `PreferenceRecord`; a bad row raises `RowRejected`.

Two schemas are accepted (field names come from `DataConfig`):

(a) explicit prompt (UltraFeedback-binarized shape): `prompt` is a string or a list of chat
    messages; `chosen` / `rejected` are strings, or message lists ending with the assistant turn
    (whose earlier turns, if any, must equal the prompt).
(b) implicit prompt (HH-RLHF shape): `chosen` and `rejected` are whole conversations (message
    lists, or strings with "\\n\\nHuman:" / "\\n\\nAssistant:" turns); the prompt is their shared
    prefix up to the last assistant turn, which must be identical in both.

A record's prompt is always a message list and its completions are the contents of the final
assistant turn, so chosen and rejected are templated identically by construction. A row whose
fields are all strings (TRL's "standard" format: (a) with string prompt and completions, or (b)
as string transcripts) also keeps its raw text, `PreferenceRecord.text`, which is what it
trains on unless `data.chat_template: always` (templates.py). A bad row
raises `RowRejected(reason, detail)` (reason in `report.BAD_ROW_REASONS`); the pipeline adds
its location.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from .report import RowRejected

Message = dict[str, str]
_HH_TURN = re.compile(r"(?:^|\n\n)(Human|Assistant):[ ]?")
_HH_ROLES = {"Human": "user", "Assistant": "assistant"}


@dataclass(frozen=True)
class PreferenceRecord:
    """One validated preference pair, before tokenization.

    Attributes:
        prompt: Chat messages ({"role", "content"}) up to, not including, the answer.
        chosen: Content of the preferred assistant answer.
        rejected: Content of the dispreferred assistant answer.
        pair_id: Stable global index of the row across all inputs (in input order).
        text: For a standard-format row, its raw text `(prompt, chosen, rejected)`:
            prompt + chosen is the row's chosen text exactly (for a transcript, the prompt ends
            at the last "Assistant:" and the completion keeps its leading space). None for a
            conversational row.
    """

    prompt: tuple[tuple[str, str], ...]
    chosen: str
    rejected: str
    pair_id: int
    text: tuple[str, str, str] | None = None

    def prompt_messages(self) -> list[Message]:
        return [{"role": r, "content": c} for r, c in self.prompt]


def parse_json_line(payload: bytes) -> dict[str, Any]:
    """Bytes of one JSON-lines row -> dict; raises RowRejected (undecodable_text, malformed_json,
    wrong_type)."""
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError as e:
        raise RowRejected(
            "undecodable_text", f"invalid UTF-8 at byte {e.start} of the line"
        ) from None
    try:
        row = json.loads(text)
    except json.JSONDecodeError as e:
        raise RowRejected("malformed_json", f"{e.msg} at column {e.colno}") from None
    if not isinstance(row, dict):
        raise RowRejected("wrong_type", f"row is a JSON {type(row).__name__}, expected an object")
    return row


def _text(value: Any, where: str) -> str:
    if isinstance(value, (bytes, bytearray)):
        try:
            value = bytes(value).decode("utf-8")
        except UnicodeDecodeError as e:
            raise RowRejected(
                "undecodable_text", f"{where}: invalid UTF-8 at byte {e.start}"
            ) from None
    if not isinstance(value, str):
        raise RowRejected("wrong_type", f"{where} is {type(value).__name__}, expected a string")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise RowRejected(
            "undecodable_text", f"{where}: unpaired surrogate at char {e.start}"
        ) from None
    return value


def _messages(value: Any, where: str) -> list[Message]:
    if not isinstance(value, (list, tuple)) or not value:
        kind = "empty list" if isinstance(value, (list, tuple)) else type(value).__name__
        raise RowRejected("wrong_type", f"{where} is {kind}, expected a string or chat messages")
    out = []
    for k, m in enumerate(value):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise RowRejected("wrong_type", f"{where}[{k}] is not a {{'role', 'content'}} message")
        out.append(
            {
                "role": _text(m["role"], f"{where}[{k}].role"),
                "content": _text(m["content"], f"{where}[{k}].content"),
            }
        )
    return out


def _hh_transcript(text: str, where: str) -> list[Message]:
    turns = list(_HH_TURN.finditer(text))
    if not turns:
        raise RowRejected(
            "wrong_type",
            f"{where} is a string without '\\n\\nHuman:' / '\\n\\nAssistant:' turns; give chat "
            "messages, or a prompt field with schema 'explicit'",
        )
    ends = [t.start() for t in turns[1:]] + [len(text)]
    return [
        {"role": _HH_ROLES[t.group(1)], "content": text[t.end() : end]}
        for t, end in zip(turns, ends, strict=True)
    ]


def _hh_prompt_end(text: str) -> int:
    """Index just after the colon of the last "Assistant:" marker (its space stays with the
    completion, as in TRL's `extract_prompt`)."""
    last = list(_HH_TURN.finditer(text))[-1]
    return last.end(1) + 1


def _conversation(value: Any, where: str) -> list[Message]:
    if isinstance(value, (str, bytes, bytearray)):
        return _hh_transcript(_text(value, where), where)
    return _messages(value, where)


def _field(row: dict[str, Any], name: str) -> Any:
    if name not in row or row[name] is None:
        present = ", ".join(sorted(map(str, row))[:8]) or "none"
        raise RowRejected("missing_field", f"no '{name}' field (fields present: {present})")
    return row[name]


def _answer(value: Any, prompt: list[Message], where: str) -> str:
    """The assistant answer of an explicit-schema completion (string or message list)."""
    if isinstance(value, (str, bytes, bytearray)):
        return _text(value, where)
    msgs = _messages(value, where)
    if msgs[-1]["role"] != "assistant":
        raise RowRejected("wrong_type", f"{where} must end with an assistant turn")
    if len(msgs) > 1 and msgs[:-1] != prompt:
        raise RowRejected(
            "prompt_mismatch", f"{where}: turns before the answer differ from the prompt"
        )
    return msgs[-1]["content"]


def _is_string(value: Any) -> bool:
    return isinstance(value, (str, bytes, bytearray))


def prompt_messages(value: Any, where: str) -> list[Message]:
    """An explicit prompt (a string: one user turn, or chat messages) as chat messages.

    Raises:
        RowRejected: not a string or a non-empty list of {"role", "content"} messages.
    """
    if _is_string(value):
        return [{"role": "user", "content": _text(value, where)}]
    return _messages(value, where)


def _explicit(row: dict[str, Any], fields: tuple[str, str, str]) -> tuple[list, str, str, Any]:
    pf, cf, rf = fields
    prompt = prompt_messages(_field(row, pf), pf)
    chosen = _answer(_field(row, cf), prompt, cf)
    rejected = _answer(_field(row, rf), prompt, rf)
    standard = all(_is_string(row[f]) for f in fields)
    text = (prompt[0]["content"], chosen, rejected) if standard else None
    return prompt, chosen, rejected, text


def _implicit(row: dict[str, Any], fields: tuple[str, str, str]) -> tuple[list, str, str, Any]:
    _, cf, rf = fields
    chosen = _conversation(_field(row, cf), cf)
    rejected = _conversation(_field(row, rf), rf)
    for name, conv in ((cf, chosen), (rf, rejected)):
        if conv[-1]["role"] != "assistant":
            raise RowRejected("wrong_type", f"{name} must end with an assistant turn")
    if chosen[:-1] != rejected[:-1]:
        k = next(
            (i for i, (a, b) in enumerate(zip(chosen[:-1], rejected[:-1], strict=False)) if a != b),
            min(len(chosen), len(rejected)) - 1,
        )
        raise RowRejected(
            "prompt_mismatch",
            f"{cf} and {rf} do not share the prompt: they differ at turn {k}; the prompt must be "
            "every turn before the last assistant turn",
        )
    text = None
    if _is_string(row[cf]) and _is_string(row[rf]):
        text = _transcript_text(_text(row[cf], cf), _text(row[rf], rf), (cf, rf))
    return chosen[:-1], chosen[-1]["content"], rejected[-1]["content"], text


def _transcript_text(chosen: str, rejected: str, names: tuple[str, str]) -> tuple[str, str, str]:
    """Raw (prompt, chosen, rejected) of two string transcripts sharing their prompt."""
    c_end, r_end = _hh_prompt_end(chosen), _hh_prompt_end(rejected)
    if chosen[:c_end] != rejected[:r_end]:
        raise RowRejected(
            "prompt_mismatch",
            f"{names[0]} and {names[1]} differ before the last 'Assistant:' (in their whitespace); "
            "the raw text of the prompt must be identical",
        )
    return chosen[:c_end], chosen[c_end:], rejected[r_end:]


def normalize_row(
    row: dict[str, Any] | bytes,
    pair_id: int,
    fields: tuple[str, str, str] = ("prompt", "chosen", "rejected"),
    schema: str = "auto",
    rejected_optional: bool = False,
) -> PreferenceRecord:
    """Validate one row (a dict, or the raw bytes of a JSON line) into a record.

    ``rejected_optional`` (SFT): a row without the rejected field (absent or null) gets a copy
    of its chosen answer as the rejected one.

    Raises:
        RowRejected: the row is bad (reason in BAD_ROW_REASONS, detail names the field).
    """
    if isinstance(row, (bytes, bytearray)):
        row = parse_json_line(bytes(row))
    copied = rejected_optional and row.get(fields[2]) is None
    if copied:
        row = {**row, fields[2]: row.get(fields[1])}
    explicit = schema == "explicit" or (schema == "auto" and row.get(fields[0]) is not None)
    prompt, chosen, rejected, raw = (_explicit if explicit else _implicit)(row, fields)
    for name, text in ((fields[1], chosen), (fields[2], rejected)):
        if not text.strip():
            raise RowRejected("empty_completion", f"{name}: the assistant answer is empty")
    if chosen == rejected and not copied:
        raise RowRejected("chosen_equals_rejected", "chosen and rejected answers are identical")
    prompt_t = tuple((m["role"], m["content"]) for m in prompt)
    return PreferenceRecord(prompt_t, chosen, rejected, pair_id, raw)

"""Turn a record into prompt text + completion texts: raw text, or a template.

Which rows are templated (`data.chat_template`, TRL's dataset formats):

- `auto`: a standard-format row (every field a string; `PreferenceRecord.text`) is raw text,
  prompt + completion concatenated with no template, as TRL's `DPOTrainer` treats it; a
  conversational row (message lists) gets the template.
- `always`: every row gets the template; a string prompt is one user turn.

Two templates exist:

- **chat template** (HF tokenizers that define one): the prompt text is
  `apply_chat_template(prompt, add_generation_prompt=True)`, the full text is
  `apply_chat_template(prompt + [assistant answer])`; the completion text is what the full text
  adds after the prompt text. What the template renders after the assistant's end of turn (a
  `"\\n"` after EOS, say) is the *tail*: `data.chat_template_tail: keep` keeps it in the
  completion (TRL), `strip` removes trailing whitespace so the completion ends exactly at EOS.
  A template that fails on a conversation, or does not render the prompt as a prefix of it,
  refuses the row: `RowRejected("template_error", ...)`.
- **plain template** `plain-v1` (sentencepiece models, and HF tokenizers without a chat
  template)::

      System: {content}\\n        (one line per prompt turn, roles System / User / Assistant)
      User: {content}\\n
      Assistant:                 <- prompt text ends here
       {answer}                  <- completion text is " " + answer

BOS / EOS are not part of either text's policy: `tokenize.py` adds exactly one BOS and one EOS.
"""

from __future__ import annotations

import hashlib
from typing import Any, NamedTuple

from .report import RowRejected

PLAIN_TEMPLATE = "plain-v1"
PLAIN_ROLES = {"system": "System", "user": "User", "assistant": "Assistant"}


def render_plain_prompt(prompt: list[dict[str, str]]) -> str:
    """Plain template: the prompt text (it ends with "Assistant:")."""
    lines = []
    for m in prompt:
        role = PLAIN_ROLES.get(m["role"], m["role"].capitalize())
        lines.append(f"{role}: {m['content']}\n")
    return "".join(lines) + "Assistant:"


def render_plain(prompt: list[dict[str, str]], answer: str) -> tuple[str, str]:
    """Plain template: returns (prompt_text, completion_text)."""
    return render_plain_prompt(prompt), " " + answer


def render_chat_prompt(tokenizer: Any, prompt: list[dict[str, str]]) -> str:
    """HF chat template: the prompt text, with the generation prompt (the assistant header).

    Raises:
        RowRejected("template_error"): the template cannot render this conversation.
    """
    return _apply_template(tokenizer, prompt, add_generation_prompt=True)


def _apply_template(tokenizer: Any, messages: list[dict[str, str]], **kwargs) -> str:
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, **kwargs)
    except Exception as e:  # jinja raises for unsupported roles / orderings
        detail = f"chat template failed: {type(e).__name__}: {e}"
        raise RowRejected("template_error", detail) from None


def render_chat(
    tokenizer: Any,
    prompt: list[dict[str, str]],
    answer: str,
    prompt_text: str | None = None,
    tail: str = "keep",
) -> tuple[str, str]:
    """HF chat template: returns (prompt_text, completion_text); `prompt_text` may be reused.

    `tail`: "keep" the text the template renders after the answer's end of turn, or "strip"
    trailing whitespace.

    Raises:
        RowRejected("template_error"): the template cannot render this conversation as
            prompt + completion.
    """
    if prompt_text is None:
        prompt_text = render_chat_prompt(tokenizer, prompt)
    full = _apply_template(tokenizer, prompt + [{"role": "assistant", "content": answer}])
    if not full.startswith(prompt_text):
        raise RowRejected(
            "template_error",
            "the chat template does not render the prompt (with add_generation_prompt=True) as a "
            "prefix of the conversation; fix the template or use the plain template",
        )
    completion = full[len(prompt_text) :]
    return prompt_text, completion.rstrip() if tail == "strip" else completion


class PairTexts(NamedTuple):
    """The texts one pair is encoded from. `tail_kept`: the completions may hold text the
    template rendered after its EOS (so EOS need not be their last token)."""

    prompt: str
    chosen: str
    rejected: str
    tail_kept: bool


def is_raw_text(text: Any, chat_template: str) -> bool:
    """A standard-format row (`text` not None: every field a string) under `auto` is raw text."""
    return text is not None and chat_template == "auto"


def render_pair(tok: Any, rec: Any, chat_template: str, tail: str) -> PairTexts:
    """The texts of `rec` (a PreferenceRecord) under `data.chat_template` / `_tail`.

    `tok` is a `PairTokenizer` (its `render` applies its chat template or plain-v1).
    """
    if is_raw_text(rec.text, chat_template):
        return PairTexts(*rec.text, tail_kept=False)
    messages = rec.prompt_messages()
    prompt, chosen = tok.render(messages, rec.chosen, tail=tail)
    _, rejected = tok.render(messages, rec.rejected, prompt, tail=tail)
    return PairTexts(prompt, chosen, rejected, tok.chat_template is not None and tail == "keep")


def render_prompt_text(tok: Any, messages: list[dict[str, str]], text: Any, chat_template: str):
    """A prompt alone (generation) rendered as `render_pair` renders a pair's prompt: `text` (a
    standard-format prompt string, else None) raw under `auto`, else the template's prompt."""
    return text if is_raw_text(text, chat_template) else tok.render_prompt(messages)


def template_identity(chat_template: str | None) -> dict[str, str]:
    """Name and hash of the template in use (recorded in the manifest)."""
    if chat_template is None:
        return {"name": PLAIN_TEMPLATE, "sha256": hashlib.sha256(b"plain-v1").hexdigest()}
    digest = hashlib.sha256(chat_template.encode("utf-8")).hexdigest()
    return {"name": "chat_template", "sha256": digest}

"""Tokenizers (HF directory or sentencepiece model) and the one BOS / EOS policy.

Policy, for every pair and every tokenizer kind:

    chosen_ids   = [BOS] + prompt_tokens + chosen_tokens   + [EOS]
    rejected_ids = [BOS] + prompt_tokens + rejected_tokens + [EOS]

- Text is encoded with `add_special_tokens=False`; BOS is prepended unless the template already
  rendered it (e.g. `{{ bos_token }}`), so there is exactly one. A tokenizer without a BOS token
  gets none. Refused as `double_bos`: the BOS string (e.g. `<s>`) inside the data, which an HF
  tokenizer would turn into a second BOS token, and a template that renders BOS twice at the
  start. (A template may still place BOS before later turns, as Llama-2's does.) A refused row
  raises `RowRejected`.
- Refused as `control_token`: any other special-token string of an HF tokenizer (EOS, role
  markers such as `<|user|>`, pad) inside the data. An HF tokenizer encodes such text as the
  control token itself, so an answer would end mid-way or carry an injected turn.
- EOS is appended to each completion unless the template already ended it with EOS (or, with
  `data.chat_template_tail: keep`, rendered EOS followed by its tail, e.g. `"</s>\\n"`).
- Which text is encoded (raw text of standard-format rows, or a template) is templates.py's
  `render_pair`.
- The prompt is rendered and encoded once per pair and shared by chosen and rejected, and the
  shared prefix is checked token by token: both sequences start with exactly the same
  `prompt_length` tokens.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from .records import PreferenceRecord
from .report import RowRejected
from .templates import (
    render_chat,
    render_chat_prompt,
    render_pair,
    render_plain,
    render_plain_prompt,
    template_identity,
)

HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
# Model weights next to a tokenizer are not part of its identity.
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".h5", ".msgpack", ".npz")


@dataclass(frozen=True)
class TokenizedPair:
    """Token ids of one pair, before truncation (1-D int64 arrays).

    Attributes:
        prompt: [BOS] + prompt tokens, shared by chosen and rejected.
        chosen: Chosen completion tokens + [EOS].
        rejected: Rejected completion tokens + [EOS].
        pair_id: Stable index of the row in the inputs.
    """

    prompt: np.ndarray
    chosen: np.ndarray
    rejected: np.ndarray
    pair_id: int


def tokenizer_files_sha256(path: str) -> str:
    """sha256 over the tokenizer files at `path` (a directory, weights excluded, or one file)."""
    h = hashlib.sha256()
    files = (
        [os.path.join(path, f) for f in sorted(os.listdir(path))] if os.path.isdir(path) else [path]
    )
    for f in files:
        if os.path.isfile(f) and not f.endswith(_WEIGHT_SUFFIXES):
            h.update(os.path.basename(f).encode() + b"\0")
            with open(f, "rb") as fh:
                h.update(fh.read())
    return h.hexdigest()


class PairTokenizer:
    """Common interface of both tokenizer kinds."""

    kind: str
    path: str
    bos_id: int | None
    eos_id: int | None
    pad_id: int
    vocab_size: int
    bos_text: str | None = None  # the BOS string an encoder maps to bos_id (None: none does)
    control_texts: tuple[str, ...] = ()  # strings the encoder maps to special tokens
    chat_template: str | None = None

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def decode(self, ids: Any) -> str:
        raise NotImplementedError

    def render(
        self,
        prompt: list[dict[str, str]],
        answer: str,
        prompt_text: str | None = None,
        tail: str = "keep",
    ):
        if self.chat_template is None:
            return render_plain(prompt, answer)
        return render_chat(self._hf, prompt, answer, prompt_text, tail)

    def render_prompt(self, prompt: list[dict[str, str]]) -> str:
        """The prompt text a completion follows (chat template or plain template)."""
        if self.chat_template is None:
            return render_plain_prompt(prompt)
        return render_chat_prompt(self._hf, prompt)

    def identity(self) -> dict[str, Any]:
        """Hash of the tokenizer files + template: recorded in and checked against manifests."""
        return {
            "kind": self.kind,
            "sha256": tokenizer_files_sha256(self.path),
            "bos_id": self.bos_id,
            "eos_id": self.eos_id,
            "pad_id": self.pad_id,
            "vocab_size": self.vocab_size,
            "template": template_identity(self.chat_template),
        }


class HFPairTokenizer(PairTokenizer):
    """An HF tokenizer directory; its chat template is applied when it has one."""

    kind = "hf"

    def __init__(self, path: str):
        try:
            from transformers import AutoTokenizer
        except ImportError as e:
            raise ImportError(
                "HF tokenizers need `transformers`: pip install 'megatron_adadpo[hf]'"
            ) from e

        self.path = path
        self._hf = AutoTokenizer.from_pretrained(path)
        self.bos_id = self._hf.bos_token_id
        self.bos_text = self._hf.bos_token if self.bos_id is not None else None
        self.eos_id = self._hf.eos_token_id
        pad = self._hf.pad_token_id
        self.pad_id = pad if pad is not None else (self.eos_id if self.eos_id is not None else 0)
        self.vocab_size = len(self._hf)
        special = [t.content for t in self._hf.added_tokens_decoder.values() if t.special]
        self.control_texts = tuple(sorted(set(special) | set(self._hf.all_special_tokens)))
        self.chat_template = getattr(self._hf, "chat_template", None) or None
        self._fast = getattr(self._hf, "_tokenizer", None)

    def encode(self, text: str) -> list[int]:
        if self._fast is not None:  # the Rust tokenizer directly: same ids, less overhead
            return self._fast.encode(text, add_special_tokens=False).ids
        return self._hf.encode(text, add_special_tokens=False)

    def decode(self, ids: Any) -> str:
        return self._hf.decode(list(ids))


class SentencePiecePairTokenizer(PairTokenizer):
    """A sentencepiece `.model`, with the plain template.

    sentencepiece adds its own word-boundary prefix, so one leading space of a text is removed
    before encoding (the plain template's " {answer}" then encodes as the word "▁{answer}").
    """

    kind = "sentencepiece"

    def __init__(self, path: str):
        import sentencepiece as spm

        self.path = path
        self._sp = spm.SentencePieceProcessor(model_file=path)
        self.bos_id = self._sp.bos_id() if self._sp.bos_id() >= 0 else None
        self.eos_id = self._sp.eos_id() if self._sp.eos_id() >= 0 else None
        pad = self._sp.pad_id()
        self.pad_id = pad if pad >= 0 else (self.eos_id if self.eos_id is not None else 0)
        self.vocab_size = self._sp.get_piece_size()

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(text[1:] if text.startswith(" ") else text)

    def decode(self, ids: Any) -> str:
        return self._sp.decode([int(i) for i in ids])


def resolve_tokenizer(path: str, kind: str = "auto") -> tuple[str, str]:
    """``(kind, file or directory to load)`` for ``data.tokenizer`` / ``data.tokenizer_kind``.

    A file is a sentencepiece model. A directory is an HF tokenizer when it holds one of
    ``HF_TOKENIZER_FILES``; otherwise (or with ``kind="sentencepiece"``) it is a sentencepiece
    directory, and its one ``*.model`` file is loaded with sentencepiece (transformers would guess
    a slow-tokenizer class and fail with "need sentencepiece installed" for any other name).
    """
    if kind not in ("auto", "hf", "sentencepiece"):
        raise ValueError(f"data.tokenizer_kind={kind!r}: use auto, hf or sentencepiece")
    if not os.path.exists(path):
        raise ValueError(f"data.tokenizer: {path} does not exist (HF dir or sentencepiece .model)")
    if not os.path.isdir(path):
        return ("sentencepiece" if kind == "auto" else kind), path
    names = set(os.listdir(path))
    models = sorted(
        n for n in names if n.endswith(".model") and os.path.isfile(os.path.join(path, n))
    )
    if kind == "hf" or (kind == "auto" and (names & set(HF_TOKENIZER_FILES) or not models)):
        return "hf", path
    if len(models) != 1:
        found = f"{len(models)} sentencepiece .model files ({', '.join(models)})" if models else ""
        raise ValueError(
            f"data.tokenizer={path} is a directory with no HF tokenizer files "
            f"({' / '.join(HF_TOKENIZER_FILES)}) and {found or 'no sentencepiece .model file'}: "
            "set data.tokenizer to the sentencepiece .model file itself, or to an HF tokenizer "
            "directory"
        )
    return "sentencepiece", os.path.join(path, models[0])


def load_tokenizer(path: str, kind: str = "auto") -> PairTokenizer:
    """Load an HF tokenizer directory or a sentencepiece model (``resolve_tokenizer``)."""
    kind, source = resolve_tokenizer(path, kind)
    if kind == "hf":
        return HFPairTokenizer(source)
    return SentencePiecePairTokenizer(source)


def _check_control_text(tok: PairTokenizer, rec: PreferenceRecord) -> None:
    """Refuse data text that the tokenizer would encode as a special token."""
    texts = [(f"prompt turn {k}", c) for k, (_, c) in enumerate(rec.prompt)]
    for where, text in texts + [("chosen", rec.chosen), ("rejected", rec.rejected)]:
        if tok.bos_id is not None and tok.bos_text and tok.bos_text in text:
            raise RowRejected(
                "double_bos",
                f"{where} contains the BOS string {tok.bos_text!r}, which would add a second "
                "BOS token; remove it from the data (BOS is added once by the pipeline)",
            )
        for control in tok.control_texts:
            if control in text:
                raise RowRejected(
                    "control_token",
                    f"{where} contains {control!r}, which the tokenizer encodes as a special "
                    "(control) token, not as text; remove or rewrite it in the data",
                )


def _check_bos(tok: PairTokenizer, rec: PreferenceRecord, prompt: list[int]) -> None:
    """Refuse a BOS string in the data, and a template that renders BOS twice in a row."""
    _check_control_text(tok, rec)
    if tok.bos_id is None:
        return
    if prompt[1:2] == [tok.bos_id]:
        raise RowRejected(
            "double_bos",
            "the chat template renders BOS twice at the start; remove one `{{ bos_token }}`",
        )


def encode_prompt(tok: PairTokenizer, prompt_text: str) -> list[int]:
    """``[BOS] + prompt tokens`` of a rendered prompt (BOS once: see the module docstring)."""
    prompt = tok.encode(prompt_text)
    if tok.bos_id is not None and prompt[:1] != [tok.bos_id]:
        prompt = [tok.bos_id] + prompt
    return prompt


def tokenize_record(
    tok: PairTokenizer,
    rec: PreferenceRecord,
    chat_template: str = "auto",
    chat_template_tail: str = "keep",
) -> TokenizedPair:
    """Apply raw text or template + BOS / EOS policy to one record (see the module docstring;
    the two settings are `DataConfig`'s).

    Raises:
        RowRejected: `template_error`, `double_bos`, `control_token` or `prompt_mismatch`.
    """
    texts = render_pair(tok, rec, chat_template, chat_template_tail)
    prompt = encode_prompt(tok, texts.prompt)
    _check_bos(tok, rec, prompt)
    completions = []
    for text in (texts.chosen, texts.rejected):
        ids = tok.encode(text)
        ended = ids[-1:] == [tok.eos_id] or (texts.tail_kept and tok.eos_id in ids)
        if tok.eos_id is not None and not ended:
            ids.append(tok.eos_id)
        completions.append(ids)
    chosen = np.asarray(prompt + completions[0], dtype=np.int64)
    rejected = np.asarray(prompt + completions[1], dtype=np.int64)
    n = len(prompt)
    if not np.array_equal(chosen[:n], rejected[:n]):  # guards future changes of the above
        raise RowRejected("prompt_mismatch", "chosen and rejected prompt tokens differ")
    return TokenizedPair(chosen[:n], chosen[n:], rejected[n:], rec.pair_id)

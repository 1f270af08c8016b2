"""`DataConfig`: every setting of the preference data pipeline, validated once."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from megatron_adadpo.data.sources import is_hf_dataset

SCHEMAS = ("auto", "explicit", "implicit")
TOKENIZER_KINDS = ("auto", "hf", "sentencepiece")
OVERLENGTH = ("truncate", "drop")
TRUNCATION_MODES = ("keep_start", "keep_end")  # TRL's DPOConfig.truncation_mode
ON_ERROR = ("fail", "skip")
BATCHING = ("fixed", "token_budget", "packed")  # data/batching.py
CHAT_TEMPLATE_MODES = ("auto", "always")
CHAT_TEMPLATE_TAILS = ("keep", "strip")

REJECTED_OPTIONAL = "rejected_optional"
TRUNCATION_MODE = "truncation_mode"
# Settings that change the tokenized output; they enter the manifest identity.
IDENTITY_FIELDS = (
    "prompt_field",
    "chosen_field",
    "rejected_field",
    "schema",
    "max_length",
    "max_prompt_length",
    "overlength",
    "chat_template",
    "chat_template_tail",
)


def default_cache_dir() -> str:
    """`$MEGATRON_ADADPO_CACHE` or `~/.cache/megatron_adadpo/data`."""
    root = os.environ.get("MEGATRON_ADADPO_CACHE")
    if root:
        return os.path.join(root, "data")
    return os.path.join(os.path.expanduser("~"), ".cache", "megatron_adadpo", "data")


@dataclass(frozen=True)
class DataConfig:
    """Preference data settings.

    Attributes:
        inputs: Paths or specs, read in order. A path is a `.jsonl`, `.json` or `.parquet` file,
            a directory written by `datasets.Dataset.save_to_disk`, or a directory of such files.
            `"hf:NAME"` or `"hf:NAME:SPLIT"` calls `datasets.load_dataset(NAME, split=...)`; a
            mapping is passed to `datasets.load_dataset(**mapping)` (`split` defaults to
            `split` below); a `datasets.Dataset` object is used as is.
        prompt_field: Column holding the prompt (string or chat messages), schema (a).
        chosen_field: Column holding the preferred completion or conversation.
        rejected_field: Column holding the dispreferred completion or conversation.
        schema: "explicit" (prompt + chosen + rejected), "implicit" (chosen and rejected are
            whole conversations sharing the prompt) or "auto" (explicit when the row has a
            non-null prompt field).
        tokenizer: An HF tokenizer directory or a sentencepiece `.model` file.
        tokenizer_kind: "hf", "sentencepiece" or "auto" (decided from the path).
        max_length: Longest prompt + completion, in tokens (BOS and EOS included).
        max_prompt_length: Longest prompt in tokens (None: only `max_length` limits it).
        overlength: "truncate" (`truncation_mode` says what is kept) or "drop".
        truncation_mode: Under `overlength: truncate`, TRL's `truncation_mode`: "keep_start"
            (the prompt keeps its end, completions their start) or "keep_end" (a sequence loses
            its start: the prompt's, then a completion's; `data/truncation.py`). Enters the
            identity only when "keep_end", so earlier caches and manifests keep theirs.
        chat_template: Which rows get the chat template (TRL's dataset formats, docs/data.md).
            "auto": conversational rows (any field a message list) are templated; standard rows
            (every field a string) are raw text, prompt + completion concatenated, as in TRL.
            "always": standard rows too (a string prompt becomes a user turn).
        chat_template_tail: What a chat template renders after the assistant's end-of-turn
            (e.g. the "\n" after EOS). "keep": it stays in the completion and is trained, as
            in TRL; "strip": trailing whitespace is dropped, so the completion ends at EOS.
        on_error: "fail" (raise before training, listing every bad row) or "skip" (report).
        preprocessed: Directory written by `tools/preprocess_data.py`; used instead of `inputs`.
        cache_dir: Where raw inputs tokenized on the fly are cached (None: default_cache_dir()).
        num_workers: Tokenizer processes for on-the-fly preprocessing.
        split: Split used for `hf:` specs and `DatasetDict` directories without one.
        batching: How a step's pairs become micro-batches (`data/batching.py`): "fixed"
            (`train.micro_batch_size` pairs each), "token_budget" (length-sorted pairs up to
            `max_tokens_per_micro_batch` padded tokens each) or "packed" (several pairs per
            row, attention confined to each sequence). The loss is the same in every mode.
        max_tokens_per_micro_batch: Tokens per micro-batch, padding included, for
            "token_budget" and "packed" (at least 2 x `max_length`: a pair is never split).
        rejected_optional: Rows may lack the rejected column (set for `loss.name: sft`, which
            trains on the chosen answers only, and by `tools/preprocess_data.py
            --rejected-optional`): such a row's rejected completion is a copy of its chosen
            one, scored but carrying no loss. Enters the identity only when set.
    """

    inputs: tuple[Any, ...] = ()
    prompt_field: str = "prompt"
    chosen_field: str = "chosen"
    rejected_field: str = "rejected"
    schema: str = "auto"
    tokenizer: str | None = None
    tokenizer_kind: str = "auto"
    max_length: int = 1024
    max_prompt_length: int | None = 512
    overlength: str = "truncate"
    truncation_mode: str = "keep_start"
    chat_template: str = "auto"
    chat_template_tail: str = "keep"
    on_error: str = "fail"
    preprocessed: str | None = None
    cache_dir: str | None = None
    num_workers: int = 1
    split: str = "train"
    batching: str = "fixed"
    max_tokens_per_micro_batch: int | None = None
    rejected_optional: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.inputs, (str, os.PathLike, Mapping)):
            object.__setattr__(self, "inputs", (self.inputs,))
        else:
            object.__setattr__(self, "inputs", tuple(self.inputs))
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the offending field and the fix."""
        _choice("schema", self.schema, SCHEMAS)
        _choice("tokenizer_kind", self.tokenizer_kind, TOKENIZER_KINDS)
        _choice("overlength", self.overlength, OVERLENGTH)
        _choice("truncation_mode", self.truncation_mode, TRUNCATION_MODES)
        if self.truncation_mode == "keep_end" and self.overlength == "drop":
            raise ValueError(
                "data.truncation_mode=keep_end has no effect under data.overlength=drop (an "
                "over-length pair is dropped, nothing is truncated): set data.overlength="
                "truncate, or remove data.truncation_mode"
            )
        _choice("on_error", self.on_error, ON_ERROR)
        _choice("batching", self.batching, BATCHING)
        budget = self.max_tokens_per_micro_batch
        if self.batching != "fixed" and (
            not isinstance(budget, int) or isinstance(budget, bool) or budget < 1
        ):
            raise ValueError(
                f"data.batching={self.batching} needs data.max_tokens_per_micro_batch (tokens "
                f"per micro-batch, padding included; >= 2 x data.max_length); got {budget!r}"
            )
        if self.batching == "fixed" and budget is not None:
            raise ValueError(
                f"data.max_tokens_per_micro_batch={budget!r} has no effect under "
                "data.batching=fixed (train.micro_batch_size pairs per micro-batch): set "
                "data.batching=token_budget or packed, or remove it (null)"
            )
        _choice("chat_template", self.chat_template, CHAT_TEMPLATE_MODES, _TEMPLATE_SOURCE)
        _choice("chat_template_tail", self.chat_template_tail, CHAT_TEMPLATE_TAILS)
        if not self.inputs and not self.preprocessed:
            raise ValueError("data.inputs is empty and data.preprocessed is unset: give one")
        if self.tokenizer is None and not self.preprocessed:
            raise ValueError("data.tokenizer is unset: give an HF tokenizer dir or a .model file")
        if not isinstance(self.max_length, int) or self.max_length < 2:
            raise ValueError(f"data.max_length={self.max_length!r}: use an int >= 2")
        mpl = self.max_prompt_length
        if mpl is not None and (not isinstance(mpl, int) or not 1 <= mpl <= self.max_length):
            raise ValueError(
                f"data.max_prompt_length={mpl!r}: use an int in [1, max_length={self.max_length}]"
                " (or None for no separate prompt limit)"
            )
        if not isinstance(self.num_workers, int) or self.num_workers < 1:
            raise ValueError(f"data.num_workers={self.num_workers!r}: use an int >= 1")
        for name in ("prompt_field", "chosen_field", "rejected_field"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise ValueError(f"data.{name} must be a non-empty column name")
        for spec in self.inputs:
            if not isinstance(spec, (str, os.PathLike, Mapping)) and not is_hf_dataset(spec):
                raise ValueError(
                    f"data.inputs entry {spec!r}: use a path, 'hf:NAME[:SPLIT]' or a mapping of "
                    "datasets.load_dataset arguments"
                )

    def replace(self, **changes: Any) -> DataConfig:
        """A copy with `changes` applied (validated)."""
        return dataclasses.replace(self, **changes)

    def identity_settings(self) -> dict[str, Any]:
        """The settings that change tokenized output (compared against a manifest)."""
        settings = {name: getattr(self, name) for name in IDENTITY_FIELDS}
        if self.rejected_optional:  # only when set: earlier caches and manifests keep theirs
            settings[REJECTED_OPTIONAL] = True
        if self.truncation_mode != "keep_start":  # likewise
            settings[TRUNCATION_MODE] = self.truncation_mode
        return settings


_TEMPLATE_SOURCE = (
    " (the template itself is the tokenizer's: chat_template.jinja in data.tokenizer)"
)


def _choice(name: str, value: Any, allowed: tuple[str, ...], note: str = "") -> None:
    if value not in allowed:
        raise ValueError(f"data.{name}={value!r}: use one of {', '.join(allowed)}{note}")

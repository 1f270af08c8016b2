"""On-disk format of tokenized pairs and its manifest.

A preprocessed directory holds:

- `pairs.bin` / `pairs.idx`: a Megatron-Core `IndexedDataset` (memory-mapped). Pair `i` is
  document `i` made of three sequences: `[prompt, chosen completion, rejected completion]`
  (the prompt is stored once, so chosen and rejected share it by construction).
- `pair_ids.npy`: int64 `[num_pairs]`, the stable row index of each pair in the inputs.
- `manifest.json`: format version, `identity` (sha256 over the tokenizer files and template,
  the settings that change tokens, and the input content hashes), counts, length histogram,
  and `integrity`: the checksum and size of each file above and the largest token id
  (integrity.py), verified at every open. It is written last: a directory without it is
  incomplete.
- `data_report.json`: every dropped row with its location and reason.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from typing import Any

import numpy as np
import torch

from megatron_adadpo.platform.megatron import DType, IndexedDataset, IndexedDatasetBuilder
from megatron_adadpo.platform.safe_pickle import load_npy

from .integrity import DataIntegrityError, verify

FORMAT = "megatron_adadpo.preference_pairs"
FORMAT_VERSION = 1
PREFIX = "pairs"
MANIFEST = "manifest.json"


def compute_identity(
    tokenizer: dict[str, Any], settings: dict[str, Any], input_hashes: list[str]
) -> str:
    """sha256 of everything that determines the tokenized pairs."""
    blob = json.dumps(
        {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "tokenizer": tokenizer,
            "settings": settings,
            "inputs": input_hashes,
        },
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()


def read_manifest(directory: str) -> dict[str, Any] | None:
    """The manifest of a complete preprocessed directory, else None."""
    path = os.path.join(directory, MANIFEST)
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


class PairWriter:
    """Append tokenized pairs, then `finalize` (writes everything but the manifest).

    Pair `i` is document `i` of a Megatron `IndexedDatasetBuilder` (public API only:
    `add_document`, `finalize`), made of three sequences `[prompt, chosen, rejected]`.
    """

    def __init__(self, directory: str, vocab_size: int):
        os.makedirs(directory, exist_ok=True)
        self.directory = directory
        self.dtype = DType.optimal_dtype(vocab_size)
        self._builder = IndexedDatasetBuilder(
            os.path.join(directory, PREFIX + ".bin"), dtype=self.dtype
        )
        self._pair_ids: list[int] = []
        self.max_token_id = -1  # over every pair added so far

    def add_pairs(self, tokens: np.ndarray, lengths: list[int], pair_ids: list[int]) -> None:
        """Append `P = len(pair_ids)` pairs, in order.

        Args:
            tokens: int `[sum(lengths)]`, the pairs' `[prompt, chosen, rejected]` sequences,
                concatenated.
            lengths: `[3 * P]`, the prompt, chosen and rejected lengths of each pair.
            pair_ids: `[P]`, the stable row index of each pair.
        """
        if len(lengths) != 3 * len(pair_ids) or sum(lengths) != len(tokens):
            raise ValueError(
                f"{len(pair_ids)} pairs need 3 lengths each summing to the {len(tokens)} tokens; "
                f"got {len(lengths)} lengths summing to {sum(lengths)}"
            )
        if len(tokens):
            self.max_token_id = max(self.max_token_id, int(np.max(tokens)))
        pair_sizes = [sum(lengths[k : k + 3]) for k in range(0, len(lengths), 3)]
        documents = torch.from_numpy(np.asarray(tokens, dtype=np.int64)).split(pair_sizes)
        for k, document in enumerate(documents):
            self._builder.add_document(document, lengths[3 * k : 3 * k + 3])
        self._pair_ids.extend(pair_ids)

    def finalize(self) -> None:
        self._builder.finalize(os.path.join(self.directory, PREFIX + ".idx"))
        np.save(os.path.join(self.directory, "pair_ids.npy"), np.asarray(self._pair_ids, np.int64))

    @property
    def token_dtype(self) -> str:
        return np.dtype(self.dtype).name


def write_manifest(directory: str, manifest: dict[str, Any]) -> None:
    tmp = os.path.join(directory, MANIFEST + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=1, sort_keys=True)
    os.replace(tmp, os.path.join(directory, MANIFEST))


def publish(partial: str, final: str) -> None:
    """Move a finished `partial` directory to `final` (manifest last; safe for concurrent
    writers of the same identity: the first one to finish wins)."""
    os.makedirs(final, exist_ok=True)
    stale = os.path.join(final, MANIFEST)
    if os.path.exists(stale):
        os.remove(stale)
    names = sorted(os.listdir(partial), key=lambda n: n == MANIFEST)
    for name in names:
        os.replace(os.path.join(partial, name), os.path.join(final, name))
    shutil.rmtree(partial, ignore_errors=True)


class PreferenceDataset(torch.utils.data.Dataset):
    """Map-style dataset over a preprocessed directory.

    `ds[i]` is a dict:
        chosen_ids: int64 `[prompt_length + chosen_completion_length]` (BOS ... EOS)
        rejected_ids: int64 `[prompt_length + rejected_completion_length]`
        prompt_length: int, number of leading tokens shared by both (BOS included)
        pair_id: int, stable row index in the inputs
    """

    def __init__(self, directory: str, fix: str | None = None):
        """Open ``directory`` after verifying its files against the manifest's checksums.

        Raises:
            DataIntegrityError: a file is missing, truncated or damaged, or the manifest records
                no checksums; the message ends with ``fix`` (default: re-preprocess with --force).
            ValueError: not a preprocessed directory, or another format version.
        """
        fix = fix or (
            f"re-run tools/preprocess_data.py --force --output {directory} with the inputs, "
            "tokenizer and settings its manifest.json lists"
        )
        try:
            manifest = read_manifest(directory)
        except ValueError as err:  # not JSON: a damaged or half-copied manifest
            path = os.path.join(directory, MANIFEST)
            raise DataIntegrityError(path, f"is damaged ({err})", fix) from None
        if manifest is None or manifest.get("format") != FORMAT:
            raise ValueError(
                f"{directory} is not a complete preprocessed directory (no {MANIFEST}); run "
                "tools/preprocess_data.py"
            )
        if manifest.get("version") != FORMAT_VERSION:
            raise ValueError(
                f"{directory}: format version {manifest.get('version')}, this code reads "
                f"{FORMAT_VERSION}; re-run tools/preprocess_data.py"
            )
        verify(directory, manifest, fix)  # before Megatron maps a file that may be truncated
        self.directory = directory
        self.manifest = manifest
        self._ds = IndexedDataset(os.path.join(directory, PREFIX))
        self._pair_ids = load_npy(os.path.join(directory, "pair_ids.npy"))
        if len(self._ds) != 3 * len(self._pair_ids):
            raise ValueError(f"{directory}: .idx and pair_ids.npy disagree; re-run preprocessing")

    @property
    def identity(self) -> str:
        """The manifest identity hash (tools that derive data from this set tie to it)."""
        return self.manifest["identity"]

    @property
    def pad_id(self) -> int:
        """The tokenizer's pad id (its EOS, else 0, when it has none): pass to collate_pairs."""
        return self.manifest["tokenizer"]["pad_id"]

    @property
    def vocab_size(self) -> int:
        """Tokenizer vocabulary size, added tokens included (the model may pad it further)."""
        return self.manifest["tokenizer"]["vocab_size"]

    @property
    def max_token_id(self) -> int:
        """The largest token id of the pairs (recorded when written, the files verified)."""
        return self.manifest["integrity"]["max_token_id"]

    def __len__(self) -> int:
        return len(self._pair_ids)

    def __getitem__(self, i: int) -> dict[str, Any]:
        if not -len(self) <= i < len(self):
            raise IndexError(f"pair index {i} out of range for {len(self)} pairs")
        i = i % len(self)
        prompt, chosen, rejected = self._ds[3 * i : 3 * i + 3]
        prompt = prompt.astype(np.int64)
        return {
            "chosen_ids": np.concatenate([prompt, chosen.astype(np.int64)]),
            "rejected_ids": np.concatenate([prompt, rejected.astype(np.int64)]),
            "prompt_length": len(prompt),
            "pair_id": int(self._pair_ids[i]),
        }

    def lengths(self) -> np.ndarray:
        """int64 `[num_pairs, 3]`: prompt, chosen and rejected completion lengths."""
        return self._ds.sequence_lengths.reshape(-1, 3).astype(np.int64)

"""Input sources: jsonl / json / parquet files, `save_to_disk` directories, `load_dataset` specs.

Each source yields raw rows with their location (1-based line for text files, 0-based row index
otherwise) and has a content fingerprint, so that preprocessing can tell unchanged inputs.
JSON-lines rows are yielded as raw bytes and parsed by the tokenizer workers (parallel). A row
already known to be bad when read (a JSON array file that does not parse) is yielded as its
`RowRejected`, which the pipeline reports like any other rejection. A UTF-8 byte-order mark at
the start of a text file (Windows editors write one) is skipped.
"""

from __future__ import annotations

import codecs
import hashlib
import json
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from .report import RowRejected

FILE_SUFFIXES = (".jsonl", ".json", ".parquet")


def hf_fingerprint(dataset) -> str:
    """An HF ``datasets.Dataset``'s content fingerprint. ``datasets`` keeps it in the private
    ``_fingerprint`` (5.2: set from the arrow files or the transforms applied; no public
    accessor): read here only, so a rename upstream is one change."""
    return dataset._fingerprint


def is_hf_dataset(value) -> bool:
    """``value`` is an in-memory HF ``datasets.Dataset`` (duck-typed: no import of datasets)."""
    return hasattr(value, "_fingerprint") and hasattr(value, "column_names")


@dataclass(frozen=True)
class Location:
    """Where a row comes from: source name, 1-based line (text files) or 0-based row index."""

    source: str
    index: int
    index_kind: str  # "line" | "row"


Row = tuple[Location, dict[str, Any] | bytes | RowRejected]


def _sha256_file(path: str, h: Any = None) -> str:
    h = h or hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _is_saved_dataset(path: str) -> bool:
    names = set(os.listdir(path))
    return bool({"dataset_info.json", "state.json", "dataset_dict.json"} & names)


class InputSource:
    """One entry of `DataConfig.inputs`."""

    def __init__(self, spec: Any, split: str = "train"):
        self.spec = spec
        self.split = split
        self._dataset = None
        if isinstance(spec, Mapping):
            self.kind, self.name = "load_dataset", f"load_dataset({dict(spec)!r})"
        elif isinstance(spec, str) and spec.startswith("hf:"):
            self.kind, self.name = "load_dataset", spec
        elif is_hf_dataset(spec):
            self.kind, self.name = "dataset", f"<datasets.Dataset {hf_fingerprint(spec)}>"
            self._dataset = spec
        else:
            path = os.fspath(spec)
            self.name = path
            if os.path.isdir(path):
                self.kind = "saved_dataset" if _is_saved_dataset(path) else "directory"
            elif os.path.isfile(path):
                if not path.endswith(FILE_SUFFIXES):
                    raise ValueError(
                        f"data.inputs: {path}: unsupported file type; use .jsonl, .json, "
                        ".parquet, a save_to_disk directory or 'hf:NAME[:SPLIT]'"
                    )
                self.kind = "file"
            else:
                raise ValueError(
                    f"data.inputs: {path} does not exist (prefix hub datasets with 'hf:')"
                )

    # ------------------------------------------------------------------ fingerprint
    def fingerprint(self) -> str:
        """sha256 of the content (files) or the datasets fingerprint (HF datasets)."""
        if self.kind == "file":
            return _sha256_file(self.name)
        if self.kind == "directory":
            h = hashlib.sha256()
            for path in self._files():
                h.update(os.path.basename(path).encode() + b"\0" + _sha256_file(path).encode())
            return h.hexdigest()
        if self.kind == "saved_dataset":
            h = hashlib.sha256()
            for root, _, files in sorted(os.walk(self.name)):
                for f in sorted(files):
                    rel = os.path.relpath(os.path.join(root, f), self.name)
                    h.update(rel.encode() + b"\0")
                    _sha256_file(os.path.join(root, f), h)
            return h.hexdigest()
        ds = self._hf_dataset()
        return hashlib.sha256(f"{self.name}\0{hf_fingerprint(ds)}".encode()).hexdigest()

    # ------------------------------------------------------------------ rows
    def rows(self) -> Iterator[Row]:
        """Yield (location, row) for every row: a dict, the bytes of a JSON line, or the
        `RowRejected` of a row that is bad before parsing."""
        if self.kind == "file":
            yield from _file_rows(self.name)
        elif self.kind == "directory":
            for path in self._files():
                yield from _file_rows(path)
        else:
            ds = self._hf_dataset()
            for i, row in enumerate(ds):
                yield Location(self.name, i, "row"), row

    def _files(self) -> list[str]:
        files = sorted(
            os.path.join(self.name, f) for f in os.listdir(self.name) if f.endswith(FILE_SUFFIXES)
        )
        if not files:
            raise ValueError(f"data.inputs: directory {self.name} holds no {FILE_SUFFIXES} file")
        return files

    def _hf_dataset(self) -> Any:
        if self._dataset is not None:
            return self._dataset
        import datasets

        if self.kind == "saved_dataset":
            ds = datasets.load_from_disk(self.name)
        elif isinstance(self.spec, Mapping):
            ds = datasets.load_dataset(**{"split": self.split, **dict(self.spec)})
        else:
            name, _, split = self.spec[3:].partition(":")
            ds = datasets.load_dataset(name, split=split or self.split)
        if isinstance(ds, datasets.DatasetDict):
            if self.split not in ds:
                raise ValueError(
                    f"data.inputs: {self.name} has splits {list(ds)}, not '{self.split}'; "
                    "set data.split"
                )
            ds = ds[self.split]
        self._dataset = ds
        return ds


def _file_rows(path: str) -> Iterator[Row]:
    if path.endswith(".parquet"):
        import pyarrow.parquet as pq

        index = 0
        for batch in pq.ParquetFile(path).iter_batches(batch_size=1024):
            for row in batch.to_pylist():
                yield Location(path, index, "row"), row
                index += 1
        return
    with open(path, "rb") as f:
        start = len(codecs.BOM_UTF8) if f.read(3) == codecs.BOM_UTF8 else 0  # editors add one
        f.seek(start)
        if path.endswith(".json") and f.read(4096).lstrip()[:1] == b"[":
            f.seek(start)
            yield from _json_array_rows(path, f.read())
            return
        f.seek(start)
        for n, line in enumerate(f, start=1):  # streamed: JSON-lines files may be large
            if line.strip():
                yield Location(path, n, "line"), line.rstrip(b"\r\n")


def _json_array_rows(path: str, data: bytes) -> Iterator[Row]:
    try:
        rows = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        detail = f"invalid UTF-8 in the JSON array: {e.reason}"
        yield Location(path, line, "line"), RowRejected("undecodable_text", detail)
        return
    except json.JSONDecodeError as e:
        detail = f"{e.msg} at column {e.colno}; no row was read"
        yield Location(path, e.lineno, "line"), RowRejected("malformed_json", detail)
        return
    for i, row in enumerate(rows):
        # Non-dict rows are re-encoded so the worker reports them as wrong_type.
        yield Location(path, i, "row"), row if isinstance(row, dict) else json.dumps(row).encode()

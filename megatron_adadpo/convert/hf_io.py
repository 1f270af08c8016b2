"""HF checkpoint files: lazy safetensors reading, sharded writing with an index, tokenizer files."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import struct
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
)


class HFCheckpointError(ValueError):
    """A file of the HF checkpoint is missing or inconsistent."""


_ST_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "BF16": torch.bfloat16,
    "F16": torch.float16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


class _SafetensorsFile:
    """One safetensors file: the header is parsed once; a tensor is read with one ``pread``
    (``get_tensor``: a private copy in memory) or mapped (``map_tensor``: no copy, see there).
    """

    def __init__(self, path: Path):
        self.path = path
        try:
            with open(path, "rb") as f:
                (length,) = struct.unpack("<Q", f.read(8))
                header = json.loads(f.read(length))
        except (struct.error, ValueError, UnicodeDecodeError) as err:
            raise HFCheckpointError(
                f"{path} is not a safetensors file ({err}); re-download it"
            ) from err
        header.pop("__metadata__", None)
        self.start = 8 + length
        self.header = header
        self.map = None

    def keys(self) -> list[str]:
        return list(self.header)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.header[name]["shape"])

    def dtype(self, name: str) -> str:
        return self.header[name]["dtype"]

    def get_tensor(self, name: str) -> torch.Tensor:
        info = self.header[name]
        begin, end = info["data_offsets"]
        buf = bytearray(end - begin)
        with open(self.path, "rb", buffering=0) as f:
            f.seek(self.start + begin)
            view, done = memoryview(buf), 0
            while done < len(buf):
                n = f.readinto(view[done:])
                if not n:
                    raise HFCheckpointError(f"{self.path} is truncated (reading {name!r})")
                done += n
        dtype = _ST_DTYPES[info["dtype"]]
        if not buf:
            return torch.empty(info["shape"], dtype=dtype)
        return torch.frombuffer(buf, dtype=dtype).reshape(info["shape"])

    def map_tensor(self, name: str) -> torch.Tensor:
        """A view of the tensor's bytes in the file (one copy-on-write ``mmap`` per file).

        Nothing is read until the data is accessed; the pages then stay resident (and count in
        the RSS of the process that read them) while the tensor lives, but they are clean file
        cache that the kernel may drop and re-read. The tensor owns a storage of exactly its
        size, so ``dist_checkpointing``'s writer does not clone it.
        """
        info = self.header[name]
        begin, end = info["data_offsets"]
        if end == begin:
            return self.get_tensor(name)
        if self.map is None:
            self.map = np.memmap(self.path, np.uint8, "c")  # holds one descriptor
        if self.start + end > len(self.map):
            raise HFCheckpointError(f"{self.path} is truncated (mapping {name!r})")
        raw = self.map[self.start + begin : self.start + end]
        return torch.from_numpy(raw).view(_ST_DTYPES[info["dtype"]]).reshape(info["shape"])


class SafetensorsReader:
    """Tensors of an HF directory, read one at a time (never the whole file).

    Accepts ``model.safetensors.index.json`` + shards, or a single ``model.safetensors``.
    """

    def __init__(self, hf_dir: str | Path):
        self.dir = Path(hf_dir)
        self._handles: dict[str, object] = {}
        index = self.dir / INDEX_FILE
        if index.is_file():
            self.source = index
            self.weight_map = json.loads(index.read_text())["weight_map"]
            for file in sorted(set(self.weight_map.values())):
                if not (self.dir / file).is_file():
                    raise HFCheckpointError(
                        f"missing shard {self.dir / file} (listed in {index}); download the "
                        "complete checkpoint (every file the index names)"
                    )
        elif (self.dir / SINGLE_FILE).is_file():
            self.source = self.dir / SINGLE_FILE
            self.weight_map = dict.fromkeys(_SafetensorsFile(self.source).keys(), SINGLE_FILE)
        else:
            bins = sorted(p.name for p in self.dir.glob("*.bin"))
            hint = (
                f" (found {bins}: re-save it with save_pretrained(safe_serialization=True))"
                if bins
                else ""
            )
            raise HFCheckpointError(
                f"{self.dir} has neither {INDEX_FILE} nor {SINGLE_FILE}; point --hf-dir at an HF "
                f"model directory with safetensors weights{hint}"
            )

    def names(self) -> list[str]:
        return list(self.weight_map)

    def _handle(self, name: str):
        if name not in self.weight_map:
            raise HFCheckpointError(
                f"tensor {name!r} not found in {self.source}; the checkpoint does not match its "
                "config.json (wrong num_hidden_layers / tie_word_embeddings?) or is incomplete"
            )
        file = self.weight_map[name]
        if file not in self._handles:
            self._handles[file] = _SafetensorsFile(self.dir / file)
        return self._handles[file]

    def get(self, name: str) -> torch.Tensor:
        return self._handle(name).get_tensor(name)

    def map(self, name: str) -> torch.Tensor:
        """``name`` mapped from its file, not read (``_SafetensorsFile.map_tensor``)."""
        return self._handle(name).map_tensor(name)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._handle(name).shape(name)

    def dtype(self, name: str) -> str:
        return self._handle(name).dtype(name)

    def torch_dtype(self, name: str) -> torch.dtype:
        return _ST_DTYPES[self.dtype(name)]

    def file_of(self, name: str) -> Path:
        return self.dir / self.weight_map[name]


def require_empty_output(path: Path) -> None:
    """Refuse to write into a non-empty directory (stale shards would mix with new ones)."""
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise FileExistsError(
            f"output {path} exists and is not an empty directory; choose a new --output or "
            "delete it first"
        )


@contextlib.contextmanager
def staged_output(path: Path) -> Iterator[Path]:
    """A hidden sibling directory to write ``path``'s contents into, renamed to ``path`` when the
    block succeeds; on failure it is removed with any parent directories this call created, so a
    failed conversion leaves no output folder (an empty ``path`` that existed stays as it was).
    An ``OSError`` in the block (a full disk) becomes a ``ValueError`` naming the file.
    """
    require_empty_output(path)
    created = [p for p in (path.parent, *path.parent.parents) if not p.exists()]
    path.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent))
    umask = os.umask(0)
    os.umask(umask)
    stage.chmod(0o777 & ~umask)  # mkdtemp makes it 0700; give it a plain mkdir's mode
    try:
        try:
            yield stage
        except OSError as err:  # a full disk, a quota
            where = str(err.filename or stage).replace(str(stage), str(path))  # stage is gone
            raise ValueError(
                f"cannot write {where} ({err.strerror or err}); free space there or choose "
                "another --output"
            ) from err
        os.replace(stage, path)  # rename(2) replaces an empty directory
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        for parent in created:  # innermost first
            with contextlib.suppress(OSError):
                parent.rmdir()
        raise


def shard_file_name(index: int, count: int) -> str:
    return f"model-{index + 1:05d}-of-{count:05d}.safetensors"


def write_shard(out_dir: Path, file: str, tensors: dict[str, torch.Tensor]) -> int:
    """Write one safetensors shard; returns its payload bytes."""
    tensors = {k: t.contiguous() for k, t in tensors.items()}
    try:
        save_file(tensors, str(out_dir / file), metadata={"format": "pt"})
    except SafetensorError as err:  # e.g. "I/O error: No space left on device (os error 28)"
        reason = str(err).removeprefix("Error while serializing: ")
        raise OSError(None, reason, str(out_dir / file)) from err
    return sum(t.numel() * t.element_size() for t in tensors.values())


def write_index(out_dir: Path, weight_map: dict[str, str], total_size: int) -> None:
    index = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}
    (out_dir / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")


def copy_tokenizer_files(src: Path, dst: Path) -> list[str]:
    """Copy the tokenizer (and generation config) files present in ``src``; returns their names."""
    copied = []
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            dst.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src / name, dst / name)
            copied.append(name)
    return copied


def has_tokenizer(directory: Path) -> bool:
    return any((directory / n).is_file() for n in ("tokenizer.json", "tokenizer.model"))


def check_tokenizer_vocab(tok_dir: Path, vocab_rows: int, weights: str) -> int:
    """Raise when the tokenizer has more tokens than the embedding has rows; returns its size.

    A tokenizer smaller than the embedding is normal (Qwen2, Llama 3 reserve rows).
    """
    from transformers import AutoTokenizer

    size = len(AutoTokenizer.from_pretrained(str(tok_dir)))
    if size > vocab_rows:
        raise HFCheckpointError(
            f"tokenizer in {tok_dir} has {size} tokens but the embedding ({weights}) has "
            f"{vocab_rows} rows: tokens {vocab_rows}..{size - 1} would index past the embedding. "
            "Use the tokenizer that belongs to these weights (or resize the embeddings in HF "
            "with model.resize_token_embeddings and save again)"
        )
    return size

"""HF checkpoint files: lazy safetensors reading, sharded writing with an index, tokenizer files."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
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


class SafetensorsReader:
    """Tensors of an HF directory, read one at a time (files are memory-mapped, never loaded).

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
            with safe_open(self.source, framework="pt") as f:
                self.weight_map = {k: SINGLE_FILE for k in f.keys()}
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
            self._handles[file] = safe_open(self.dir / file, framework="pt")
        return self._handles[file]

    def get(self, name: str) -> torch.Tensor:
        return self._handle(name).get_tensor(name)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._handle(name).get_slice(name).get_shape())

    def dtype(self, name: str) -> str:
        return self._handle(name).get_slice(name).get_dtype()

    def file_of(self, name: str) -> Path:
        return self.dir / self.weight_map[name]


def shard_file_name(index: int, count: int) -> str:
    return f"model-{index + 1:05d}-of-{count:05d}.safetensors"


def write_shard(out_dir: Path, file: str, tensors: dict[str, torch.Tensor]) -> int:
    """Write one safetensors shard; returns its payload bytes."""
    tensors = {k: t.contiguous() for k, t in tensors.items()}
    save_file(tensors, str(out_dir / file), metadata={"format": "pt"})
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

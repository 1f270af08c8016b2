"""HF Llama-family directory -> Megatron ``dist_checkpointing`` checkpoint (any TP / PP / VPP).

Output directory: the checkpoint files, ``model.yaml`` (the derived ``ModelConfig``) and
``tokenizer/`` (a copy of the tokenizer files and ``generation_config.json``).

Streaming: the checkpoint template (``megatron_io.template``) is filled with file-backed tensors,
never with the model in memory. A tensor stored as it is in the HF file (same dtype, no
re-layout: norms, o_proj, down_proj, gate / up as the ``linear_fc1`` halves, unpadded
embeddings) is a memory map of the safetensors file; the others (fused QKV, padded vocab rows,
dtype conversions) are read, converted one at a time and spilled to an unnamed scratch file in
the output directory (``megatron_io.file_backed``). ``dist_checkpointing.save`` then writes them
with enough writer processes that each maps at most about one HF shard's worth of bytes
(``WRITER_SHARE``).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import logging
from pathlib import Path

import torch
from tqdm import tqdm

from megatron_adadpo.convert import hf_io, mapping, megatron_io
from megatron_adadpo.convert.hf_config import hf_to_model_config
from megatron_adadpo.model.config import ModelConfig
from megatron_adadpo.platform.megatron import dist_checkpointing

log = logging.getLogger(__name__)
TOKENIZER_DIR = "tokenizer"
# Bytes per checkpoint writer process, as a fraction of the largest HF shard: a writer's mapped
# pages stay in its RSS until it exits, so this bounds peak RSS (see BENCHMARKS.md).
WRITER_SHARE = 0.5


def read_hf_config(hf_dir: Path) -> ModelConfig:
    path = hf_dir / "config.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: --hf-dir must be an HF model directory (config.json + "
            "safetensors + tokenizer files)"
        )
    return hf_to_model_config(json.loads(path.read_text()), where=str(path))


def default_dtype(reader: hf_io.SafetensorsReader) -> torch.dtype:
    """fp32 for fp32 checkpoints, bf16 otherwise (bf16 / fp16 weights)."""
    return torch.float32 if reader.dtype("model.embed_tokens.weight") == "F32" else torch.bfloat16


def check_inputs(hf_dir: Path, reader: hf_io.SafetensorsReader, model: ModelConfig) -> None:
    """Unknown tensors, embedding rows vs config.json, tokenizer size vs embedding."""
    known = {n for e in mapping.tensor_map(model) for n in e.hf}
    extra = [
        n for n in reader.names() if n not in known and not mapping.ignorable_hf_tensor(n, model)
    ]
    if extra:
        raise hf_io.HFCheckpointError(
            f"{reader.source} holds tensors a {model.hf_architecture} with this config.json does "
            f"not have: {extra[:5]}{' ...' if len(extra) > 5 else ''}; check num_hidden_layers / "
            "attention_bias in config.json (or the checkpoint is not a supported architecture)"
        )
    embed = "model.embed_tokens.weight"
    rows = reader.shape(embed)[0]
    if rows != model.vocab_size:
        raise hf_io.HFCheckpointError(
            f"{hf_dir / 'config.json'}: vocab_size={model.vocab_size} but {embed} in "
            f"{reader.file_of(embed)} has {rows} rows; fix vocab_size in config.json"
        )
    if hf_io.has_tokenizer(hf_dir):
        hf_io.check_tokenizer_vocab(hf_dir, rows, f"{embed} in {reader.file_of(embed)}")
    else:
        log.warning("no tokenizer files in %s: the checkpoint will have no tokenizer/", hf_dir)


def fill(sharded: dict, entry, model: ModelConfig, dtype, reader, scratch: Path) -> None:
    """Put ``entry``'s tensor, converted from its HF tensors, into the checkpoint template.

    The tensor is file-backed (see the module docstring): a map of the HF file where the bytes
    are stored unchanged, else a converted copy spilled to ``scratch``.
    """
    target = sharded[entry.megatron]
    if isinstance(target, dist_checkpointing.mapping.ShardedTensorFactory):
        # linear_fc1: store the [gate; up] halves as they are. Concatenating would copy, and the
        # factory's halves are views, which the checkpoint writer clones once more.
        pieces = target.build()
        for piece, name in zip(pieces, entry.hf, strict=True):
            tensor = _stored(reader, name, dtype, scratch)
            _check_shape(entry, tensor, tuple(piece.local_shape), reader)
            piece.data, piece.dtype = tensor, dtype
        sharded[entry.megatron] = pieces
        return
    expected = megatron_io.expected_shape(target)
    rows = reader.shape(entry.hf[0])[0]
    if entry.kind == "copy" or (entry.kind == "vocab" and rows == expected[0]):
        tensor = _stored(reader, entry.hf[0], dtype, scratch)
    else:  # fused QKV, padded vocab rows
        tensor = mapping.to_megatron(entry, [reader.get(n) for n in entry.hf], model)
        tensor = megatron_io.file_backed(tensor, scratch, dtype)
    _check_shape(entry, tensor, expected, reader)
    target.data, target.dtype = tensor, dtype


def _stored(reader, name: str, dtype: torch.dtype, scratch: Path) -> torch.Tensor:
    """HF tensor ``name`` in ``dtype``: mapped from its file, else read and converted.

    (Converting from the map would leave the pages read resident in this process: the file's
    map lives until the save ends.)
    """
    if reader.torch_dtype(name) == dtype:
        return reader.map(name)
    return megatron_io.file_backed(reader.get(name), scratch, dtype)


def _return_freed_memory() -> None:
    """Give the heap's freed pages back to the OS (glibc ``malloc_trim``; no-op elsewhere).

    The transient copies of ``fill`` are freed, but glibc keeps most of them (below its mmap
    threshold) in the heap, where they count in this process's RSS and in that of every
    checkpoint writer forked from it.
    """
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def _load_libc():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


_LIBC = _load_libc()


def _check_shape(entry, tensor, expected: tuple, reader) -> None:
    if tuple(tensor.shape) != expected:
        raise hf_io.HFCheckpointError(
            f"{entry.hf} in {reader.file_of(entry.hf[0])} give {entry.megatron} the shape "
            f"{tuple(tensor.shape)}, config.json implies {expected}; config.json does not "
            "describe these weights"
        )


def convert_hf_to_megatron(
    hf_dir: str | Path, output: str | Path, dtype: str | None = None, progress: bool = True
) -> ModelConfig:
    """Convert; returns the ``ModelConfig`` written to ``output/model.yaml``."""
    hf_dir, output = Path(hf_dir), Path(output)
    hf_io.require_empty_output(output)
    model = read_hf_config(hf_dir)
    reader = hf_io.SafetensorsReader(hf_dir)
    check_inputs(hf_dir, reader, model)
    out_dtype = megatron_io.parse_dtype(dtype) if dtype else default_dtype(reader)
    megatron_io.init_single_process()
    sharded = megatron_io.template(model, out_dtype)
    megatron_io.raise_open_file_limit()
    with hf_io.staged_output(output) as stage:  # scratch files (unnamed) live in it too
        _write(stage, sharded, model, out_dtype, reader, progress)
        sharded.clear()  # frees the file-backed tensors
        copied = hf_io.copy_tokenizer_files(hf_dir, stage / TOKENIZER_DIR)
    log.info("wrote %s (%s); tokenizer files: %s", output, out_dtype, copied)
    return model


def _write(out: Path, sharded: dict, model: ModelConfig, dtype, reader, progress: bool) -> None:
    """Fill the template from the HF tensors and save it as a checkpoint in ``out``."""
    entries = mapping.tensor_map(model)
    for entry in tqdm(entries, desc="HF -> Megatron", unit="tensor", disable=not progress):
        fill(sharded, entry, model, dtype, reader, out)
        _return_freed_memory()
    missing = [k for k, v in sharded.items() if megatron_io.is_tensor_entry(v) and v.data.is_meta]
    if missing:
        raise RuntimeError(f"internal: template entries left unfilled: {missing}")
    largest_shard = max(f.stat().st_size for f in {reader.file_of(n) for n in reader.names()})
    megatron_io.save(sharded, out, model, bytes_per_writer=int(WRITER_SHARE * largest_shard))

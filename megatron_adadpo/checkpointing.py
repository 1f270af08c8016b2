"""Checkpoints through Megatron's ``dist_checkpointing``: resharding-friendly, crash-safe.

A checkpoint directory holds the ``dist_checkpointing`` files of a sharded state dict whose
model part is ``{"model": chunk.sharded_state_dict()}`` (``"model0"``, ``"model1"``, ... with
virtual pipeline stages) — the keys inside are global, so any TP / PP / VPP layout loads it —
plus ``model.yaml`` (the ``ModelConfig``). Training checkpoints add the optimizer, scheduler and
run state (see ``save_training`` / ``load_training``) and ``config.yaml`` (the resolved run
config). A run's checkpoints live in ``<run_dir>/checkpoints/iter_NNNNNNN``; the ``latest``
marker is written, atomically, only after a save completed on every rank.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.distributed as dist
import yaml

from megatron_adadpo.megatron_api import dist_checkpointing
from megatron_adadpo.model_config import ModelConfig

MODEL_CONFIG_FILE = "model.yaml"


def _unwrap(chunk: torch.nn.Module) -> torch.nn.Module:
    while hasattr(chunk, "module"):
        chunk = chunk.module
    return chunk


def model_sharded_state_dict(chunks: list[torch.nn.Module]) -> dict:
    """``{"model": sd}`` for one chunk, ``{"model0": sd0, ...}`` for virtual pipeline stages."""
    chunks = [_unwrap(c) for c in chunks]
    if len(chunks) == 1:
        return {"model": chunks[0].sharded_state_dict()}
    return {f"model{i}": c.sharded_state_dict() for i, c in enumerate(chunks)}


def write_model_config(directory: str | Path, model: ModelConfig) -> None:
    path = Path(directory) / MODEL_CONFIG_FILE
    path.write_text(yaml.safe_dump(model.to_dict(), sort_keys=False))


def read_model_config(directory: str | Path) -> ModelConfig:
    """The ``ModelConfig`` stored with a checkpoint (clear error when absent)."""
    path = Path(directory) / MODEL_CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: {directory} is not a megatron_adadpo checkpoint (convert an HF "
            "model with tools/convert_hf_to_megatron.py, or point at a run's checkpoint)"
        )
    return ModelConfig.from_dict(yaml.safe_load(path.read_text()))


def save_model(chunks: list[torch.nn.Module], directory: str | Path, model: ModelConfig) -> None:
    """Save model weights only (an initial checkpoint). Collective over all ranks."""
    directory = Path(directory)
    if _rank() == 0:
        directory.mkdir(parents=True, exist_ok=True)
    _barrier()
    dist_checkpointing.save(model_sharded_state_dict(chunks), str(directory))
    if _rank() == 0:
        write_model_config(directory, model)
    _barrier()


def load_model(chunks: list[torch.nn.Module], directory: str | Path, model: ModelConfig) -> None:
    """Load weights saved at any layout into ``chunks``; refuses another model shape."""
    stored = read_model_config(directory)
    check_same_architecture(stored, model, str(directory))
    sharded = model_sharded_state_dict(chunks)
    loaded = dist_checkpointing.load(sharded, str(directory))
    for i, chunk in enumerate(chunks):
        key = "model" if len(chunks) == 1 else f"model{i}"
        _unwrap(chunk).load_state_dict(loaded[key], strict=False)


def check_same_architecture(stored: ModelConfig, wanted: ModelConfig, where: str) -> None:
    """Raise when a checkpoint's model shape differs from the configured one."""
    fields = (
        "num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "query_groups",
        "head_dim", "vocab_size", "add_qkv_bias", "tie_word_embeddings",
    )
    diff = [
        f"{f}: checkpoint {getattr(stored, f)} vs config {getattr(wanted, f)}"
        for f in fields
        if getattr(stored, f) != getattr(wanted, f)
    ]
    if diff:
        raise ValueError(
            f"checkpoint {where} holds another model shape ({'; '.join(diff)}); use its "
            f"{MODEL_CONFIG_FILE} as the model section or pick the matching checkpoint"
        )


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` so that readers see the old or the new file, never a part."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    with open(tmp, "rb") as handle:
        os.fsync(handle.fileno())
    os.replace(tmp, path)

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

from megatron_adadpo.model.config import (
    ModelConfig,
    check_same_architecture,
    read_model_config,
    write_model_config,
)
from megatron_adadpo.platform.megatron import dist_checkpointing, tensor_parallel, unwrap_model


def model_sharded_state_dict(chunks: list[torch.nn.Module]) -> dict:
    """``{"model": sd}`` for one chunk, ``{"model0": sd0, ...}`` for virtual pipeline stages."""
    chunks = [unwrap_model(c) for c in chunks]
    if len(chunks) == 1:
        return {"model": chunks[0].sharded_state_dict()}
    return {f"model{i}": c.sharded_state_dict() for i, c in enumerate(chunks)}


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
        unwrap_model(chunk).load_state_dict(loaded[key], strict=False)


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


LATEST_FILE = "latest"


def checkpoints_root(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The directory named by ``<run_dir>/checkpoints/latest``, or None when there is none."""
    marker = checkpoints_root(run_dir) / LATEST_FILE
    if not marker.is_file():
        return None
    path = checkpoints_root(run_dir) / marker.read_text().strip()
    return path if path.is_dir() else None


def save_training(
    run_dir: str | Path,
    step: int,
    policy: list,
    optimizer,
    scheduler,
    run_state: dict,
    model: ModelConfig,
    config_yaml: str,
) -> Path:
    """Save model, optimizer, scheduler, run state and RNG to ``iter_{step:07d}``.

    Crash-safe: a partial directory of the same name (left by an interrupted save) is removed
    first, and ``latest`` is replaced atomically only after every rank finished writing, so an
    interruption at any point leaves the previous checkpoint loadable and pointed to.
    """
    name = f"iter_{step:07d}"
    directory = checkpoints_root(run_dir) / name
    if _rank() == 0:
        if directory.exists():
            import shutil

            shutil.rmtree(directory)
        directory.mkdir(parents=True)
    _barrier()
    model_sd = model_sharded_state_dict(policy)
    state = dict(model_sd)
    state["optimizer"] = optimizer.sharded_state_dict(model_sd)
    state["scheduler"] = scheduler.state_dict()
    state["run"] = dict(run_state)
    dist_checkpointing.save(state, str(directory))
    _save_rng(directory)
    if _rank() == 0:
        write_model_config(directory, model)
        (directory / "config.yaml").write_text(config_yaml)
    _barrier()
    if _rank() == 0:
        atomic_write_text(checkpoints_root(run_dir) / LATEST_FILE, name + "\n")
    _barrier()
    return directory


def load_training(directory: Path, policy: list, optimizer, scheduler, model: ModelConfig) -> dict:
    """Restore a ``save_training`` checkpoint (any layout for the model); returns run state."""
    check_same_architecture(read_model_config(directory), model, str(directory))
    model_sd = model_sharded_state_dict(policy)
    state = dict(model_sd)
    state["optimizer"] = optimizer.sharded_state_dict(model_sd, is_loading=True)
    state["scheduler"] = None
    state["run"] = None
    loaded = dist_checkpointing.load(state, str(directory))
    for i, chunk in enumerate(policy):
        key = "model" if len(policy) == 1 else f"model{i}"
        unwrap_model(chunk).load_state_dict(loaded[key], strict=False)
    optimizer.load_state_dict(loaded["optimizer"])
    scheduler.load_state_dict(loaded["scheduler"])
    _load_rng(directory)
    return loaded["run"]


def _save_rng(directory: Path) -> None:
    """Per-rank RNG states (torch CPU/CUDA and Megatron's tracker) in ``rng/rank_N.pt``."""
    (directory / "rng").mkdir(exist_ok=True)
    state = {
        "world_size": dist.get_world_size() if dist.is_initialized() else 1,
        "cpu": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
        "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }
    torch.save(state, directory / "rng" / f"rank_{_rank()}.pt")


def _load_rng(directory: Path) -> None:
    """Restore this rank's RNG states when the checkpoint was written by the same world size."""
    path = directory / "rng" / f"rank_{_rank()}.pt"
    world = dist.get_world_size() if dist.is_initialized() else 1
    if not path.is_file():
        return
    state = torch.load(path, weights_only=False)
    if state["world_size"] != world:
        return  # another layout: RNG streams cannot be mapped; keep the fresh seeds
    torch.set_rng_state(state["cpu"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def check_resume_data(state: dict, dataset_identity: str, where) -> None:
    """Refuse to resume on other data or another tokenisation (sample order would differ)."""
    if state.get("dataset_identity") != dataset_identity:
        raise ValueError(
            f"checkpoint {where} was trained on dataset {str(state.get('dataset_identity'))[:16]}"
            f"... but the configured data is {dataset_identity[:16]}... (other inputs, tokenizer "
            "or truncation settings); use the original data, or a new logging.run_dir"
        )

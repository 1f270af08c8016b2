"""Checkpoints through Megatron's ``dist_checkpointing``: resharding-friendly, crash-safe.

A checkpoint directory holds the ``dist_checkpointing`` files of a sharded state dict whose
model part is ``{"model": chunk.sharded_state_dict()}`` (``"model0"``, ``"model1"``, ... with
virtual pipeline stages) — the keys inside are global, so any TP / PP / VPP layout loads it —
plus ``model.yaml`` (the ``ModelConfig``). Training checkpoints add the optimizer (the
distributed optimizer in Megatron's ``dp_reshardable`` format: any DP size, the saved TP / PP),
scheduler and run state (see ``save_training`` / ``load_training``), per-rank RNG states and
``config.yaml`` (the resolved run config); with TR-DPO (``reference.sync_steps``) also the
updated reference model, keys prefixed ``reference.`` (``reference_sharded_state_dict``).
Where they live and how a save is published atomically: ``run/state/run_dir.py``. Every file is read
without running code (``platform/safe_dcp.py``, ``platform/safe_pickle.py``); one that would is
refused, named.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.api import CheckpointException

from megatron_adadpo.model.config import (
    ModelConfig,
    check_same_architecture,
    read_model_config,
    write_model_config,
)
from megatron_adadpo.model.lora import adapter_state_only, has_adapters
from megatron_adadpo.platform.machine import probe_machine
from megatron_adadpo.platform.megatron import dist_checkpointing, tensor_parallel, unwrap_model
from megatron_adadpo.platform.megatron_optimizer import (
    OPTIMIZER_SHARDING,
    force_param_sync,
    init_optimizer_state,
    optimizer_sharded_state_dict,
    restore_adam_steps,
)
from megatron_adadpo.platform.safe_dcp import common_state_dict, load_sharded
from megatron_adadpo.platform.safe_pickle import find_unsafe, torch_load
from megatron_adadpo.run.optimizer import adopt_group_schedules
from megatron_adadpo.run.state import run_dir as run_files
from megatron_adadpo.run.state.checkpoint_writer import CheckpointWriter, checkpoint_group

log = logging.getLogger(__name__)
EXTRA_STATE_SUFFIX = "_extra_state"


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or lacks a tensor; the message names it and the fix."""


def model_sharded_state_dict(chunks: list[torch.nn.Module]) -> dict:
    """``{"model": sd}`` for one chunk, ``{"model0": sd0, ...}`` for virtual pipeline stages;
    a model with LoRA adapters: the adapters only (the frozen base is its init checkpoint)."""
    chunks = [unwrap_model(c) for c in chunks]
    keep = adapter_state_only if has_adapters(chunks) else dict
    if len(chunks) == 1:
        return {"model": keep(chunks[0].sharded_state_dict())}
    return {f"model{i}": keep(c.sharded_state_dict()) for i, c in enumerate(chunks)}


REFERENCE = "reference"  # TR-DPO's updated reference: sharded-state key and tensor key prefix


def reference_sharded_state_dict(chunks: list[torch.nn.Module]) -> dict:
    """``model_sharded_state_dict`` of the reference model's chunks under ``reference`` /
    ``reference0``, ... with every tensor key prefixed ``reference.`` (the policy's keys stay
    unique)."""
    chunks = [unwrap_model(c) for c in chunks]
    names = [REFERENCE] if len(chunks) == 1 else [f"{REFERENCE}{i}" for i in range(len(chunks))]
    return {
        n: c.sharded_state_dict(prefix=f"{REFERENCE}.") for n, c in zip(names, chunks, strict=True)
    }


def _apply_model(chunks: list[torch.nn.Module], loaded: dict, name: str = "model") -> None:
    prefix = f"{REFERENCE}." if name == REFERENCE else ""
    for i, chunk in enumerate(chunks):
        values = loaded[name if len(chunks) == 1 else f"{name}{i}"]
        values = {k.removeprefix(prefix): v for k, v in values.items()}
        unwrap_model(chunk).load_state_dict(values, strict=False)


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


def load_model(
    chunks: list[torch.nn.Module],
    directory: str | Path,
    model: ModelConfig,
    fully_parallel: bool = False,
) -> None:
    """Load weights saved at any layout into ``chunks``; refuses another model.
    ``fully_parallel``: each DP x CP rank reads a share and broadcasts it (collective)."""
    stored = read_model_config(directory)
    check_same_architecture(stored, model, str(directory))
    fix = "re-create it (tools/convert_hf_to_megatron.py) or use another train.init_checkpoint"
    sharded = model_sharded_state_dict(chunks)
    group = checkpoint_group(fully_parallel)
    loaded = load_tolerating_extra_state(sharded, Path(directory), fix, group)
    _apply_model(chunks, loaded)


def load_tolerating_extra_state(
    sharded: dict, directory: Path, fix: str, parallel_group=None
) -> dict:
    """``dist_checkpointing.load`` of ``sharded`` (fully parallel over ``parallel_group`` if
    given) that skips absent ``_extra_state`` objects.

    A Transformer Engine model requests every TE module's ``_extra_state`` (FP8 metadata) as a
    ``ShardedObject`` (megatron-core 0.16.1 / 0.19 ``megatron/core/transformer/utils.py``:
    ``sharded_state_dict_default`` -> ``make_sharded_tensors_for_checkpoint`` ->
    ``make_sharded_object_for_checkpoint`` for keys ending in ``_extra_state``). A checkpoint
    written from the local spec (the HF converter's template) has none, and the default strict
    load fails with "Missing key". These are skipped and logged, and TE keeps its freshly
    initialised extra state; any other absent key (a real tensor) raises ``CheckpointError``
    naming it. An unreadable file raises ``CheckpointError`` naming the directory and ``fix``.
    """
    try:
        loaded, absent = load_sharded(sharded, str(directory), parallel_group)
    except _LOAD_ERRORS as err:  # a truncated / corrupt file: EOFError, UnpicklingError, ...
        raise unreadable(directory, err, fix) from err
    real = sorted(k for k in absent if not k.endswith(EXTRA_STATE_SUFFIX))
    if real:
        shown = ", ".join(real[:5]) + (f" and {len(real) - 5} more" if len(real) > 5 else "")
        raise CheckpointError(
            f"checkpoint {directory} lacks {len(real)} tensor(s) the model needs: {shown}; it "
            f"was written for another model or is incomplete: {fix}"
        )
    if absent and _rank() == 0:
        log.info(
            "%s has no %s for %s (a local-spec checkpoint loaded into a Transformer Engine "
            "model): kept the modules' initial extra state",
            directory,
            EXTRA_STATE_SUFFIX,
            ", ".join(sorted(absent)),
        )
    return loaded


# What a damaged file raises while loading: torch.distributed.checkpoint gathers the ranks'
# errors into a CheckpointException, which derives from BaseException.
_LOAD_ERRORS = (Exception, CheckpointException)


def unreadable(path: Path, err: BaseException, fix: str) -> CheckpointError:
    """The error for a checkpoint ``path`` (its directory, or one file of it) that failed to
    load with ``err`` (its first and last lines: a gathered traceback ends with the cause), or
    that holds code which loading would run (``UnsafeFileError``, whose message names the file)."""
    unsafe = find_unsafe(err)
    if unsafe is not None:  # its message names the file (a bytes item: within ``path``)
        named = str(path) in str(unsafe)
        return CheckpointError(str(unsafe) if named else f"checkpoint {path}: {unsafe}")
    lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
    detail = type(err).__name__ + (f": {lines[0]}" if lines else "")
    if len(lines) > 1:
        detail += f" ... {lines[-1]}"
    if len(detail) > 300:
        detail = detail[:300] + "..."
    return CheckpointError(
        f"checkpoint {path} cannot be loaded ({detail}); if it is incomplete or corrupt, {fix}"
    )


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def save_training(
    run_dir: str | Path,
    step: int,
    policy: list,
    optimizer,
    scheduler,
    run_state: dict,
    model: ModelConfig,
    config_yaml: str,
    writer: CheckpointWriter | None = None,
    reference: list | None = None,
) -> Path:
    """Save model, optimizer, scheduler, run state and RNG to ``iter_{step:07d}``; with
    ``reference`` (TR-DPO's updated reference chunks) also those.

    Parameters are synchronised first (``force_param_sync``: with overlapped param gathering
    they are stale until the next forward). Crash-safe: everything is written to
    ``iter_N.partial``, which becomes ``iter_N`` and is named by ``latest`` only after every
    rank finished (``run_dir.publish``), so an interruption at any point leaves the previous
    checkpoint complete and pointed to. ``writer`` (``run/state/checkpoint_writer.py``; default:
    synchronous, DP rank 0 writing replicated tensors) decides how the tensors are written and,
    with ``checkpoint.async_save``, publishes later, once the background write is complete.
    """
    writer = writer or CheckpointWriter()
    writer.wait()  # the write in flight is published before this save starts
    force_param_sync(policy, optimizer)
    final = run_files.checkpoints_root(run_dir) / run_files.checkpoint_name(step)
    partial = run_files.partial_path(final)
    if _rank() == 0:
        run_files.start_partial(final)
    _barrier()
    model_sd = model_sharded_state_dict(policy)
    state = dict(model_sd)
    state["optimizer"] = optimizer_sharded_state_dict(optimizer, model_sd)
    state["scheduler"] = scheduler.state_dict()
    state["run"] = dict(run_state)
    state.update(reference_sharded_state_dict(reference) if reference else {})

    def write_files() -> None:
        _save_rng(partial)
        if _rank() == 0:
            write_model_config(partial, model)
            (partial / "config.yaml").write_text(config_yaml)

    writer.write(
        state,
        partial,
        dict(OPTIMIZER_SHARDING),
        write_files,
        lambda: run_files.publish(partial, final),
    )
    return final


def read_saved_state(directory: Path, model: ModelConfig) -> tuple[dict, dict]:
    """(run state, scheduler state) of a training checkpoint, read without its tensors so that
    they can be checked against the config before the model is built; refuses another model
    (``model.yaml``)."""
    check_same_architecture(read_model_config(directory), model, str(directory))
    try:
        common = common_state_dict(directory)
    except _LOAD_ERRORS as err:
        raise unreadable(directory, err, run_files.earlier_checkpoints_hint(directory)) from err
    return common["run"], common["scheduler"]


def load_training(
    directory: Path,
    policy: list,
    optimizer,
    fully_parallel: bool = False,
    reference: list | None = None,
) -> None:
    """Restore model, optimizer and RNG of a ``save_training`` checkpoint (and the
    ``reference`` chunks: TR-DPO's updated reference, saved with it).

    The model loads at any layout; the distributed optimizer's ``dp_reshardable`` state at any
    DP size with the saved TP / PP (``run/state/resume.py`` refuses other layouts first). Exact
    resume needs three things on megatron-core 0.16.1 with torch's Adam: state initialised
    before the load (``init_optimizer_state``), the load under ``torch.no_grad()`` (it copies
    into leaf parameters), and each parameter's own ``step`` (``restore_adam_steps``). The
    scheduler is restored by the caller after its own check. Call ``read_saved_state`` first
    (it checks the model). The loaded param groups take the optimizer's schedule values
    (``adopt_group_schedules``): ``checkpoint.override_scheduler`` applies the config's.
    ``fully_parallel`` (``checkpoint.fully_parallel``): each DP x CP rank reads a share of the
    replicated tensors and broadcasts it, instead of every rank reading all of them.
    """
    init_optimizer_state(optimizer)
    fix = run_files.earlier_checkpoints_hint(directory)
    with torch.no_grad():
        model_sd = model_sharded_state_dict(policy)
        state = dict(model_sd)
        state["optimizer"] = optimizer_sharded_state_dict(optimizer, model_sd, is_loading=True)
        state.update(reference_sharded_state_dict(reference) if reference else {})
        group = checkpoint_group(fully_parallel)
        loaded = load_tolerating_extra_state(state, directory, fix, group)
        _apply_model(policy, loaded)
        if reference:
            _apply_model(reference, loaded, REFERENCE)
        adopt_group_schedules(optimizer, loaded["optimizer"])
        optimizer.load_state_dict(loaded["optimizer"])
    restore_adam_steps(optimizer)
    _load_rng(directory, fix)


def _save_rng(directory: Path) -> None:
    """Per-rank RNG states (torch CPU/CUDA and Megatron's tracker) in ``rng/rank_N.pt``."""
    (directory / "rng").mkdir(exist_ok=True)
    state = {
        "world_size": dist.get_world_size() if dist.is_initialized() else 1,
        "cpu": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if probe_machine().has_cuda else None,
        "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }
    torch.save(state, directory / "rng" / f"rank_{_rank()}.pt")


def _load_rng(directory: Path, fix: str) -> None:
    """Restore this rank's RNG states when the checkpoint was written by the same world size."""
    path = directory / "rng" / f"rank_{_rank()}.pt"
    world = dist.get_world_size() if dist.is_initialized() else 1
    if not path.is_file():
        return
    try:
        state = torch_load(path)
    except _LOAD_ERRORS as err:
        raise unreadable(path, err, fix) from err
    if state["world_size"] != world:
        return  # another layout: RNG streams cannot be mapped; keep the fresh seeds
    torch.set_rng_state(state["cpu"])
    if state["cuda"] is not None and probe_machine().has_cuda:
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])

"""Megatron side of the conversion: a weightless template of the checkpoint, single-process setup.

The template is the ``sharded_state_dict()`` of a TP1 / PP1 ``GPTModel`` built on the meta
device (no memory, ~0.1 s for 8B): it gives the exact checkpoint keys, shapes, layer-stacking
offsets and factories (``linear_fc1``) that Megatron itself uses. Conversion fills its ``data``
with real tensors (to save) or with empty buffers for a subset of keys (to load part of a
checkpoint), so the files are written and read by Megatron's own ``dist_checkpointing``.
"""

from __future__ import annotations

import dataclasses
import math
import os
import pickle
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import yaml
from torch.distributed.checkpoint.api import CheckpointException

from megatron_adadpo.layout import ExecutionConfig
from megatron_adadpo.model.build import gpt_model, transformer_config
from megatron_adadpo.model.config import (
    MODEL_CONFIG_FILE,
    ModelConfig,
    read_model_config,
    write_model_config,
)
from megatron_adadpo.platform import safe_dcp
from megatron_adadpo.platform.megatron import dist_checkpointing, save_strategy
from megatron_adadpo.run.state.checkpoints import CheckpointError, unreadable

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
BLOCK_BYTES = 64 << 20  # dtype conversion block (file_backed)


def parse_dtype(name: str, flag: str = "--dtype") -> torch.dtype:
    if name not in DTYPES:
        raise ValueError(f"{flag} {name!r} is not supported; use one of {sorted(DTYPES)}")
    return DTYPES[name]


def init_single_process() -> None:
    """A world of one gloo process + TP1 / PP1 Megatron state (CPU tensors, even on GPU hosts)."""
    from megatron_adadpo.platform import cpu
    from megatron_adadpo.platform.distributed import free_port, init_model_parallel

    cpu.activate()  # conversion runs on the CPU; a no-op where CUDA exists
    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        dist.init_process_group("gloo", rank=0, world_size=1)
    if dist.get_world_size() != 1:
        raise RuntimeError(
            f"checkpoint conversion runs in one process, found a world of {dist.get_world_size()}"
            "; run the tool with plain `python`, not torchrun"
        )
    init_model_parallel(ExecutionConfig())


def template(model: ModelConfig, dtype: torch.dtype = torch.float32) -> dict:
    """``{name: ShardedTensor | ShardedTensorFactory | ShardedObject}`` of a TP1/PP1 model.

    Names are the TP1 / PP1 module names (layer index = global layer number). Tensors are on
    the meta device. Requires ``init_single_process()`` (or any TP1 / PP1 parallel state).
    """
    run = ExecutionConfig(bf16=dtype == torch.bfloat16, transformer_impl="local")
    config = dataclasses.replace(
        transformer_config(model, run), use_cpu_initialization=True, perform_initialization=False
    )
    with torch.device("meta"):
        gpt = gpt_model(model, config, run)
    return gpt.sharded_state_dict()


def is_tensor_entry(value) -> bool:
    return isinstance(getattr(value, "data", None), torch.Tensor)


def expected_shape(value) -> tuple[int, ...]:
    return tuple(value.data.shape)


def file_backed(tensor: torch.Tensor, directory: Path, dtype: torch.dtype | None = None):
    """``tensor.to(dtype)`` written to an unnamed file in ``directory``, returned as a map of it.

    The result is clean file cache, read again only when the checkpoint writer reaches it, so
    the source can be freed. The conversion runs in blocks of ``BLOCK_BYTES`` (one converted
    copy of the tensor is never in memory whole). The file has no name (``O_TMPFILE``, or
    unlinked at once) and disappears with the last reference to the result. Each result holds
    one file descriptor (``raise_open_file_limit``).
    """
    dtype = dtype or tensor.dtype
    if tensor.numel() == 0:
        return tensor.to(dtype)
    flat = tensor.contiguous().reshape(-1)
    step = max(1, BLOCK_BYTES // max(flat.element_size(), dtype.itemsize))
    with tempfile.TemporaryFile(dir=directory) as f:
        for begin in range(0, flat.numel(), step):
            f.write(flat[begin : begin + step].to(dtype).view(torch.uint8).numpy().data)
        f.flush()
        size = flat.numel() * dtype.itemsize
        mapped = np.memmap(f, np.uint8, "c", shape=(size,))  # keeps a duplicate descriptor
    return torch.from_numpy(mapped).view(dtype).reshape(tensor.shape)


def raise_open_file_limit() -> None:
    """Soft ``ulimit -n`` -> the hard limit: each ``file_backed`` tensor holds a descriptor."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and (hard == resource.RLIM_INFINITY or soft < hard):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def save(sharded: dict, directory: Path, model: ModelConfig, bytes_per_writer: int = 0) -> None:
    """Save a filled template as a model checkpoint (the layout ``save_model`` writes).

    ``bytes_per_writer`` > 0: split the tensors over enough writer processes (one ``.distcp``
    file each; Megatron's default is 2) that each writes about that many bytes. A writer reads
    its tensors from memory-mapped files (``file_backed``), and those pages count in its RSS
    until it exits, so this bounds each process's peak RSS; the file count does not matter to
    ``dist_checkpointing.load``.
    """
    directory.mkdir(parents=True, exist_ok=True)
    strategy = None
    if bytes_per_writer > 0:
        total = sum(
            t.data.numel() * t.data.element_size()
            for v in sharded.values()
            for t in (v if isinstance(v, list) else [v])
            if is_tensor_entry(t)
        )
        strategy = save_strategy(thread_count=max(2, math.ceil(total / bytes_per_writer)))
    dist_checkpointing.save({"model": sharded}, str(directory), sharded_strategy=strategy)
    write_model_config(directory, model)


def load_subset(
    directory: Path, sharded: dict, names: list[str], dtype: torch.dtype, fix: str
) -> dict:
    """Load only ``names`` of a checkpoint: ``{name: full TP1 tensor}`` (CPU, ``dtype``); a file
    that cannot be read raises ``CheckpointError`` naming it and ``fix``.

    Each request covers one layer's slice of a layer-stacked tensor. Megatron's own (regular
    grid) requests assume every slice of a key is requested by some rank, so each is re-expressed
    as an irregular ``ShardedTensor`` over the same global region, which the torch_dist loader
    reads on its own (``linear_fc1``'s factory halves [gate; up] are one contiguous region).
    """
    requests = {name: _region_request(sharded[name], dtype) for name in names}
    try:  # partial reads of stacked tensors: skip the "every element accessed once" check
        loaded = safe_dcp.load({"model": requests}, directory, validate_access_integrity=False)[
            "model"
        ]
    except (Exception, CheckpointException) as err:  # a damaged file: EOFError, ...
        check_files(directory, fix)
        raise unreadable(directory, err, fix) from err
    return {name: loaded[name].reshape(expected_shape(sharded[name])) for name in names}


def _region_request(value, dtype: torch.dtype):
    mapping = dist_checkpointing.mapping
    first = value.build()[0] if isinstance(value, mapping.ShardedTensorFactory) else value
    local = (1,) * first.prepend_axis_num + expected_shape(value)
    return mapping.ShardedTensor(
        key=first.key,
        data=torch.empty(local, dtype=dtype),
        dtype=dtype,
        local_shape=local,
        global_shape=first.global_shape,
        global_offset=first.global_offset,
        axis_fragmentations=None,
        replica_id=0,
        prepend_axis_num=0,
        allow_shape_mismatch=first.allow_shape_mismatch,
    )


def check_files(directory: Path, fix: str) -> None:
    """Raise ``CheckpointError`` naming each ``.distcp`` file of a ``torch_dist`` checkpoint that
    is missing or ends before the last byte its ``.metadata`` records for it (a partial copy or
    a save cut short): ``size(file) >= max(offset + length)`` over its storage entries.

    Reads the ``.metadata`` that ``dist_checkpointing.load`` itself reads first, with the same
    data-only reader (``safe_dcp.SafeFileSystemReader``); a checkpoint without one is left to
    the load.
    """
    try:
        storage = safe_dcp.SafeFileSystemReader(str(directory)).read_metadata().storage_data
    except (OSError, EOFError, pickle.UnpicklingError):
        return
    ends: dict[str, int] = {}
    for info in storage.values():
        end = info.offset + info.length
        ends[info.relative_path] = max(ends.get(info.relative_path, 0), end)
    damaged = []
    for name, end in sorted(ends.items()):
        path = directory / name
        size = path.stat().st_size if path.is_file() else None
        if size is None or size < end:
            held = "missing" if size is None else f"{size} of its {end} bytes"
            damaged.append(f"{path} ({held})")
    if damaged:
        raise CheckpointError(
            f"checkpoint file {'; '.join(damaged)} is incomplete (a partial copy or an "
            f"interrupted save): {fix}"
        )


def stored_dtype(directory: Path) -> torch.dtype:
    """dtype of the model tensors in a checkpoint (from its metadata; nothing is loaded)."""
    meta = safe_dcp.tensors_metadata(directory)
    key = "embedding.word_embeddings.weight"
    if key in meta:
        return meta[key].dtype
    return next(v.dtype for v in meta.values() if hasattr(v, "dtype"))


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint or ``iter_*`` dir, a ``checkpoints`` root or a run dir -> checkpoint dir."""
    p = Path(path)
    if (p / "metadata.json").is_file():
        return p
    for root in (p, p / "checkpoints"):
        latest = root / "latest"
        if latest.is_file():
            name = latest.read_text().strip()
            target = Path(name) if Path(name).is_absolute() else root / name
            if (target / "metadata.json").is_file():
                return target
            raise FileNotFoundError(
                f"{latest} names {target}, which is not a complete checkpoint (no metadata.json); "
                "pass an existing iter_* directory with --checkpoint"
            )
    raise FileNotFoundError(
        f"{p} is not a checkpoint: expected metadata.json (a checkpoint / iter_* dir) or a "
        "'latest' file (a checkpoints root); pass the directory written by the trainer or by "
        "tools/convert_hf_to_megatron.py"
    )


def checkpoint_model_config(directory: Path) -> ModelConfig:
    """``model.yaml`` of a checkpoint, else the ``model`` section of its ``config.yaml``."""
    if (directory / MODEL_CONFIG_FILE).is_file():
        return read_model_config(directory)
    for candidate in (directory / "config.yaml", directory.parent.parent / "config.yaml"):
        if candidate.is_file():
            cfg = yaml.safe_load(candidate.read_text()) or {}
            if isinstance(cfg.get("model"), dict):
                known = {f.name for f in dataclasses.fields(ModelConfig)}
                return ModelConfig.from_dict({k: v for k, v in cfg["model"].items() if k in known})
    return read_model_config(directory)  # raises the explanatory FileNotFoundError

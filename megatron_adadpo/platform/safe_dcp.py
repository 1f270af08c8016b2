"""``dist_checkpointing`` loads that never run a checkpoint's code (megatron-core 0.16.1, 0.19).

Megatron reads a ``torch_dist`` checkpoint with torch DCP, which unpickles two kinds of data
with no restriction: ``.metadata`` (plain ``pickle.load`` in ``FileSystemReader.read_metadata``)
and every bytes item (``DefaultLoadPlanner.load_bytes``: ``torch.load(weights_only=False)``;
the layers' ``_extra_state``, the distributed optimizer's ``dp_reshardable`` state and, from
0.19, the common state). The common state is ``common.pt`` (0.16.1's ``TorchCommonLoadStrategy``
and 0.19's legacy ``load_common``: ``torch.load`` with torch's default, which is
``weights_only=False`` before torch 2.6 and wherever ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD`` is set)
or, from 0.19, a ``common_state`` bytes item read through DCP's default planner.

Here every read goes through ``SafeFileSystemReader`` (``.metadata`` by ``MetadataUnpickler``)
and ``SafeLoadPlanner`` (bytes items by ``torch_load``, i.e. ``weights_only=True``), and
``common.pt`` by ``torch_load`` (``platform/safe_pickle.py``). How they reach Megatron:

- ``SafeLoadStrategy`` is Megatron's ``TorchDistLoadShardedStrategy`` whose ``load`` /
  ``load_tensors_metadata`` / ``load_sharded_metadata`` are Megatron's own code with the two
  module-level names they build their reader and planner from (``_get_filesystem_reader``,
  ``MCoreLoadPlanner``; 0.16.1 and 0.19 ``dist_checkpointing/strategies/torch.py``, which take
  neither as an argument) bound to the safe ones (``_rebound``: Megatron's modules are left
  unchanged). It is passed as ``dist_checkpointing.load``'s public ``sharded_strategy``.
- 0.16.1: the common state goes through ``load``'s public ``common_strategy``
  (``SafeCommonLoadStrategy``). 0.19 has no such argument and ``serialization.load`` calls its
  module's ``load_common_state_dict``; ``load`` below is that function rebound to
  ``common_state_dict``.

Tested by planting code-running payloads in each kind of file and loading them through these
functions (``tests/distributed/test_safe_checkpoint_load.py``, at both versions) and the CLIs
(``tests/e2e/test_safe_load_cli.py``); if a Megatron release stops looking up a rebound name,
``_rebound`` raises at import and names it.
"""

from __future__ import annotations

import functools
import inspect
import io
import os
import types
from pathlib import Path
from typing import Any

from megatron.core.dist_checkpointing import serialization
from megatron.core.dist_checkpointing.mapping import ShardedObject
from megatron.core.dist_checkpointing.strategies.fully_parallel import (
    FullyParallelLoadStrategyWrapper,
)
from megatron.core.dist_checkpointing.strategies.torch import (
    MCoreLoadPlanner,
    TorchDistLoadShardedStrategy,
)
from torch.distributed import checkpoint as dcp
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

from megatron_adadpo.platform.megatron import MEGATRON_VERSION
from megatron_adadpo.platform.safe_pickle import MetadataUnpickler, torch_load

COMMON_FILE = "common.pt"
_METADATA_FILE = ".metadata"


class SafeFileSystemReader(dcp.FileSystemReader):
    """torch's ``FileSystemReader`` whose ``.metadata`` is read by ``MetadataUnpickler``; the
    metadata is read once per reader (as Megatron's ``CachedMetadataFileSystemReader``)."""

    def __init__(self, path: str | os.PathLike) -> None:
        super().__init__(path)
        self._metadata = None

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        """torch's ``read_metadata`` (2.4 - 2.13) with the restricted unpickler."""
        if self._metadata is None:
            rank = kwargs.get("rank")
            name = _METADATA_FILE if rank is None else f"__{rank}{_METADATA_FILE}"
            path = self.fs.concat_path(self.path, name)
            with self.fs.create_stream(path, "rb") as stream:
                metadata = MetadataUnpickler(stream, str(path)).load()
            if not isinstance(metadata, Metadata):
                raise ValueError(f"{path} is not a DCP Metadata ({type(metadata).__name__})")
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            self._metadata = metadata
        return self._metadata


def safe_filesystem_reader(checkpoint_dir, *_args, **_kwargs) -> SafeFileSystemReader:
    """Stands for Megatron's ``_get_filesystem_reader(checkpoint_dir, cache_metadata=...,
    async_strategy=...)``: always a ``SafeFileSystemReader`` (which caches its metadata)."""
    return SafeFileSystemReader(checkpoint_dir)


class SafeLoadPlanner(MCoreLoadPlanner):
    """Megatron's load planner reading bytes items with ``torch_load`` (``weights_only=True``);
    placing the loaded object is ``DefaultLoadPlanner.load_bytes``'s (torch 2.4 - 2.13)."""

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        fqn = read_item.dest_index.fqn
        stored = self.metadata.storage_data.get(read_item.storage_index)
        where = f" in {stored.relative_path}" if stored is not None else ""
        loaded = torch_load(value, f"bytes item {fqn!r}{where}")
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[fqn], loaded)
        else:
            self.state_dict[fqn] = loaded


def _rebound(function, **names):
    """``function`` (Megatron's own code) with the module-level ``names`` it looks up bound to
    other objects. Raises ``ImportError`` if ``function`` no longer uses one of them."""
    unused = sorted(n for n in names if n not in function.__code__.co_names)
    if unused:
        raise ImportError(
            f"megatron-core {MEGATRON_VERSION}: {function.__qualname__} no longer looks up "
            f"{', '.join(unused)}; adapt megatron_adadpo/platform/safe_dcp.py to this release"
        )
    clone = types.FunctionType(
        function.__code__,
        {**function.__globals__, **names},
        function.__name__,
        function.__defaults__,
        function.__closure__,
    )
    clone.__kwdefaults__ = function.__kwdefaults__
    return functools.update_wrapper(clone, function)


_READER = {"_get_filesystem_reader": safe_filesystem_reader}
_Megatron = TorchDistLoadShardedStrategy


class SafeLoadStrategy(TorchDistLoadShardedStrategy):
    """Megatron's ``torch_dist`` load strategy with ``SafeFileSystemReader`` and
    ``SafeLoadPlanner`` (see the module docstring)."""

    load = _rebound(_Megatron.load, MCoreLoadPlanner=SafeLoadPlanner, **_READER)
    load_tensors_metadata = _rebound(_Megatron.load_tensors_metadata, **_READER)
    load_sharded_metadata = _rebound(_Megatron.load_sharded_metadata, **_READER)


def _common_file(directory: str | Path) -> dict:
    path = Path(directory) / COMMON_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: the checkpoint is incomplete")
    return torch_load(path)


_COMMON_STRATEGY_ARGUMENT = "common_strategy" in inspect.signature(serialization.load).parameters

if _COMMON_STRATEGY_ARGUMENT:  # megatron-core 0.16
    from megatron.core.dist_checkpointing.strategies.common import TorchCommonLoadStrategy

    class SafeCommonLoadStrategy(TorchCommonLoadStrategy):
        """0.16's ``common.pt`` strategy reading with ``torch_load``. Its sharded-object
        methods are never called: ``SafeLoadStrategy`` handles sharded objects itself."""

        def load_common(self, checkpoint_dir):
            return _common_file(checkpoint_dir)

    def common_state_dict(directory: str | Path) -> dict:
        """0.16's ``load_common_state_dict`` (checks ``metadata.json``, reads ``common.pt``)
        with ``SafeCommonLoadStrategy``."""
        _, common = serialization.verify_checkpoint_and_load_strategy(
            str(directory), SafeLoadStrategy(), SafeCommonLoadStrategy()
        )
        return common.load_common(str(directory))

    def _load(sharded_state_dict, checkpoint_dir, strategy, **kwargs):
        return serialization.load(
            sharded_state_dict,
            checkpoint_dir,
            sharded_strategy=strategy,
            common_strategy=SafeCommonLoadStrategy(),
            **kwargs,
        )

else:  # megatron-core 0.19: common state in common.pt (legacy) or a DCP bytes item

    def common_state_dict(directory: str | Path) -> dict:
        """0.19's ``serialization.load_common_state_dict`` (checks ``metadata.json``, reads the
        legacy ``common.pt`` or the ``common_state`` bytes item) with the safe reader and
        planner."""
        serialization.verify_checkpoint(str(directory))
        if (Path(directory) / COMMON_FILE).is_file():
            return _common_file(directory)
        key = ShardedObject("common_state", None, (1,), (0,)).unique_key
        state = {key: io.BytesIO()}
        dcp.load(
            state,
            storage_reader=SafeFileSystemReader(directory),
            planner=SafeLoadPlanner(),
            no_dist=True,
        )
        return state[key][0]

    _megatron_load = _rebound(serialization.load, load_common_state_dict=common_state_dict)

    def _load(sharded_state_dict, checkpoint_dir, strategy, **kwargs):
        return _megatron_load(
            sharded_state_dict, checkpoint_dir, sharded_strategy=strategy, **kwargs
        )


def load(sharded_state_dict: dict, checkpoint_dir: str | Path, parallel_group=None, **kwargs):
    """``dist_checkpointing.load`` (same arguments and result) through the safe readers.

    With a ``parallel_group`` (the DP x CP group) the load is fully parallel: Megatron's
    ``FullyParallelLoadStrategyWrapper`` around ``SafeLoadStrategy`` has each rank of the group
    read an even share of the tensors the group needs and broadcast it to the others, instead
    of every rank reading everything (megatron-core 0.16.1 / 0.19
    ``strategies/fully_parallel.py``; Megatron-LM's ``--ckpt-fully-parallel-load``). The safe
    strategy does every read underneath.
    """
    strategy = SafeLoadStrategy()
    if parallel_group is not None:
        strategy = FullyParallelLoadStrategyWrapper(strategy, parallel_group)
    return _load(sharded_state_dict, str(checkpoint_dir), strategy, **kwargs)


def tensors_metadata(checkpoint_dir: str | Path) -> dict:
    """``dist_checkpointing.load_tensors_metadata`` through the safe reader."""
    return serialization.load_tensors_metadata(
        str(checkpoint_dir), sharded_strategy=SafeLoadStrategy()
    )


def load_sharded(
    sharded_state_dict: dict, directory: str, parallel_group=None
) -> tuple[dict, set[str]]:
    """``load`` (fully parallel over ``parallel_group`` if given) that also returns the keys
    requested but absent.

    Uses ``dist_checkpointing.load``'s public ``strict`` argument with
    ``StrictHandling.RETURN_UNEXPECTED`` (``dist_checkpointing/validation.py``, megatron-core
    0.16.1 and 0.19): keys the state dict requests that the checkpoint lacks ("unexpected" in
    Megatron's wording) are dropped from the load and returned, instead of the default
    ``ASSUME_OK_UNEXPECTED``'s "Missing key" error from the storage reader. The caller decides
    which absent keys are acceptable.
    """
    loaded, _, absent = load(
        sharded_state_dict, directory, parallel_group, strict="return_unexpected"
    )
    return loaded, set(absent)

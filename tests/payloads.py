"""Code-running payloads planted where an attacker would put them, for the tests that show
loading never executes (``docs/troubleshooting.md``, "What the project loads, and how")."""

from __future__ import annotations

import dataclasses
import io
import os
import pickle
from pathlib import Path

import torch
from torch.distributed.checkpoint.metadata import BytesStorageMetadata

from megatron_adadpo.platform.safe_pickle import MetadataUnpickler


class Payload:
    """Unpickling this runs ``touch MARKER``: the shell command an attacker's file would run."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def pickled(marker: Path) -> bytes:
    """A plain pickle (what torch DCP's ``.metadata`` reader would unpickle)."""
    return pickle.dumps(Payload(marker))


def torch_file(marker: Path, obj_of=lambda payload: {"state": payload}) -> bytes:
    """A ``torch.save`` file holding the payload inside ``obj_of(payload)``."""
    buffer = io.BytesIO()
    torch.save(obj_of(Payload(marker)), buffer)
    return buffer.getvalue()


def plant_bytes_item(checkpoint: Path, key_part: str, marker: Path) -> str:
    """Point the first DCP bytes item whose key contains ``key_part`` at a payload appended to
    its ``.distcp`` file, and rewrite ``.metadata`` to match (a realistic edit of a genuine
    checkpoint: every other item still loads). Returns the item's key."""
    meta_path = checkpoint / ".metadata"
    with open(meta_path, "rb") as f:
        metadata = MetadataUnpickler(f, str(meta_path)).load()
    index = next(
        i
        for i in metadata.storage_data
        if key_part in i.fqn
        and isinstance(metadata.state_dict_metadata[i.fqn], BytesStorageMetadata)
    )
    info = metadata.storage_data[index]
    data = checkpoint / info.relative_path
    payload = torch_file(marker, obj_of=lambda p: [p])  # a sharded object is saved as [data]
    offset = data.stat().st_size
    with open(data, "ab") as f:
        f.write(payload)
    metadata.storage_data[index] = dataclasses.replace(info, offset=offset, length=len(payload))
    meta_path.write_bytes(pickle.dumps(metadata))
    return index.fqn

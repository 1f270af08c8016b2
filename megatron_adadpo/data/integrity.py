"""Checksums and the largest token id of a preprocessed directory: written with it, checked
at every open, before any step.

    digest(file) = xxh3_128(bytes of file)        (xxhash, read in 8 MiB chunks)

``seal(directory, max_token_id)`` is the manifest's ``integrity`` entry, computed from the files
as written::

    {"algorithm": "xxh3_128", "max_token_id": m,
     "files": {"pairs.bin": {"bytes": n, "digest": hex}, "pairs.idx": ..., "pair_ids.npy": ...}}

``verify(directory, manifest)`` raises ``DataIntegrityError`` (naming the file) when a file is
missing, shorter or longer than written (a partial copy: Megatron's reader would fail with a
bare numpy error naming no file), or holds other bytes (bit rot, in-range corruption that no
other check sees), and when the manifest records no checksums (written before they existed).
xxh3_128 runs near memory speed, so verifying costs 1.2-1.7x one plain read of the files
(crc32 4-7x, sha256 8-15x, blake2b 14-27x; ``benchmarks/bench_data_checksum.py``,
``BENCHMARKS.md`` "Data checksums"). It detects accidental damage, not a forger (who could
rewrite the manifest).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

CHUNK_BYTES = 8 << 20
CHECKED_FILES = ("pairs.bin", "pairs.idx", "pair_ids.npy")
ALGORITHM = "xxh3_128"


class DataIntegrityError(ValueError):
    """A file of a preprocessed directory is not what its manifest recorded.

    Attributes:
        path: the damaged file (or the manifest).
        problem: what is wrong with it, without the fix.
    """

    def __init__(self, path: str, problem: str, fix: str):
        super().__init__(f"{path} {problem}; {fix}")
        self.path, self.problem = path, problem


def _hasher(algorithm: str):
    if algorithm == "xxh3_128":
        import xxhash  # a dependency of `datasets`, declared in setup.py too

        return xxhash.xxh3_128()
    raise ValueError(f"unknown checksum algorithm {algorithm!r}")


def read_chunks(path: str, update: Callable[[memoryview], Any]) -> None:
    """Call ``update`` on the bytes of ``path``, ``CHUNK_BYTES`` at a time (one buffer)."""
    buffer = bytearray(CHUNK_BYTES)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buffer):
            update(view[:n])


def file_digest(path: str, algorithm: str = ALGORITHM) -> str:
    """Hex digest of the bytes of ``path``."""
    hasher = _hasher(algorithm)
    read_chunks(path, hasher.update)
    return hasher.hexdigest()


def seal(directory: str, max_token_id: int) -> dict[str, Any]:
    """The ``integrity`` entry of a manifest for the files now in ``directory``."""
    files = {}
    for name in CHECKED_FILES:
        path = os.path.join(directory, name)
        files[name] = {"bytes": os.path.getsize(path), "digest": file_digest(path)}
    return {"algorithm": ALGORITHM, "max_token_id": int(max_token_id), "files": files}


def verify(directory: str, manifest: dict[str, Any], fix: str) -> None:
    """Raise ``DataIntegrityError`` (with ``fix`` appended) unless every file of ``directory``
    is the one its manifest records."""
    integrity = manifest.get("integrity")
    if not isinstance(integrity, dict):
        path = os.path.join(directory, "manifest.json")
        raise DataIntegrityError(
            path, "records no checksums (written by an older megatron_adadpo)", fix
        )
    algorithm = integrity["algorithm"]
    for name, want in integrity["files"].items():
        path = os.path.join(directory, name)
        if not os.path.isfile(path):
            raise DataIntegrityError(path, "is missing", fix)
        size = os.path.getsize(path)
        if size != want["bytes"]:
            how = "truncated" if size < want["bytes"] else "longer than written"
            raise DataIntegrityError(path, f"is {how}: {size} bytes of {want['bytes']}", fix)
        if file_digest(path, algorithm) != want["digest"]:
            raise DataIntegrityError(
                path, f"is damaged: its {algorithm} checksum differs from the manifest's", fix
            )

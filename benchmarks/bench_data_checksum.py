"""What verifying a preprocessed dataset's checksums costs at open, against its size.

    python benchmarks/bench_data_checksum.py [--gib 0.25 1 4] [--dir /tmp] [--repeats 3]
        [--memory-mb 256] [--out FILE.json]

For each size: a dataset in the real format (``PairWriter``: Megatron ``IndexedDataset``,
uint16 tokens, pairs of 300 + 350 + 350 tokens on average) is written and sealed
(``integrity.seal``, the write-side cost), then opened

- without verification (Megatron's ``IndexedDataset`` + ``pair_ids.npy``: the open before
  checksums existed),
- with it (``PreferenceDataset``: sizes + xxh3_128 of the three files, then the same open),

warm (files in the page cache, as right after preprocessing or on the second rank of a node)
and cold (the files dropped from the page cache with ``posix_fadvise(DONTNEED)``: disk-bound).
First, each checksum's speed over bytes in memory (no I/O). Then, per size, the throughput of
other checksums over the same files (warm) and of a plain read, and
each as a multiple of the plain read's time (a ratio that survives a busy machine). Prints one
JSON line per size: seconds, MB/s, and verification as a % of the open time. Best of
``--repeats``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
import zlib

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.machine import machine_line  # noqa: E402
from megatron_adadpo.data.indexed import PairWriter, PreferenceDataset, write_manifest  # noqa: E402
from megatron_adadpo.data.integrity import CHECKED_FILES, CHUNK_BYTES, read_chunks, seal  # noqa: E402
from megatron_adadpo.platform.megatron import IndexedDataset  # noqa: E402

PAIRS_PER_CHUNK = 4096


def write_dataset(directory: str, gib: float, seed: int = 0) -> float:
    """A sealed dataset of about ``gib`` GiB of tokens; returns the sealing seconds."""
    rng = np.random.default_rng(seed)
    writer = PairWriter(directory, vocab_size=32000)
    target, written, pair_id = int(gib * (1 << 30)) // 2, 0, 0
    while written < target:
        lengths = rng.integers([200, 250, 250], [400, 450, 450], size=(PAIRS_PER_CHUNK, 3))
        tokens = rng.integers(0, 32000, size=int(lengths.sum()), dtype=np.int64)
        ids = list(range(pair_id, pair_id + PAIRS_PER_CHUNK))
        writer.add_pairs(tokens, lengths.ravel().tolist(), ids)
        written, pair_id = written + len(tokens), pair_id + PAIRS_PER_CHUNK
    writer.finalize()
    start = time.perf_counter()
    integrity = seal(directory, writer.max_token_id)
    sealing = time.perf_counter() - start
    manifest = {"format": "megatron_adadpo.preference_pairs", "version": 1, "identity": "bench"}
    write_manifest(directory, manifest | {"tokenizer": {}, "integrity": integrity})
    return sealing


def drop_cache(directory: str) -> None:
    for name in CHECKED_FILES:
        fd = os.open(os.path.join(directory, name), os.O_RDONLY)
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)


def open_plain(directory: str) -> None:
    IndexedDataset(os.path.join(directory, "pairs"))
    np.load(os.path.join(directory, "pair_ids.npy"))


def timed(fn, *args) -> float:
    start = time.perf_counter()
    fn(*args)
    return time.perf_counter() - start


def _crc32():
    state = [0]

    def update(chunk) -> None:
        state[0] = zlib.crc32(chunk, state[0])

    return update


def _updaters() -> dict:
    """name -> a function returning a fresh ``update(chunk)`` of that checksum."""
    import xxhash

    return {
        "crc32": _crc32,
        "blake2b": lambda: hashlib.blake2b().update,
        "sha256": lambda: hashlib.sha256().update,
        "xxh3_128": lambda: xxhash.xxh3_128().update,
    }


def other_checksums(directory: str) -> dict[str, float]:
    """Warm seconds over the three files for each checksum and for a plain read."""
    paths = [os.path.join(directory, n) for n in CHECKED_FILES]
    updaters = {"read_only": lambda: lambda chunk: None} | _updaters()
    return {
        name: sum(timed(read_chunks, p, make()) for p in paths) for name, make in updaters.items()
    }


def in_memory(megabytes: int, repeats: int) -> dict[str, int]:
    """MB/s of each checksum over random bytes already in memory (no I/O), in 8 MiB chunks."""
    data = memoryview(np.random.default_rng(0).bytes(megabytes << 20))

    def chunked(update) -> None:
        for k in range(0, len(data), CHUNK_BYTES):
            update(data[k : k + CHUNK_BYTES])

    best = {
        name: min(timed(chunked, make()) for _ in range(repeats))
        for name, make in _updaters().items()
    }
    return {k: round(len(data) / 1e6 / s) for k, s in best.items()}


def bench(root: str, gib: float, repeats: int) -> dict:
    directory = tempfile.mkdtemp(prefix="checksum-", dir=root)
    try:
        sealing = write_dataset(directory, gib)
        size = sum(os.path.getsize(os.path.join(directory, n)) for n in CHECKED_FILES)
        row = {"dataset_mb": round(size / 1e6, 1), "seal_s": round(sealing, 3)}
        for cache in ("warm", "cold"):
            plain, full = [], []
            for _ in range(repeats):
                if cache == "cold":
                    drop_cache(directory)
                plain.append(timed(open_plain, directory))
                if cache == "cold":
                    drop_cache(directory)
                full.append(timed(PreferenceDataset, directory))
            plain_s, full_s = min(plain), min(full)
            row[cache] = {
                "open_without_verify_s": round(plain_s, 4),
                "open_with_verify_s": round(full_s, 3),
                "verify_mb_per_s": round(size / 1e6 / max(full_s - plain_s, 1e-9)),
                "verify_pct_of_open": round(100 * (full_s - plain_s) / full_s, 1),
            }
        others = [other_checksums(directory) for _ in range(repeats)]
        best = {k: min(run[k] for run in others) for k in others[0]}
        row["warm_mb_per_s"] = {k: round(size / 1e6 / s) for k, s in best.items()}
        row["warm_x_plain_read"] = {k: round(s / best["read_only"], 2) for k, s in best.items()}
        return row
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gib", type=float, nargs="*", default=[0.25, 1.0, 4.0])
    parser.add_argument("--dir", default=tempfile.gettempdir(), help="where datasets are written")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--memory-mb", type=int, default=256, help="in-memory hashing buffer")
    parser.add_argument("--out", help="also write the results to this JSON file")
    args = parser.parse_args()
    results = {"machine": machine_line(), "sizes": []}
    print(results["machine"], flush=True)
    results["in_memory_mb_per_s"] = in_memory(args.memory_mb, args.repeats)
    print(json.dumps({"in_memory_mb_per_s": results["in_memory_mb_per_s"]}), flush=True)
    for gib in args.gib:
        row = bench(args.dir, gib, args.repeats)
        results["sizes"].append(row)
        print(json.dumps(row), flush=True)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()

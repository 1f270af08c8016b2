"""Data pipeline benchmarks: preprocessing throughput and data-loading cost per step.

    python benchmarks/bench_preprocess.py [--pairs 40000] [--tokenizer examples/data/tokenizer]

1. Preprocessing: the bundled pairs, replicated with distinct prompts to `--pairs` rows, are
   tokenized with 1 and 2 workers (end to end: read, validate, template, tokenize, truncate,
   write .bin/.idx + manifest). Prints pairs/s and the 2-worker speed-up (target >= 1.6x).
2. Data loading per step: sampler + dataset reads + collate for the tiny configuration
   (micro-batch 4 pairs, fixed length 128, global batch 8 = 2 micro-batches per step on one
   rank). Prints the absolute time per micro-batch and per step; divide by the measured
   training step time for the relative cost (target < 2%).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_adadpo.data import (  # noqa: E402
    DataConfig,
    PreferenceSampler,
    collate_pairs,
    load_preference_dataset,
    preprocess,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(ROOT, "examples", "data")


def make_input(path: str, pairs: int) -> None:
    with open(os.path.join(DATA, "prefs_train.jsonl"), encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    with open(path, "w", encoding="utf-8") as f:
        for k in range(pairs):
            row = dict(rows[k % len(rows)])
            if isinstance(row["prompt"], str):
                row["prompt"] = f"{row['prompt']} (case {k})"
            else:
                row["prompt"] = row["prompt"][:-1] + [
                    {"role": "user", "content": f"{row['prompt'][-1]['content']} (case {k})"}
                ]
            if isinstance(row["chosen"], list):  # UltraFeedback shape: keep the answer only
                row["chosen"], row["rejected"] = row["chosen"][-1:], row["rejected"][-1:]
            f.write(json.dumps(row) + "\n")


def bench_preprocess(tmp: str, pairs: int, tokenizer: str, repeats: int) -> dict[str, float]:
    src = os.path.join(tmp, "bench.jsonl")
    make_input(src, pairs)
    rates = {}
    for workers in (1, 2):
        cfg = DataConfig(
            inputs=(src,),
            tokenizer=tokenizer,
            max_length=256,
            max_prompt_length=128,
            on_error="skip",
            num_workers=workers,
        )
        best = float("inf")
        for r in range(repeats):
            start = time.perf_counter()
            manifest, report = preprocess(
                cfg, os.path.join(tmp, f"out{workers}_{r}"), progress=False, force=True
            )
            best = min(best, time.perf_counter() - start)
            assert report.pairs_written == pairs, report.summary()
        rates[workers] = pairs / best
        print(
            f"preprocess workers={workers}: {rates[workers]:8.0f} pairs/s "
            f"({pairs} pairs in {best:.2f} s, best of {repeats})"
        )
    print(f"speed-up 2 workers / 1 worker: {rates[2] / rates[1]:.2f}x (target >= 1.6x)")
    return rates


def bench_loading(tmp: str, tokenizer: str, steps: int) -> tuple[float, float]:
    cfg = DataConfig(
        inputs=(os.path.join(DATA, "prefs_train.jsonl"),),
        tokenizer=tokenizer,
        max_length=128,
        max_prompt_length=64,
        cache_dir=os.path.join(tmp, "cache"),
    )
    ds = load_preference_dataset(cfg)
    mbs, gbs, seq = 4, 8, 128
    sampler = iter(PreferenceSampler(len(ds), gbs, mbs, dp_rank=0, dp_size=1, seed=0))
    n = steps * (gbs // mbs)
    for _ in range(50):  # warm-up
        collate_pairs([ds[i] for i in next(sampler)], ds.pad_id, pad_to_multiple_of=seq)
    start = time.perf_counter()
    for _ in range(n):
        batch = collate_pairs([ds[i] for i in next(sampler)], ds.pad_id, pad_to_multiple_of=seq)
    per_mb = (time.perf_counter() - start) / n
    assert batch["tokens"].shape == (2 * mbs, seq)
    per_step = per_mb * (gbs // mbs)
    print(
        f"data loading: {per_mb * 1e6:.0f} us per micro-batch ({mbs} pairs, seq {seq}); "
        f"{per_step * 1e3:.3f} ms per step (global batch {gbs} pairs, 1 rank)"
    )
    return per_mb, per_step


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--pairs", type=int, default=40000)
    p.add_argument("--tokenizer", default=os.path.join(DATA, "tokenizer"))
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--steps", type=int, default=2000)
    args = p.parse_args()
    from benchmarks.machine import machine_line

    print(f"machine: {machine_line()}")
    with tempfile.TemporaryDirectory() as tmp:
        bench_preprocess(tmp, args.pairs, args.tokenizer, args.repeats)
        bench_loading(tmp, args.tokenizer, args.steps)


if __name__ == "__main__":
    main()

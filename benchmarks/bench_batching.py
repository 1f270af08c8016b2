#!/usr/bin/env python
"""Padding and useful tokens/s of ``data.batching`` modes on an UltraFeedback-like profile.

1. **Profile** (no model run): pairs drawn from ``UltraFeedbackProfile`` at ``max_length``
   2048 / prompt <= 1800 (``data/length_profile.py`` cites the statistics), split by the
   trainer's own policies; per mode the fraction of processed tokens that is padding,
   micro-batches per step, and processed / useful forward FLOPs (``planner/batching.py``) for
   the benchmark model (local spec: dense attention over a packed row) and for Llama-3-8B with
   Transformer Engine (THD: attention per sequence). ``today`` is the batching before
   token budgets: one pair per micro-batch, every row padded to ``max_length`` under pipeline
   parallelism.
2. **Measured** (``--measure``): the real trainer (``torchrun ... megatron_adadpo.train``, DPO
   with a resident reference) on CPU with a small Llama-shaped model, on a preprocessed set of
   those pairs; each variant runs ``--steps`` steps (the first is warm-up), variants in
   alternating order for ``--rounds`` rounds, and the median per-step ``real_tokens_per_s``
   is compared with ``today`` (PP2) and ``fixed`` (PP1).

    python benchmarks/bench_batching.py                      # profile only (seconds)
    python benchmarks/bench_batching.py --measure --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the benchmarks package (not installed)

from benchmarks.machine import emit_result, machine_line  # noqa: E402
from megatron_adadpo.config import read_yaml  # noqa: E402
from megatron_adadpo.data.batching import BatchingPolicy  # noqa: E402
from megatron_adadpo.data.config import DataConfig  # noqa: E402
from megatron_adadpo.data.length_profile import UltraFeedbackProfile  # noqa: E402
from megatron_adadpo.model.config import ModelConfig  # noqa: E402
from megatron_adadpo.planner.batching import estimate_batching  # noqa: E402

MAX_LENGTH, MAX_PROMPT = 2048, 1800
MODEL = dict(
    num_layers=4,
    hidden_size=128,
    ffn_hidden_size=352,
    num_attention_heads=4,
    num_query_groups=2,
    vocab_size=640,
    max_position_embeddings=4096,
    make_vocab_size_divisible_by=64,
)
LLAMA_1B = dict(  # Llama-3.2-1B shape, for --model llama-1b on a GPU
    num_layers=16,
    hidden_size=2048,
    ffn_hidden_size=8192,
    num_attention_heads=32,
    num_query_groups=8,
    vocab_size=128256,
    max_position_embeddings=4096,
    make_vocab_size_divisible_by=128,
)
RECIPE_8B = REPO / "examples/recipes/llama3_8b_adadpo.yaml"  # its model section
# variant: (pipeline stages, data.batching); "today" pads every row to max_length.
VARIANTS = {
    "pp1/fixed": (1, "fixed"),
    "pp1/token_budget": (1, "token_budget"),
    "pp1/packed": (1, "packed"),
    "pp2/today": (2, "fixed"),
    "pp2/fixed": (2, "fixed"),
    "pp2/token_budget": (2, "token_budget"),
    "pp2/packed": (2, "packed"),
}


def policies(budget: int) -> dict[str, BatchingPolicy]:
    return {
        "today": BatchingPolicy("fixed", 1, pad_multiple=MAX_LENGTH),
        "fixed": BatchingPolicy("fixed", 1),
        "token_budget": BatchingPolicy("token_budget", max_tokens=budget),
        "packed": BatchingPolicy("packed", max_tokens=budget),
    }


def profile_table(rows: np.ndarray, gbs: int, budget: int) -> dict:
    """Per mode: padding, micro-batches, FLOPs overhead for the bench model and Llama-3-8B."""
    models = {
        "bench_model_local": (ModelConfig(**MODEL), False),
        "llama3_8b_te": (ModelConfig(**read_yaml(RECIPE_8B)["model"]), True),
    }
    out = {}
    for name, policy in policies(budget).items():
        entry = {}
        for label, (model, flash) in models.items():
            est = estimate_batching(policy, rows, gbs, 1, model, flash=flash)
            entry[label] = est.to_dict()
        out[name] = entry
    for label in models:  # FLOPs bound: today's processed FLOPs over each mode's
        today = out["today"][label]["processed_flops"]
        for entry in out.values():
            entry[label]["speedup_bound_vs_today"] = today / entry[label]["processed_flops"]
            entry[label]["ideal_speedup_vs_today"] = today / entry[label]["useful_flops"]
    return out


def write_dataset(directory: Path, pairs: np.ndarray, seed: int, vocab_size: int) -> None:
    """A preprocessed set (``data/indexed.py`` format) of random tokens with these lengths."""
    from megatron_adadpo.data.indexed import PairWriter, write_manifest

    rng = np.random.default_rng(seed)
    writer = PairWriter(str(directory), vocab_size)
    for i, (p, c, r) in enumerate(pairs.tolist()):
        tokens = rng.integers(3, vocab_size, p + c + r)
        writer.add_pairs(tokens, [p, c, r], [i])
    writer.finalize()
    data = DataConfig(preprocessed=str(directory), max_length=MAX_LENGTH)
    write_manifest(
        str(directory),
        {
            "format": "megatron_adadpo.preference_pairs",
            "version": 1,
            "identity": f"bench-batching-{seed}-{len(pairs)}",
            "tokenizer": {"pad_id": 0, "vocab_size": vocab_size, "path": None},
            "settings": data.replace(max_prompt_length=MAX_PROMPT).identity_settings(),
            "num_pairs": len(pairs),
            "length_histogram": {"bin_upper_edges": [MAX_LENGTH], "counts": [len(pairs)]},
        },
    )


def run_config(run_dir: Path, data_dir: Path, args, batching: str, pp: int) -> dict:
    model = LLAMA_1B if args.model == "llama-1b" else MODEL
    return {
        "model": model,
        "execution": {"tp": 1, "pp": pp, "transformer_impl": args.impl, "bf16": args.bf16},
        "loss": {"name": "dpo", "adaptive": True},
        "data": {
            "preprocessed": str(data_dir),
            "max_length": MAX_LENGTH,
            "max_prompt_length": MAX_PROMPT,
            "batching": batching,
            "max_tokens_per_micro_batch": None if batching == "fixed" else args.budget,
        },
        "reference": {"mode": "resident"},
        "optimizer": {"lr": 1e-4, "warmup_fraction": 0.0, "decay_style": "constant"},
        "train": {
            "global_batch_size": args.gbs,
            "micro_batch_size": 1,
            "train_iters": args.steps,
            "seed": 1,
            "init_method": "layout_invariant",
        },
        "checkpoint": {"save_at_end": False, "resume": False},
        "logging": {"run_dir": str(run_dir), "progress": False, "peak_tflops": 1.0},
    }


def worker(argv: list[str], pad_to_max_length: bool) -> None:
    """One training run (inside torchrun); ``today`` pads every row to ``max_length``."""
    from megatron_adadpo import train
    from megatron_adadpo.run import batches

    if pad_to_max_length:
        batches.StepBatches._collate = _collate_padded_to_max_length
    train.main(argv)


def _collate_padded_to_max_length(self, examples):
    from megatron_adadpo.run.batches import collate_pairs
    from megatron_adadpo.run.microbatch import MicroBatch

    batch = collate_pairs(examples, self.dataset.pad_id, pad_to_multiple_of=MAX_LENGTH)
    return MicroBatch.from_collated(batch).to(self.device)


def measure(args, data_dir: Path, tmp: Path) -> dict:
    variants = [name for name in VARIANTS if VARIANTS[name][0] <= args.max_pp]
    samples = {name: [] for name in variants}
    for round_ in range(args.rounds):
        order = variants if round_ % 2 == 0 else variants[::-1]
        for name in order:
            pp, batching = VARIANTS[name]
            run_dir = tmp / f"{name.replace('/', '_')}_{round_}"
            config = tmp / f"{name.replace('/', '_')}.yaml"
            config.write_text(yaml.safe_dump(run_config(run_dir, data_dir, args, batching, pp)))
            command = [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--standalone",
                f"--nproc-per-node={pp}",
                __file__,
                "--worker",
                *(["--today"] if name.endswith("today") else []),
                "--config",
                str(config),
            ]
            env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": str(args.threads)}
            subprocess.run(command, check=True, env=env, capture_output=not args.verbose)
            lines = (run_dir / "metrics.jsonl").read_text().splitlines()
            rows = [json.loads(line) for line in lines if line.strip()]
            samples[name] += [r for r in rows if r["split"] == "train" and r["step"] > 1]
            print(f"round {round_} {name}: {len(rows)} steps", file=sys.stderr, flush=True)
    return {name: _summary(rows) for name, rows in samples.items()}


def _summary(rows: list[dict]) -> dict:
    def med(key):
        return statistics.median(r[key] for r in rows)

    return {
        "steps": len(rows),
        "real_tokens_per_s": med("throughput/real_tokens_per_s"),
        "tokens_per_s": med("throughput/tokens_per_s"),
        "padding_fraction": med("throughput/padding_fraction"),
        "step_time_s": med("step_time_s"),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gbs", type=int, default=128, help="pairs per step (profile: 128)")
    ap.add_argument("--budget", type=int, default=4096, help="max_tokens_per_micro_batch")
    ap.add_argument("--measure", action="store_true", help="also run the trainer on CPU")
    ap.add_argument("--measure-gbs", type=int, default=8, help="pairs per measured step")
    ap.add_argument("--steps", type=int, default=3, help="measured run length (1 warm-up)")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    ap.add_argument("--max-pp", type=int, default=2, help="1: skip the PP2 variants (1 GPU)")
    ap.add_argument("--model", choices=["tiny", "llama-1b"], default="tiny")
    ap.add_argument("--impl", default="local", help="execution.transformer_impl")
    ap.add_argument("--bf16", action="store_true")
    ap.add_argument("--verbose", action="store_true")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--today", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--config", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(["--config", args.config], args.today)
        return
    profile = UltraFeedbackProfile(MAX_LENGTH, MAX_PROMPT)
    result = {
        "machine": machine_line(),
        "profile": profile_table(profile.row_lengths(args.gbs * 16, seed=0), args.gbs, args.budget),
    }
    if args.measure:
        args.gbs = args.measure_gbs
        pairs = profile.sample(args.gbs * args.steps, seed=1)
        with tempfile.TemporaryDirectory() as tmp:
            vocab = (LLAMA_1B if args.model == "llama-1b" else MODEL)["vocab_size"]
            write_dataset(Path(tmp) / "data", pairs, seed=1, vocab_size=vocab)
            rows = pairs[:, :1] + pairs[:, 1:]
            result["measured_profile"] = profile_table(rows, args.gbs, args.budget)
            result["measured"] = measure(args, Path(tmp) / "data", Path(tmp))
        m = result["measured"]
        for pp, base in (("pp2", "pp2/today"), ("pp1", "pp1/fixed")):
            for name in m:
                if name.startswith(pp) and base in m:
                    m[name]["speedup_vs_" + base] = (
                        m[name]["real_tokens_per_s"] / m[base]["real_tokens_per_s"]
                    )
    emit_result(result, args.json)


if __name__ == "__main__":
    main()

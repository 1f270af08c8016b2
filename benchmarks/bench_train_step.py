#!/usr/bin/env python
"""Training-step time of the real trainer step, variants side by side in one run.

Variants share one policy (and one resident reference) and are interleaved step by step, so
machine noise hits them alike; the median step time of each is reported with ratios:

- ``dpo``: DPO, resident reference model (forward-only pass on the same micro-batches);
- ``adadpo``: AdaDPO (adaptive coefficient), resident reference;
- ``adadpo_precomputed``: AdaDPO with reference log-probs looked up from a precomputed file.

Presets: ``tiny-cpu`` (the quickstart model, 1 process on CPU) and ``llama-1b`` (a Llama-3.2-1B
shaped model, bf16 on one GPU: tokens/s, MFU and peak memory too).

    python benchmarks/bench_train_step.py --preset tiny-cpu --steps 20
    python benchmarks/bench_train_step.py --preset llama-1b --steps 10 --json out.json
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the benchmarks package (not installed)

from benchmarks.machine import emit_result, machine_line  # noqa: E402
from megatron_adadpo.config import load_config  # noqa: E402
from megatron_adadpo.data import collate_pairs  # noqa: E402
from megatron_adadpo.losses import LossConfig  # noqa: E402
from megatron_adadpo.model.build import build_model  # noqa: E402
from megatron_adadpo.platform import cpu, distributed  # noqa: E402
from megatron_adadpo.platform.machine import probe_machine  # noqa: E402
from megatron_adadpo.resolve import resolve  # noqa: E402
from megatron_adadpo.run.microbatch import MicroBatch  # noqa: E402
from megatron_adadpo.run.optimizer import build_optimizer, build_scheduler, wrap_ddp  # noqa: E402
from megatron_adadpo.run.reference import (  # noqa: E402
    PrecomputedReference,
    ResidentReference,
    write_precomputed,
)
from megatron_adadpo.run.step import StepContext, train_step  # noqa: E402

LLAMA3_VOCAB = [
    "model.vocab_size=128256",
    "model.max_position_embeddings=4096",
    "model.rotary_base=500000",
    "model.make_vocab_size_divisible_by=128",
    "model.tie_word_embeddings=true",
    "execution.tp=1",
    "execution.bf16=true",
    "optimizer.lr=1e-6",
    "optimizer.min_lr=0",
]

PRESETS = {
    "tiny-cpu": dict(
        overrides=[],
        prompt=48,
        completion=(24, 64),
        micro_batches=4,
        micro_batch_size=4,
    ),
    # Llama-3.2-1B shape.
    "llama-1b": dict(
        overrides=[
            *LLAMA3_VOCAB,
            "model.num_layers=16",
            "model.hidden_size=2048",
            "model.ffn_hidden_size=8192",
            "model.num_attention_heads=32",
            "model.num_query_groups=8",
        ],
        prompt=256,
        completion=(512, 768),
        micro_batches=4,
        micro_batch_size=2,
    ),
    # Llama-3.2-3B shape: the largest that fits one 80 GB H100 with a resident reference and
    # the plain optimizer (planner: 62 GiB); full recompute, one pair per micro-batch.
    "llama-3b": dict(
        overrides=[
            *LLAMA3_VOCAB,
            "model.num_layers=28",
            "model.hidden_size=3072",
            "model.ffn_hidden_size=8192",
            "model.num_attention_heads=24",
            "model.num_query_groups=8",
            "execution.recompute=full",
            "execution.recompute_num_layers=1",
        ],
        prompt=256,
        completion=(512, 768),
        micro_batches=8,
        micro_batch_size=1,
    ),
}


def synthetic_batches(vocab: int, preset: dict, multiple: int, seed: int) -> list[dict]:
    """Micro-batches of random pairs: prompt + completions of the preset's lengths."""
    g = np.random.default_rng(seed)
    device = torch.cuda.current_device() if torch.cuda.is_available() else "cpu"
    batches, pair_id = [], 0
    for _ in range(preset["micro_batches"]):
        examples = []
        for _ in range(preset["micro_batch_size"]):
            prompt = g.integers(3, vocab, preset["prompt"]).tolist()
            lo, hi = preset["completion"]
            chosen = g.integers(3, vocab, int(g.integers(lo, hi + 1))).tolist()
            rejected = g.integers(3, vocab, int(g.integers(lo, hi + 1))).tolist()
            examples.append(
                dict(
                    chosen_ids=prompt + chosen,
                    rejected_ids=prompt + rejected,
                    prompt_length=len(prompt),
                    pair_id=pair_id,
                )
            )
            pair_id += 1
        b = collate_pairs(examples, pad_token_id=0, pad_to_multiple_of=multiple)
        batches.append(MicroBatch.from_collated(b).to(device))
    return batches


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny-cpu")
    parser.add_argument("--steps", type=int, default=20, help="measured steps per variant")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--json", help="write the results here")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra config overrides (e.g. a smaller model for a smoke run)",
    )
    args = parser.parse_args()
    preset = PRESETS[args.preset]
    c = load_config(
        REPO / "examples/configs/quickstart.yaml",
        ["execution.tp=1", "eval.interval=0", *preset["overrides"], *args.set],
    )
    cpu.activate()
    distributed.init_distributed()
    e = c.execution
    groups = distributed.init_model_parallel(e, seed=1)
    chunks = build_model(c.model, e)
    run = resolve(c, torch.distributed.get_world_size(), probe_machine())
    context = StepContext.from_config(c, run, groups)  # the settled logprob_chunk_tokens
    resident = ResidentReference(build_model(c.model, e), chunks, context)
    policy = wrap_ddp(chunks, c.optimizer)
    optimizer = build_optimizer(policy, c.optimizer, e.bf16)
    scheduler = build_scheduler(optimizer, c.optimizer, 10_000, 1)
    vocab = c.model.vocab_size
    batches = synthetic_batches(vocab, preset, e.pad_multiple, 0)
    n_pairs = preset["micro_batches"] * preset["micro_batch_size"]
    with tempfile.TemporaryDirectory() as tmp:
        write_precomputed(tmp, -50 * np.ones((n_pairs, 2), np.float32), "bench", {})
        precomputed = PrecomputedReference(tmp, "bench")
        dpo = dataclasses.replace(context, loss=LossConfig(name="dpo"))
        adadpo = dataclasses.replace(context, loss=LossConfig(name="adadpo"))
        variants = {
            "dpo": (dpo, resident),
            "adadpo": (adadpo, resident),
            "adadpo_precomputed": (adadpo, precomputed),
        }
        times = {name: [] for name in variants}
        for i in range(args.warmup + args.steps):
            for name, (step_context, ref) in variants.items():
                step_batches = [dataclasses.replace(b) for b in batches]
                _sync()
                start = time.perf_counter()
                ref.attach(step_batches)
                train_step(
                    policy,
                    optimizer,
                    scheduler,
                    step_batches,
                    replace(step_context, global_batch_size=n_pairs),
                )
                _sync()
                if i >= args.warmup:
                    times[name].append(time.perf_counter() - start)
    report(c, preset, batches, times, args, context.logprob_chunk_tokens)
    distributed.destroy()


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def report(c, preset, batches, times, args, logprob_chunk_tokens: int) -> None:
    from megatron_adadpo.platform.hardware import peak_flops_per_device

    seq = batches[0].tokens.shape[1]
    n_seqs = sum(b.tokens.shape[0] for b in batches)
    tokens = n_seqs * seq
    peak = peak_flops_per_device()
    fwd = c.model.forward_flops(seq, c.execution.tp) * n_seqs
    result = {
        "preset": args.preset,
        "machine": machine_line(),
        "seq_length": seq,
        "sequences_per_step": n_seqs,
        "params": c.model.num_parameters(),
        "logprob_chunk_tokens": logprob_chunk_tokens,
        "variants": {},
    }
    for name, ts in times.items():
        med = statistics.median(ts)
        mult = 3.0 if name.endswith("precomputed") else 4.0  # fwd+bwd (+ reference forward)
        result["variants"][name] = {
            "median_s": med,
            "tokens_per_s": tokens / med,
            "mfu": mult * fwd / med / peak if peak == peak else None,
        }
    v = result["variants"]
    result["ratio_adadpo_over_dpo"] = v["adadpo"]["median_s"] / v["dpo"]["median_s"]
    result["ratio_precomputed_over_resident"] = (
        v["adadpo_precomputed"]["median_s"] / v["adadpo"]["median_s"]
    )
    emit_result(result, args.json)


if __name__ == "__main__":
    main()

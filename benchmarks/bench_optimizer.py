#!/usr/bin/env python
"""Optimizer step of Megatron's torch fallback (no TE / apex): plain AdamW vs torch's fused.

One Llama-shaped model (default ~115 M parameters, vocabulary 32000), wrapped in Megatron's DDP,
random gradients in its grad buffers; the timed region is ``optimizer.step()`` (Megatron's:
gradient norm, clipping, the AdamW update, copies between grad buffer and parameters), on the
wall clock and in process CPU time (robust on a shared machine).
Variants, interleaved step by step:

- ``megatron_plain``: what megatron-core builds (``torch.optim.AdamW`` with torch's defaults:
  the per-tensor loop on CPU), i.e. this plugin before the seam switched it;
- ``megatron_fused``: ``platform/megatron.py``'s ``get_megatron_optimizer`` (fused AdamW);
- ``torch_fused``: a bare ``torch.optim.AdamW(fused=True)`` over same-shaped tensors plus
  ``clip_grad_norm_``: what an HF ``Trainer`` (TRL) runs per step, for scale.

    python benchmarks/bench_optimizer.py --steps 6 --threads 2
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the benchmarks package (not installed)

from benchmarks.machine import emit_result, machine_line  # noqa: E402
from megatron_adadpo.config import load_config  # noqa: E402
from megatron_adadpo.model.build import build_model  # noqa: E402
from megatron_adadpo.platform import cpu, distributed  # noqa: E402
from megatron_adadpo.platform.megatron_optimizer import torch_optimizers  # noqa: E402
from megatron_adadpo.run.optimizer import build_optimizer, wrap_ddp  # noqa: E402

MODEL_115M = [
    "model.num_layers=12",
    "model.hidden_size=768",
    "model.ffn_hidden_size=2048",
    "model.num_attention_heads=12",
    "model.num_query_groups=4",
    "model.vocab_size=32000",
    "model.max_position_embeddings=2048",
    "model.make_vocab_size_divisible_by=128",
    "execution.tp=1",
    "optimizer.weight_decay=0.01",
]


def megatron_variant(config, plain: bool):
    """(step function, gradient filler) of Megatron's optimizer over a fresh model."""
    policy = wrap_ddp(build_model(config.model, config.execution), config.optimizer)
    optimizer = build_optimizer(policy, config.optimizer, config.execution.bf16)
    if plain:  # torch's defaults, as megatron-core constructs its fallback
        for group in (g for o in torch_optimizers(optimizer) for g in o.param_groups):
            group["fused"] = group["foreach"] = None
    params = [p for chunk in policy for p in chunk.parameters()]

    def fill(seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        for p in params:
            p.main_grad.copy_(torch.randn(p.shape, generator=g) * 1e-3)

    return optimizer.step, fill, sum(p.numel() for p in params)


def torch_variant(config):
    """A bare fused ``torch.optim.AdamW`` + ``clip_grad_norm_`` over same-shaped tensors."""
    shapes = [
        p.shape for chunk in build_model(config.model, config.execution) for p in chunk.parameters()
    ]
    params = [torch.nn.Parameter(torch.zeros(s)) for s in shapes]
    o = config.optimizer
    optimizer = torch.optim.AdamW(
        params, lr=o.lr, betas=(o.adam_beta1, o.adam_beta2), eps=o.adam_eps, fused=True
    )

    def step():
        torch.nn.utils.clip_grad_norm_(params, o.clip_grad)
        optimizer.step()

    def fill(seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        for p in params:
            p.grad = torch.randn(p.shape, generator=g) * 1e-3

    return step, fill, sum(p.numel() for p in params)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=6, help="measured steps per variant")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    config = load_config(REPO / "examples/configs/quickstart.yaml", [*MODEL_115M, *args.set])
    cpu.activate()
    distributed.init_distributed()
    distributed.init_model_parallel(config.execution, seed=1)
    variants = {
        "megatron_plain": megatron_variant(config, plain=True),
        "megatron_fused": megatron_variant(config, plain=False),
        "torch_fused": torch_variant(config),
    }
    times = {name: [] for name in variants}
    cpu_times = {name: [] for name in variants}
    for i in range(args.warmup + args.steps):
        for name, (step, fill, _) in variants.items():
            fill(i)
            start, cpu_start = time.perf_counter(), time.process_time()
            step()
            if i >= args.warmup:
                times[name].append(time.perf_counter() - start)
                cpu_times[name].append(time.process_time() - cpu_start)
    result = dict(machine=machine_line(), threads=torch.get_num_threads(), variants={})
    result["params"] = variants["megatron_fused"][2]
    for name, ts in times.items():
        cpu_s = statistics.median(cpu_times[name])
        result["variants"][name] = dict(median_step_s=statistics.median(ts), median_cpu_s=cpu_s)
    v = result["variants"]
    for key in ("median_step_s", "median_cpu_s"):
        result["plain_over_fused_" + key] = v["megatron_plain"][key] / v["megatron_fused"][key]
    emit_result(result, args.json)
    distributed.destroy()


if __name__ == "__main__":
    main()

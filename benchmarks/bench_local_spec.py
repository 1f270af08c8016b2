#!/usr/bin/env python
"""Training step of the local layer spec (no Transformer Engine): SDPA vs Megatron's attention.

Variants share the same layout-invariant weights and the same micro-batches and are interleaved
step by step (the machine's noise hits them alike); each is the trainer's real ``train_step``
(Megatron schedule, DDP, optimizer) with a resident reference of the same kind:

- ``megatron_local``: Megatron's ``DotProductAttention`` (materialised ``[b, np, s, s]`` scores
  and softmax): ``execution.attention=megatron_local``, the local spec before SDPA;
- ``sdpa``: ``model/attention.py``'s ``SDPAttention`` (the default without TE);
- ``sdpa_compiled_swiglu`` (``--swiglu``): ``sdpa`` + Megatron's ``bias_activation_fusion``
  (its fused SwiGLU autograd function, compiled by ``torch.compile``; compile time reported);
- ``sdpa_without_rope`` (``--rope``): ``sdpa`` with the rotary embedding switched off, which
  bounds what any faster RoPE could save (a speed measurement only: not the same model).

It also times the RMSNorm of ``model/norm.py`` (``torch.nn.functional.rms_norm`` in fp32)
against the same formula in separate ops, forward + backward at the model's ``[s, b, h]``.

Presets: ``cpu`` (Llama-shaped, 4 layers, GQA, vocab 8000, sequences of 160-288 tokens) and
``llama-1b`` (Llama-3.2-1B shape, bf16 on one GPU: MFU against the device's dense bf16 peak).

    python benchmarks/bench_local_spec.py --preset cpu --steps 12 --threads 2
    python benchmarks/bench_local_spec.py --preset llama-1b --steps 6 --json out.json
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the benchmarks package (not installed)

from benchmarks.bench_train_step import PRESETS as TRAIN_STEP_PRESETS  # noqa: E402
from benchmarks.bench_train_step import synthetic_batches  # noqa: E402
from benchmarks.machine import emit_result, machine_line  # noqa: E402
from megatron_adadpo.config import load_config  # noqa: E402
from megatron_adadpo.model.build import build_model  # noqa: E402
from megatron_adadpo.model.initialization import init_layout_invariant  # noqa: E402
from megatron_adadpo.platform import cpu, distributed  # noqa: E402
from megatron_adadpo.platform.hardware import peak_flops_per_device  # noqa: E402
from megatron_adadpo.run.optimizer import build_optimizer, build_scheduler, wrap_ddp  # noqa: E402
from megatron_adadpo.run.reference import ResidentReference  # noqa: E402
from megatron_adadpo.run.step import StepContext, train_step  # noqa: E402

PRESETS = {
    "cpu": dict(
        overrides=[
            "model.num_layers=4",
            "model.hidden_size=256",
            "model.ffn_hidden_size=688",
            "model.num_attention_heads=8",
            "model.num_query_groups=2",
            "model.vocab_size=8000",
            "model.max_position_embeddings=512",
        ],
        prompt=64,
        completion=(96, 224),
        micro_batches=2,
        micro_batch_size=4,
    ),
    "llama-1b": TRAIN_STEP_PRESETS["llama-1b"],
}


def build_variant(config, groups, swiglu: bool = False, rope: bool = True):
    """Policy (DDP), optimizer, scheduler, step context and resident reference of ``config``."""
    e = config.execution
    chunks = build_model(config.model, e)
    reference_chunks = build_model(config.model, e)
    for c in (chunks, reference_chunks):
        init_layout_invariant(c, seed=3, vocab_size=config.model.vocab_size)
        for chunk in c:  # both read by GPTModel / its MLP at forward time
            if swiglu:
                chunk.config.bias_activation_fusion = True
            if not rope:
                chunk.position_embedding_type = "none"
    context = StepContext(config.loss, config.model.vocab_size, groups)
    reference = ResidentReference(reference_chunks, chunks, context)
    policy = wrap_ddp(chunks, config.optimizer)
    optimizer = build_optimizer(policy, config.optimizer, e.bf16)
    scheduler = build_scheduler(optimizer, config.optimizer, 10_000, 1)
    return policy, optimizer, scheduler, context, reference


def time_steps(variants: dict, batches: list, steps: int, warmup: int) -> dict:
    """Interleaved steps; per variant the measured wall and process-CPU step times and the
    first step's wall time (CPU time, all threads of this process, is what a step costs on a
    machine that other jobs share; it equals wall time x threads on an idle one)."""
    times = {name: [] for name in variants}
    cpu_times = {name: [] for name in variants}
    first = {}
    n_pairs = sum(b.tokens.shape[0] for b in batches) // 2
    for i in range(warmup + steps):
        for name, (policy, optimizer, scheduler, context, reference) in variants.items():
            step_batches = [dataclasses.replace(b) for b in batches]
            _sync()
            start, cpu_start = time.perf_counter(), time.process_time()
            reference.attach(step_batches)
            train_step(
                policy,
                optimizer,
                scheduler,
                step_batches,
                replace(context, global_batch_size=n_pairs),
            )
            _sync()
            elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu_start
            first.setdefault(name, elapsed)
            if i >= warmup:
                times[name].append(elapsed)
                cpu_times[name].append(cpu)
    return {"times": times, "cpu_times": cpu_times, "first_step_s": first}


def time_norm(shape: tuple, dtype: torch.dtype, reps: int) -> dict:
    """Median forward + backward seconds of the RMSNorm formula: separate ops vs ``F.rms_norm``
    (process CPU time on CPU, wall time on a GPU)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    x = torch.randn(shape, dtype=dtype, device=device, requires_grad=True)
    w = torch.nn.Parameter(torch.rand(shape[-1], dtype=dtype, device=device) + 0.5)
    grad = torch.randn_like(x)

    def separate_ops():
        x32 = x.float()
        return w * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + 1e-5)).to(dtype)

    def fused():
        return w * torch.nn.functional.rms_norm(x.float(), (shape[-1],), eps=1e-5).to(dtype)

    out = {"separate_ops": [], "rms_norm": []}
    clock = time.perf_counter if torch.cuda.is_available() else time.process_time
    for _ in range(reps):
        for name, fn in (("separate_ops", separate_ops), ("rms_norm", fused)):
            _sync()
            start = clock()
            fn().backward(grad)
            _sync()
            out[name].append(clock() - start)
    return {name: statistics.median(ts[2:]) for name, ts in out.items()}


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    parser.add_argument("--steps", type=int, default=12, help="measured steps per variant")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    parser.add_argument("--swiglu", action="store_true", help="add sdpa_compiled_swiglu")
    parser.add_argument("--rope", action="store_true", help="add sdpa_without_rope")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    preset = PRESETS[args.preset]
    base = ["execution.tp=1", "eval.interval=0", *preset["overrides"]]
    cpu.activate()
    distributed.init_distributed()
    configs = {
        name: load_config(REPO / "examples/configs/quickstart.yaml", [*base, f"execution.{kv}"])
        for name, kv in (("megatron_local", "attention=megatron_local"), ("sdpa", "attention=sdpa"))
    }
    groups = distributed.init_model_parallel(configs["sdpa"].execution, seed=1)
    variants = {name: build_variant(c, groups) for name, c in configs.items()}
    if args.swiglu:
        variants["sdpa_compiled_swiglu"] = build_variant(configs["sdpa"], groups, swiglu=True)
    if args.rope:
        variants["sdpa_without_rope"] = build_variant(configs["sdpa"], groups, rope=False)
    c = configs["sdpa"]
    batches = synthetic_batches(c.model.vocab_size, preset, c.execution.pad_multiple, 0)
    measured = time_steps(variants, batches, args.steps, args.warmup)
    seq, rows = batches[0].tokens.shape[1], sum(b.tokens.shape[0] for b in batches)
    dtype = torch.bfloat16 if c.execution.bf16 else torch.float32
    norm = time_norm((seq, batches[0].tokens.shape[0], c.model.hidden_size), dtype, 40)
    report(args, c, measured, seq, rows, norm)
    distributed.destroy()


def report(args, c, measured: dict, seq: int, rows: int, norm: dict) -> None:
    peak = peak_flops_per_device()
    flops = 4.0 * c.model.forward_flops(seq, c.execution.tp) * rows  # fwd+bwd + reference fwd
    result = {
        "preset": args.preset,
        "machine": machine_line(),
        "threads": torch.get_num_threads(),
        "params": c.model.num_parameters(),
        "seq_length": seq,
        "sequences_per_step": rows,
        "variants": {},
        "rmsnorm_fwd_bwd_s": norm,
    }
    for name, ts in measured["times"].items():
        med, cpu = statistics.median(ts), statistics.median(measured["cpu_times"][name])
        result["variants"][name] = {
            "median_s": med,
            "median_cpu_s": cpu,
            "tokens_per_s": seq * rows / med,
            "tokens_per_cpu_s": seq * rows / cpu,
            "first_step_s": measured["first_step_s"][name],
            "mfu": flops / med / peak if peak == peak else None,
        }
    v = result["variants"]
    for key, base, other in (
        ("sdpa_speedup", "megatron_local", "sdpa"),
        ("swiglu_speedup", "sdpa", "sdpa_compiled_swiglu"),
        ("rope_share", "sdpa", "sdpa_without_rope"),
    ):
        if other in v:
            wall, cpu = (v[base][k] / v[other][k] for k in ("median_s", "median_cpu_s"))
            result[key] = {"wall": wall, "cpu": cpu}
    for clock in ("wall", "cpu"):  # the share of the step that RoPE costs
        if "rope_share" in result:
            result["rope_share"][clock] = 1 - 1 / result["rope_share"][clock]
    result["rmsnorm_speedup"] = norm["separate_ops"] / norm["rms_norm"]
    emit_result(result, args.json)


if __name__ == "__main__":
    main()

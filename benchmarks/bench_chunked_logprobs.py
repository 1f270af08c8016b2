"""Chunked vs unchunked output layer + log-probs at TP = 2: peak host memory and time per rank.

Each tensor-parallel rank holds the output layer's input ``x`` ``[s, b, h]`` (requires grad, as
the decoder's output does) and Megatron's ``ColumnParallelLinear`` output layer (``[v/tp, h]``,
no bias, vocab-parallel output) inside Megatron's ``DistributedDataParallel``, whose fp32
main-grad buffer exists before anything is measured, as in training. Per repetition, forward
+ backward of the per-sequence completion sums (``sums.sum().backward()``):

  * ``unchunked``: ``logits = output_layer(x)`` ``[s, b, v/tp]``, ``token_logprobs``,
    ``sequence_logprobs`` (the trainer with ``execution.logprob_chunk_tokens: 0``); the weight
    gradient goes to ``.grad``, DDP's hook adds it to ``main_grad``;
  * ``chunk=C``: ``chunked_token_logprobs(x, ..., chunk_tokens=C)`` then
    ``sequence_logprobs`` (``execution.logprob_chunk_tokens: C``).

Labels and completion mask as ``bench_logprobs_memory.py`` (prompt s/8..s/2 tokens, padding up
to s/8); ``--full-mask`` makes every token a completion token (the chunked path then computes
as many logits as the unchunked one, plus its backward recompute). Memory: every variant runs
in fresh forked gloo ranks (``tests/launcher.run_ranks``); per repetition the kernel's
high-water mark is reset, ``VmRSS`` read, forward + backward run, ``VmHWM`` read: peak above the
baseline = ``VmHWM - VmRSS_before`` (``benchmarks/machine.peak_rss_runs``). Time: one more set
of ranks runs every variant, repetitions interleaved with the order alternating, so load on the
shared machine hits them alike. One warm-up repetition is not counted; medians over
``--reps``. The variants must give the same sums, ``x`` gradients and ``main_grad`` (asserted).

Targets (issue 13): chunked peak <= 0.25x unchunked, time <= 1.05x.

    python benchmarks/bench_chunked_logprobs.py --vocab 128256 --seq 2048 --hidden 1024
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # run from a checkout
from benchmarks.bench_logprobs_memory import completion_labels  # noqa: E402
from benchmarks.machine import machine_line, peak_rss_runs  # noqa: E402
from megatron_adadpo.platform import cpu  # noqa: E402
from tests.launcher import run_ranks  # noqa: E402

TP = 2
MIB = 2**20


def build_output_layer(hidden: int, padded: int, tp_group):
    """Megatron's vocab-parallel output layer (as ``GPTModel`` builds it) in Megatron DDP."""
    from megatron_adadpo.platform.megatron import (
        DistributedDataParallel,
        DistributedDataParallelConfig,
        TransformerConfig,
        tensor_parallel,
    )

    config = TransformerConfig(
        num_layers=1,
        hidden_size=hidden,
        num_attention_heads=TP,
        tensor_model_parallel_size=TP,
        use_cpu_initialization=True,
        gradient_accumulation_fusion=False,
    )
    torch.manual_seed(7)  # the same full weight in every variant, split over TP
    layer = tensor_parallel.ColumnParallelLinear(
        hidden,
        padded,
        config=config,
        init_method=lambda w: torch.nn.init.normal_(w, std=hidden**-0.5),
        bias=False,
        gather_output=False,
        tp_group=tp_group,
    )
    ddp_config = DistributedDataParallelConfig(grad_reduce_in_fp32=True)
    return DistributedDataParallel(config=config, ddp_config=ddp_config, module=layer)


def unchunked(ddp, x, labels, mask, groups, vocab: int, chunk: int) -> torch.Tensor:
    from megatron_adadpo.logprobs import sequence_logprobs, token_logprobs

    logits, _ = ddp(x)  # [s, b, v/tp]
    logps = token_logprobs(logits, labels, groups.tp, vocab)
    return sequence_logprobs(logps, mask)[0]


def chunked(ddp, x, labels, mask, groups, vocab: int, chunk: int) -> torch.Tensor:
    from megatron_adadpo.chunked_logprobs import OutputLayer, chunked_token_logprobs
    from megatron_adadpo.logprobs import sequence_logprobs

    layer = OutputLayer(ddp.module.weight)
    logps = chunked_token_logprobs(
        x, layer, labels, mask, chunk_tokens=chunk, tp_group=groups.tp, vocab_size=vocab
    )
    return sequence_logprobs(logps, mask)[0]


def _setup(args, padded: int):
    """This rank's groups, DDP-wrapped output layer, input ``x`` and (labels, mask)."""
    from megatron_adadpo.layout import ExecutionConfig
    from megatron_adadpo.platform.distributed import init_model_parallel

    groups = init_model_parallel(ExecutionConfig(tp=TP))
    torch.set_num_threads(args.threads)
    ddp = build_output_layer(args.hidden, padded, groups.tp)
    labels, mask = completion_labels(args.seq, args.batch, args.vocab)
    if args.full_mask:
        mask = torch.ones_like(mask)
    g = torch.Generator().manual_seed(99)  # x is replicated over TP (no sequence parallel)
    x = torch.randn(args.seq, args.batch, args.hidden, generator=g).requires_grad_()
    return groups, ddp, x, labels, mask


def _runner(chunk: int, args, groups, ddp, x, labels, mask):
    """``(prepare, step, state)`` of one variant for ``peak_rss_runs``."""
    import torch.distributed as dist

    fn = chunked if chunk else unchunked
    state = {}

    def prepare():
        ddp.zero_grad_buffer()
        x.grad = None
        state.clear()
        dist.barrier()

    def step():
        state["sums"] = fn(ddp, x, labels, mask, groups, args.vocab, chunk)
        state["sums"].sum().backward()

    return prepare, step, state


def memory_rank(rank, world_size, chunk, args, padded, out_dir):
    """One variant in fresh processes: its peaks, sums and gradients (to a file)."""
    groups, ddp, x, labels, mask = _setup(args, padded)
    prepare, step, state = _runner(chunk, args, groups, ddp, x, labels, mask)
    peaks, _, _ = peak_rss_runs(step, args.reps, prepare)
    path = os.path.join(out_dir, f"{chunk}-grads-{rank}.pt")
    torch.save({"x": x.grad, "main_grad": ddp.module.weight.main_grad}, path)
    return {"peaks": peaks, "sums": state["sums"].detach(), "grad_path": path}


def time_rank(rank, world_size, variants, args, padded):
    """Every variant in the same processes, repetitions interleaved (order alternating), so
    machine noise hits them alike: wall seconds per variant."""
    setup = _setup(args, padded)
    runners = {chunk: _runner(chunk, args, *setup) for chunk in variants}
    times = {chunk: [] for chunk in variants}
    for r in range(args.reps + 1):  # repetition 0 is a warm-up
        for chunk in variants if r % 2 else variants[::-1]:
            prepare, step, _ = runners[chunk]
            prepare()
            start = time.perf_counter()
            step()
            if r:
                times[chunk].append(time.perf_counter() - start)
    return times


def check_same(results: dict, variants: list[int]) -> None:
    """Every variant's sums, ``x`` gradient and ``main_grad`` equal the unchunked ones."""
    for rank in range(TP):
        ref = results[0][rank]
        ref_grads = torch.load(ref["grad_path"])
        for chunk in variants[1:]:
            res = results[chunk][rank]
            torch.testing.assert_close(res["sums"], ref["sums"], rtol=1e-5, atol=1e-3)
            grads = torch.load(res["grad_path"])
            for name, grad in grads.items():
                err = (grad - ref_grads[name]).norm() / ref_grads[name].norm()
                assert err < 1e-5, f"chunk={chunk} rank {rank}: {name} differs by {err:.2e}"


def report(memory: dict, times: list[dict], variants: list[int], args, padded: int) -> None:
    tokens = args.seq * args.batch
    shard_bytes = tokens * (padded // TP) * 4
    print(
        f"{'rank':>4} {'variant':>10} {'peak MiB med':>12} {'max':>8} {'x [s,b,v/tp]':>12} "
        f"{'time s med':>10} {'mem ratio':>9} {'time ratio':>10}"
    )
    for rank in range(TP):
        base_peak = statistics.median(memory[0][rank]["peaks"])
        base_time = statistics.median(times[rank][0])
        for chunk in variants:
            res = memory[chunk][rank]
            peak, t = statistics.median(res["peaks"]), statistics.median(times[rank][chunk])
            name = f"chunk={chunk}" if chunk else "unchunked"
            print(
                f"{rank:>4} {name:>10} {peak / MIB:12.1f} {max(res['peaks']) / MIB:8.1f} "
                f"{peak / shard_bytes:12.2f} {t:10.2f} {peak / base_peak:9.3f} "
                f"{t / base_time:10.3f}"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=2, help="sequences (2 = one pair)")
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--chunks", type=int, nargs="+", default=[512, 1024])
    parser.add_argument("--full-mask", action="store_true", help="every token is a completion")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads per rank")
    args = parser.parse_args()
    padded = -(-args.vocab // (128 * TP)) * 128 * TP  # Megatron's make_vocab_size_divisible_by
    cpu.activate()
    tokens = args.seq * args.batch
    print(f"machine: {machine_line()} ranks={TP} (gloo, fork) threads/rank={args.threads}")
    print(
        f"shapes: s={args.seq} b={args.batch} h={args.hidden} v={args.vocab} (padded {padded}) "
        f"tp={TP} fp32, mask={'all tokens' if args.full_mask else 'completions'}; fp32 "
        f"[s,b,v/tp] = {tokens * padded // TP * 4 / MIB:.1f} MiB, [v/tp,h] = "
        f"{padded // TP * args.hidden * 4 / MIB:.1f} MiB"
    )
    variants = [0, *args.chunks]
    out_dir = tempfile.mkdtemp(prefix="bench_chunked_")
    memory = {
        c: run_ranks(memory_rank, TP, c, args, padded, out_dir, timeout=3600) for c in variants
    }
    check_same(memory, variants)
    shutil.rmtree(out_dir, ignore_errors=True)
    print("check: per-sequence sums, x gradients and main_grad match the unchunked path")
    times = run_ranks(time_rank, TP, variants, args, padded, timeout=3600)
    report(memory, times, variants, args, padded)


if __name__ == "__main__":
    main()

"""Log-prob path vs full-vocab gather at TP = 2: peak host memory and time per rank, on CPU.

Each tensor-parallel rank holds fp32 logits ``[s, b, v/tp]`` (requires grad), labels ``[b, s]``
(prompt and padding positions are ignore markers) and a completion mask. Two ways of getting
per-sequence log-prob sums, each run forward + backward (``sums.sum().backward()``):

  * ``ours``: ``megatron_adadpo.logprobs.token_logprobs`` (Megatron's
    ``vocab_parallel_cross_entropy``: scalar all-reduces per token, never a ``[s, b, v]`` tensor)
    then ``sequence_logprobs``;
  * ``naive``: ``gather_from_tensor_model_parallel_region`` (differentiable all-gather to the
    full vocab; its backward splits the gradient back to the shard), ``torch.log_softmax`` over
    the full vocab, ``gather`` of the labels, then the same masked sum;
  * ``+logits``: ``ours`` plus what the step adds for TRL's ``logits/*`` metrics
    (``shard_logit_sums`` + ``sequence_mean_logits``: a per-token shard sum, one ``[b]``
    all-reduce), to read its cost as the ratio ``+logits / ours``.

Every variant runs in a fresh forked gloo process group (``tests/launcher.run_ranks``, one
process per TP rank). Inside a rank the inputs are created first, then, for each repetition, the
kernel's high-water mark is reset (``5`` into ``/proc/self/clear_refs``), ``VmRSS`` is read,
forward + backward run, and ``VmHWM`` is read: the peak above the baseline is
``VmHWM - VmRSS_before`` (host RSS; tensors this large are ``mmap``-ed and go back to the kernel
when freed, so each repetition starts from the same baseline). One warm-up repetition is not
counted; the median (and max) over ``--reps`` are reported, with the wall-time median. The two
variants must give the same sums and the same shard gradients (asserted).

The analytic sizes of one ``[s, b, v/tp]`` and one ``[s, b, v]`` fp32 tensor are printed next to
the measurements. Target: ours <= 0.6x the naive peak per rank.

    python benchmarks/bench_logprobs_memory.py --vocab 32000 --seq 512 --batch 4 --reps 7
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # run from a checkout
from benchmarks.machine import machine_line, peak_rss_runs  # noqa: E402
from tests.launcher import run_ranks  # noqa: E402

TP = 2
MIB = 2**20


def completion_labels(seq: int, batch: int, vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Labels ``[b, s]`` (ignore markers on prompt and padding) and the completion mask: each
    row's prompt takes s/8 to s/2 tokens, its padding up to s/8 (rank-independent)."""
    g = torch.Generator().manual_seed(1234)
    labels = torch.randint(0, vocab, (batch, seq), generator=g)
    prompt = torch.randint(seq // 8, seq // 2 + 1, (batch,), generator=g)
    pad = torch.randint(0, seq // 8 + 1, (batch,), generator=g)
    pos = torch.arange(seq)
    mask = (pos >= prompt[:, None]) & (pos < seq - pad[:, None])
    labels = torch.where(mask, labels, torch.full_like(labels, -100))
    return labels, mask.float()


def make_inputs(rank: int, seq: int, batch: int, vocab: int, padded: int):
    """This rank's logits shard and the (rank-independent) labels and mask."""
    labels, mask = completion_labels(seq, batch, vocab)
    per_rank = padded // TP
    g_rank = torch.Generator().manual_seed(1000 + rank)
    shard = torch.randn(seq, batch, per_rank, generator=g_rank).mul_(3.0)
    return shard.requires_grad_(), labels, mask


def ours(shard: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    from megatron_adadpo.logprobs import sequence_logprobs, token_logprobs
    from megatron_adadpo.platform.megatron import parallel_state

    tp_group = parallel_state.get_tensor_model_parallel_group()
    sums, _ = sequence_logprobs(token_logprobs(shard, labels, tp_group), mask)
    return sums


def naive(shard: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    from megatron_adadpo.logprobs import sequence_logprobs

    # Nested so the gathered [s, b, v] tensor is not kept alive by a local name.
    logp = torch.log_softmax(gather_from_tensor_model_parallel_region(shard), dim=-1)
    target = labels.clamp(min=0).transpose(0, 1).unsqueeze(-1)  # [s, b, 1]
    token = logp.gather(-1, target).squeeze(-1).transpose(0, 1)  # [b, s]
    sums, _ = sequence_logprobs(token, mask)
    return sums


def ours_with_logits(shard: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor):
    from megatron_adadpo.logprobs import sequence_mean_logits, shard_logit_sums
    from megatron_adadpo.platform.megatron import parallel_state

    vocab, tp_group = shard.shape[-1] * TP, parallel_state.get_tensor_model_parallel_group()
    sequence_mean_logits(shard_logit_sums(shard, vocab, tp_group).t(), mask, vocab, tp_group)
    return ours(shard, labels, mask)


VARIANTS = {"ours": ours, "naive": naive, "+logits": ours_with_logits}


def rank_fn(rank, world_size, variant, seq, batch, vocab, padded, reps, threads, out_dir):
    import torch.distributed as dist

    from megatron_adadpo.layout import ExecutionConfig
    from megatron_adadpo.platform.distributed import init_model_parallel

    init_model_parallel(ExecutionConfig(tp=TP))
    torch.set_num_threads(threads)
    fn = VARIANTS[variant]
    shard, labels, mask = make_inputs(rank, seq, batch, vocab, padded)
    state = {}

    def prepare():
        shard.grad = None
        state.clear()
        dist.barrier()

    def step():
        state["sums"] = fn(shard, labels, mask)
        state["sums"].sum().backward()

    peaks, times, rss_base = peak_rss_runs(step, reps, prepare)
    sums = state["sums"]
    assert shard.grad is not None
    # The gradient goes to a file, not back through the launcher: the parent forks the next
    # variant's ranks, which would otherwise inherit (and count in RSS) its pages.
    grad_path = os.path.join(out_dir, f"{variant}-grad-{rank}.pt")
    torch.save(shard.grad, grad_path)
    return {
        "peaks": peaks,
        "times": times,
        "sums": sums.detach(),
        "grad_path": grad_path,
        "rss_base": rss_base,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads per rank")
    args = parser.parse_args()
    padded = -(-args.vocab // TP) * TP

    print(f"machine: {machine_line()} ranks={TP} (gloo, fork) threads/rank={args.threads}")
    n = args.seq * args.batch
    shard_bytes = n * (padded // TP) * 4
    full_bytes = n * padded * 4
    print(
        f"shapes: s={args.seq} b={args.batch} v={args.vocab} (padded {padded}), tp={TP}; "
        f"fp32 [s,b,v/tp] = {shard_bytes / MIB:.1f} MiB, [s,b,v] = {full_bytes / MIB:.1f} MiB"
    )
    print(
        "expected: ours ~1 x [s,b,v/tp] (the fp32 copy Megatron's CE turns in place into the "
        "softmax, then the gradient, which becomes shard.grad); naive ~3 x [s,b,v] (backward: "
        "log_softmax output + its gradient + the gathered-output gradient)"
    )

    results = {}
    out_dir = tempfile.mkdtemp(prefix="bench_logprobs_")
    for variant in VARIANTS:
        results[variant] = run_ranks(
            rank_fn,
            TP,
            variant,
            args.seq,
            args.batch,
            args.vocab,
            padded,
            args.reps,
            args.threads,
            out_dir,
            timeout=900.0,
        )

    for rank in range(TP):
        a, b = results["ours"][rank], results["naive"][rank]
        torch.testing.assert_close(a["sums"], b["sums"], rtol=1e-5, atol=1e-3)
        grad_a, grad_b = (torch.load(x["grad_path"]) for x in (a, b))
        torch.testing.assert_close(grad_a, grad_b, rtol=1e-4, atol=1e-6)
        del grad_a, grad_b
        assert torch.equal(a["sums"], results["ours"][0]["sums"]), "TP ranks disagree"
    print(
        f"check: per-sequence sums and shard gradients match (sums "
        f"{[round(x, 2) for x in results['ours'][0]['sums'].tolist()]})"
    )
    shutil.rmtree(out_dir, ignore_errors=True)

    hdr = (
        f"{'rank':>4} {'variant':>7} {'peak MiB med':>12} {'max':>8} {'x shard':>8} "
        f"{'x full':>7} {'time ms med':>11} {'base RSS MiB':>12}"
    )
    print(hdr)
    summary = []
    for rank in range(TP):
        row = {}
        for variant in VARIANTS:
            res = results[variant][rank]
            peak = statistics.median(res["peaks"])
            t = statistics.median(res["times"])
            row[variant] = (peak, t)
            print(
                f"{rank:>4} {variant:>7} {peak / MIB:12.1f} {max(res['peaks']) / MIB:8.1f} "
                f"{peak / shard_bytes:8.2f} {peak / full_bytes:7.2f} {t * 1e3:11.1f} "
                f"{res['rss_base'] / MIB:12.1f}"
            )
        mem_ratio = row["ours"][0] / row["naive"][0]
        time_ratio = row["ours"][1] / row["naive"][1]
        metric = (row["+logits"][0] / row["ours"][0], row["+logits"][1] / row["ours"][1])
        summary.append((rank, mem_ratio, time_ratio, metric))
    for rank, mem_ratio, time_ratio, metric in summary:
        verdict = "met" if mem_ratio <= 0.6 else "NOT met"
        print(
            f"rank {rank}: ours/naive peak memory = {mem_ratio:.3f} (target <= 0.6 {verdict}), "
            f"time = {time_ratio:.3f}; +logits/ours peak = {metric[0]:.3f}, time = {metric[1]:.3f}"
        )


if __name__ == "__main__":
    main()

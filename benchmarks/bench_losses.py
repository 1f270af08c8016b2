"""AdaDPO vs DPO loss: forward + backward time, side by side, on CPU (or CUDA if asked).

Two workloads on ``--pairs`` pairs (default 4096):
  * ``pair-sums``: the inputs are per-pair summed log-probs that require grad (the loss alone);
  * ``per-token``: per-token log-probs ``[b, --tokens]`` (default 512) for chosen and rejected
    that require grad, masked and summed inside the timed region, so the backward is non-trivial.

DPO is ``LossConfig(name="dpo")``, AdaDPO ``LossConfig(name="adadpo")``. Both
compute the same metrics. Repetitions are interleaved (order alternating) and the median is
reported with the ratio AdaDPO / DPO (target <= 1.02).

    python benchmarks/bench_losses.py --threads 2
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(
    0, os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
)  # run from a checkout
from benchmarks.machine import machine_line  # noqa: E402
from megatron_adadpo.losses import LossConfig, preference_loss  # noqa: E402


def make_workload(kind: str, pairs: int, tokens: int, device: torch.device):
    g = torch.Generator().manual_seed(0)
    n_w = torch.randint(tokens // 4, tokens + 1, (pairs,), generator=g)
    n_l = torch.randint(tokens // 4, tokens + 1, (pairs,), generator=g)
    mask_w = (torch.arange(tokens) < n_w[:, None]).float()
    mask_l = (torch.arange(tokens) < n_l[:, None]).float()
    tok = lambda: -2.0 - torch.rand(pairs, tokens, generator=g)  # noqa: E731
    ref_w, ref_l = (tok() * mask_w).sum(-1), (tok() * mask_l).sum(-1)
    if kind == "pair-sums":
        leaves = [(tok() * mask_w).sum(-1), (tok() * mask_l).sum(-1)]
    else:
        leaves = [tok(), tok()]
    to = lambda t: t.to(device)  # noqa: E731
    leaves = [to(t).requires_grad_() for t in leaves]
    fixed = {
        k: to(v)
        for k, v in dict(
            n_w=n_w, n_l=n_l, ref_w=ref_w, ref_l=ref_l, mask_w=mask_w, mask_l=mask_l
        ).items()
    }
    return kind, leaves, fixed


def step(config: LossConfig, workload) -> None:
    kind, (a, b), f = workload
    if kind == "pair-sums":
        l_w, l_l = a, b
    else:
        l_w, l_l = (a * f["mask_w"]).sum(-1), (b * f["mask_l"]).sum(-1)
    losses, metrics = preference_loss(config, l_w, l_l, f["n_w"], f["n_l"], f["ref_w"], f["ref_l"])
    loss = losses.sum() / metrics["pairs/valid"][0].clamp(min=1)
    loss.backward()
    a.grad = b.grad = None


def time_pair(configs: dict[str, LossConfig], workload, reps: int, warmup: int, sync):
    for _ in range(warmup):
        for cfg in configs.values():
            step(cfg, workload)
    times: dict[str, list[float]] = {name: [] for name in configs}
    names = list(configs)
    for r in range(reps):
        for name in names if r % 2 == 0 else names[::-1]:
            sync()
            start = time.perf_counter()
            step(configs[name], workload)
            sync()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=4096)
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reps", type=int, default=201)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    print(f"machine: {machine_line()} threads={torch.get_num_threads()} run on={device}")
    configs = {"DPO": LossConfig(name="dpo"), "AdaDPO": LossConfig(name="adadpo")}
    print(f"{'workload':<34} {'DPO ms':>9} {'AdaDPO ms':>10} {'ratio':>7}")
    for kind in ("pair-sums", "per-token"):
        workload = make_workload(kind, args.pairs, args.tokens, device)
        reps = args.reps if kind == "pair-sums" else max(21, args.reps // 2)
        med = time_pair(configs, workload, reps, args.warmup, sync)
        shape = f"[{args.pairs}]" if kind == "pair-sums" else f"[{args.pairs}, {args.tokens}]"
        label = f"{kind} {shape} x{reps}"
        print(
            f"{label:<34} {med['DPO'] * 1e3:9.3f} {med['AdaDPO'] * 1e3:10.3f} "
            f"{med['AdaDPO'] / med['DPO']:7.3f}"
        )


if __name__ == "__main__":
    main()

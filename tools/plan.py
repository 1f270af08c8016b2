#!/usr/bin/env python
"""Plan a run before queueing it: per-GPU memory by part, step FLOPs, time and tokens/s.

    python tools/plan.py --recipe examples/recipes/llama3_70b_adadpo.yaml --gpu h100 --nodes 8
    python tools/plan.py --recipe R.yaml --gpu h200 --set execution.pp=2 --mfu 0.35 --json
    python tools/plan.py --recipe R.yaml --lengths ultrafeedback   # batching on real lengths

Exit status: 0 when the layout fits, 1 when it does not (suggestions are printed), 2 when the
layout cannot run at all (the reasons are printed: one ``error: layout refused: ...`` line, or
``{"error": ..., "fits": false}`` with ``--json``). The recipe is validated as the trainer
validates it, but for the cluster described here, not this machine: no GPU or Megatron needed.
"""

from __future__ import annotations

import argparse
import json
import sys

from megatron_adadpo import cli
from megatron_adadpo.planner import LayoutError, load, make_plan, suggest
from megatron_adadpo.planner.report import render, suggestion_line
from megatron_adadpo.planner.search import min_nodes
from megatron_adadpo.platform.hardware import GPUS


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--recipe", "--config", dest="recipe", help="training YAML (a recipe)")
    ap.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a recipe value, e.g. --set execution.tp=8 (repeatable)",
    )
    ap.add_argument("--gpu", default="h100", help=f"GPU kind: {', '.join(GPUS)} (default h100)")
    ap.add_argument("--nodes", type=int, default=1)
    ap.add_argument("--gpus-per-node", type=int, default=8)
    ap.add_argument(
        "--gpus", type=int, default=None, help="GPUs used in all (default: nodes x gpus-per-node)"
    )
    ap.add_argument(
        "--mfu",
        type=float,
        default=None,
        help="model FLOPs utilisation vs the bf16 dense peak (default 0.40 bf16, 0.55 fp8)",
    )
    ap.add_argument(
        "--avg-seq-len",
        type=int,
        default=None,
        help="mean tokens per sequence for FLOPs (default: data.max_length)",
    )
    ap.add_argument(
        "--lengths",
        default=None,
        metavar="PROFILE",
        help="pair lengths to run the recipe's data.batching on: 'ultrafeedback' (synthetic, "
        "published statistics) or a preprocessed data directory (its manifest's histogram); "
        "default: every sequence is --avg-seq-len or data.max_length tokens",
    )
    ap.add_argument(
        "--pairs", type=int, default=None, help="training pairs, to print the time of one epoch"
    )
    ap.add_argument("--no-suggest", action="store_true", help="skip the layout search")
    ap.add_argument("--json", action="store_true", help="machine-readable output")
    return ap.parse_args(argv)


COUNTS = ("nodes", "gpus_per_node", "gpus", "avg_seq_len", "pairs")  # integers >= 1 when given


class ArgumentError(ValueError):
    """A numeric option out of its range; the message names the option and its range."""


def check_numbers(args: argparse.Namespace) -> None:
    """One rule for the numeric options: every count and length is an integer >= 1, --mfu a
    fraction in (0, 1] (NaN fails both comparisons)."""
    for name in COUNTS:
        value = getattr(args, name)
        if value is not None and not value >= 1:
            raise ArgumentError(f"--{name.replace('_', '-')}={value} must be an integer >= 1")
    if args.mfu is not None and not 0 < args.mfu <= 1:
        raise ArgumentError(f"--mfu={args.mfu} must be a fraction in (0, 1], e.g. 0.4")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        check_numbers(args)
        p, cluster = load(
            args.recipe,
            args.overrides,
            args.gpu,
            args.nodes,
            args.gpus_per_node,
            args.gpus,
            lengths=args.lengths,
        )
        if args.avg_seq_len:
            if args.avg_seq_len > p.seq_length:
                raise ArgumentError(
                    f"--avg-seq-len={args.avg_seq_len} is more than data.max_length="
                    f"{p.seq_length}, the longest a sequence can be; give the mean length"
                )
            p = p.replace(avg_seq_length=args.avg_seq_len)
        plan = make_plan(p, cluster, args.mfu)
    except ValueError as exc:  # LayoutError included; cli.run prints it and exits with 2
        if args.json:
            print(json.dumps({"error": str(exc), "fits": False}))
            return 2
        if isinstance(exc, ArgumentError):
            raise
        raise LayoutError(f"layout refused: {exc}") from None
    suggestions = [] if plan.fits or args.no_suggest else suggest(p, cluster, args.mfu)
    more_nodes = (None, None)
    if not plan.fits and not suggestions and not args.no_suggest:
        more_nodes = min_nodes(p, cluster, args.mfu)
    if args.json:
        out = plan.to_dict()
        out["suggestions"] = [
            s.to_dict()["layout"] | {"peak_reserved_gib": s.peak.reserved / 2**30}
            for s in suggestions
        ]
        if more_nodes[0]:
            out["min_nodes"] = more_nodes[0]
        if args.pairs:
            out["epoch_hours"] = _epoch_hours(plan, args.pairs)
        print(json.dumps(out, indent=1, default=str))
        return 0 if plan.fits else 1
    print(render(plan, title=f"plan: {args.recipe or '(overrides only)'}"))
    if args.pairs:
        steps = -(-args.pairs // p.global_batch_size)
        print(
            f"  one epoch of {args.pairs:,} pairs: {steps} steps, "
            f"{_epoch_hours(plan, args.pairs):.2f} h"
        )
    if suggestions:
        print("layouts that fit (best first; apply with --set):")
        for s in suggestions:
            print(suggestion_line(s))
    elif more_nodes[0]:
        print(
            f"no layout fits on {cluster.world_size} GPUs; the smallest power-of-two node "
            f"count that fits is {more_nodes[0]}:"
        )
        print(suggestion_line(more_nodes[1]))
    elif not plan.fits and not args.no_suggest:
        print("no layout of this recipe fits; shorten data.max_length or use larger GPUs")
    return 0 if plan.fits else 1


def _epoch_hours(plan, pairs: int) -> float:
    steps = -(-pairs // plan.input.global_batch_size)
    return steps * plan.cost.step_time_s / 3600


if __name__ == "__main__":
    sys.exit(cli.run(main))

#!/usr/bin/env python
"""The CPU quickstart's training throughput: this working tree vs a git revision, side by side.

Runs the quickstart's training (``examples/configs/quickstart.yaml``: 2 processes, TP = 2,
gloo, AdaDPO) with the code of ``--before`` (a git revision, exported with ``git archive`` to a
temporary directory) and with this working tree, alternating ``--repeats`` times (before,
after; then after, before), and reports the median over steps and runs of each side's logged
tokens/s (``metrics.jsonl``; the first ``--warmup`` steps of every run left out) and the CPU
seconds of each run's processes (robust on a machine that other jobs share; start-up, the
same for both sides, included). The data is tokenized once beforehand, into one cache.

    python benchmarks/bench_quickstart.py --before main --steps 30 --repeats 2
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the benchmarks package (not installed)
from benchmarks.machine import emit_result  # noqa: E402


def export(revision: str, target: Path) -> Path:
    """The tree of ``revision`` in ``target`` (no git metadata)."""
    target.mkdir(parents=True)
    archive = subprocess.run(
        ["git", "archive", revision], cwd=REPO, check=True, capture_output=True
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(target)], input=archive, check=True)
    return target


def train(tree: Path, run_dir: Path, steps: int, cache: Path) -> tuple[list[dict], float]:
    """One quickstart training with the code in ``tree``: its train rows of metrics.jsonl and
    the CPU seconds of all its processes (start-up included)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    cmd += ["-m", "megatron_adadpo.train", "--config", "examples/configs/quickstart.yaml"]
    for item in (
        f"logging.run_dir={run_dir}",
        f"data.cache_dir={cache}",
        f"train.train_iters={steps}",
        "checkpoint.resume=false",
        "checkpoint.save_at_end=false",
        "logging.progress=false",
        "eval.interval=0",
    ):
        cmd += ["--set", item]
    env = dict(os.environ, PYTHONPATH=str(tree), OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    out = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if out.returncode:
        raise RuntimeError(f"training in {tree} failed:\n{out.stderr[-3000:]}")
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["split"] == "train"], cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before", default="main", help="git revision to compare against")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        trees = {"before": export(args.before, tmp / "before"), "after": REPO}
        train(REPO, tmp / "warm_cache", 1, tmp / "cache")  # tokenize once, for both sides
        rates = {"before": [], "after": []}
        cpu = {"before": [], "after": []}
        for r in range(args.repeats):
            for side in ("before", "after") if r % 2 == 0 else ("after", "before"):
                rows, seconds = train(
                    trees[side], tmp / f"run_{side}_{r}", args.steps, tmp / "cache"
                )
                rates[side] += [row["throughput/tokens_per_s"] for row in rows[args.warmup :]]
                cpu[side].append(seconds)
    result = {f"{side}_tokens_per_s": statistics.median(v) for side, v in rates.items()}
    result |= {f"{side}_run_cpu_s": statistics.median(v) for side, v in cpu.items()}
    result["tokens_per_s_after_over_before"] = (
        result["after_tokens_per_s"] / result["before_tokens_per_s"]
    )
    result["run_cpu_s_after_over_before"] = result["after_run_cpu_s"] / result["before_run_cpu_s"]
    result["before_revision"] = args.before
    emit_result(result, args.json)


if __name__ == "__main__":
    main()

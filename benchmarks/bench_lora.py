#!/usr/bin/env python
"""LoRA vs full-parameter training on CPU: peak memory and step time of the real trainer.

Each variant runs in its own process (``python -m megatron_adadpo.train`` as a user runs it, one
rank, gloo) on the bundled preference pairs with a model as large as this CPU trains in
minutes; the process's peak resident memory (``ru_maxrss``) and the median ``step_time_s`` of
its ``metrics.jsonl`` (after the first step) are reported:

- ``full``: AdaDPO, every parameter trained (fp32 grads + Adam state), resident reference copy;
- ``lora``: AdaDPO, LoRA rank 16 on every attention / MLP linear, the base frozen, the reference
  the policy with its adapters off (``reference.mode: adapters_off``).

    python benchmarks/bench_lora.py --steps 6 --json benchmarks/results/cpu_lora.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.machine import machine_line  # noqa: E402

MODEL = [  # ~60 M parameters: 8 layers, hidden 768, ffn 2048, vocab 640
    "model.num_layers=8",
    "model.hidden_size=768",
    "model.ffn_hidden_size=2048",
    "model.num_attention_heads=12",
    "model.num_query_groups=4",
    "execution.tp=1",
    "train.global_batch_size=8",
    "train.micro_batch_size=2",
    "train.init_method=megatron",
    "eval.interval=0",
    "checkpoint.save_at_end=false",
    "logging.progress=false",
]
VARIANTS = {
    "full": ["reference.mode=resident"],
    "lora": ["reference.mode=adapters_off", "lora.rank=16", "lora.alpha=32"],
}
RUNNER = (
    "import resource, sys; from megatron_adadpo import train; train.main(sys.argv[1:]); "
    "print('MAXRSS_KB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)"
)


def run_variant(name: str, steps: int, work: Path) -> dict:
    run_dir = work / name
    argv = ["--config", str(REPO / "examples/configs/quickstart.yaml")]
    for item in [*MODEL, *VARIANTS[name], f"train.train_iters={steps}"]:
        argv += ["--set", item]
    argv += ["--set", f"logging.run_dir={run_dir}", "--set", f"data.cache_dir={work / 'cache'}"]
    out = subprocess.run(
        [sys.executable, "-c", RUNNER, *argv], cwd=REPO, capture_output=True, text=True
    )
    if out.returncode:
        raise RuntimeError(f"{name} failed:\n{out.stderr[-3000:]}")
    rss_kb = int(next(x for x in out.stdout.splitlines() if x.startswith("MAXRSS_KB")).split()[1])
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    times = [r["step_time_s"] for r in rows if r.get("split") == "train"][1:]
    return {
        "peak_rss_gib": rss_kb / 1024**2,
        "median_step_s": statistics.median(times),
        "losses": [r["loss"] for r in rows if r.get("split") == "train"],
    }


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        results = {name: run_variant(name, args.steps, Path(tmp)) for name in VARIANTS}
    full, lora = results["full"], results["lora"]
    print(machine_line())
    for name, r in results.items():
        print(f"{name:5s} peak RSS {r['peak_rss_gib']:.2f} GiB, step {r['median_step_s']:.3f} s")
    ratio_mem = lora["peak_rss_gib"] / full["peak_rss_gib"]
    ratio_time = lora["median_step_s"] / full["median_step_s"]
    print(f"lora / full: memory {ratio_mem:.3f}, step time {ratio_time:.3f}")
    if args.json:
        summary = {"machine": machine_line(), "results": results}
        Path(args.json).write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()

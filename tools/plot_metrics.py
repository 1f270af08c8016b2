#!/usr/bin/env python
"""Plot runs' metrics side by side: chosen / rejected log-probs, margins, reward accuracy.

    python tools/plot_metrics.py RUN_DIR [RUN_DIR ...] [--labels A B] --output FILE.png

Each RUN_DIR holds the ``metrics.jsonl`` written by ``megatron_adadpo.train``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

PANELS = (
    ("logps/chosen_per_token", "chosen log-prob per token"),
    ("logps/rejected_per_token", "rejected log-prob per token"),
    ("rewards/margins", "reward margin (beta * (h_w - h_l))"),
    ("rewards/accuracies", "reward accuracy"),
    ("ada/log_prob_balance", "log |dL/dpi_w| / |dL/dpi_l| (0 = balanced)"),
    ("loss", "loss"),
)


def read(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise SystemExit(f"{path} not found: is {run_dir} a run directory?")
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in rows if r.get("split", "train") == "train"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--labels", nargs="*")
    parser.add_argument("--output", required=True, type=Path)
    args = parser.parse_args()
    labels = args.labels or [r.name for r in args.runs]
    if len(labels) != len(args.runs):
        raise SystemExit("--labels needs one label per run directory")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(15, 8), constrained_layout=True)
    for run, label in zip(args.runs, labels, strict=True):
        rows = read(run)
        for ax, (key, title) in zip(axes.flat, PANELS, strict=True):
            points = [(r["step"], r[key]) for r in rows if key in r]
            if points:
                ax.plot(*zip(*points, strict=True), label=label)
            ax.set_title(title)
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
    axes.flat[0].legend()
    args.output.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.output, dpi=100)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()

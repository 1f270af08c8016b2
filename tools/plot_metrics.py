#!/usr/bin/env python
"""Plot runs' metrics side by side: chosen / rejected log-probs, rewards, accuracy, balance.

    python tools/plot_metrics.py RUN_DIR [RUN_DIR ...] [--labels A B] --output FILE.png

Each RUN_DIR holds the ``metrics.jsonl`` written by ``megatron_adadpo.train``. Training steps
are thin lines (each step is a different batch, so they are noisy); the held-out evaluations
(``eval.interval``; the same pairs every time) are thick lines with markers, when present.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

PANELS = (
    ("logps/chosen_per_token", "chosen log-prob per token"),
    ("logps/rejected_per_token", "rejected log-prob per token"),
    ("rewards/chosen", "chosen reward (beta * h_w; < 0: below the start)"),
    ("rewards/margins", "reward margin (beta * (h_w - h_l))"),
    ("rewards/accuracies", "reward accuracy"),
    ("ada/log_prob_balance", "log |dL/dpi_w| / |dL/dpi_l| (0 = balanced)"),
    ("rewards/rejected", "rejected reward (beta * h_l)"),
    ("loss", "loss"),
)


def read(run_dir: Path) -> dict[str, list[dict]]:
    """``{"train": rows, "eval": rows}`` of a run directory."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise SystemExit(f"{path} not found: is {run_dir} a run directory?")
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {s: [r for r in rows if r.get("split", "train") == s] for s in ("train", "eval")}


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

    fig, axes = plt.subplots(2, 4, figsize=(19, 8), constrained_layout=True)
    for k, (run, label) in enumerate(zip(args.runs, labels, strict=True)):
        splits = read(run)
        color = f"C{k}"
        for ax, (key, title) in zip(axes.flat, PANELS, strict=True):
            for split, style in (("train", dict(lw=1, alpha=0.45)), ("eval", dict(lw=2.5))):
                points = [(r["step"], r[key]) for r in splits[split] if key in r]
                if points:
                    name = f"{label} ({'held-out' if split == 'eval' else 'train'})"
                    marker = "o" if split == "eval" else None
                    ax.plot(
                        *zip(*points, strict=True), color=color, marker=marker, label=name, **style
                    )
            ax.set_title(title, fontsize=10)
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
    axes.flat[0].legend(fontsize=8)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.output, dpi=90)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()

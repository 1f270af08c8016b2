"""The report of ``run.py --grid`` and ``run.py --lora``: tables (markdown) and one figure.

    python examples/miniature/grid_report.py --out DIR --jobs grid|lora   (run.py calls it)

Reads ``DIR/results/*.json`` (finished runs only: it works while the grid runs) and the
ground truth ``DIR/data/heldout.jsonl``; writes ``DIR/report.md`` (per method: exact match with
its 95 % interval over prompts, log-prob changes, both fell; ``grid``: per (lr, beta) cell and
AdaDPO's cells won against each baseline, ``stats.py`` has the rules; per run), and
``DIR/results.json``; ``grid`` also ``DIR/grid.png`` (heatmaps of exact match per method and
of AdaDPO minus each baseline).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from report import COLUMNS  # the default report's columns, the same measures
from stats import cell_means, cells_won, hits, paired_interval, prompt_interval

METHODS = ("DPO", "AdaDPO", "DPO+SFT", "DPOP")
BASELINES = ("DPO", "DPO+SFT", "DPOP")


def load(out: Path) -> tuple[dict, list[dict], list[str]]:
    """(the SFT start, the finished runs in job order, the held-out ground-truth answers)."""
    truth = [json.loads(line)["chosen"].strip() for line in open(out / "data/heldout.jsonl")]
    results = [json.loads(p.read_text()) for p in sorted((out / "results").glob("*.json"))]
    for r in results:
        r["exact"] = r["exact_match"]["all"]
    start = next(r for r in results if r["name"] == "SFT")
    runs = [r for r in results if r["name"] != "SFT"]
    runs.sort(key=lambda r: (METHODS.index(r["method"]), r["lr"], r["beta"], r["seed"]))
    return start, runs, truth


def _row(cells: list) -> str:
    return "| " + " | ".join(map(str, cells)) + " |"


def _table(head: list[str], rows: list[list]) -> str:
    return "\n".join([_row(head), _row(["---"] * len(head)), *map(_row, rows)])


def method_table(start: dict, runs: list[dict], truth: list[str]) -> str:
    """Per method: runs, exact match and its 95 % interval, means of the other measures."""
    head = ["method", "runs", "exact match", "95 % interval", *(t for _, t, _ in COLUMNS[:4])]
    rows = [["SFT start", 1, f"{start['exact']:.1%}", "", "0", "0", ""]]
    rows[0].append(f"{start['reward_accuracy']:.0%}")
    for method in METHODS:
        group = [r for r in runs if r["method"] == method]
        if not group:
            continue
        mean, low, high = prompt_interval(np.stack([hits(r["answers"], truth) for r in group]))
        cells = [fmt.format(np.mean([r[k] for r in group])) for k, _, fmt in COLUMNS[:4]]
        rows.append([method, len(group), f"{mean:.1%}", f"{low:.1%} to {high:.1%}", *cells])
    return _table(head, rows)


def cell_table(runs: list[dict]) -> str:
    """Per (lr, beta) cell: each method's exact match, mean of its seeds (blank: not run yet)."""
    means = {m: cell_means(runs, m) for m in METHODS}
    cells = sorted({(r["lr"], r["beta"]) for r in runs})
    rows = []
    for lr, beta in cells:
        mine = [f"{means[m][lr, beta]:.1%}" if (lr, beta) in means[m] else "" for m in METHODS]
        rows.append([f"{lr:g}", f"{beta:g}", *mine])
    return _table(["lr", "β", *METHODS], rows)


def wins_table(runs: list[dict], truth: list[str], baselines: tuple = BASELINES) -> str:
    """AdaDPO's cells won / tied / lost against each baseline, and its exact match minus the
    baseline's over all their runs with the paired 95 % interval over prompts."""
    ada = cell_means(runs, "AdaDPO")
    stacked = {
        m: np.stack([hits(r["answers"], truth) for r in runs if r["method"] == m])
        for m in METHODS
        if any(r["method"] == m for r in runs)
    }
    rows = []
    for base in baselines:
        theirs = cell_means(runs, base)
        wins, ties, losses = cells_won(ada, theirs, len(truth))
        row = [f"AdaDPO vs {base}", wins, ties, losses, len(ada.keys() & theirs.keys()), ""]
        if "AdaDPO" in stacked and base in stacked:
            diff, low, high = (100 * x for x in paired_interval(stacked["AdaDPO"], stacked[base]))
            row[-1] = f"{diff:+.1f} ({low:+.1f} to {high:+.1f})"
        rows.append(row)
    head = ["", "wins", "ties", "losses", "cells", "exact match difference, points (95 %)"]
    return _table(head, rows)


def run_table(runs: list[dict]) -> str:
    head = ["run", "lr", "β", "seed", *(title for _, title, _ in COLUMNS)]
    rows = [
        [r["method"], f"{r['lr']:g}", f"{r['beta']:g}", r["seed"]]
        + [fmt.format(r[key]) for key, _, fmt in COLUMNS]
        for r in runs
    ]
    return _table(head, rows)


def _limits(values: list[np.ndarray], centred: bool) -> dict:
    """One colour scale for a row of heatmaps (symmetric about 0 when ``centred``)."""
    finite = np.concatenate([v[np.isfinite(v)] for v in values])
    if not finite.size:
        return {}
    if centred:
        limit = float(np.abs(finite).max()) or 1.0
        return dict(vmin=-limit, vmax=limit)
    return dict(vmin=float(finite.min()), vmax=float(finite.max()))


def figure(runs: list[dict], path: Path) -> None:
    """Top: exact match per (lr, beta) cell for each method; bottom: AdaDPO minus DPO, DPO+SFT
    and DPOP (points of exact match), blank where a cell has not finished."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lrs = sorted({r["lr"] for r in runs})
    betas = sorted({r["beta"] for r in runs})

    def grid(cells: dict) -> np.ndarray:
        return np.array([[cells.get((lr, b), np.nan) for b in betas] for lr in lrs]) * 100

    means = {m: grid(cell_means(runs, m)) for m in METHODS}
    diffs = {b: means["AdaDPO"] - means[b] for b in BASELINES}

    top, bottom = _limits(list(means.values()), False), _limits(list(diffs.values()), True)
    panels = [(m, v, "viridis", top, "{:.1f}") for m, v in means.items()]
    panels += [(f"AdaDPO - {b}", v, "RdBu", bottom, "{:+.1f}") for b, v in diffs.items()]
    fig, axes = plt.subplots(2, 4, figsize=(16, 7), constrained_layout=True)
    for ax, (title, values, cmap, limits, fmt) in zip(axes.flat, panels, strict=False):
        image = ax.imshow(values, cmap=cmap, origin="lower", **limits)
        for (i, j), v in np.ndenumerate(values):
            if np.isfinite(v):
                box = dict(facecolor="white", alpha=0.7, lw=0)
                ax.text(j, i, fmt.format(v), ha="center", va="center", bbox=box)
        ax.set_xticks(range(len(betas)), [f"{b:g}" for b in betas])
        ax.set_yticks(range(len(lrs)), [f"{lr:g}" for lr in lrs])
        ax.set_xlabel("β")
        ax.set_ylabel("lr")
        ax.set_title(f"{title}: exact match (%)", fontsize=10)
        fig.colorbar(image, ax=ax, shrink=0.8)
    axes.flat[-1].axis("off")
    fig.savefig(path, dpi=90)


def write_report(out: Path, jobs: str) -> list[Path]:
    """Write the report of the finished runs; returns the files written."""
    start, runs, truth = load(out)
    text = f"{len(runs)} runs finished.\n\n## Per method (exact match: 95 % interval over the "
    text += f"{len(truth)} held-out prompts)\n\n" + method_table(start, runs, truth)
    if jobs == "grid":
        text += "\n\n## Per (lr, β) cell: exact match, mean of the seeds\n\n" + cell_table(runs)
    text += f"\n\n## Cells won by AdaDPO (a tie: within one prompt, 1/{len(truth)})\n\n"
    text += wins_table(runs, truth, BASELINES if jobs == "grid" else ("DPO",))
    text += "\n\n## Per run\n\n" + run_table(runs) + "\n"
    written = [out / "report.md", out / "results.json"]
    written[0].write_text(text)
    written[1].write_text(json.dumps([start, *runs], indent=1))
    if jobs == "grid" and runs:
        written.append(out / "grid.png")
        figure(runs, written[-1])
    return written


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--jobs", choices=["grid", "lora"], default="grid")
    args = parser.parse_args()
    print(f"wrote {', '.join(map(str, write_report(args.out, args.jobs)))}")

"""The miniature's report: per-run and per-method tables (markdown) and one figure.

    python examples/miniature/report.py --out DIR      (run.py calls it at the end)

Reads ``DIR/results/*.json`` and writes ``DIR/report.md``, ``DIR/results.json`` (every run)
and ``DIR/miniature.png``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

COLUMNS = (
    ("delta_chosen", "Δ chosen lp/tok", "{:+.3f}"),
    ("delta_rejected", "Δ rejected lp/tok", "{:+.3f}"),
    ("both_fell", "both fell", "{:.0%}"),
    ("reward_accuracy", "reward acc.", "{:.0%}"),
    ("exact", "exact match", "{:.1%}"),
)
PAIRS = (("DPO", "AdaDPO"), ("SimPO", "AdaSimPO"))


def load(out: Path) -> tuple[dict, list[dict]]:
    """(the SFT start's result, the preference runs' results in grid order)."""
    results = [json.loads(p.read_text()) for p in sorted((out / "results").glob("*.json"))]
    for r in results:
        r["exact"] = r["exact_match"]["all"]
    start = next(r for r in results if r["name"] == "SFT")
    order = [m for pair in PAIRS for m in pair]
    runs = [r for r in results if r["name"] != "SFT"]
    runs.sort(key=lambda r: (order.index(r["method"]), r["beta"], r["seed"]))
    return start, runs


def _row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def run_table(start: dict, runs: list[dict]) -> str:
    head = ["run", "β", "seed", *(title for _, title, _ in COLUMNS)]
    lines = [_row(head), _row(["---"] * len(head))]
    sft = [fmt.format(start[key]) for key, _, fmt in COLUMNS]
    lines.append(_row(["SFT start", "", "", "0", "0", "", sft[3], sft[4]]))
    for r in runs:
        cells = [fmt.format(r[key]) for key, _, fmt in COLUMNS]
        lines.append(_row([r["method"], f"{r['beta']:g}", str(r["seed"]), *cells]))
    return "\n".join(lines)


def method_table(start: dict, runs: list[dict]) -> str:
    """Means over betas and seeds, with the per-task exact match."""
    tasks = sorted(k for k in start["exact_match"] if k != "all")
    head = ["method", "runs", *(t for _, t, _ in COLUMNS), *tasks]
    lines = [_row(head), _row(["---"] * len(head))]
    groups = [("SFT start", [start])]
    groups += [(m, [r for r in runs if r["method"] == m]) for pair in PAIRS for m in pair]
    for name, group in groups:
        if not group:
            continue
        cells = [fmt.format(np.mean([r[key] for r in group])) for key, _, fmt in COLUMNS]
        if name == "SFT start":
            cells[2] = ""  # nothing moved yet
        per_task = [f"{np.mean([r['exact_match'][t] for r in group]):.0%}" for t in tasks]
        lines.append(_row([name, str(len(group)), *cells, *per_task]))
    return "\n".join(lines)


def figure(start: dict, runs: list[dict], path: Path) -> None:
    """Rows: DPO vs AdaDPO, SimPO vs AdaSimPO. Columns: held-out Δ chosen / Δ rejected
    log-prob per token and exact match, against beta; dots are seeds, lines their means."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = (("delta_chosen", "Δ chosen log-prob / token"), ("delta_rejected", "Δ rejected"))
    panels += (("exact", "greedy exact match (held-out)"),)
    fig, axes = plt.subplots(2, 3, figsize=(14, 7.5), constrained_layout=True)
    for axes_row, pair in zip(axes, PAIRS, strict=True):
        for ax, (key, title) in zip(axes_row, panels, strict=True):
            for method, color in zip(pair, ("tab:red", "tab:blue"), strict=True):
                mine = [r for r in runs if r["method"] == method]
                betas = sorted({r["beta"] for r in mine})
                means = [np.mean([r[key] for r in mine if r["beta"] == b]) for b in betas]
                ax.plot(betas, means, "-o", color=color, label=method)
                ax.scatter([r["beta"] for r in mine], [r[key] for r in mine], color=color, s=12)
            level = start[key] if key == "exact" else 0.0
            ax.axhline(level, color="gray", ls="--", lw=1, label="SFT start")
            ax.set_xscale("log")
            ax.set_xticks(betas, [f"{b:g}" for b in betas])
            ax.minorticks_off()
            ax.set_xlabel("β")
            ax.set_title(f"{title}: {pair[0]} vs {pair[1]}", fontsize=10)
            ax.grid(alpha=0.3)
        axes_row[0].legend(fontsize=8)
    fig.savefig(path, dpi=90)


def write_report(out: Path) -> Path:
    start, runs = load(out)
    text = "## Per method (mean over β and seeds)\n\n" + method_table(start, runs)
    text += "\n\n## Per run\n\n" + run_table(start, runs) + "\n"
    (out / "report.md").write_text(text)
    (out / "results.json").write_text(json.dumps([start, *runs], indent=1))
    figure(start, runs, out / "miniature.png")
    return out / "report.md"


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, type=Path)
    print(f"wrote {write_report(parser.parse_args().out)}")

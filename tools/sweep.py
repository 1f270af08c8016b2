#!/usr/bin/env python
"""The paper's lr x beta grid as launch commands: one override set and one command per point.

    python tools/sweep.py --recipe examples/recipes/llama3_8b_adadpo.yaml
    python tools/sweep.py --recipe R.yaml --launcher slurm --losses adadpo,dpo --write sweeps/8b

Default grid (ALGORITHM.md section 7): lr in {3e-7, 5e-7, 6e-7, 1e-6} x beta in {0.005, 0.01,
0.05, 0.1}. ``--losses adadpo,dpo`` adds the DPO baseline (``loss.name=dpo``) at every
point, the comparison the paper reports. Each point gets its own ``logging.run_dir``. With
``--write DIR`` every point is also written as a complete YAML config (the recipe with its
overrides applied) and the commands use those files. The recipe is validated first (as the
trainer's config, without its machine checks): a bad recipe prints one ``error: ...`` line and
exits with status 2. Nothing is launched: pipe the output to a shell, or submit the lines you
want.
"""

from __future__ import annotations

import argparse
import itertools
import json
import shlex
import sys
from pathlib import Path

import yaml

from megatron_adadpo import cli
from megatron_adadpo.config import from_dict, read_yaml

PAPER_LRS = (3e-7, 5e-7, 6e-7, 1e-6)
PAPER_BETAS = (0.005, 0.01, 0.05, 0.1)
LOSSES = {"adadpo": True, "dpo": False}  # loss.name -> loss.adaptive (explicit: no notice)
LAUNCHERS = {
    "single": "bash examples/launch/single_node.sh",
    "multi": (
        "NNODES=${{NNODES:?}} MASTER_ADDR=${{MASTER_ADDR:?}} bash examples/launch/multi_node.sh"
    ),
    "slurm": "sbatch --job-name {name} examples/launch/slurm.sbatch",
}


def grid_points(lrs, betas, losses, run_root: str) -> list[dict]:
    """One dict per point: its name and its ``--set`` overrides, in grid order."""
    points = []
    for loss, lr, beta in itertools.product(losses, lrs, betas):
        name = f"{loss}_lr{lr:g}_beta{beta:g}"
        points.append(
            {
                "name": name,
                "overrides": [
                    f"optimizer.lr={lr:g}",
                    f"loss.beta={beta:g}",
                    f"loss.name={loss}",
                    f"loss.adaptive={str(LOSSES[loss]).lower()}",
                    f"logging.run_dir={run_root}/{name}",
                ],
            }
        )
    return points


def command(launcher: str, recipe: str, point: dict, config_file: str | None = None) -> str:
    head = LAUNCHERS[launcher].format(name=shlex.quote(f"adadpo-{point['name']}"))
    if config_file:
        return f"{head} --config {shlex.quote(config_file)}"
    sets = " ".join(f"--set {shlex.quote(o)}" for o in point["overrides"])
    return f"{head} --config {shlex.quote(recipe)} {sets}"


def write_config(recipe: str, point: dict, out_dir: Path) -> Path:
    values = read_yaml(recipe, point["overrides"])
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{point['name']}.yaml"
    header = f"# {point['name']}: {recipe} with {' '.join(point['overrides'])}\n"
    path.write_text(header + yaml.safe_dump(values, sort_keys=False))
    return path


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--recipe", required=True)
    ap.add_argument("--lrs", type=_floats, default=list(PAPER_LRS), help="comma-separated")
    ap.add_argument("--betas", type=_floats, default=list(PAPER_BETAS), help="comma-separated")
    ap.add_argument("--losses", default="adadpo", help="comma-separated: adadpo, dpo")
    ap.add_argument("--launcher", choices=sorted(LAUNCHERS), default="single")
    ap.add_argument(
        "--run-root", default=None, help="parent of the runs (default: runs/sweep_<recipe name>)"
    )
    ap.add_argument("--write", default=None, help="also write one full YAML per point here")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    losses = [x for x in args.losses.split(",") if x]
    bad = [x for x in losses if x not in LOSSES]
    if bad:
        ap.error(f"--losses {bad}: accepted {sorted(LOSSES)}")
    from_dict(read_yaml(args.recipe))  # fail early on a missing / invalid recipe (ConfigError)
    root = args.run_root or f"runs/sweep_{Path(args.recipe).stem}"
    points = grid_points(args.lrs, args.betas, losses, root)
    for p in points:
        cfg = str(write_config(args.recipe, p, Path(args.write))) if args.write else None
        p["config"] = cfg
        p["command"] = command(args.launcher, args.recipe, p, cfg)
    if args.json:
        print(json.dumps(points, indent=1))
    else:
        print(
            f"# {len(points)} runs: {len(losses)} loss(es) x {len(args.lrs)} lr x "
            f"{len(args.betas)} beta, from {args.recipe}"
        )
        for p in points:
            print(p["command"])
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))

"""tools/sweep.py: the paper's lr x beta grid as override sets and launch commands."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
R8B = REPO / "examples" / "recipes" / "llama3_8b_adadpo.yaml"


def _sweep(*args):
    return subprocess.run(
        [sys.executable, str(REPO / "tools" / "sweep.py"), *map(str, args)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
    )


def test_paper_grid_commands():
    r = _sweep("--recipe", R8B, "--json")
    assert r.returncode == 0, r.stderr
    points = json.loads(r.stdout)
    assert len(points) == 16
    lrs = {o for p in points for o in p["overrides"] if o.startswith("optimizer.lr=")}
    betas = {o for p in points for o in p["overrides"] if o.startswith("loss.beta=")}
    assert lrs == {
        "optimizer.lr=3e-07",
        "optimizer.lr=5e-07",
        "optimizer.lr=6e-07",
        "optimizer.lr=1e-06",
    }
    assert betas == {"loss.beta=0.005", "loss.beta=0.01", "loss.beta=0.05", "loss.beta=0.1"}
    assert len({p["name"] for p in points}) == 16
    cmd = shlex.split(points[0]["command"])
    assert cmd[:2] == ["bash", "examples/launch/single_node.sh"] and "--set" in cmd


def test_sweep_with_dpo_baseline_writes_loadable_configs(tmp_path):
    from megatron_adadpo.config import load_config

    r = _sweep(
        "--recipe",
        R8B,
        "--losses",
        "adadpo,dpo",
        "--lrs",
        "5e-7",
        "--betas",
        "0.01,0.1",
        "--launcher",
        "slurm",
        "--write",
        tmp_path,
        "--json",
    )
    assert r.returncode == 0, r.stderr
    points = json.loads(r.stdout)
    assert len(points) == 4
    assert points[0]["command"].startswith("sbatch --job-name adadpo-adadpo_lr5e-07_beta0.01 ")
    for p in points:
        c = load_config(p["config"], ["train.init_checkpoint=null"])  # the recipe's placeholder
        assert c.optimizer.lr == 5e-7 and c.loss.adaptive == p["name"].startswith("adadpo")
        assert c.loss.name == p["name"].split("_lr")[0] and c.notices == ()
        assert c.logging.run_dir.endswith(p["name"])


def test_multi_node_launcher_needs_the_cluster_variables():
    r = _sweep("--recipe", R8B, "--launcher", "multi", "--lrs", "1e-6", "--betas", "0.1")
    assert r.returncode == 0, r.stderr
    assert "NNODES=${NNODES:?} MASTER_ADDR=${MASTER_ADDR:?} bash examples/launch/multi_node.sh" in (
        r.stdout
    )


@pytest.mark.parametrize(
    "args,msg", [(["--losses", "kto"], "accepted"), (["--lrs", "x"], "invalid")]
)
def test_sweep_bad_arguments(args, msg):
    r = _sweep("--recipe", R8B, *args)
    assert r.returncode == 2 and msg in r.stderr

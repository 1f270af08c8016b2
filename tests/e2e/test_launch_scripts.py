"""The launch scripts in examples/launch: dry runs, refusals, and real CPU launches.

The documented commands are the tested commands: every script runs here exactly as a user runs
it, with PYTHON pointing at this venv and a tiny config. Dry runs and refusals are fast; the
real launches (marked e2e) start torchrun on CPU with gloo: one node with 2 processes, two
torchrun "nodes" on localhost joined by c10d rendezvous, and the Slurm script with stand-in
``srun`` / ``scontrol`` that start its per-node command twice on this machine.
"""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
LAUNCH = REPO / "examples" / "launch"
SCRIPTS = ["single_node.sh", "multi_node.sh", "slurm.sbatch", "common.sh"]
DATA = REPO / "examples" / "data"


def tiny_config(tmp_path: Path, **sections) -> Path:
    cfg = {
        "model": dict(
            num_layers=2,
            hidden_size=64,
            ffn_hidden_size=128,
            num_attention_heads=4,
            num_query_groups=2,
            vocab_size=640,
            max_position_embeddings=128,
            make_vocab_size_divisible_by=64,
        ),
        "execution": dict(tp=1, transformer_impl="local"),
        "loss": dict(name="adadpo", beta=0.1, clip_max=2.0),
        "data": dict(
            inputs=[str(DATA / "prefs_train.jsonl")],
            tokenizer=str(DATA / "tokenizer"),
            max_length=64,
            max_prompt_length=32,
        ),
        "reference": dict(mode="resident"),
        "optimizer": dict(lr=1e-3, warmup_fraction=0.0, decay_style="constant"),
        "train": dict(global_batch_size=4, micro_batch_size=1, train_iters=2, seed=7),
        "checkpoint": dict(save_at_end=False, resume=False),
        "logging": dict(run_dir=str(tmp_path / "run"), progress=False),
    }
    for name, values in sections.items():
        cfg[name] = cfg.get(name, {}) | values
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def run_script(script: str, *args, env: dict | None = None, timeout: float = 60):
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    full_env.update(
        PYTHON=sys.executable,
        OMP_NUM_THREADS="1",
        PYTHONWARNINGS="ignore",
        TOKENIZERS_PARALLELISM="false",
    )
    full_env.update(env or {})
    return subprocess.run(
        ["bash", str(LAUNCH / script), *map(str, args)],
        capture_output=True,
        text=True,
        env=full_env,
        cwd=REPO,
        timeout=timeout,
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("script", SCRIPTS)
def test_scripts_parse(script):
    subprocess.run(["bash", "-n", str(LAUNCH / script)], check=True)


def test_single_node_dry_run_prints_command_and_plan(tmp_path):
    cfg = tiny_config(tmp_path)
    r = run_script(
        "single_node.sh",
        "--dry-run",
        "--config",
        cfg,
        "--set",
        "loss.beta=0.05",
        env={"GPUS_PER_NODE": "2"},
    )
    assert r.returncode == 0, r.stderr
    assert "--standalone --nnodes 1 --nproc-per-node 2 -m megatron_adadpo.train" in r.stdout
    assert "--set loss.beta=0.05" in r.stdout
    assert "layout: TP1 x PP1 x CP1 x DP2" in r.stdout and "verdict: FITS" in r.stdout
    assert not (tmp_path / "run").exists()  # nothing launched


@pytest.mark.parametrize("typo", [["--dryrun"], ["--conifg", "x.yaml"], ["extra"]])
def test_mistyped_argument_is_refused_not_launched(tmp_path, typo):
    cfg = tiny_config(tmp_path)
    r = run_script("single_node.sh", "--config", cfg, *typo)
    assert r.returncode == 64 and f"unknown argument '{typo[0]}'" in r.stderr, r.stderr
    assert "torch.distributed.run" not in r.stdout and not (tmp_path / "run").exists()


def test_multi_node_dry_run_and_missing_variables(tmp_path):
    cfg = tiny_config(tmp_path)
    r = run_script("multi_node.sh", "--dry-run", "--config", cfg)
    assert r.returncode == 64 and "required variable(s) not set: NNODES MASTER_ADDR" in r.stderr
    env = {"NNODES": "2", "GPUS_PER_NODE": "1", "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "6000"}
    r = run_script("multi_node.sh", "--dry-run", "--config", cfg, env=env)
    assert r.returncode == 0, r.stderr
    assert "--nnodes 2 --nproc-per-node 1 --rdzv-backend c10d --rdzv-endpoint 10.0.0.1:6000" in (
        r.stdout
    )
    assert "GPUs: 2 x H100" in r.stdout
    r = run_script("multi_node.sh", "--dry-run", "--config", cfg, env=env | {"NNODES": "two"})
    assert r.returncode == 64 and "NNODES=two must be a positive integer" in r.stderr


def test_collective_timeout_is_a_config_value_the_scripts_set(tmp_path):
    """``NCCL_TIMEOUT`` is read by nothing; the scripts pass train.distributed_timeout_minutes
    (tests/distributed/test_collective_timeout.py: the value reaches every process group)."""
    assert "NCCL_TIMEOUT" not in (LAUNCH / "slurm.sbatch").read_text()
    cfg = tiny_config(tmp_path)
    r = run_script(
        "slurm.sbatch", "--dry-run", "--config", cfg, env={"NNODES": "1", "GPUS_PER_NODE": "1"}
    )
    assert r.returncode == 0, r.stderr
    assert "--set train.distributed_timeout_minutes=30" in r.stdout
    env = {"DISTRIBUTED_TIMEOUT_MINUTES": "45", "GPUS_PER_NODE": "1"}
    r = run_script(
        "single_node.sh", "--dry-run", "--config", cfg, "--set", "loss.beta=0.2", env=env
    )
    assert "--set train.distributed_timeout_minutes=45 --set loss.beta=0.2" in r.stdout, r.stderr
    r = run_script(
        "single_node.sh",
        "--dry-run",
        "--config",
        cfg,
        env=env | {"DISTRIBUTED_TIMEOUT_MINUTES": "x"},
    )
    assert r.returncode == 64 and "DISTRIBUTED_TIMEOUT_MINUTES=x must be a positive" in r.stderr


def test_slurm_checks_its_variables(tmp_path):
    cfg = tiny_config(tmp_path)
    r = run_script("slurm.sbatch", "--config", cfg)
    assert r.returncode == 64
    assert "required variable(s) not set: SLURM_JOB_ID SLURM_JOB_NODELIST SLURM_NNODES" in r.stderr
    r = run_script("slurm.sbatch", "--dry-run", "--config", cfg)
    assert r.returncode == 64 and "required variable(s) not set: NNODES" in r.stderr
    r = run_script("slurm.sbatch", "--config", cfg, env={"SLURM_JOB_ID": "7", "SLURM_NNODES": "2"})
    assert r.returncode == 64 and "not set: SLURM_JOB_NODELIST" in r.stderr
    r = run_script("slurm.sbatch", "--config", tmp_path / "missing.yaml", env={"NNODES": "1"})
    assert r.returncode == 64 and "missing.yaml does not exist" in r.stderr


@pytest.mark.parametrize(
    "script,recipe,env",
    [
        ("single_node.sh", "llama3_8b_adadpo.yaml", {}),
        ("slurm.sbatch", "llama3_70b_adadpo.yaml", {"NNODES": "8"}),
        ("multi_node.sh", "llama3_70b_adadpo_fp8.yaml", {"NNODES": "8", "MASTER_ADDR": "n1"}),
        ("slurm.sbatch", "llama3_70b_adadpo.yaml", {"NNODES": "4", "GPU": "h200"}),
    ],
)
def test_recipes_dry_run_fit(script, recipe, env):
    r = run_script(script, "--dry-run", "--config", REPO / "examples" / "recipes" / recipe, env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "verdict: FITS" in r.stdout


@pytest.mark.parametrize(
    "sets,env,reason",
    [
        (["execution.tp=3"], {}, "execution.tp=3 must divide model.num_attention_heads=4"),
        (
            ["execution.pp=3"],
            {"GPUS_PER_NODE": "3"},
            "model.num_layers=2 must be divisible by execution.pp*vpp = 3",
        ),
        ([], {"GPUS": "4", "GPUS_PER_NODE": "2"}, "4 GPUs requested but 1 nodes x 2 GPUs"),
    ],
)
def test_impossible_layouts_are_refused(tmp_path, sets, env, reason):
    cfg = tiny_config(tmp_path)
    args = [a for s in sets for a in ("--set", s)]
    dry = run_script("single_node.sh", "--dry-run", "--config", cfg, *args, env=env)
    assert dry.returncode == 2 and reason in dry.stderr, dry.stderr
    real = run_script("single_node.sh", "--config", cfg, *args, env=env)
    assert real.returncode == 64 and reason in real.stderr
    assert "layout refused before launch" in real.stderr and not (tmp_path / "run").exists()


def test_layout_that_does_not_fit_is_not_launched(tmp_path):
    r = run_script(
        "single_node.sh",
        "--config",
        REPO / "examples/recipes/llama3_8b_adadpo.yaml",
        "--set",
        "execution.tp=1",
        "--set",
        "execution.sequence_parallel=false",
        env={"GPU": "a100-40", "GPUS_PER_NODE": "8"},
    )
    assert r.returncode == 64 and "does not fit" in r.stderr and "DOES NOT FIT" in r.stderr


# ---- real launches (torchrun on CPU, gloo) ---------------------------------------------------

needs_train = pytest.mark.skipif(
    importlib.util.find_spec("megatron_adadpo.train") is None,
    reason="megatron_adadpo.train (the training entry point) is not available",
)


def _final_loss(run_dir: Path) -> float:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "loss" in r]
    assert rows, f"no loss rows in {run_dir / 'metrics.jsonl'}"
    return rows[-1]["loss"]


def _fake_slurm_bin(tmp_path: Path) -> Path:
    """``srun`` that runs its command once per node here; ``scontrol`` that names localhost."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text(
        '#!/usr/bin/env bash\n[[ "$1 $2" == "show hostnames" ]] || exit 2\n'
        'for i in $(seq "$SLURM_NNODES"); do echo 127.0.0.1; done\n'
    )
    (bin_dir / "srun").write_text(
        "#!/usr/bin/env bash\n"
        "nodes=1; chdir=.\n"
        "while [[ $1 == --* ]]; do case $1 in\n"
        "  --nodes) nodes=$2; shift 2;; --ntasks-per-node) shift 2;; --chdir) chdir=$2; shift 2;;\n"
        "  *) shift;; esac; done\n"
        'cd "$chdir"; pids=()\n'
        'for ((i=0; i<nodes; i++)); do SLURM_NODEID=$i SLURM_PROCID=$i "$@" & pids+=($!); done\n'
        'rc=0; for p in "${pids[@]}"; do wait "$p" || rc=$?; done; exit $rc\n'
    )
    for f in bin_dir.iterdir():
        f.chmod(f.stat().st_mode | stat.S_IEXEC)
    return bin_dir


@pytest.mark.e2e
@needs_train
def test_real_launches_on_cpu_agree(tmp_path):
    """One node x 2 processes, 2 c10d "nodes" x 1, and Slurm 2 nodes x 1: the same training."""
    losses = {}
    # single node, 2 processes
    cfg = tiny_config(tmp_path / "a", logging={"run_dir": str(tmp_path / "a" / "run")})
    r = run_script("single_node.sh", "--config", cfg, env={"GPUS_PER_NODE": "2"}, timeout=240)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    losses["single"] = _final_loss(tmp_path / "a" / "run")

    # two torchrun "nodes" on localhost, c10d rendezvous
    cfg = tiny_config(tmp_path / "b", logging={"run_dir": str(tmp_path / "b" / "run")})
    env = {
        "NNODES": "2",
        "GPUS_PER_NODE": "1",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
        "RDZV_ID": "test-launch",
    }
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    full_env.update(PYTHON=sys.executable, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", **env)
    nodes = [
        subprocess.Popen(
            ["bash", str(LAUNCH / "multi_node.sh"), "--config", str(cfg)],
            env=full_env,
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for _ in range(2)
    ]
    try:
        outs = [n.communicate(timeout=240)[0] for n in nodes]
    finally:
        for n in nodes:
            if n.poll() is None:
                n.kill()
    assert all(n.returncode == 0 for n in nodes), "\n".join(o[-3000:] for o in outs)
    losses["multi_node"] = _final_loss(tmp_path / "b" / "run")

    # Slurm script with stand-in srun / scontrol
    cfg = tiny_config(tmp_path / "c", logging={"run_dir": str(tmp_path / "c" / "run")})
    bin_dir = _fake_slurm_bin(tmp_path)
    env = {
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "SLURM_JOB_ID": "4242",
        "SLURM_JOB_NODELIST": "node[1-2]",
        "SLURM_NNODES": "2",
        "GPUS_PER_NODE": "1",
        "MASTER_PORT": str(free_port()),
    }
    r = run_script("slurm.sbatch", "--config", cfg, env=env, timeout=240)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "rendezvous 127.0.0.1:" in r.stdout
    losses["slurm"] = _final_loss(tmp_path / "c" / "run")

    assert losses["single"] == pytest.approx(losses["multi_node"], abs=1e-6), losses
    assert losses["single"] == pytest.approx(losses["slurm"], abs=1e-6), losses

"""Every entry point shares one shell: a config or input error is one ``error:`` line from one
rank and a non-zero exit, never a traceback per rank (also under torchrun)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
CONFIG = "examples/configs/quickstart.yaml"
pytestmark = pytest.mark.e2e


def _run(args, timeout=180):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    return subprocess.run(
        [sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout
    )


def _error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if "error: " in line]


@pytest.mark.parametrize(
    "args",
    [
        ["-m", "megatron_adadpo.train", "--config", CONFIG, "--set", "execution.tp=3"],
        ["tools/precompute_reference.py", "--config", CONFIG, "--output", "x",
         "--set", "loss.beta=-1"],
        ["tools/plan.py", "--recipe", CONFIG, "--set", "execution.tp=3"],
        ["tools/generate.py", "--checkpoint", "examples/checkpoints/sft_tiny",
         "--prompts", "missing.jsonl", "--output", "x.jsonl"],
    ],
)  # fmt: skip
def test_config_error_is_one_line(args):
    out = _run(args)
    assert out.returncode == 2, out.stderr
    assert "Traceback" not in out.stderr, out.stderr
    assert len(_error_lines(out.stderr)) == 1, out.stderr


def test_config_error_under_torchrun_is_printed_once():
    args = ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    args += ["-m", "megatron_adadpo.train", "--config", CONFIG, "--set", "execution.tp=3"]
    out = _run(args)
    assert out.returncode != 0
    lines = _error_lines(out.stderr)
    assert len(lines) == 1 and "execution.tp=3 must divide" in lines[0], out.stderr
    assert "megatron_adadpo/" not in out.stderr  # no traceback through the package

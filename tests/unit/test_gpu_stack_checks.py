"""The GPU stack checks (``benchmarks/gpu/stack_checks.py``) still fit the code they check.

They run only on a lent GPU machine, so nothing else notices when the project moves under
them: the parameter-sync body called a function that had moved to another module and died on
its first run. Here, on CPU: every trainer run a check asks for is a config that loads and that
the resolver accepts on the machine it needs (one H100 with Transformer Engine, with its
number of processes), and the one check that runs on gloo (``--cpu``) passes through the script.
"""

from __future__ import annotations

import inspect
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.gpu import stack_checks
from megatron_adadpo.config import from_dict, validate
from megatron_adadpo.config_text import read_yaml
from megatron_adadpo.platform.hardware import Machine, gpu_spec
from megatron_adadpo.resolve.resolver import resolve

REPO = Path(__file__).resolve().parents[2]
H100_TE = Machine.of_gpu(gpu_spec("h100"))
TRAINER_CHECKS = [
    name for name, (check, _) in stack_checks.CHECKS.items() if "train(" in inspect.getsource(check)
]


class AnyRow(dict):
    """A metrics row whose every measure is ln 2 (the checks' arithmetic runs on it)."""

    def __missing__(self, key):
        return math.log(2)


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """The checks' converted checkpoint, made the way they make it (their body + the CLI)."""
    work = tmp_path_factory.mktemp("stack_work")
    return work, stack_checks.converted_checkpoint(work)


def test_every_trainer_check_is_seen():
    assert {"fusions_bf16_step", "fp8_step", "cp2_equals_cp1", "lora_te_spec"} <= set(
        TRAINER_CHECKS
    )


@pytest.mark.parametrize("name", TRAINER_CHECKS)
def test_each_trainer_run_is_a_config_the_resolver_accepts(name, converted, monkeypatch):
    work, _ = converted
    runs = []

    def train(work, run_name, sets, nproc=1, timeout=300):
        sets = [*stack_checks.BASE, f"logging.run_dir={work / run_name}", *sets]
        config = from_dict(read_yaml(stack_checks.QUICKSTART, sets))
        validate(config)
        resolve(config, nproc, H100_TE)  # raises ConfigError naming every reason
        runs.append(run_name)
        return [AnyRow() for _ in range(3)]

    monkeypatch.setattr(stack_checks, "train", train)
    monkeypatch.setattr(stack_checks, "expect", lambda condition, message: None)
    check, _ = stack_checks.CHECKS[name]
    check(work, stack_checks.machine())
    assert len(runs) == inspect.getsource(check).count("train(work"), runs


def test_the_cpu_check_passes_through_the_script(tmp_path):
    """``--cpu`` runs the DP2 parameter sync on two gloo processes: saved == live weights."""
    r = subprocess.run(
        [sys.executable, "benchmarks/gpu/stack_checks.py", "--out", str(tmp_path), "--cpu"]
        + ["--only", "param_sync_before_save"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    results = {c["check"]: c for c in json.loads((tmp_path / "stack_checks.json").read_text())}
    assert results["param_sync_before_save"]["status"] == "PASS"
    assert results["param_sync_before_save"]["details"]["max_rel_diff"] <= 1e-6

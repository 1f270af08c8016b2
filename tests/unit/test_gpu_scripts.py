"""The GPU check scripts fit the machine they run on (issue 22).

A lent GPU machine runs one command for at most 600 s (``/work/.library/device/README.md``:
"one command's run (timeout_s at most) | 10 minutes"), so each ``benchmarks/gpu/run_*.sh``
must end within 540 s, its setup (``env.sh``: carried wheels, preflight) included, and run the
preflight before any timed check. Each script runs here with ``timeout`` and ``python3``
stubbed (nothing runs): the stub records every timeout's seconds, in order, through
functions and variables as bash expands them; a ``python3`` outside a ``timeout`` is recorded
as untimed. A fake ``.whl/`` takes the longest path (the carried-wheel install). The
commands recorded are then parsed by their own scripts' argparse (run up to it, no further),
so an option a script no longer has fails here, not on the lent machine.
"""

from __future__ import annotations

import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
GPU = REPO / "benchmarks" / "gpu"
SCRIPTS = sorted(p.name for p in GPU.glob("run_*.sh"))
BUDGET_S = 540
VARIANTS = {"run_chunked.sh": [(), ("3b",)]}  # a script's argument lists (default: none)

TIMEOUT_STUB = """#!/bin/bash
echo "timeout $*" >> "$STUB_LOG"
echo "$STUB_SITE"
"""
PYTHON_STUB = """#!/bin/bash
echo "UNTIMED python3 $*" >> "$STUB_LOG"
"""


def timed_commands(script: str, tmp_path: Path, *args: str) -> list[tuple[float, str]]:
    bin_dir, work = tmp_path / "bin", tmp_path / "work"
    bin_dir.mkdir(parents=True)
    (work / ".whl").mkdir(parents=True)
    (work / ".whl" / "megatron_core-0.19.2-py3-none-any.whl").write_text("")
    for name, text in (("timeout", TIMEOUT_STUB), ("python3", PYTHON_STUB)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(stat.S_IRWXU)
    log = tmp_path / "calls.log"
    env = os.environ | {
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "STUB_LOG": str(log),
        "STUB_SITE": str(tmp_path),
        "OUT": str(tmp_path / "out"),
    }
    r = subprocess.run(
        ["bash", str(GPU / script), *args], cwd=work, env=env, capture_output=True, text=True
    )
    assert r.returncode == 0, r.stderr
    calls = []
    for line in log.read_text().splitlines():
        assert not line.startswith("UNTIMED"), f"{script}: python3 without a timeout: {line}"
        seconds, command = line.split(" ", 2)[1:]
        calls.append((float(re.fullmatch(r"(\d+(?:\.\d+)?)s?", seconds).group(1)), command))
    return calls


def test_every_script_is_checked():
    assert {"run_gpu_checks.sh", "run_stack_checks.sh", "run_chunked.sh"} <= set(SCRIPTS)


@pytest.mark.parametrize("script", SCRIPTS)
def test_timeouts_fit_one_device_command_and_preflight_comes_first(script, tmp_path):
    for args in VARIANTS.get(script, [()]):
        calls = timed_commands(script, tmp_path / "_".join(args or ("default",)), *args)
        total = sum(seconds for seconds, _ in calls)
        assert total <= BUDGET_S, f"{script} {args}: timeouts sum to {total} s > {BUDGET_S} s"
        checks = [c for _, c in calls if "pip install" not in c and "getsitepackages" not in c]
        assert "benchmarks/gpu/preflight.py" in checks[0], f"{script}: first check {checks[0]}"
        assert len(checks) > 1, f"{script}: no check after the preflight"


def test_carried_wheels_never_shadow_the_image(tmp_path):
    """Carried wheels go after site-packages (a .pth file), never first on PYTHONPATH."""
    env_sh = (GPU / "env.sh").read_text()
    assert "/tmp/site" not in "".join(re.findall(r"PYTHONPATH=.*", env_sh))
    assert "zz_carried_wheels.pth" in env_sh
    timed_commands("run_3b.sh", tmp_path)
    assert (tmp_path / "zz_carried_wheels.pth").read_text().strip() == "/tmp/site"


def test_readme_lists_every_dependency_the_preflight_imports():
    from benchmarks.gpu.preflight import DEPENDENCIES

    readme = (GPU / "README.md").read_text()
    downloads = " ".join(re.findall(r"^\$W (.*)$", readme, flags=re.M)).split()
    carried = {name.partition("==")[0] for name in downloads}
    for _, dist in DEPENDENCIES:
        assert dist in carried, f"benchmarks/gpu/README.md does not list {dist}"
    assert "triton" not in carried and "torch" not in carried  # never carried: torch's own


def test_preflight_refuses_a_triton_that_is_not_torchs():
    from benchmarks.gpu.preflight import triton_error, triton_pin

    torch_requires = ['triton==3.6.0; platform_system == "Linux"', "filelock"]
    assert triton_pin(torch_requires) == "3.6.0" and triton_pin(["filelock"]) is None
    assert triton_error("3.6.0", "3.6.0") is None and triton_error(None, "3.6.0") is None
    assert "shadows torch's" in triton_error("3.7.1", "3.6.0", "/tmp/site/triton")


def test_preflight_imports_here():
    """The CPU stack has every dependency: the preflight (no compile) passes and says so."""
    r = subprocess.run(
        [sys.executable, str(GPU / "preflight.py"), "--no-compile"],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
    )
    assert r.returncode == 0 and "preflight: ok" in r.stdout, r.stdout + r.stderr


# Runs a script as __main__ until its argparse has parsed the command line, then leaves:
# the options a GPU script passes are checked here, not on the lent machine's first run.
PARSE_ONLY = """
import argparse, runpy, sys
parse = argparse.ArgumentParser.parse_args
def parsed(self, args=None, namespace=None):
    parse(self, args, namespace)
    print("PARSED", self.prog)
    sys.exit(0)
argparse.ArgumentParser.parse_args = parsed
sys.argv = sys.argv[1:]
sys.path.insert(0, ".")
runpy.run_path(sys.argv[0], run_name="__main__")
print("NO ARGPARSE")
"""


def python_scripts_called(script: str, tmp_path: Path, *args: str) -> list[list[str]]:
    """Each ``python3 FILE.py ARGS`` a script times (``-m`` modules and stdin heredocs left out)."""
    calls = []
    for _, command in timed_commands(script, tmp_path, *args):
        words = command.split()
        if words[0] == "python3" and len(words) > 1 and words[1].endswith(".py"):
            calls.append(words[1:])
    return calls


@pytest.mark.parametrize("script", SCRIPTS)
def test_the_options_each_script_passes_parse(script, tmp_path):
    calls = []
    for args in VARIANTS.get(script, [()]):
        calls += python_scripts_called(script, tmp_path / "_".join(args or ("default",)), *args)
    for call in calls:
        r = subprocess.run(
            [sys.executable, "-c", PARSE_ONLY, *call],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert r.returncode == 0 and "PARSED" in r.stdout, f"{script}: {call}\n{r.stderr[-2000:]}"
    assert len(calls) > 1, f"{script} calls no python script after the preflight"

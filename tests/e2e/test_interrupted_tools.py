"""Tools interrupted the hard way (SIGKILL) leave nothing running and nothing half-written that
the next run trips on; the converter refuses a shard size it cannot use."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch

from tests import convert_models as cm

ROOT = Path(__file__).resolve().parents[2]
TOOLS = ROOT / "tools"
pytestmark = pytest.mark.e2e


def _manager(parent: psutil.Process) -> psutil.Process | None:
    """The converter's spawned multiprocessing Manager, once it listens on its socket."""
    for child in parent.children(recursive=True):
        try:
            if "spawn_main" in " ".join(child.cmdline()) and child.net_connections("unix"):
                return child
        except psutil.Error:
            pass
    return None


def test_sigkill_during_conversion_leaves_no_child_running(tmp_path):
    """dist_checkpointing's save spawns a Manager (megatron-core 0.16.1
    ``strategies/filesystem_async.py`` ``_get_write_results_queue``) that lives until the
    process exits; the converter killed while it runs must take it along (it stayed, blocked,
    with ~0.35 GB)."""
    hf = cm.make_hf_model("llama2", tmp_path / "hf", dtype=torch.float32)
    cmd = [sys.executable, str(TOOLS / "convert_hf_to_megatron.py"), "--hf-dir", str(hf),
           "--output", str(tmp_path / "mg"), "--no-progress"]  # fmt: skip
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    parent, deadline = psutil.Process(proc.pid), time.monotonic() + 240
    while _manager(parent) is None and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGSTOP)  # hold it between "manager up" and its normal exit
    assert proc.poll() is None, "the converter exited before its Manager could be seen"
    children = parent.children(recursive=True)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    _, alive = psutil.wait_procs(children, timeout=30)
    leftover = [(p.pid, p.cmdline()[-2:]) for p in alive if p.status() != psutil.STATUS_ZOMBIE]
    for p in alive:
        p.kill()
    assert leftover == [], f"children outlived the killed converter: {leftover}"


def test_nonpositive_shard_size_is_refused(tmp_path):
    cmd = [sys.executable, str(TOOLS / "convert_megatron_to_hf.py"), "--checkpoint",
           str(tmp_path / "none"), "--output", str(tmp_path / "hf"),
           "--max-shard-size-gb", "0"]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert out.returncode == 2 and "--max-shard-size-gb=0.0 must be > 0" in out.stderr
    assert "Traceback" not in out.stderr and not (tmp_path / "hf").exists()

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
from tests.cli import one_error_line

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


BUNDLED = ROOT / "examples" / "checkpoints" / "sft_tiny"


def test_export_of_truncated_checkpoint_names_the_file_and_leaves_no_output(tmp_path):
    """A partial copy: one ``.distcp`` file cut short. The export names that file, and neither a
    new output folder (nor its new parents) nor a staging folder is left; an empty output
    folder the user made stays."""
    import shutil

    ckpt = tmp_path / "ckpt"
    shutil.copytree(BUNDLED, ckpt)
    victim = sorted(ckpt.glob("*.distcp"))[-1]
    full = victim.stat().st_size
    os.truncate(victim, full // 3)
    mine = tmp_path / "mine"
    mine.mkdir()
    for output in (tmp_path / "new" / "parent" / "hf", mine):
        cmd = [sys.executable, str(TOOLS / "convert_megatron_to_hf.py"), "--checkpoint",
               str(ckpt), "--output", str(output), "--no-progress"]  # fmt: skip
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=240, cwd=tmp_path)
        error = one_error_line(out)
        assert f"{victim} ({full // 3} of its" in error and "copy the checkpoint" in error
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "mine"]
    assert list(mine.iterdir()) == []


@pytest.fixture
def full_disk(tmp_path):
    """A directory on its own 16 KiB tmpfs, filled up: writes there fail with ENOSPC, as on a
    full cluster file system (mounting needs root; elsewhere the test is skipped)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16k", "tmpfs", str(disk)],
                             capture_output=True, text=True)  # fmt: skip
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {mounted.stderr.strip()}")
    try:
        yield disk
    finally:
        subprocess.run(["umount", str(disk)], check=True)


def _fill(disk: Path) -> None:
    with open(disk / "filler", "wb", buffering=0) as handle:
        try:
            while True:
                handle.write(b"\0" * 1024)
        except OSError:
            pass


def test_precompute_on_a_full_disk_names_the_file_and_keeps_the_previous_values(
    full_disk, tmp_path
):
    """Disk full while the reference values are written: one error line naming the file, no
    0-byte or temporary file, and the previous complete pair of files stays as it was."""
    ref = full_disk / "ref"
    ref.mkdir()
    previous = {"reference_logps.npy": b"previous values", "meta.json": b'{"previous": 1}'}
    for name, data in previous.items():
        (ref / name).write_bytes(data)
    _fill(full_disk)
    cmd = [sys.executable, str(TOOLS / "precompute_reference.py"), "--config",
           "examples/configs/quickstart.yaml", "--output", str(ref), "--eval",
           "--set", "execution.tp=1", "--set", f"data.cache_dir={tmp_path / 'cache'}"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=240, cwd=ROOT, env=env)
    assert [one_error_line(out)] == [
        f"error: cannot write {ref / 'reference_logps.npy'} (No space left on device); free "
        "space there or choose another --output, then run tools/precompute_reference.py again"
    ]
    assert {p.name: p.read_bytes() for p in ref.iterdir()} == previous


def test_export_to_a_full_disk_names_the_file_and_leaves_no_output(full_disk):
    """The disk fills while the shards are written: the error names the output file, and no
    half-written output folder (nor the parent this run created) is left."""
    output = full_disk / "new" / "hf"
    cmd = [sys.executable, str(TOOLS / "convert_megatron_to_hf.py"), "--checkpoint",
           str(BUNDLED), "--output", str(output), "--no-progress"]  # fmt: skip
    _fill(full_disk)
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=240, cwd=full_disk.parent)
    error = one_error_line(out)
    assert f"cannot write {output}/model-00001-of-00001" in error
    assert "No space left on device" in error and "choose another --output" in error
    assert sorted(p.name for p in full_disk.iterdir()) == ["filler"]

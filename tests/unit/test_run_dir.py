"""The run directory's rules without a trainer: where a launch starts, atomic publication of a
save, the write probe, the lock (live, stale, and a holder in another process), and metrics
rows after a restart."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from megatron_adadpo.run.metrics import drop_rows_after
from megatron_adadpo.run.state import run_dir as rd
from megatron_adadpo.run.state.lock import RunDirLock, RunDirLocked


def _checkpoints(run_dir, *steps, latest=None):
    root = rd.checkpoints_root(run_dir)
    for step in steps:
        (root / rd.checkpoint_name(step)).mkdir(parents=True)
    if latest is not None:
        (root / rd.LATEST_FILE).write_text(latest + "\n")
    return root


def test_resume_point_of_each_directory_state(tmp_path):
    assert rd.resume_point(tmp_path / "new", resume=True) is None
    assert rd.resume_point(tmp_path / "new", resume=False) is None
    ok = _checkpoints(tmp_path / "ok", 2, 4, latest="iter_0000004")
    (ok / "iter_0000006.partial").mkdir()  # an interrupted save is never a checkpoint
    assert rd.resume_point(tmp_path / "ok", resume=True) == ok / "iter_0000004"
    assert rd.list_checkpoints(tmp_path / "ok") == ["iter_0000002", "iter_0000004"]
    _checkpoints(tmp_path / "nolatest", 2, 4)
    with pytest.raises(rd.RunDirError, match=r"no 'latest' file .* `echo iter_0000004 > "):
        rd.resume_point(tmp_path / "nolatest", resume=True)
    _checkpoints(tmp_path / "dangling", 2, latest="iter_0000008")
    with pytest.raises(rd.RunDirError, match=r"names 'iter_0000008'.*available: iter_0000002"):
        rd.resume_point(tmp_path / "dangling", resume=True)
    with pytest.raises(rd.RunDirError, match="checkpoint.resume=false would overwrite"):
        rd.resume_point(tmp_path / "ok", resume=False)


def test_publish_replaces_only_after_the_new_save_is_complete(tmp_path):
    root = _checkpoints(tmp_path, 2, 4, latest="iter_0000002")
    (root / "iter_0000004" / "old").write_text("old")
    final = root / "iter_0000004"
    partial = rd.start_partial(final)
    (partial / "new").write_text("new")
    assert (final / "old").exists() and rd.latest_checkpoint(tmp_path).name == "iter_0000002"
    rd.publish(partial, final)
    assert sorted(p.name for p in final.iterdir()) == ["new"]
    assert rd.latest_checkpoint(tmp_path) == final
    assert sorted(p.name for p in root.iterdir()) == ["iter_0000002", "iter_0000004", "latest"]


def test_unwritable_run_dir_is_named(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(rd.RunDirError, match=r"cannot write to .*file/run \(.*\); choose"):
        rd.check_writable(tmp_path / "file" / "run")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "checkpoints").write_text("")  # checkpoints/ cannot be created
    with pytest.raises(rd.RunDirError, match=r"cannot write to .*run/checkpoints"):
        rd.check_writable(tmp_path / "run")
    rd.check_writable(tmp_path / "fresh")
    assert sorted(p.name for p in (tmp_path / "fresh").iterdir()) == ["checkpoints"]


HOLD = """
import sys, time
from megatron_adadpo.run.state.lock import RunDirLock
RunDirLock(sys.argv[1]).acquire()
print("held", flush=True)
time.sleep(600)
"""


def test_lock_refuses_a_live_holder_and_takes_over_a_killed_one(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(tmp_path)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        message = rf"in use by another run \(host {os.uname().nodename}, pid {holder.pid}, "
        with pytest.raises(RunDirLocked, match=message) as refused:
            RunDirLock(tmp_path).acquire()
        assert "holds the kernel lock, which frees itself when it exits" in str(refused.value)
        assert f"removing {tmp_path / 'run.lock'} is never needed" in str(refused.value)
    finally:
        holder.kill()
        holder.wait()
    lock = RunDirLock(tmp_path)
    lock.acquire()  # the killed holder's record is still in the file: stale, taken over
    assert json.loads((tmp_path / "run.lock").read_text())["pid"] == os.getpid()
    lock.release()
    assert (tmp_path / "run.lock").read_text() == ""


def test_lock_record_of_a_live_process_here_is_respected_without_file_locks(tmp_path):
    """File systems without lock support: the owner record decides."""
    record = {"host": os.uname().nodename, "pid": os.getppid(), "started": time.ctime()}
    (tmp_path / "run.lock").write_text(json.dumps(record))
    lock = RunDirLock(tmp_path)
    lock._lock = lambda fd: False  # as if lockf were unsupported
    with pytest.raises(
        RunDirLocked, match=f"pid {os.getppid()}.*once that process is gone, delete"
    ):
        lock.acquire()
    other_host = dict(record, host="elsewhere")
    (tmp_path / "run.lock").write_text(json.dumps(other_host))
    with pytest.raises(RunDirLocked, match="host elsewhere"):
        lock.acquire()


def test_lock_record_of_a_live_foreign_pid_does_not_strand_a_requeue(tmp_path, caplog):
    """The record names a live process on this host (a reused pid) that holds no kernel lock:
    the kernel lock decides, the run takes over with a log line naming the record."""
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        record = {"host": os.uname().nodename, "pid": other.pid, "started": "yesterday"}
        (tmp_path / "run.lock").write_text(json.dumps(record))
        lock = RunDirLock(tmp_path)
        with caplog.at_level("WARNING", logger="megatron_adadpo.run.state.lock"):
            lock.acquire()
        assert other.poll() is None  # still alive: the record's pid was live throughout
    finally:
        other.kill()
        other.wait()
    assert json.loads((tmp_path / "run.lock").read_text())["pid"] == os.getpid()
    lock.release()
    [line] = [r.getMessage() for r in caplog.records]
    assert f"pid {other.pid}, started yesterday" in line and "a reused pid" in line, line


def test_lock_file_that_is_a_directory_is_named_with_the_fix(tmp_path):
    (tmp_path / "run.lock").mkdir()
    with pytest.raises(RunDirLocked) as refused:
        RunDirLock(tmp_path).acquire()
    path = tmp_path / "run.lock"
    assert str(refused.value) == (
        f"{path} is a directory, not the run's lock file: remove it (rm -r {path}) and launch again"
    )


def test_metrics_rows_after_the_restart_step_are_dropped(tmp_path):
    path = tmp_path / "metrics.jsonl"
    rows = [{"step": s, "split": "train"} for s in (1, 2, 3, 4)] + [{"step": 2, "split": "eval"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 5, "spl')
    drop_rows_after(path, 2)
    kept = [json.loads(line) for line in path.read_text().splitlines()]
    assert kept == [rows[0], rows[1], rows[4]]
    before = path.stat().st_mtime_ns
    drop_rows_after(path, 2)
    assert path.stat().st_mtime_ns == before  # nothing to drop: not rewritten

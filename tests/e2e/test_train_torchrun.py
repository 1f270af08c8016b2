"""The real launch path: ``torchrun -m megatron_adadpo.train`` with 2 processes (TP=2)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.e2e

TINY = [
    "model.num_layers=2",
    "model.hidden_size=64",
    "model.ffn_hidden_size=128",
    "data.max_length=64",
    "data.max_prompt_length=32",
    "eval.interval=0",
    "train.global_batch_size=8",
    "train.micro_batch_size=2",
    "logging.progress=false",
]


def _cmd(run_dir, cache, *extra):
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        "-m",
        "megatron_adadpo.train",
        "--config",
        "examples/configs/quickstart.yaml",
    ]
    for item in [*TINY, f"logging.run_dir={run_dir}", f"data.cache_dir={cache}", *extra]:
        cmd += ["--set", item]
    return cmd


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def _launch(run_dir, cache, *extra):
    return subprocess.run(
        _cmd(run_dir, cache, *extra),
        cwd=REPO,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )


def _files(directory: Path) -> dict:
    return {
        str(p.relative_to(directory)): (p.read_bytes(), p.stat().st_mtime_ns)
        for p in directory.rglob("*")
        if p.is_file() and p.name != "run.lock"
    }


def test_torchrun_two_processes_trains_and_checkpoints(tmp_path):
    """Trains and saves; the same command again (a Slurm requeue) says the run is finished,
    exits 0 and changes nothing."""
    run_dir = tmp_path / "run"
    out = _launch(run_dir, tmp_path / "cache", "train.train_iters=3")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "resolved config" in out.stdout
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert rows[0]["loss"] == pytest.approx(0.6931471805599453, abs=1e-6)
    assert rows[0]["throughput/tokens_per_s"] > 0
    latest = (run_dir / "checkpoints" / "latest").read_text().strip()
    assert latest == "iter_0000003"
    assert (run_dir / "checkpoints" / latest / "config.yaml").is_file()
    before = _files(run_dir)
    again = _launch(run_dir, tmp_path / "cache", "train.train_iters=3")
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"{run_dir} is finished" in again.stdout and "nothing to train" in again.stdout
    assert _files(run_dir) == before


def _sigterm_after_rows(run_dir, cache, rows: int, delay: float, *extra) -> tuple[str, float]:
    """Launch, wait until ``metrics.jsonl`` has ``rows`` rows and ``delay`` seconds more, send
    SIGTERM to torchrun and its ranks (Slurm signals every task); (output, seconds to exit)."""
    proc = subprocess.Popen(
        _cmd(run_dir, cache, *extra),
        cwd=REPO,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    metrics = run_dir / "metrics.jsonl"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and not (
        metrics.exists() and metrics.read_text().count("\n") >= rows
    ):
        time.sleep(0.05)
    time.sleep(delay)
    sent = time.monotonic()
    os.killpg(proc.pid, signal.SIGTERM)  # torchrun forwards it too
    output, _ = proc.communicate(timeout=240)
    return output, time.monotonic() - sent


def test_sigterm_saves_and_exits_cleanly(tmp_path):
    """Slurm preemption: SIGTERM to every rank -> checkpoint at the step boundary, clean exit.

    torchrun itself re-raises the signal (exit 1, ``SignalException``) after its workers have
    finished; the workers must have saved and left on their own.
    """
    run_dir = tmp_path / "run"
    output, _ = _sigterm_after_rows(run_dir, tmp_path / "cache", 2, 0.0, "train.train_iters=100000")
    metrics = run_dir / "metrics.jsonl"
    assert "SIGTERM: saved step" in output, output[-3000:]
    assert "NonFiniteLoss" not in output and "ChildFailedError" not in output, output[-3000:]
    steps = [json.loads(x)["step"] for x in metrics.read_text().splitlines()]
    latest = (run_dir / "checkpoints" / "latest").read_text().strip()
    assert latest == f"iter_{steps[-1]:07d}"


# 400 held-out pairs (the bundled training file): one evaluation is 50 batches of 8 pairs.
LARGE_EVAL = ["eval.inputs=[examples/data/prefs_train.jsonl]", "eval.interval=2"]


def _comparable(run_dir):
    """``metrics.jsonl`` rows without their timings (throughput, step time)."""
    rows = map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
    return [{k: v for k, v in r.items() if "throughput" not in k and "time" not in k} for r in rows]


def test_sigterm_during_evaluation_saves_at_once_and_the_same_command_resumes_exactly(tmp_path):
    """SIGTERM to every rank while the step-2 evaluation of 400 pairs runs: the evaluation
    stops at the next micro-batch (no eval row, no step 3), step 2 is saved with its evaluation
    pending, the ranks exit 0 within a bound; the same command then evaluates step 2 first and
    trains on, and its metrics equal an uninterrupted run's exactly."""
    steps = ["train.train_iters=4", *LARGE_EVAL]
    full = _launch(tmp_path / "full", tmp_path / "cache", *steps)
    assert full.returncode == 0, full.stderr[-3000:]
    run_dir = tmp_path / "run"
    # 1 s after step 2's row: inside its evaluation (it takes several seconds)
    output, elapsed = _sigterm_after_rows(run_dir, tmp_path / "cache", 2, 1.0, *steps)
    print(f"SIGTERM during evaluation -> torchrun exited after {elapsed:.1f} s")
    assert "SIGTERM: saved step 2 (its evaluation pending" in output, output[-3000:]
    assert "ChildFailedError" not in output and "[rank" not in output, output[-3000:]  # exit 0
    assert [(r["step"], r["split"]) for r in _comparable(run_dir)] == [(1, "train"), (2, "train")]
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "iter_0000002"
    assert elapsed < 30, elapsed  # torchrun's own limit: it SIGKILLs its workers after 30 s
    again = _launch(run_dir, tmp_path / "cache", *steps)
    assert again.returncode == 0, again.stderr[-3000:]
    assert _comparable(run_dir) == _comparable(tmp_path / "full")
    splits = [(r["step"], r["split"]) for r in _comparable(run_dir)]
    assert splits == [
        (1, "train"),
        (2, "train"),
        (2, "eval"),
        (3, "train"),
        (4, "train"),
        (4, "eval"),
    ]


def test_sigkill_then_same_command_resumes_exactly(tmp_path):
    """A node failure: SIGKILL to torchrun and every rank after a checkpoint, mid-run; the same
    command (a requeue) resumes from ``latest`` and its losses equal an uninterrupted run's
    exactly; ``metrics.jsonl`` holds every step once."""
    steps = ["train.train_iters=12", "checkpoint.save_interval=4"]
    full = _launch(tmp_path / "full", tmp_path / "cache", *steps)
    assert full.returncode == 0, full.stderr[-3000:]
    run_dir = tmp_path / "killed"
    proc = subprocess.Popen(
        _cmd(run_dir, tmp_path / "cache", *steps),
        cwd=REPO,
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    latest = run_dir / "checkpoints" / "latest"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and not latest.exists() and proc.poll() is None:
        time.sleep(0.05)
    launcher = psutil.Process(proc.pid)
    tree = [launcher, *launcher.children(recursive=True)]  # torchrun and its worker ranks
    for process in tree:  # a node failure: every process at once, no handler runs
        process.kill()
    psutil.wait_procs(tree, timeout=60)
    killed_at = latest.read_text().strip()
    assert killed_at in ("iter_0000004", "iter_0000008"), killed_at  # killed before the end
    again = _launch(run_dir, tmp_path / "cache", *steps)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resumed from {run_dir / 'checkpoints' / killed_at}" in again.stdout

    def losses(d):
        return [(r["step"], r["loss"]) for r in map(json.loads, open(d / "metrics.jsonl"))]

    assert losses(run_dir) == losses(tmp_path / "full")
    assert [s for s, _ in losses(run_dir)] == list(range(1, 13))


def test_requeue_takes_over_a_lock_record_naming_a_live_foreign_pid(tmp_path):
    """A requeued job's ``run.lock`` names a pid that is now another live process on this host
    (containers reuse small pids) but nobody holds the kernel lock: the run proceeds, with a
    log line naming the record."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        record = {"host": os.uname().nodename, "pid": other.pid, "started": "before the requeue"}
        (run_dir / "run.lock").write_text(json.dumps(record))
        out = _launch(run_dir, tmp_path / "cache", "train.train_iters=1")
        assert other.poll() is None  # the recorded pid stayed alive throughout
    finally:
        other.kill()
        other.wait()
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"pid {other.pid}, started before the requeue" in out.stderr, out.stderr[-3000:]
    assert "a reused pid" in out.stderr
    assert (run_dir / "run.lock").read_text() == ""  # released at the end
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "iter_0000001"


HOLD = (
    "import sys, time\n"
    "from megatron_adadpo.run.state.lock import RunDirLock\n"
    "RunDirLock(sys.argv[1]).acquire()\n"
    "print('held', flush=True)\n"
    "time.sleep(600)\n"
)


def test_lock_held_by_a_live_run_or_a_directory_is_refused_in_one_line(tmp_path):
    """A real second process holding the kernel lock: refused, naming it and saying that
    removing ``run.lock`` is never needed; ``run.lock`` as a directory: named, with the fix."""
    run_dir = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(run_dir)], cwd=REPO, stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        out = _launch(run_dir, tmp_path / "cache", "train.train_iters=1")
    finally:
        holder.kill()
        holder.wait()
    errors = [line for line in out.stderr.splitlines() if "error: " in line]
    assert out.returncode != 0 and len(errors) == 1, out.stderr[-3000:]
    assert f"(host {os.uname().nodename}, pid {holder.pid}, started " in errors[0]
    assert f"removing {run_dir / 'run.lock'} is never needed" in errors[0]
    (run_dir / "run.lock").unlink()
    (run_dir / "run.lock").mkdir()
    out = _launch(run_dir, tmp_path / "cache", "train.train_iters=1")
    errors = [line for line in out.stderr.splitlines() if "error: " in line]
    lock = run_dir / "run.lock"
    fix = f"remove it (rm -r {lock}) and launch again"
    assert errors == [f"error: {lock} is a directory, not the run's lock file: {fix}"], out.stderr


# ---------------------------------------------------------------- asynchronous saves

SAVING = ["train.train_iters=12", "checkpoint.save_interval=4"]
ASYNC = [*SAVING, "checkpoint.async_save=true"]


def _losses(run_dir):
    return [(r["step"], r["loss"]) for r in map(json.loads, open(run_dir / "metrics.jsonl"))]


@pytest.fixture(scope="module")
def synchronous(tmp_path_factory):
    """(run dir, data cache) of an uninterrupted run with synchronous saves."""
    root = tmp_path_factory.mktemp("synchronous")
    out = _launch(root / "run", root / "cache", *SAVING)
    assert out.returncode == 0, out.stderr[-3000:]
    return root / "run", root / "cache"


@pytest.mark.timeout(900)  # three torchrun launches (with the fixture's) on a shared machine
def test_async_save_sigkill_mid_write_then_same_command_resumes_exactly(synchronous, tmp_path):
    """Asynchronous saves, SIGKILL to torchrun and every rank while iter 8 is being written
    (its ``.partial`` directory exists; its writers die with their ranks): ``latest`` still
    names iter 4 (published before iter 8 started), iter 8 is not published, and the same
    command resumes from iter 4 to the synchronous run's losses exactly."""
    reference, cache = synchronous
    run_dir = tmp_path / "killed"
    proc = subprocess.Popen(
        _cmd(run_dir, cache, *ASYNC),
        cwd=REPO,
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    writing = run_dir / "checkpoints" / "iter_0000008.partial"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and not writing.is_dir() and proc.poll() is None:
        time.sleep(0.005)
    launcher = psutil.Process(proc.pid)
    tree = [launcher, *launcher.children(recursive=True)]  # torchrun, ranks, writers
    for process in tree:
        process.kill()
    psutil.wait_procs(tree, timeout=60)
    checkpoints = run_dir / "checkpoints"
    assert (checkpoints / "latest").read_text().strip() == "iter_0000004"
    assert writing.is_dir() and not (checkpoints / "iter_0000008").exists()
    again = _launch(run_dir, cache, *ASYNC)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resumed from {checkpoints / 'iter_0000004'}" in again.stdout
    assert _losses(run_dir) == _losses(reference)
    assert (checkpoints / "latest").read_text().strip() == "iter_0000012"
    assert not list(checkpoints.glob("*.partial"))


@pytest.mark.timeout(600)
def test_async_save_sigterm_waits_for_the_write_and_the_same_command_resumes(synchronous, tmp_path):
    """Asynchronous saves, SIGTERM to every process after step 5 (iter 4's write may still be
    in flight): the ranks save the step they stop at, wait until every write is published, and
    exit 0; ``latest`` names that complete checkpoint and nothing is left unpublished; the same
    command resumes to the synchronous run's losses."""
    reference, cache = synchronous
    run_dir = tmp_path / "run"
    output, elapsed = _sigterm_after_rows(run_dir, cache, 5, 0.0, *ASYNC)
    assert "SIGTERM: saved step" in output, output[-3000:]
    assert "ChildFailedError" not in output and "[rank" not in output, output[-3000:]  # exit 0
    assert elapsed < 30, elapsed  # torchrun's own limit: it SIGKILLs its workers after 30 s
    checkpoints = run_dir / "checkpoints"
    stopped = _losses(run_dir)[-1][0]
    assert (checkpoints / "latest").read_text().strip() == f"iter_{stopped:07d}"
    assert (checkpoints / f"iter_{stopped:07d}" / "metadata.json").is_file()
    assert not list(checkpoints.glob("*.partial"))
    again = _launch(run_dir, cache, *ASYNC)
    assert again.returncode == 0, again.stderr[-3000:]
    assert _losses(run_dir) == _losses(reference)

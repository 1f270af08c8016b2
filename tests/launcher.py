"""Fast multi-rank launcher for pytest: fork + ``file://`` rendezvous, hard timeouts.

``run_ranks(fn, world_size, *args)`` forks ``world_size`` processes from the (already warm)
pytest process (spawns them once the parent touched CUDA: ``start_method``), initialises a
gloo process group in each, runs ``fn(rank, world_size, *args)`` and returns the per-rank
results. About 10x faster than torchrun or spawn (PLATFORM.md). Rules it
keeps: the parent never joins a process group; each rank uses one thread, passes a timeout to
``init_process_group``, tears down Megatron state and leaves with ``os._exit``; the parent kills
every rank when one fails or the deadline passes, and re-raises the rank's traceback.
"""

from __future__ import annotations

import datetime
import io
import multiprocessing as mp
import os
import queue
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Callable

import torch
import torch.distributed as dist


class RankFailed(RuntimeError):
    """A rank raised or the group did not finish before the deadline."""


def run_ranks(fn: Callable, world_size: int, *args, timeout: float = 120.0, **kwargs) -> list:
    """Run ``fn(rank, world_size, *args, **kwargs)`` on ``world_size`` forked gloo ranks.

    Results must be picklable (tensors are fine). Returns them ordered by rank.
    """
    ctx = mp.get_context(start_method())
    results: mp.Queue = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        store = os.path.join(tmp, "rendezvous")
        procs = [
            ctx.Process(
                target=_rank_main,
                args=(fn, rank, world_size, store, timeout, results, args, kwargs),
                daemon=False,  # dist_checkpointing starts a Manager process
            )
            for rank in range(world_size)
        ]
        sys.stdout.flush()  # forked children must not inherit (and re-print) unflushed output
        sys.stderr.flush()
        for p in procs:
            p.start()
        try:
            return _collect(results, procs, world_size, timeout)
        finally:
            for p in procs:
                p.join(5 if p.exitcode is None else 0)
                _kill_group(p.pid)


def start_method() -> str:
    """``fork`` (fast), or ``spawn`` once this process has initialised CUDA: a forked child
    cannot use it (torch ``cuda/__init__.py`` ``_lazy_init``: "Cannot re-initialize CUDA in
    forked subprocess"). ``ADADPO_RANK_START=spawn`` forces it (the GPU checks set it). Spawned
    ranks need ``fn`` and its arguments picklable (module-level functions)."""
    forced = os.environ.get("ADADPO_RANK_START")
    if forced:
        return forced
    return "spawn" if torch.cuda.is_initialized() else "fork"


def _kill_group(pid: int) -> None:
    """Kill a rank's whole process group: the rank (if still running) and what it started
    (dist_checkpointing's multiprocessing Manager outlives an ``os._exit``-ed rank)."""
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _collect(results: mp.Queue, procs, world_size: int, timeout: float) -> list:
    deadline = time.monotonic() + timeout
    out: dict[int, object] = {}
    while len(out) < world_size:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            missing = sorted(set(range(world_size)) - set(out))
            raise RankFailed(f"ranks {missing} did not finish within {timeout:.0f} s")
        try:
            rank, ok, payload = results.get(timeout=min(remaining, 1.0))
        except queue.Empty:
            dead = [i for i, p in enumerate(procs) if not p.is_alive() and i not in out]
            if dead and results.empty():
                time.sleep(0.2)
                if results.empty():
                    codes = {i: procs[i].exitcode for i in dead}
                    raise RankFailed(f"ranks exited without a result: exit codes {codes}") from None
            continue
        if not ok:
            raise RankFailed(f"rank {rank} failed:\n{payload}")
        out[rank] = torch.load(io.BytesIO(payload), weights_only=False)
    return [out[r] for r in range(world_size)]


def _rank_main(fn, rank, world_size, store, timeout, results, args, kwargs) -> None:
    code = 0
    try:
        os.setsid()  # own process group, so the parent can reap everything this rank starts
        torch.set_num_threads(1)
        os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
        from megatron_adadpo.platform import cpu

        cpu.activate()
        dist.init_process_group(
            "gloo",
            init_method=f"file://{store}",
            rank=rank,
            world_size=world_size,
            timeout=datetime.timedelta(seconds=timeout),
        )
        payload = fn(rank, world_size, *args, **kwargs)
        # Plain bytes: torch's queue reductions pass tensors as shared-memory file descriptors,
        # which die with this process before the parent reads them.
        buffer = io.BytesIO()
        torch.save(payload, buffer)
        results.put((rank, True, buffer.getvalue()))
    except BaseException:
        results.put((rank, False, traceback.format_exc()))
        code = 1
    finally:
        try:
            from megatron_adadpo.platform import distributed as parallel

            parallel.destroy()
        except BaseException:
            pass
        results.close()
        results.join_thread()
        os._exit(code)

"""One line describing the machine a benchmark ran on (recorded with every result), and the
process's resident-memory counters the memory benchmarks read (Linux ``/proc``)."""

from __future__ import annotations

import gc
import json
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (``platform.processor()`` elsewhere)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def machine_line() -> str:
    """``nproc=.. cpu=.. python=.. torch=.. megatron-core=.. device=..``."""
    import torch

    try:
        import megatron.core as mcore

        mcore_version = mcore.__version__
    except ImportError:
        mcore_version = "absent"
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    return (
        f"nproc={os.cpu_count()} cpu={cpu_model()!r} python={platform.python_version()} "
        f"torch={torch.__version__} megatron-core={mcore_version} device={device!r}"
    )


def status_kib(field: str) -> int:
    """A ``/proc/self/status`` memory field in KiB (``VmRSS``: now, ``VmHWM``: peak)."""
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def reset_peak_rss() -> None:
    """Reset ``VmHWM`` (the peak resident set) to the current ``VmRSS``."""
    with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
        f.write("5")


def peak_rss_runs(
    step: Callable[[], None], reps: int, prepare: Callable[[], None]
) -> tuple[list[int], list[float], int]:
    """Peak resident bytes above the baseline and wall seconds of ``reps`` runs of ``step``,
    and the last baseline (resident bytes before the run).

    ``reps + 1`` runs, the first a warm-up (not counted); before each, ``prepare()`` (drop the
    previous run's outputs, synchronise ranks), a garbage collection (a previous graph held by
    a reference cycle), ``VmHWM`` reset; peak = ``VmHWM - VmRSS`` before. Tensors this large
    are ``mmap``-ed and go back to the kernel when freed, so every run starts from the same
    baseline.
    """
    peaks, times = [], []
    for r in range(reps + 1):
        prepare()
        gc.collect()
        reset_peak_rss()
        before = status_kib("VmRSS")
        start = time.perf_counter()
        step()
        elapsed = time.perf_counter() - start
        if r:
            peaks.append((status_kib("VmHWM") - before) * 1024)
            times.append(elapsed)
    return peaks, times, before * 1024


def emit_result(result: dict, json_path: str | None) -> None:
    """Print a benchmark's result as JSON, and write it to ``json_path`` when given (with the
    CUDA peak memory when the run used a GPU)."""
    import torch

    if torch.cuda.is_available() and torch.cuda.max_memory_allocated():
        result["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
    text = json.dumps(result, indent=2)
    print(text)
    if json_path:
        Path(json_path).write_text(text)

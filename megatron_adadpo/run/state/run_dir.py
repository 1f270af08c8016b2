"""The files of a run directory, and what a (re-)launch may do with them. Torch-free.

::

    <run_dir>/run.lock                   held while a run uses the directory (``run/state/lock.py``)
    <run_dir>/metrics.jsonl, tensorboard/
    <run_dir>/checkpoints/iter_0000040/  one complete checkpoint per saved step
    <run_dir>/checkpoints/iter_0000060.partial/   a save in progress (never loaded)
    <run_dir>/checkpoints/latest         "iter_0000040": the newest complete checkpoint

A save writes ``iter_N.partial`` and renames it to ``iter_N`` only when every rank finished,
then replaces ``latest`` atomically, so no complete checkpoint is removed before its successor
is complete. ``resume_point`` decides where a launch starts and refuses the states that would
otherwise silently restart from step 0 and overwrite checkpoints.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from megatron_adadpo.config import ConfigError

LATEST_FILE = "latest"
PARTIAL_SUFFIX = ".partial"
_ITER = re.compile(r"^iter_(\d{7,})$")


class RunDirError(ConfigError):
    """The run directory does not allow this launch; the message says why and the fix. Every
    rank finds the same, so the command-line shell prints it once."""


def checkpoints_root(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def checkpoint_name(step: int) -> str:
    return f"iter_{step:07d}"


def step_of(name: str) -> int | None:
    """The step of a checkpoint directory name (``iter_0000040`` -> 40), else None."""
    match = _ITER.match(name)
    return int(match.group(1)) if match else None


def list_checkpoints(run_dir: str | Path) -> list[str]:
    """Names of the checkpoint directories of a run, oldest first (partial saves excluded)."""
    root = checkpoints_root(run_dir)
    if not root.is_dir():
        return []
    names = [p.name for p in root.iterdir() if p.is_dir() and step_of(p.name) is not None]
    return sorted(names, key=step_of)


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The directory ``<run_dir>/checkpoints/latest`` names, or None (absent or dangling)."""
    root = checkpoints_root(run_dir)
    marker = root / LATEST_FILE
    if not marker.is_file():
        return None
    name = marker.read_text().strip()
    if step_of(name) is None or not (root / name).is_dir():
        return None
    return root / name


def point_latest_hint(run_dir: str | Path, names: list[str]) -> str:
    """The command that makes ``latest`` name the newest of ``names``."""
    marker = checkpoints_root(run_dir) / LATEST_FILE
    return f"echo {names[-1]} > {marker}" if names else f"rm {marker}"


def resume_point(run_dir: str | Path, resume: bool) -> Path | None:
    """The checkpoint a launch resumes from (None: a fresh start), refusing unsafe states.

    Refused (``RunDirError``), because each would train from step 0 and overwrite the
    ``iter_*`` checkpoints one by one: ``resume: true`` with ``latest`` absent, naming nothing
    or a missing directory while checkpoints exist; ``resume: false`` in a directory that
    holds checkpoints.
    """
    names = list_checkpoints(run_dir)
    root = checkpoints_root(run_dir)
    marker = root / LATEST_FILE
    if not resume:
        if names:
            raise RunDirError(
                f"logging.run_dir={run_dir} already holds checkpoints {_shown(names)}, which "
                "checkpoint.resume=false would overwrite; use a new logging.run_dir, or "
                "checkpoint.resume=true to continue that run"
            )
        return None
    where = latest_checkpoint(run_dir)
    if where is not None:
        return where
    if marker.exists():
        named = marker.read_text().strip() if marker.is_file() else "(not a file)"
        raise RunDirError(
            f"{marker} names {named!r}, which is not a checkpoint of this run (available: "
            f"{_shown(names) or 'none'}); point it at one: {point_latest_hint(run_dir, names)}"
        )
    if names:
        raise RunDirError(
            f"{root} holds checkpoints {_shown(names)} but no '{LATEST_FILE}' file (an "
            f"interrupted save, or it was removed); resume from the newest complete one with "
            f"`{point_latest_hint(run_dir, names)}`, or use a new logging.run_dir to start afresh"
        )
    return None


def _shown(names: list[str], limit: int = 6) -> str:
    if len(names) <= limit:
        return ", ".join(names)
    return ", ".join(names[: limit // 2] + ["..."] + names[-(limit // 2) :])


def earlier_checkpoints_hint(directory: Path) -> str:
    """How to recover from an unreadable checkpoint ``directory`` of a run."""
    run_dir = directory.parent.parent
    earlier = [n for n in list_checkpoints(run_dir) if step_of(n) < (step_of(directory.name) or 0)]
    if not earlier:
        return "no earlier checkpoint exists: start afresh in a new logging.run_dir"
    return (
        f"resume from an earlier checkpoint ({_shown(earlier)}): "
        f"{point_latest_hint(run_dir, earlier)}"
    )


def partial_path(final: Path) -> Path:
    return final.with_name(final.name + PARTIAL_SUFFIX)


def start_partial(final: Path) -> Path:
    """An empty ``<final>.partial`` directory to save into (a leftover of an interrupted save,
    never a complete checkpoint, is removed). Call on one rank."""
    partial = partial_path(final)
    if partial.exists():
        shutil.rmtree(partial)
    partial.mkdir(parents=True)
    return partial


def publish(partial: Path, final: Path) -> None:
    """Rename a finished ``partial`` save to ``final`` and point ``latest`` at it. Call on one
    rank after every rank finished writing.

    An existing ``final`` (only possible when ``latest`` was pointed back at an older step) is
    moved aside and removed only after the new checkpoint and ``latest`` are in place.
    """
    aside = None
    if final.exists():
        aside = final.with_name(f"{final.name}.replaced-{os.getpid()}")
        os.replace(final, aside)
    os.replace(partial, final)
    atomic_write_text(final.parent / LATEST_FILE, final.name + "\n")
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)


def durable_temp(path: Path, write: Callable[[BinaryIO], object]) -> Path:
    """A hidden temporary file beside ``path`` holding what ``write(handle)`` wrote, on disk
    (``fsync``); ``os.replace`` it onto ``path`` to publish it. If writing fails (a full disk)
    the temporary file is removed and the ``OSError`` names ``path``."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
    except BaseException as err:
        tmp.unlink(missing_ok=True)
        if isinstance(err, OSError):
            err.filename = str(path)
        raise
    return tmp


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` so that readers see the old or the new file, never a part."""
    path = Path(path)
    os.replace(durable_temp(path, lambda handle: handle.write(text.encode())), path)
    fsync_directory(path.parent)


def fsync_directory(directory: Path) -> None:
    """Make the renames inside ``directory`` durable (the POSIX way: fsync the directory)."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def check_writable(run_dir: str | Path) -> None:
    """Create ``run_dir`` and ``checkpoints/`` if needed and write a probe file in each.

    Raises ``RunDirError`` naming the directory (unwritable, on a read-only file system, or a
    path through a file), so that this is found before the model is built, not at the first
    save.
    """
    probe_name = f".write_probe.{socket.gethostname()}.{os.getpid()}"
    for directory in (Path(run_dir), checkpoints_root(run_dir)):
        try:
            directory.mkdir(parents=True, exist_ok=True)
            probe = directory / probe_name
            probe.write_text("")
            probe.unlink()
        except OSError as err:
            raise RunDirError(
                f"logging.run_dir: cannot write to {directory} ({err.strerror or err}); "
                "choose a writable logging.run_dir"
            ) from None

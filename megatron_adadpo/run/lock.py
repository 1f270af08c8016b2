"""One run at a time per run directory: ``<run_dir>/run.lock``.

Global rank 0 holds an exclusive POSIX record lock (``fcntl.lockf``) on the file for the whole
run and writes its owner (host, pid, start time, command) into it. The kernel releases the lock
when its process dies, SIGKILL included, and a forked child (a checkpoint writer) never
inherits it, so a lock file left by a killed run is recognised as stale (nobody holds it) and
taken over, with a log line naming the previous owner. On a file system without lock support
the owner record decides: a live process on this host keeps the lock; an owner on another host
cannot be checked and is refused (the message says how to clear it). A finished run empties
the file (an empty lock file is free).
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import socket
import sys
import time
from pathlib import Path

import torch.distributed as dist

from megatron_adadpo.config import ConfigError
from megatron_adadpo.platform.processes import pid_alive

LOCK_FILE = "run.lock"
log = logging.getLogger(__name__)


class RunDirLocked(ConfigError):
    """Another run uses this run directory (the message names its host and pid)."""


def _owner_record() -> dict:
    return {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "command": " ".join(sys.argv),
    }


def _alive_here(owner: dict) -> bool:
    """True when ``owner`` is a live process on this host (an unreadable record counts)."""
    if owner.get("host") != socket.gethostname():
        return False
    try:
        return pid_alive(int(owner["pid"]))
    except (KeyError, ValueError, TypeError):
        return True


def _is_self(owner: dict) -> bool:
    return owner.get("host") == socket.gethostname() and owner.get("pid") == os.getpid()


class RunDirLock:
    """``acquire()`` / ``release()`` of ``<run_dir>/run.lock`` (call on one process)."""

    def __init__(self, run_dir: str | Path):
        self.path = Path(run_dir) / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock, or raise ``RunDirLocked`` naming the owner and the fix."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            locked = self._lock(fd)  # raises when a live process holds it
            previous = self._read(fd)
            if previous and not _is_self(previous):
                elsewhere = previous.get("host") != socket.gethostname()
                if _alive_here(previous) or (elsewhere and not locked):
                    raise RunDirLocked(self._busy(previous, locks_work=locked))
                log.warning(
                    "taking over the stale lock %s of a run that is gone (host %s, pid %s)",
                    self.path,
                    previous.get("host"),
                    previous.get("pid"),
                )
            self._write(fd, json.dumps(_owner_record()) + "\n")
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd

    def release(self) -> None:
        """Empty the lock file and drop the lock (idempotent)."""
        if self._fd is None:
            return
        try:
            self._write(self._fd, "")
        finally:
            os.close(self._fd)  # closing drops the lock
            self._fd = None

    def _lock(self, fd: int) -> bool:
        """True when the lock is held; False when the file system does not support locks."""
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            if err.errno in (errno.EACCES, errno.EAGAIN):
                raise RunDirLocked(self._busy(self._read(fd), locks_work=True)) from None
            if err.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                return False
            raise
        return True

    @staticmethod
    def _read(fd: int) -> dict:
        os.lseek(fd, 0, os.SEEK_SET)
        raw = os.read(fd, 1 << 16).decode("utf-8", "replace").strip()
        try:
            return json.loads(raw) if raw else {}
        except json.JSONDecodeError:
            return {"host": "?", "pid": "?", "record": raw[:200]}

    @staticmethod
    def _write(fd: int, text: str) -> None:
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, text.encode())
        os.fsync(fd)

    def _busy(self, owner: dict, locks_work: bool) -> str:
        who = (
            f"host {owner.get('host', '?')}, pid {owner.get('pid', '?')}, started "
            f"{owner.get('started', '?')}"
        )
        fix = "wait for it to finish, or use another logging.run_dir"
        if not locks_work:
            fix += f"; if that run is gone, delete {self.path}"
        return f"logging.run_dir {self.path.parent} is in use by another run ({who}): {fix}"


def claim_run_dir(run_dir: str | Path) -> RunDirLock | None:
    """Collective: global rank 0 takes ``run_dir``'s lock (returned; None on other ranks), and
    when it cannot, every rank raises the same ``RunDirLocked`` (printed once)."""
    lock, refusal = None, None
    if dist.get_rank() == 0:
        lock = RunDirLock(run_dir)
        try:
            lock.acquire()
        except RunDirLocked as err:
            lock, refusal = None, str(err)
    message = [refusal]
    dist.broadcast_object_list(message, src=0)
    if message[0] is not None:
        raise RunDirLocked(message[0])
    return lock

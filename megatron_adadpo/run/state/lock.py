"""One run at a time per run directory: ``<run_dir>/run.lock``.

Global rank 0 holds an exclusive POSIX record lock (``fcntl.lockf``) on the file for the whole
run and writes its owner (host, pid, start time, command) into it. The kernel lock decides; the
record only informs. The kernel releases the lock when its process dies, SIGKILL included, and a
forked child (a checkpoint writer) never inherits it, so whenever the lock can be taken the
record is stale and is taken over with a log line naming the previous owner, even when its pid
now belongs to another live process (containers reuse small pids: a requeued job is never
stranded by its own record). When another process holds the kernel lock the run is refused,
naming the holder from the record. Only on a file system without lock support does the record
decide: a live process on this host, or an owner on another host (which cannot be checked),
keeps the directory. A finished run empties the file (an empty lock file is free).

What it guarantees, and where: two runs on one host are always kept apart. Across nodes it holds
only where the file system's locks are cluster-wide (NFSv4, Lustre mounted with ``flock``,
GPFS); on a file system whose locks work only within one node (Lustre ``localflock``, some NFS
mounts with ``nolock``) a live run on another node can have its lock taken over.
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
        """Take the lock, or raise ``RunDirLocked`` naming the holder and the fix."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.is_dir():
            raise RunDirLocked(
                f"{self.path} is a directory, not the run's lock file: remove it (rm -r "
                f"{self.path}) and launch again"
            )
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            locked = self._lock(fd)  # raises when another process holds the kernel lock
            previous = self._read(fd)
            if previous and not _is_self(previous):
                self._take_over(previous, locked)
            self._write(fd, json.dumps(_owner_record()) + "\n")
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd

    def _take_over(self, previous: dict, locked: bool) -> None:
        """Replace ``previous``'s record: always when the kernel lock is ours (nobody else holds
        it, whatever the record says); without lock support only when its owner is gone."""
        here = previous.get("host") == socket.gethostname()
        if not locked and (not here or _alive_here(previous)):
            raise RunDirLocked(self._busy(previous, locks_work=False))
        if not locked:
            why = "this file system has no file locks, and that process is gone"
        elif here and _alive_here(previous):
            why = "the kernel lock was free: that pid is another process now (a reused pid)"
        elif here:
            why = "the kernel lock was free: that run is gone"
        else:  # see the module docstring: node-local locks cannot see a run on another node
            why = "the kernel lock was free: that run is gone, or its node's locks are not ours"
        log.warning(
            "taking over the stale lock %s (recorded owner: host %s, pid %s, started %s): %s",
            self.path,
            previous.get("host"),
            previous.get("pid"),
            previous.get("started"),
            why,
        )

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
        if locks_work:
            fix = (
                "wait for it to finish, or use another logging.run_dir (that process holds the "
                f"kernel lock, which frees itself when it exits, SIGKILL included; removing "
                f"{self.path} is never needed and, while it runs, lets two runs share the "
                "directory)"
            )
        else:
            fix = (
                "wait for it to finish, or use another logging.run_dir; this file system has no "
                f"file locks, so the record decides: once that process is gone, delete "
                f"{self.path} (safe only then)"
            )
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

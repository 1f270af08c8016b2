"""Process facts and hygiene: is a pid alive, and children that do not outlive their parent.

``dist_checkpointing.save`` starts helper processes: a ``multiprocessing`` Manager (spawned,
megatron-core 0.16.1 ``strategies/filesystem_async.py`` ``_get_write_results_queue``) and forked
writers. When the parent is SIGKILL-ed mid-save nothing shuts them down, and a blocked helper
stays forever with its memory. ``children_die_with_parent`` uses Linux's ``PR_SET_PDEATHSIG``
(the kernel SIGKILLs the child when the thread that started it exits) in every child
``multiprocessing`` starts: forked children run a ``multiprocessing.util.register_after_fork``
hook; spawned children (whose ``_after_fork`` is a no-op) import the entry script, which
imports ``cli``, which calls this function while the child is being prepared. Elsewhere it is
a no-op. A spawned child also ignores SIGTERM: it dies with its parent anyway, and Slurm's
preemption signal goes to every process of the job step, so without this the writers' Manager
would die before the rank's SIGTERM save needs it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import multiprocessing
import multiprocessing.util
import os
import signal
import sys

_PR_SET_PDEATHSIG = 1


def pid_alive(pid: int) -> bool:
    """True when a process with this pid exists on this host (another user's included)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _die_with(parent_pid: int) -> None:
    """In a ``multiprocessing`` child: be SIGKILL-ed when the parent goes."""
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
    if os.getppid() != parent_pid:  # the parent died before prctl
        os._exit(1)


def _forked_child_dies_with_parent(_registry_key) -> None:
    _die_with(multiprocessing.parent_process().pid)


class _Key:
    """``register_after_fork`` keys its hooks by a weak reference to an object."""


_KEY = _Key()


def children_die_with_parent() -> None:
    """Make every ``multiprocessing`` child of this process die when it does (Linux)."""
    if not sys.platform.startswith("linux"):
        return
    multiprocessing.util.register_after_fork(_KEY, _forked_child_dies_with_parent)
    # A spawned child importing the entry script: multiprocessing's own test for it
    # (spawn.py ``_check_not_importing_main``; ``spawn.is_forking`` fails once ``prepare``
    # restored the parent's sys.argv).
    if getattr(multiprocessing.current_process(), "_inheriting", False):
        _die_with(os.getppid())
        # It lives exactly as long as its parent, so SIGTERM to the whole process group (Slurm
        # preemption, ``kill -- -PGID``) must not take it from a rank that saves on SIGTERM
        # (the checkpoint writers' Manager).
        signal.signal(signal.SIGTERM, signal.SIG_IGN)

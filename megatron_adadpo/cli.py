"""The one shell of every command-line entry point (training, precompute, tools).

``run(main, argv)`` calls ``main(argv)``; bad input (a config, data or file error: the message
names the field or file and the fix) prints one ``error: ...`` line and exits with status 2
instead of a traceback. A config error is the same on every rank of a torchrun launch, so only
global rank 0 prints it (the others wait a few seconds before exiting, so torchrun does not stop
rank 0 first); other errors are printed by each rank that hits them, with its rank.
``MEGATRON_ADADPO_DEBUG=1`` re-raises, for the traceback.

Importing this module makes the ``multiprocessing`` children of the process (checkpoint
writers, the writers' Manager, tokenizer workers) die with it
(``platform.processes.children_die_with_parent``): a SIGKILL-ed save leaves no orphan behind.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Callable

from megatron_adadpo.config import ConfigError
from megatron_adadpo.platform.processes import children_die_with_parent
from megatron_adadpo.status import show_on_stdout

USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, PermissionError)
RANK0_PRINT_GRACE_S = 5.0
children_die_with_parent()  # at import: spawned children import the entry script, hence this


def leave_now(status: int = 0) -> None:
    """Exit at once, skipping the interpreter's teardown (seconds of garbage collection of the
    model and Megatron's state, measured: docs/troubleshooting.md); for a rank that saved on
    SIGTERM and has closed every file, inside Slurm's and torchrun's grace time. Helper
    processes die with it (``children_die_with_parent``)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def run(main: Callable[[list[str]], int | None], argv: list[str] | None = None) -> int:
    """Exit status of ``main(argv)``: its return value (None = 0), or 2 on bad input."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("megatron_adadpo").setLevel(logging.INFO)
    show_on_stdout()  # rank-0 status lines: "[megatron_adadpo] ..." on stdout
    try:
        status = main(sys.argv[1:] if argv is None else argv)
    except USER_ERRORS as err:
        if os.environ.get("MEGATRON_ADADPO_DEBUG") == "1":
            raise
        rank = os.environ.get("RANK")
        if isinstance(err, ConfigError):
            if rank in (None, "0"):
                print(f"error: {err}", file=sys.stderr, flush=True)
            else:  # torchrun stops every rank when the first one exits: let rank 0 print first
                time.sleep(RANK0_PRINT_GRACE_S)
        else:
            where = f"[rank {rank}] " if rank not in (None, "0") else ""
            print(f"{where}error: {err}", file=sys.stderr, flush=True)
        return 2
    return 0 if status is None else int(status)

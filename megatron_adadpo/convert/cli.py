"""Shared shell of the two conversion CLIs: logging, and bad input as a message + exit code 2."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable


def run(convert: Callable[[], str]) -> int:
    """Call ``convert()`` (returns the line to print); a bad input prints ``error: ...``."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("megatron_adadpo").setLevel(logging.INFO)
    try:
        done = convert()
    except (ValueError, FileNotFoundError, FileExistsError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(done)
    return 0

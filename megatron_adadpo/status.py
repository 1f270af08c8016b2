"""A run's status lines (the resolved config, where it resumed, SIGTERM saves, what a tool
wrote): one logger, ``megatron_adadpo.status``, that rank-0 code writes to and the CLIs show on
stdout as ``[megatron_adadpo] message`` (``show_on_stdout``; ``cli.run`` calls it). Library use
keeps Python's logging defaults: configure the logger to see them."""

from __future__ import annotations

import logging
import sys

log = logging.getLogger("megatron_adadpo.status")


class _StdoutHandler(logging.StreamHandler):
    """Writes to the ``sys.stdout`` of the moment (pytest and torchrun replace it)."""

    def __init__(self):
        super().__init__()
        self.setFormatter(logging.Formatter("[megatron_adadpo] %(message)s"))

    @property
    def stream(self):
        return sys.stdout

    @stream.setter
    def stream(self, _value):
        pass


def show_on_stdout() -> None:
    """Status lines to stdout, INFO and above, not repeated by the root logger (idempotent)."""
    if not any(isinstance(h, _StdoutHandler) for h in log.handlers):
        log.addHandler(_StdoutHandler())
    log.setLevel(logging.INFO)
    log.propagate = False

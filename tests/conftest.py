"""Shared pytest setup: CUDA-only tests skip cleanly; the repository root is importable; the
header names the stack under test and the two stacks CI runs (requirements/*.txt)."""

import os
import platform
import re
from importlib.metadata import version
from pathlib import Path

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# The two ends of the supported range (tools/venv.sh's stacks) and their pins files.
STACKS = {"default": "cpu.txt", "newest": "newest.txt"}
REQUIREMENTS = Path(__file__).resolve().parent.parent / "requirements"


def stack_versions(pins: Path) -> str:
    """'Python X.Y, torch A, megatron-core B' from a pins file (Python from its header line)."""
    text = pins.read_text(encoding="utf-8")
    python = re.search(r"Python (3\.\d+)", text)
    pinned = dict(re.findall(r"^([\w.-]+)==(\S+)$", text, flags=re.M))
    return (
        f"Python {python.group(1) if python else '?'}, torch {pinned.get('torch', '?')}, "
        f"megatron-core {pinned.get('megatron-core', '?')}"
    )


def stack_lines() -> list[str]:
    """The stack under test and the two CI stacks (pinned versions), one line each."""
    running = (
        f"stack under test: Python {platform.python_version()}, torch {torch.__version__}, "
        f"megatron-core {version('megatron-core')}"
    )
    tested = [
        f"CI stack {name} (requirements/{pins}): {stack_versions(REQUIREMENTS / pins)}"
        for name, pins in STACKS.items()
        if (REQUIREMENTS / pins).exists()
    ]
    return [running, *tested]


def pytest_report_header(config):
    return stack_lines()


def pytest_sessionstart(session):
    """``-q`` (tools/run_tests.sh) drops pytest's header: the stack lines are printed anyway."""
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None and session.config.get_verbosity() < 0:
        for line in stack_lines():
            reporter.write_line(line)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA (GPU test); none on this machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)

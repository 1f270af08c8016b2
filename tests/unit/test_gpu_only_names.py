"""The code only a GPU machine runs names only what the project still has.

``tests/gpu/`` skips here and ``benchmarks/gpu/`` runs only on a lent machine, so a function
that moved or was renamed breaks them silently until that machine's first (and budgeted) run:
the parameter-sync body called ``checkpoints.checkpoints_root`` long after it moved to
``run_dir``. Read as text here: every ``from megatron_adadpo... import NAME`` must import, and
every ``module.NAME`` on a project module bound by such an import must exist.
"""

from __future__ import annotations

import ast
import importlib
import types
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PROJECT = "megatron_adadpo"
GPU_ONLY = sorted(
    [*REPO.glob("tests/gpu/*.py"), *REPO.glob("benchmarks/gpu/*.py"), REPO / "tests/gpu_runs.py"]
)


def project_modules(tree: ast.Module, missing: list[str]) -> dict[str, types.ModuleType]:
    """Names bound to project modules by the file's imports; names that fail go to ``missing``."""
    bound = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith(PROJECT) and alias.asname:
                    bound[alias.asname] = importlib.import_module(alias.name)
        if not isinstance(node, ast.ImportFrom) or not (node.module or "").startswith(PROJECT):
            continue
        module = importlib.import_module(node.module)
        for alias in node.names:
            try:
                value = getattr(module, alias.name, None) or importlib.import_module(
                    f"{node.module}.{alias.name}"
                )
            except ImportError:
                missing.append(f"from {node.module} import {alias.name}")
                continue
            if isinstance(value, types.ModuleType):
                bound[alias.asname or alias.name] = value
    return bound


@pytest.mark.parametrize("path", GPU_ONLY, ids=lambda p: str(p.relative_to(REPO)))
def test_every_project_name_exists(path):
    tree = ast.parse(path.read_text())
    missing: list[str] = []
    bound = project_modules(tree, missing)
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
            module = bound.get(node.value.id)
            if module is not None and not hasattr(module, node.attr):
                missing.append(f"{node.value.id}.{node.attr} (line {node.lineno})")
    assert not missing, f"{path.name}: {missing}"


def test_the_gpu_only_files_are_found():
    names = {p.name for p in GPU_ONLY}
    assert {"stack_bodies.py", "stack_checks.py", "test_cuda_lora.py", "gpu_runs.py"} <= names

"""Shared pytest setup: CUDA-only tests skip cleanly; the repository root is importable."""

import os

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA (GPU test); none on this machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)

"""Fixtures of the multi-rank tests."""

import pytest


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    """One tokenized-data cache per test module (its runs share the tokenization)."""
    return tmp_path_factory.mktemp("data_cache")

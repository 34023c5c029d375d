"""Shared pytest configuration."""

from __future__ import annotations

import os
import shutil
import tempfile


def pytest_addoption(parser):
    parser.addoption("--update-golden", action="store_true", default=False,
                     help="rewrite tests/golden/** from the compiler's current output")


_OWN_CACHE: list[str] = []


def pytest_configure(config):
    """Compile into a throwaway cache, so the suite neither reuses nor fills the user's cache."""
    if "ATTNC_CACHE_DIR" not in os.environ:
        _OWN_CACHE.append(tempfile.mkdtemp(prefix="attnc-test-cache-"))
        os.environ["ATTNC_CACHE_DIR"] = _OWN_CACHE[0]


def pytest_unconfigure(config):
    for path in _OWN_CACHE:
        shutil.rmtree(path, ignore_errors=True)

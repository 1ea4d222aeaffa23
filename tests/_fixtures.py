"""Paths to the real test material in ../shared/fixtures, read in place (never copied into the repo).

Outside CI a missing fixture skips the test with the reason; under CI (`CI=true`), which always has
`../shared` beside the clone, it fails.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]  # the checkout: tests in any folder under tests/ find it here
SHARED = ROOT.parent / "shared"
FIXTURES = SHARED / "fixtures"


def fixture_path(rel: str) -> Path:
    """The fixture at `rel` under shared/fixtures, or skip (fail under CI) when it is absent."""
    return shared_path(f"fixtures/{rel}")


def shared_path(rel: str) -> Path:
    """The file at `rel` under ../shared (fixtures, tools), or skip (fail under CI) when it is absent."""
    path = SHARED / rel
    if not path.exists():
        message = f"shared file {path} is absent (shared/ sits beside the clone)"
        if os.environ.get("CI") == "true":
            pytest.fail(f"{message}; under CI it must be there")
        pytest.skip(message)
    return path


def load_bench(name: str):
    """bench/<name>.py as a module (the benches are scripts, not a package the tests import by name)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"bench_{name}", Path(__file__).resolve().parents[1] / "bench" /
                                                  f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module

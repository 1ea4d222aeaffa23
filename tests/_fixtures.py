"""Paths to the real test material in ../shared/fixtures, read in place (never copied into the repo).

Outside CI a missing fixture skips the test with the reason; under CI (`CI=true`), which always has
`../shared` beside the clone, it fails.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

FIXTURES = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures"


def fixture_path(rel: str) -> Path:
    """The fixture at `rel` under shared/fixtures, or skip (fail under CI) when it is absent."""
    path = FIXTURES / rel
    if not path.exists():
        message = f"shared fixture {path} is absent (the shared fixtures sit beside the clone)"
        if os.environ.get("CI") == "true":
            pytest.fail(f"{message}; under CI it must be there")
        pytest.skip(message)
    return path

"""Shared test fixtures: one Prefect API server per session, the sample crawl, fixture paths."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# No test touches the internet: the model layer must not even probe the Hugging Face hub (set before
# huggingface_hub is imported, which reads it once), and no server reports usage. Subprocesses and Dask
# workers inherit these.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ["DO_NOT_TRACK"] = "1"


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory):
    """A real Prefect API server (Prefect's test harness), exported so Dask worker processes see it."""
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    old = os.environ.get("PREFECT_API_URL")
    with prefect_test_harness(server_startup_timeout=120):
        url = PREFECT_API_URL.value()
        os.environ["PREFECT_API_URL"] = url
        try:
            yield url
        finally:
            if old is None:
                os.environ.pop("PREFECT_API_URL", None)
            else:
                os.environ["PREFECT_API_URL"] = old


@pytest.fixture(scope="session")
def sample_crawl(tmp_path_factory):
    from tasks.sample import write_sample_crawl

    return write_sample_crawl(tmp_path_factory.mktemp("sample-crawl"))

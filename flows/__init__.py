"""Orchestration: Prefect flows and tasks over Dask, settings, the CLI and the funnel report."""

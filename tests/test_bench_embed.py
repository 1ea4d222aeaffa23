"""Smoke test of bench/embed.py at its smallest size: a tiny random model, a few fixture photos, one round."""

from __future__ import annotations

import json
import os

import pytest
from _fixtures import load_bench


@pytest.fixture(scope="module")
def bench():
    module = load_bench("embed")
    if not module.FIXTURE_IMAGES.is_dir():
        if os.environ.get("CI") == "true":
            pytest.fail(f"fixture folder {module.FIXTURE_IMAGES} is missing under CI")
        pytest.skip(f"fixture folder {module.FIXTURE_IMAGES} is absent (the shared fixtures sit beside the clone)")
    return module


def test_main_prints_every_figure_and_the_json_line_last(bench, tmp_path, capsys):
    figures = bench.main(["--tiny", "--batch", "3", "--work", str(tmp_path)])
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == figures
    for key in ("ours_s", "forward_s", "images_per_s", "forward_images_per_s", "embed_ratio_vs_forward"):
        assert figures[key] > 0, key
    assert (figures["images"], figures["batch"], figures["device"]) == (4, 3, "cpu")
    assert "random weights" in figures["model"]
    assert (tmp_path / f"siglip2-tiny-fixres-v{bench.CHECKPOINT_VERSION}").is_dir()  # built once, then reused
    assert bench.main(["--tiny", "--work", str(tmp_path)])["images"] == 4

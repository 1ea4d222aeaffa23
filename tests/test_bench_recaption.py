"""Smoke test of bench/recaption.py at its smallest size: the tiny random LLaVA, a few fixture photos, one round."""

from __future__ import annotations

import json
import os

import pytest
from _fixtures import load_bench


def test_main_prints_every_figure_and_the_json_line_last(tmp_path, capsys):
    bench = load_bench("recaption")
    photos = bench.ROOT.parent / "shared/fixtures/images"
    if not photos.is_dir():
        if os.environ.get("CI") == "true":
            pytest.fail(f"fixture folder {photos} is missing under CI")
        pytest.skip(f"fixture folder {photos} is absent (the shared fixtures sit beside the clone)")
    figures = bench.main(["--images", "4", "--batch", "3", "--repeat", "1", "--max-new-tokens", "3",
                          "--work", str(tmp_path)])
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == figures
    for key in ("ours_s", "generate_s", "images_per_s", "generate_images_per_s", "recaption_ratio_vs_generate"):
        assert figures[key] > 0, key
    assert (figures["images"], figures["batch"], figures["device"]) == (4, 3, "cpu")
    assert figures["differing_captions"] == 0 and "placeholder" in figures["model"]  # 4 RGB photos: like for like
    assert (tmp_path / f"llava-tiny-v{bench.CHECKPOINT_VERSION}").is_dir()  # built once, then reused

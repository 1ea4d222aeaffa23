"""Tests for tasks.image: geometry (1:3 <= W/H <= 3:1, min side > 100 px) and the texture, blur, entropy rules."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from tasks.calibrate import fit_chain
from tasks.image import CHAIN, ImageConfig, filter_images, mark_duplicates, mark_nsfw
from tasks.paper import paper_removal

GEOMETRY = "image.geometry"


def _frame(sizes: list[tuple[int, int]], metrics: list[tuple[float, float, float]] | None = None) -> pd.DataFrame:
    metrics = metrics or [(40.0, 5000.0, 7.0)] * len(sizes)  # a well-textured, sharp photo unless a test says
    return pd.DataFrame({
        "key": [f"k{i}" for i in range(len(sizes))],
        "original_width": pd.Series([w for w, _ in sizes], dtype="int64"),
        "original_height": pd.Series([h for _, h in sizes], dtype="int64"),
        "gray_std": pd.Series([m[0] for m in metrics], dtype="float64"),
        "laplacian_var": pd.Series([m[1] for m in metrics], dtype="float64"),
        "gray_entropy": pd.Series([m[2] for m in metrics], dtype="float64"),
    })


@pytest.mark.parametrize("size, reason", [
    ((300, 100), GEOMETRY),  # ratio 3 is fine, but a side of 100 is not > 100
    ((450, 150), None),  # ratio exactly 3:1
    ((150, 450), None),  # ratio exactly 1:3
    ((303, 101), None),  # 3:1 with the smallest allowed side
    ((304, 101), GEOMETRY),  # just over 3:1
    ((101, 304), GEOMETRY),  # just over 1:3
    ((640, 100), GEOMETRY),
    ((101, 101), None),
    ((100, 100), GEOMETRY),
    ((100, 101), GEOMETRY),
    ((4000, 3000), None),
    ((0, 0), GEOMETRY),  # no size at all never passes
])
def test_geometry_boundaries(size, reason):
    out = filter_images(_frame([size]))
    got = out["drop_reason"].iloc[0]
    assert (None if pd.isna(got) else got) == reason


def test_thresholds_are_config():
    sizes = [(400, 100), (90, 90)]
    assert filter_images(_frame(sizes))["drop_reason"].tolist() == [GEOMETRY, GEOMETRY]
    out = filter_images(_frame(sizes), ImageConfig(max_aspect=4.0, min_side=50))
    assert out["drop_reason"].isna().all()


def test_rows_are_annotated_not_removed():
    frame = _frame([(500, 400), (50, 50), (640, 480)])
    out = filter_images(frame)
    assert out["key"].tolist() == frame["key"].tolist()
    assert out["drop_reason"].isna().tolist() == [True, False, True]
    assert "drop_reason" not in frame.columns  # the input frame is not modified


@pytest.mark.parametrize("metrics, reason", [
    ((2.0, 1000.0, 3.0), None),  # every threshold is a strict "<": the boundary passes
    ((1.99, 5000.0, 7.0), "image.low_texture"),
    ((40.0, 999.9, 7.0), "image.blur"),
    ((40.0, 5000.0, 2.99), "image.low_entropy"),
    ((0.0, 0.0, 0.0), "image.low_texture"),  # several rules fail: the first in the paper's order names it
    ((40.0, 10.0, 1.0), "image.blur"),
])
def test_quality_rules_and_their_order(metrics, reason):
    got = filter_images(_frame([(300, 200)], [metrics]))["drop_reason"].iloc[0]
    assert (None if pd.isna(got) else got) == reason


def test_geometry_comes_first():
    assert filter_images(_frame([(50, 50)], [(0.0, 0.0, 0.0)]))["drop_reason"].iloc[0] == GEOMETRY


def test_quality_thresholds_are_config():
    frame = _frame([(300, 200)], [(1.0, 500.0, 2.0)])
    cfg = ImageConfig(min_gray_std=0.5, min_laplacian_var=100.0, min_gray_entropy=1.0)
    assert filter_images(frame, cfg)["drop_reason"].isna().all()


def _diversify_frame(keys: list[str], reasons: list[str | None] | None = None) -> pd.DataFrame:
    return pd.DataFrame({"key": keys, "drop_reason": pd.Series(reasons or [None] * len(keys), dtype="str"),
                         "nsfw_unsafe": [False] * len(keys)})


def test_duplicates_keep_the_chosen_member_and_record_the_group():
    frame = _diversify_frame(["a", "b", "c", "d"])
    groups = pd.DataFrame({"key": ["a", "b", "c", "d"], "group_key": ["a", "a", "a", "d"],
                           "group_size": [3, 3, 3, 1], "keep": [False, True, False, True]})
    out = mark_duplicates(frame, groups)
    assert out["drop_reason"].isna().tolist() == [False, True, False, True]
    assert set(out.loc[[0, 2], "drop_reason"]) == {"image.duplicate"}
    assert out["group_key"].tolist() == ["a", "a", "a", "d"] and out["group_size"].tolist() == [3, 3, 3, 1]


def test_a_row_without_a_group_is_an_error_not_a_silent_keep():
    frame = _diversify_frame(["a", "b"])
    groups = pd.DataFrame({"key": ["a"], "group_key": ["a"], "group_size": [1], "keep": [True]})
    with pytest.raises(RuntimeError, match="no group for 1 row"):
        mark_duplicates(frame, groups)


def test_nsfw_drops_rows_whose_unsafe_probability_reaches_the_threshold_not_already_dropped():
    frame = _diversify_frame(["a", "b", "c", "d", "e"], [None, None, "image.duplicate", None, None])
    frame["nsfw_score"] = [0.8, 0.79, 0.99, np.nan, 0.3]
    frame["nsfw_unsafe"] = [False, True, True, False, True]  # the top label: what only `top_class` reads
    out = mark_nsfw(frame)  # default: probability >= 0.8
    assert out["drop_reason"].fillna("kept").tolist() == ["image.nsfw", "kept", "image.duplicate", "kept", "kept"]
    lower = mark_nsfw(frame, ImageConfig(nsfw_threshold=0.3))
    assert lower["drop_reason"].fillna("kept").tolist() == ["image.nsfw", "image.nsfw", "image.duplicate", "kept",
                                                             "image.nsfw"]  # a row without a score never fails
    top = mark_nsfw(frame, ImageConfig(nsfw_rule="top_class"))
    assert top["drop_reason"].fillna("kept").tolist() == ["kept", "image.nsfw", "image.duplicate", "kept",
                                                           "image.nsfw"]
    with pytest.raises(ValueError, match="image.nsfw_rule"):
        ImageConfig(nsfw_rule="top")


def test_calibration_fits_the_nsfw_cut_to_the_papers_removal_after_duplicates():
    rng = np.random.default_rng(0)
    n = 2000
    frame = _diversify_frame([f"k{i}" for i in range(n)], ["image.duplicate" if i % 5 == 0 else None for i in range(n)])
    frame["nsfw_score"] = rng.beta(0.3, 6, n)
    frame["nsfw_unsafe"] = False
    config, fits = fit_chain(frame, ImageConfig(), CHAIN)
    entered = int(frame["drop_reason"].isna().sum())
    assert [f.reason for f in fits] == ["image.duplicate", "image.nsfw"] and fits[1].step_in == entered
    assert fits[1].removed == round(paper_removal("image.nsfw") * entered)  # the paper's 4.0%, to the row
    out = mark_nsfw(frame, config)
    assert (out["drop_reason"] == "image.nsfw").sum() == fits[1].removed
    # by hand: the rows dropped are exactly the highest scores among the non-duplicates
    alive = frame[frame["drop_reason"].isna()]["nsfw_score"].sort_values(ascending=False)
    assert set(out.index[out["drop_reason"] == "image.nsfw"]) == set(alive.index[: fits[1].removed])

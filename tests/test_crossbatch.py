"""Tests for tasks.crossbatch: rows matching committed rows of earlier runs are dropped, with the match recorded."""

from __future__ import annotations

import pandas as pd

from tasks.crossbatch import mark_crossbatch


def test_matched_rows_are_dropped_and_say_what_they_repeat():
    frame = pd.DataFrame({"key": ["a", "b", "c"]})
    matches = pd.DataFrame({"key": ["b"], "match_key": ["x"], "match_run": ["run-1"], "match_distance": [0.03]})
    out = mark_crossbatch(frame, matches)
    assert out["drop_reason"].isna().tolist() == [True, False, True]
    assert out.loc[1, "drop_reason"] == "crossbatch.duplicate"
    assert out.loc[1, ["crossbatch_match_key", "crossbatch_match_run"]].tolist() == ["x", "run-1"]
    assert out.loc[1, "crossbatch_distance"] == 0.03 and out["crossbatch_distance"].isna().sum() == 2


def test_no_matches_keeps_everything():
    frame = pd.DataFrame({"key": ["a"]})
    empty = pd.DataFrame({"key": pd.Series([], dtype="str"), "match_key": pd.Series([], dtype="str"),
                          "match_run": pd.Series([], dtype="str"), "match_distance": pd.Series([], dtype="float64")})
    assert mark_crossbatch(frame, empty)["drop_reason"].isna().all()

"""Tests for tasks.calibrate: the threshold fit knows only each rule's score, direction and target."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from tasks.calibrate import Chain, ScoredRule, fit_chain, render_fits


@dataclass(frozen=True)
class Cfg:
    low: float = 0.5  # "a.low" fails score_a < low
    high: float = 0.9  # "c.high" fails score_c >= high


def _failures(frame: pd.DataFrame, cfg: Cfg) -> dict[str, pd.Series]:
    return {"a.low": frame["score_a"] < cfg.low, "b.flag": frame["flag"],
            "c.high": frame["listed"] | (frame["score_c"] >= cfg.high).fillna(False)}


CHAIN = Chain("x", _failures, (ScoredRule("a.low", "score_a", "below", "low", 0.10),
                               ScoredRule("c.high", "score_c", "at_or_above", "high", 0.05)))


def _frame(n: int = 10_000) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    return pd.DataFrame({"score_a": rng.random(n), "flag": rng.random(n) < 0.2, "listed": rng.random(n) < 0.01,
                         "score_c": np.where(rng.random(n) < 0.1, np.nan, rng.random(n))})


def test_each_scored_rule_removes_its_target_share_of_the_rows_that_reach_it():
    frame = _frame()
    fitted, fits = fit_chain(frame, Cfg(), CHAIN)
    by = {f.reason: f for f in fits}
    assert [f.reason for f in fits] == ["a.low", "b.flag", "c.high"]
    assert abs(by["a.low"].share - 0.10) < 1e-3 and abs(by["c.high"].share - 0.05) < 1e-3
    assert by["a.low"].step_in == len(frame)
    assert by["b.flag"].step_in == by["a.low"].step_in - by["a.low"].removed
    assert by["b.flag"].threshold is None and by["b.flag"].paper is None  # reported, not calibrated
    assert by["c.high"].threshold == fitted.high and fitted.low == by["a.low"].threshold
    # Replaying the chain under the fitted config gives the same removals.
    alive = pd.Series(True, index=frame.index)
    for reason, failed in _failures(frame, fitted).items():
        assert int((failed & alive).sum()) == by[reason].removed
        alive &= ~failed
    assert "a.low" in render_fits(fits)


def test_a_fixed_part_above_the_target_leaves_the_score_dropping_nothing():
    frame = _frame()
    frame["listed"] = True
    fitted, fits = fit_chain(frame, Cfg(), CHAIN)
    assert fits[2].share == 1.0 and not (frame["score_c"] >= fitted.high).any()


def test_a_rule_without_scores_is_reported_not_calibrated():
    frame = _frame()
    frame["score_c"] = np.nan
    fitted, fits = fit_chain(frame, Cfg(), CHAIN)
    assert fitted.high == Cfg().high and fits[2].threshold is None and "no scores" in fits[2].note

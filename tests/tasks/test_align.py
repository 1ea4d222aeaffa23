"""Tests for tasks.align: choosing the cosine band and marking the pairs outside it."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from tasks.align import PAPER_BAND, PAPER_MODEL, AlignConfig, Band, apply_band, choose_band

UNIFORM = np.random.default_rng(0).uniform(-0.2, 0.6, 10_000)


def test_paper_band_is_the_papers_l2_band_as_cosine():
    # For unit vectors L2^2 = 2 - 2 cos, so the paper's L2 band [1.06, 1.24] is this cosine band.
    low, high = PAPER_BAND
    assert low == pytest.approx(1 - 1.24**2 / 2, abs=5e-4)
    assert high == pytest.approx(1 - 1.06**2 / 2, abs=5e-4)


def test_explicit_band_is_used_as_is():
    band = choose_band(UNIFORM, AlignConfig(low=0.1, high=0.5), PAPER_MODEL, placeholder=False)
    assert band == Band(0.1, 0.5, False, 0)
    assert choose_band(UNIFORM, AlignConfig(low=0.1, high=0.5), "placeholder", placeholder=True).fitted is False


@pytest.mark.parametrize("name", [
    PAPER_MODEL, "/models/chinese-clip-vit-large-patch14/", "mirror/chinese-clip-vit-large-patch14"])
def test_the_papers_model_gets_the_papers_band(name):
    assert choose_band(UNIFORM, AlignConfig(), name, placeholder=False) == Band(*PAPER_BAND, False, 0)


def test_a_placeholder_never_gets_the_papers_band():
    band = choose_band(UNIFORM, AlignConfig(), PAPER_MODEL, placeholder=True)
    assert band.fitted and band.n == UNIFORM.size


def test_other_models_get_a_band_fitted_to_the_papers_removal():
    config = AlignConfig()
    band = choose_band(UNIFORM, config, "google/siglip2-base-patch16-256", placeholder=False)
    assert band.fitted and band.n == UNIFORM.size
    low_cut, high_cut = np.mean(UNIFORM < band.low), np.mean(UNIFORM > band.high)
    assert low_cut + high_cut == pytest.approx(0.136, abs=0.002)
    assert low_cut == pytest.approx(0.136 * 0.75, abs=0.002)
    assert high_cut == pytest.approx(0.136 * 0.25, abs=0.002)
    # independent check on the uniform law: quantiles of U(-0.2, 0.6)
    assert band.low == pytest.approx(-0.2 + 0.8 * 0.102, abs=0.01)
    assert band.high == pytest.approx(-0.2 + 0.8 * (1 - 0.034), abs=0.01)


def test_low_share_and_target_are_config():
    band = choose_band(UNIFORM, AlignConfig(target_removal=0.2, low_share=0.5), "other", placeholder=False)
    assert np.mean(UNIFORM < band.low) == pytest.approx(0.1, abs=0.002)
    assert np.mean(UNIFORM > band.high) == pytest.approx(0.1, abs=0.002)


def test_empty_scores_keep_everything():
    band = choose_band(np.array([]), AlignConfig(), "other", placeholder=True)
    assert (band.low, band.high, band.n) == (-1.0, 1.0, 0)
    out = apply_band(pd.DataFrame({"align_cosine": pd.Series([], dtype="float64")}), band)
    assert len(out) == 0 and "drop_reason" in out.columns


def test_apply_band_marks_out_of_band_rows_inclusively():
    frame = pd.DataFrame({"key": list("abcdef"), "align_cosine": [0.1, 0.231, 0.3, 0.438, 0.5, -0.9]})
    out = apply_band(frame, Band(*PAPER_BAND, False, 0))
    reasons = [None if pd.isna(r) else r for r in out["drop_reason"]]
    assert reasons == ["align.out_of_band", None, None, None, "align.out_of_band", "align.out_of_band"]
    assert out["key"].tolist() == list("abcdef")

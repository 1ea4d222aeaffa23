"""Stage align (stage 4): keep pairs whose image-text cosine lies inside a band."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from schemas.reasons import REASONS

STAGE = "align"
RULES = REASONS[STAGE]
PAPER_MODEL = "OFA-Sys/chinese-clip-vit-large-patch14"
PAPER_BAND = (0.231, 0.438)  # cosine = 1 - L2^2 / 2 for the paper's L2 band [1.06, 1.24]


@dataclass(frozen=True)
class AlignConfig:
    low: float | None = None  # cosine lower bound; None = the paper's band for its model, else fitted
    high: float | None = None  # cosine upper bound; as `low`
    target_removal: float = 0.136  # paper: the band removed 13.6% of this step's input
    low_share: float = 0.75  # share of that removal taken from the low end (unpublished; stated in the report)


@dataclass(frozen=True)
class Band:
    low: float
    high: float
    fitted: bool  # True: quantiles of this run's scores matched to the paper's removal rate
    n: int  # scores the band was fitted on (0 when not fitted)


def choose_band(scores: np.ndarray, config: AlignConfig, model_name: str, placeholder: bool) -> Band:
    """The configured band; else the paper's band for the paper's model; else fitted to the paper's rate.

    A fitted band only reproduces the paper's removal *rate*: for a placeholder model it judges nothing.
    """
    if config.low is not None and config.high is not None:
        return Band(config.low, config.high, False, 0)
    if not placeholder and model_name.rstrip("/").endswith(PAPER_MODEL.split("/")[1]):
        return Band(*PAPER_BAND, False, 0)
    scores = np.asarray(scores, dtype=np.float64)
    if scores.size == 0:
        return Band(-1.0, 1.0, True, 0)
    low_q = config.target_removal * config.low_share
    high_q = 1.0 - config.target_removal * (1.0 - config.low_share)
    low, high = np.quantile(scores, [low_q, high_q], method="linear")
    return Band(float(low), float(high), True, int(scores.size))


def apply_band(frame: pd.DataFrame, band: Band) -> pd.DataFrame:
    """Annotate rows whose `align_cosine` lies outside [low, high]."""
    out = frame.copy()
    s = out["align_cosine"]
    reason = pd.Series(pd.NA, index=out.index, dtype="str")
    reason[(s < band.low) | (s > band.high)] = f"{STAGE}.out_of_band"
    out["drop_reason"] = reason
    return out


SIMILARITY_BINS = 100  # the report's histogram of image-text similarity


def score_histogram(scores: np.ndarray, band: Band, bins: int = SIMILARITY_BINS) -> dict:
    """The report's histogram of the scores entering align, over a range that shows both edges of the band."""
    lo, hi = (float(scores.min()), float(scores.max())) if scores.size else (-1.0, 1.0)
    counts, edges = np.histogram(scores, bins=bins, range=(min(lo, band.low), max(hi, band.high)))
    return {"counts": counts.tolist(), "edges": edges.round(6).tolist()}

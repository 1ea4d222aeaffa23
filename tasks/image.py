"""Stage image (stage 3): image quality rules on the fetched images, each its own reason and threshold."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

STAGE = "image"
RULES = ("geometry", "low_texture", "blur", "low_entropy")  # duplicate, nsfw: diversification


@dataclass(frozen=True)
class ImageConfig:
    max_aspect: float = 3.0  # paper: 1:3 <= W/H <= 3:1
    min_side: int = 100  # paper: min(W, H) > 100 px
    min_gray_std: float = 2.0  # paper: greyscale pixel std sigma < 2 is low texture
    min_laplacian_var: float = 1000.0  # paper: Laplacian variance < 1000 is blur (at FetchConfig.metric_side)
    min_gray_entropy: float = 3.0  # paper: 256-bin greyscale histogram entropy < 3 bits


def filter_images(frame: pd.DataFrame, config: ImageConfig = ImageConfig()) -> pd.DataFrame:
    """Annotate rows whose image fails a quality rule; the first failing rule, in the paper's order, names it.

    Geometry is judged on the image as fetched; the other rules on the metrics the fetch stage measured
    (tasks.fetch.image_metrics) at one fixed resolution.
    """
    out = frame.copy()
    w = out["original_width"].astype("float64")
    h = out["original_height"].astype("float64")
    ratio = w / h
    skewed = (ratio > config.max_aspect) | (ratio < 1 / config.max_aspect)
    rules = [
        ("geometry", skewed | (np.minimum(w, h) <= config.min_side)),
        ("low_texture", out["gray_std"] < config.min_gray_std),
        ("blur", out["laplacian_var"] < config.min_laplacian_var),
        ("low_entropy", out["gray_entropy"] < config.min_gray_entropy),
    ]
    reason = pd.Series(pd.NA, index=out.index, dtype="str")
    for name, bad in reversed(rules):  # the earliest rule is written last, so it wins
        reason[bad.fillna(True).to_numpy(dtype=bool)] = f"{STAGE}.{name}"
    out["drop_reason"] = reason
    return out

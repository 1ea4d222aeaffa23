"""Stage image (stage 3): image quality rules on the fetched images (geometry so far)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

STAGE = "image"
RULES = ("geometry",)  # low_texture, blur, low_entropy: the fetcher issue; duplicate, nsfw: diversification


@dataclass(frozen=True)
class ImageConfig:
    max_aspect: float = 3.0  # paper: 1:3 <= W/H <= 3:1
    min_side: int = 100  # paper: min(W, H) > 100 px


def filter_images(frame: pd.DataFrame, config: ImageConfig = ImageConfig()) -> pd.DataFrame:
    """Annotate rows whose image fails a quality rule; measured on the image as fetched."""
    out = frame.copy()
    w = out["original_width"].astype("float64")
    h = out["original_height"].astype("float64")
    ratio = w / h
    bad = (ratio > config.max_aspect) | (ratio < 1 / config.max_aspect) | (np.minimum(w, h) <= config.min_side)
    reason = pd.Series(pd.NA, index=out.index, dtype="str")
    reason[bad] = f"{STAGE}.geometry"
    out["drop_reason"] = reason
    return out

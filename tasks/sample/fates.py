"""The expected fates of the variants' pairs after the quality rules: in-batch dedup, the alignment band and
cross-batch dedup, as an offline run (placeholder model, default configs) decides them."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import pandas as pd

from tasks.align import AlignConfig, Band, apply_band, choose_band
from tasks.embed import embed_pairs
from tasks.fetch import decode_image, sniff_mime
from tasks.models.placeholder import PLACEHOLDER, PlaceholderModel

_DEDUP_RADIUS = 0.1  # SPEC: a cosine distance under 0.1 links two images (stage 3's dedup, and cross-batch)


@dataclass(frozen=True)
class Fates:
    expected: list[str]  # per row: "kept" or the reason an offline run drops it for
    vectors: np.ndarray  # the placeholder's vector of each stored image
    scores: np.ndarray  # image-text cosine: what align judges
    entered: np.ndarray  # bool per row: reached align (not an in-batch duplicate)
    band: Band  # fitted on the rows that reached align

    @property
    def band_margin(self) -> float:
        """How close the row nearest an edge of the band lies to it."""
        s = self.scores[self.entered]
        return float(np.minimum(np.abs(s - self.band.low), np.abs(s - self.band.high)).min(initial=np.inf))


def predict_fates(bodies: list[bytes], captions: list[str], committed: np.ndarray | None = None) -> Fates:
    """What an offline run (placeholder model, default configs) does after the quality rules to pairs, in run order,
    that every earlier rule keeps: in-batch dedup, the alignment band, then cross-batch dedup against `committed`
    (the vectors of the rows earlier runs kept).

    In-batch groups must be pairs, whose earlier row is kept (its two members lie equally far from their mean).
    """
    stored = [decode_image(body, sniff_mime(body)).jpeg for body in bodies]
    frame = pd.DataFrame({"key": [f"{i:020x}" for i in range(len(bodies))], "caption": captions, "image": stored,
                          "sha256": [hashlib.sha256(b).hexdigest() for b in bodies]})
    model = PlaceholderModel()
    scored, vec = embed_pairs(frame, model, model)
    vectors = np.stack(vec["vector"].tolist()).astype(np.float64)
    expected = ["kept"] * len(bodies)
    sims = vectors @ vectors.T
    for j in range(len(bodies)):
        linked = np.flatnonzero(sims[j, :j] > 1 - _DEDUP_RADIUS)
        if linked.size > 1 or (linked.size and expected[linked[0]] != "kept"):
            raise ValueError(f"row {j} joins an in-batch duplicate group larger than a pair")
        if linked.size:
            expected[j] = "image.duplicate"
    entered = np.array([e == "kept" for e in expected], dtype=bool)
    scores = scored["align_cosine"].to_numpy()
    band = choose_band(scores[entered], AlignConfig(), PLACEHOLDER, placeholder=True)
    banded = apply_band(scored[entered], band)["drop_reason"]
    for i, reason in zip(np.flatnonzero(entered), banded, strict=True):
        if not pd.isna(reason):
            expected[i] = reason
    if committed is not None and len(committed):
        near = (vectors @ np.asarray(committed, np.float64).T).max(axis=1) > 1 - _DEDUP_RADIUS
        expected = ["crossbatch.duplicate" if e == "kept" and hit else e for e, hit in zip(expected, near, strict=True)]
    return Fates(expected, vectors, scores, entered, band)

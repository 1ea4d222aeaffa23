"""Stage image (stage 3): image quality rules on the fetched images, each its own reason and threshold."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from schemas.reasons import REASONS
from tasks.calibrate import Chain, ScoredRule
from tasks.models.classify import NSFW_IMAGE_LABELS
from tasks.paper import paper_removal

STAGE = "image"
NSFW_RULES = ("threshold", "top_class")
# the quality rules (filter_images), then the embed step's failures and the diversification rules
RULES = REASONS[STAGE]


@dataclass(frozen=True)
class ImageConfig:
    max_aspect: float = 3.0  # paper: 1:3 <= W/H <= 3:1
    min_side: int = 100  # paper: min(W, H) > 100 px
    min_gray_std: float = 2.0  # paper: greyscale pixel std sigma < 2 is low texture
    min_laplacian_var: float = 1000.0  # paper: Laplacian variance < 1000 is blur (at FetchConfig.metric_side)
    min_gray_entropy: float = 3.0  # paper: 256-bin greyscale histogram entropy < 3 bits
    # image safety (the nsfw_image model role; open_nsfw by default): the labels that count as unsafe
    # (case-insensitive), e.g. [high] for the paper's Freepik/nsfw_image_detector
    nsfw_labels: tuple[str, ...] = NSFW_IMAGE_LABELS
    # drop when the probability on the unsafe labels is at least this (above 1: never); 0.8 is open_nsfw's "highly
    # likely NSFW" cut; the paper's is unpublished: `danqing calibrate` fits it to the paper's 4.0% removal
    nsfw_threshold: float = 0.8
    nsfw_rule: str = "threshold"  # "threshold": the rule above; "top_class": drop when the top label is unsafe

    def __post_init__(self) -> None:
        if self.nsfw_rule not in NSFW_RULES:
            raise ValueError(f"image.nsfw_rule must be one of {list(NSFW_RULES)}, got {self.nsfw_rule!r}")


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


def mark_duplicates(frame: pd.DataFrame, groups: pd.DataFrame) -> pd.DataFrame:
    """Stage 3 redundancy on one shard: `groups` (the run's dedup reduce, rows of this shard) gives each row its
    group and whether it is the member kept; the others are `image.duplicate`. Rows already dropped keep their
    reason; every row still undecided must have a group (a missing one is a broken reduce, never a silent keep)."""
    out = frame.copy()
    g = groups.set_index("key")
    undecided = out["drop_reason"].isna().to_numpy()
    missing = ~out.loc[undecided, "key"].isin(g.index)
    if missing.any():
        raise RuntimeError(f"dedup reduce has no group for {int(missing.sum())} row(s), e.g. "
                           f"{out.loc[undecided, 'key'][missing].iloc[0]}")
    out["group_key"] = out["key"].map(g["group_key"]).fillna(out["key"]).astype("str")  # dropped rows: their own
    out["group_size"] = out["key"].map(g["group_size"]).fillna(1).astype("int64")
    keep = out["key"].map(g["keep"]).fillna(True).astype(bool)
    out.loc[undecided & ~keep.to_numpy(), "drop_reason"] = f"{STAGE}.duplicate"
    return out


def nsfw_failures(frame: pd.DataFrame, config: ImageConfig) -> pd.Series:
    """Rows the image-safety rule fails, from the embed step's scores: `nsfw_score` (the probability on the unsafe
    labels) at least `nsfw_threshold`, or under `nsfw_rule: top_class` the top label unsafe (`nsfw_unsafe`). A row
    without a score (NaN) never fails."""
    if config.nsfw_rule == "top_class":
        return frame["nsfw_unsafe"].fillna(False).astype(bool)
    return (pd.to_numeric(frame["nsfw_score"], errors="coerce") >= config.nsfw_threshold).fillna(False)


def mark_nsfw(frame: pd.DataFrame, config: ImageConfig = ImageConfig()) -> pd.DataFrame:
    """Stage 3 image safety: rows `nsfw_failures` names are `image.nsfw`, unless already dropped."""
    out = frame.copy()
    unsafe = nsfw_failures(out, config).to_numpy(dtype=bool)
    out.loc[out["drop_reason"].isna().to_numpy() & unsafe, "drop_reason"] = f"{STAGE}.nsfw"
    return out


def diversify_failures(frame: pd.DataFrame, config: ImageConfig) -> dict[str, pd.Series]:
    """The rules of the diversify step in order, on the rows that entered it (kept and rejected): the dedup
    reduce's verdict as stored, then image safety under `config` (what `danqing calibrate` refits)."""
    return {f"{STAGE}.duplicate": frame["drop_reason"].eq(f"{STAGE}.duplicate").fillna(False),
            f"{STAGE}.nsfw": nsfw_failures(frame, config)}


CHAIN = Chain(STAGE, diversify_failures, (
    ScoredRule(f"{STAGE}.nsfw", "nsfw_score", "at_or_above", "nsfw_threshold", paper_removal(f"{STAGE}.nsfw")),
), paper_removal)

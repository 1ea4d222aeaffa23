"""Embedding step (part of stage image): image vectors for dedup and the image-text cosine for align."""

from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pandas as pd
from PIL import Image


@dataclass(frozen=True)
class EmbedConfig:
    batch_size: int = 64  # images decoded and embedded at a time: bounds memory per worker


def _images(blobs) -> list[Image.Image]:
    out = []
    for b in blobs:
        with Image.open(io.BytesIO(b)) as im:
            out.append(im.convert("RGB"))
    return out


def embed_pairs(frame: pd.DataFrame, embed_model, align_model, config: EmbedConfig = EmbedConfig(),
                image_of: Callable[[str], bytes] | None = None):
    """(scored frame with `align_cosine`, vectors frame key/vector/sha256) for one shard.

    Image bytes come from the frame's `image` column, or from `image_of(key)` one batch at a time (so a
    shard's images need not all be in memory). When both roles use the same model the image vectors are
    computed once.
    """
    n = len(frame)
    vectors: list[np.ndarray] = []
    cosines = np.zeros(n, dtype=np.float64)
    captions = frame["caption"].tolist()
    keys = frame["key"].tolist()
    blobs = frame["image"].tolist() if image_of is None else None
    for start in range(0, n, config.batch_size):
        stop = min(start + config.batch_size, n)
        images = _images(blobs[start:stop] if blobs is not None else [image_of(k) for k in keys[start:stop]])
        img = embed_model.embed_images(images)
        vectors.extend(np.asarray(img, dtype=np.float32))
        a_img = img if align_model is embed_model else align_model.embed_images(images)
        txt = align_model.embed_texts(captions[start:stop])
        cosines[start:stop] = np.clip(np.sum(np.asarray(a_img, np.float64) * np.asarray(txt, np.float64), axis=1),
                                      -1.0, 1.0)
    scored = frame.copy()
    scored["align_cosine"] = cosines
    scored["drop_reason"] = pd.Series(pd.NA, index=scored.index, dtype="str")
    vec = pd.DataFrame(
        {"key": frame["key"].to_numpy(), "vector": pd.Series(vectors, dtype="object"),
         "sha256": frame["sha256"].to_numpy()}
    ).astype({"key": "str", "sha256": "str"})
    if "snapshot" in frame:  # provenance travels with the vector into LanceDB
        vec["snapshot"] = frame["snapshot"].astype("str").to_numpy()
    return scored, vec

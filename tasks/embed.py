"""Embedding step (part of stage image): image vectors for dedup, the image-text cosine for align, NSFW scores."""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
from PIL import Image

from tasks.models.embedding import to_rgb

EMBED_ERROR = "image.embed_error"  # undecodable, refused by a model's preprocessing, or a zero/NaN/inf result
UNIT_TOLERANCE = 1e-3  # |norm - 1| beyond this is not a unit vector (schemas' EmbeddingSchema uses the same)


@dataclass(frozen=True)
class EmbedConfig:
    batch_size: int = 64  # images decoded and embedded at a time: bounds memory per worker


def embed_pairs(frame: pd.DataFrame, embed_model, align_model, config: EmbedConfig = EmbedConfig(),
                image_of: Callable[[str], bytes] | None = None, nsfw_model=None,
                nsfw_labels: Sequence[str] = ()) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(scored frame, vectors frame) for one shard.

    ``scored`` is ``frame`` plus ``align_cosine`` (the align model's image-text cosine), ``caption_truncated``
    (the caption is longer than the align model's text context, so only its start was embedded),
    ``nsfw_score`` (the classifier's probability on ``nsfw_labels``; NaN without ``nsfw_model``), ``nsfw_unsafe``
    (its top label is one of them; False without it) and ``drop_reason``: ``EMBED_ERROR`` for a row
    whose image could not be decoded, preprocessed or embedded, or whose vector or cosine is degenerate, else NA.
    ``vectors`` holds key, vector (float32, unit norm), sha256 (and snapshot when the frame has it) for the rows
    without a drop reason only.

    Image bytes come from the frame's ``image`` column, or from ``image_of(key)`` one batch at a time (so a
    shard's images need not all be in memory). Each batch is decoded once for every model. When both roles use
    the same model the image vectors are computed once. A batch a model refuses is retried row by row, so one
    bad image costs only its own row; if every row of a batch of two or more fails alone too, the model is
    broken, not the images, and the error is raised.
    """
    if nsfw_model is not None:
        nsfw_model.label_ids(nsfw_labels)  # a label list naming none of the model's classes fails before any work
    n = len(frame)
    captions = frame["caption"].tolist()
    keys = frame["key"].tolist()
    blobs = frame["image"].tolist() if image_of is None else None
    vectors = np.full((n, embed_model.dim), np.nan, dtype=np.float32)
    cosines = np.full(n, np.nan)
    nsfw = np.full((n, 2), np.nan)  # score, top label unsafe (0/1)
    kept = np.zeros(n, dtype=bool)
    for start in range(0, n, config.batch_size):
        rows = slice(start, min(start + config.batch_size, n))
        images = [_decode(b) for b in (blobs[rows] if blobs is not None else [image_of(k) for k in keys[rows]])]
        ok = np.array([image is not None for image in images], dtype=bool)
        img, ok = _per_image(embed_model.embed_images, images, ok, embed_model.dim)
        ok &= _unit(img)
        if align_model is embed_model:
            a_img = img
        else:
            a_img, ok = _per_image(align_model.embed_images, images, ok, align_model.dim)
            ok &= _unit(a_img)
        if nsfw_model is not None:
            scores, ok = _per_image(lambda ims: np.column_stack(nsfw_model.unsafe(ims, nsfw_labels)), images, ok, 2)
            nsfw[rows] = scores
        cos = np.full(len(images), np.nan)
        if ok.any():
            txt = align_model.embed_texts([c for c, keep in zip(captions[rows], ok, strict=True) if keep])
            cos[ok] = np.sum(np.asarray(a_img[ok], np.float64) * np.asarray(txt, np.float64), axis=1)
        ok &= np.isfinite(cos)  # a NaN text vector
        kept[rows] = ok
        vectors[rows] = np.where(ok[:, None], img, np.nan)
        cosines[rows] = np.where(ok, np.clip(cos, -1.0, 1.0), np.nan)
    scored = frame.copy()
    scored["align_cosine"] = cosines
    scored["caption_truncated"] = np.asarray(align_model.text_truncated(captions), dtype=bool).reshape(n)
    scored["nsfw_score"] = np.where(kept, nsfw[:, 0], np.nan)
    scored["nsfw_unsafe"] = kept & (nsfw[:, 1] == 1.0)
    scored["drop_reason"] = pd.Series([None if k else EMBED_ERROR for k in kept], index=scored.index, dtype="str")
    vec = pd.DataFrame(
        {"key": frame["key"].to_numpy()[kept], "vector": pd.Series(list(vectors[kept]), dtype="object"),
         "sha256": frame["sha256"].to_numpy()[kept]}
    ).astype({"key": "str", "sha256": "str"})
    if "snapshot" in frame:  # provenance travels with the vector into LanceDB
        vec["snapshot"] = frame["snapshot"].astype("str").to_numpy()[kept]
    return scored, vec


def _decode(blob: bytes) -> Image.Image | None:
    """The image in RGB (transparency on white, as the models see it), or None when it cannot be decoded."""
    try:
        with Image.open(io.BytesIO(blob)) as image:
            image.load()  # decode now: a truncated file fails here, not inside a model
            return to_rgb(image)
    except Exception:  # PIL raises OSError, ValueError, SyntaxError, DecompressionBombError...: all a bad record
        return None


def _per_image(fn: Callable[[list], np.ndarray], images: list, ok: np.ndarray,
               width: int) -> tuple[np.ndarray, np.ndarray]:
    """``fn`` on the ``ok`` images at once, as ``(len(images), width)`` rows (NaN where not computed), and the
    rows still ok. When the batch fails, each image is tried alone so one bad image costs only its own row."""
    out = np.full((len(images), width), np.nan, dtype=np.float32)
    index = np.flatnonzero(ok)
    if not len(index):
        return out, ok
    try:
        out[index] = fn([images[i] for i in index])
        return out, ok
    except Exception as batch_error:  # which image, if any, is at fault is found below
        ok = ok.copy()
        for i in index:
            try:
                out[i] = fn([images[i]])[0]
            except Exception:  # this image is the bad record
                ok[i] = False
        if len(index) > 1 and not ok[index].any():
            raise batch_error
        return out, ok


def _unit(vectors: np.ndarray) -> np.ndarray:
    """Rows that are finite unit vectors (a zero, NaN or inf output is a failed row, never propagated)."""
    with np.errstate(invalid="ignore"):
        return np.isfinite(vectors).all(axis=1) & (np.abs(np.linalg.norm(vectors, axis=1) - 1.0) < UNIT_TOLERANCE)


def stack_vectors(files: list[tuple[str, str]], keys: set[str] | None = None) -> tuple[list, list, np.ndarray]:
    """(keys, shard ids, float32 matrix) of the vectors files `(shard, path)` in order, optionally only `keys`:
    the embed step's vectors of a whole run (or of its survivors) for dedup and the cross-batch search."""
    import pyarrow.parquet as pq

    all_keys, all_shards, parts = [], [], []
    for shard, path in files:
        t = pq.read_table(path, columns=["key", "vector"])
        k = t.column("key").to_pylist()
        if not k:
            continue
        v = t.column("vector").combine_chunks().values.to_numpy(zero_copy_only=False).reshape(len(k), -1)
        if keys is not None:
            mask = np.fromiter((x in keys for x in k), bool, len(k))
            k, v = [x for x, keep in zip(k, mask, strict=True) if keep], v[mask]
        all_keys += k
        all_shards += [shard] * len(k)
        parts.append(np.asarray(v, np.float32))
    dim = parts[0].shape[1] if parts else 0
    return all_keys, all_shards, np.concatenate(parts) if parts else np.zeros((0, dim), np.float32)

"""Tests for tasks.embed with the built-in placeholder model: vectors, cosines, and work done once."""

from __future__ import annotations

import hashlib
import io

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from tasks.embed import EmbedConfig, embed_pairs
from tasks.models import PlaceholderModel


def _jpeg(seed: int, size=(64, 48)) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _frame(n: int) -> pd.DataFrame:
    images = [_jpeg(i) for i in range(n)]
    return pd.DataFrame({
        "key": [f"{i:020x}" for i in range(n)],
        "caption": [f"第{i}张图片 的说明 文字" for i in range(n)],
        "image": pd.Series(images, dtype="object"),
        "sha256": [hashlib.sha256(b).hexdigest() for b in images],
    })


class Counting:
    """Wraps a model and counts what it is asked to embed."""

    def __init__(self, model):
        self.model = model
        self.image_calls = 0
        self.images = 0
        self.text_calls = 0

    def embed_images(self, images):
        self.image_calls += 1
        self.images += len(images)
        return self.model.embed_images(images)

    def embed_texts(self, texts):
        self.text_calls += 1
        return self.model.embed_texts(texts)


def test_vectors_are_unit_norm_and_cosines_bounded():
    frame = _frame(5)
    scored, vectors = embed_pairs(frame, PlaceholderModel(), PlaceholderModel())
    assert vectors["key"].tolist() == frame["key"].tolist()
    assert vectors["sha256"].tolist() == frame["sha256"].tolist()
    mat = np.stack(vectors["vector"].to_list())
    assert mat.dtype == np.float32 and mat.shape == (5, PlaceholderModel().dim)
    assert np.allclose(np.linalg.norm(mat, axis=1), 1.0, atol=1e-5)
    assert scored["align_cosine"].dtype == "float64"
    assert scored["align_cosine"].between(-1.0, 1.0).all()
    assert scored["drop_reason"].isna().all()
    assert scored["key"].tolist() == frame["key"].tolist()


@pytest.mark.parametrize("batch_size", [1, 2, 64])
def test_batches_give_the_same_row_by_row_results(batch_size):
    """Each row's cosine is its own image against its own caption, whatever the batching."""
    frame = _frame(5)
    model = PlaceholderModel()
    scored, vectors = embed_pairs(frame, model, model, EmbedConfig(batch_size=batch_size))
    for i, (blob, caption) in enumerate(zip(frame["image"], frame["caption"], strict=True)):
        with Image.open(io.BytesIO(blob)) as im:
            img = model.embed_images([im.convert("RGB")])[0]
        txt = model.embed_texts([caption])[0]
        assert scored["align_cosine"].iloc[i] == pytest.approx(float(np.dot(img, txt)), abs=1e-6)
        assert np.allclose(vectors["vector"].iloc[i], img, atol=1e-6)


def test_one_model_for_both_roles_embeds_each_image_once():
    frame = _frame(5)
    model = Counting(PlaceholderModel())
    embed_pairs(frame, model, model, EmbedConfig(batch_size=2))
    assert (model.images, model.image_calls, model.text_calls) == (5, 3, 3)


def test_two_models_each_embed_the_images():
    frame = _frame(5)
    embed, align = Counting(PlaceholderModel()), Counting(PlaceholderModel())
    scored, _ = embed_pairs(frame, embed, align, EmbedConfig(batch_size=2))
    assert (embed.images, embed.text_calls) == (5, 0)
    assert (align.images, align.text_calls) == (5, 3)
    same, _ = embed_pairs(frame, PlaceholderModel(), PlaceholderModel())
    assert np.allclose(scored["align_cosine"], same["align_cosine"])  # a deterministic model agrees with itself


def test_empty_shard():
    frame = _frame(0)
    scored, vectors = embed_pairs(frame, PlaceholderModel(), PlaceholderModel())
    assert len(scored) == 0 and len(vectors) == 0
    assert {"key", "vector", "sha256"} <= set(vectors.columns)

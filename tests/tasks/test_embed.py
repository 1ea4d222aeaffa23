"""Tests for tasks.embed: vectors, cosines and work done once (placeholder model); bad images and degenerate
vectors as row-level reasons (fakes); truncation, NSFW scores and both roles with tiny random-weight checkpoints."""

from __future__ import annotations

import hashlib
import io

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from tiny_models import build_tiny_chinese_clip, build_tiny_image_classifier, build_tiny_siglip2

from tasks.embed import EMBED_ERROR, EmbedConfig, embed_pairs
from tasks.models import NSFW_IMAGE_LABELS, PlaceholderModel, load_image_classifier, load_model, resolve_model


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

    def text_truncated(self, texts):
        return self.model.text_truncated(texts)

    @property
    def dim(self):
        return self.model.dim


class Faulty(Counting):
    """Refuses (raises on) some images and returns a degenerate vector for others, chosen by image width."""

    def __init__(self, model, refuse=(), zero=(), nan=(), inf=()):
        super().__init__(model)
        self.refuse, self.zero, self.nan, self.inf = refuse, zero, nan, inf

    def embed_images(self, images):
        if any(im.width in self.refuse for im in images):
            self.image_calls += 1
            raise ValueError("the processor cannot handle this image")
        out = super().embed_images(images).copy()
        for i, im in enumerate(images):
            for widths, value in ((self.zero, 0.0), (self.nan, np.nan), (self.inf, np.inf)):
                if im.width in widths:
                    out[i] = value
        return out


def _widths(frame: pd.DataFrame, widths: list[int]) -> pd.DataFrame:
    """``frame`` with row i's image replaced by a distinct image ``widths[i]`` pixels wide."""
    frame = frame.copy()
    images = [_jpeg(100 + i, size=(w, 40)) for i, w in enumerate(widths)]
    frame["image"] = pd.Series(images, dtype="object")
    frame["sha256"] = [hashlib.sha256(b).hexdigest() for b in images]
    return frame


def _reasons(scored: pd.DataFrame) -> list:
    return [None if pd.isna(r) else r for r in scored["drop_reason"]]


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
    # No classifier asked: the NSFW columns are present, NaN and False; the placeholder never truncates.
    assert scored["nsfw_score"].dtype == "float64" and scored["nsfw_score"].isna().all()
    assert scored["nsfw_unsafe"].dtype == bool and not scored["nsfw_unsafe"].any()
    assert scored["caption_truncated"].dtype == bool and not scored["caption_truncated"].any()


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
    assert {"align_cosine", "caption_truncated", "nsfw_score", "nsfw_unsafe", "drop_reason"} <= set(scored.columns)


# --- bad images and degenerate vectors --------------------------------------------------------------------------


def test_an_undecodable_image_costs_only_its_own_row():
    frame = _frame(5)
    truncated = frame["image"].iloc[3][: len(frame["image"].iloc[3]) // 2]  # a header that opens, then ends
    frame["image"] = pd.Series([*frame["image"].iloc[:1], b"not an image", *frame["image"].iloc[2:3], truncated,
                                *frame["image"].iloc[4:]], dtype="object")
    model = Counting(PlaceholderModel())
    scored, vectors = embed_pairs(frame, model, model)
    assert _reasons(scored) == [None, EMBED_ERROR, None, EMBED_ERROR, None]
    assert vectors["key"].tolist() == frame["key"].iloc[[0, 2, 4]].tolist()
    assert scored["align_cosine"].iloc[[1, 3]].isna().all() and scored["align_cosine"].iloc[[0, 2, 4]].notna().all()
    assert model.images == 3  # the undecodable ones never reach the model
    clean, _ = embed_pairs(_frame(5), PlaceholderModel(), PlaceholderModel())
    assert np.allclose(scored["align_cosine"].iloc[[0, 2, 4]], clean["align_cosine"].iloc[[0, 2, 4]])


def test_an_image_the_model_refuses_is_found_row_by_row():
    frame = _widths(_frame(5), [60, 61, 62, 63, 64])
    model = Faulty(PlaceholderModel(), refuse={62})
    scored, vectors = embed_pairs(frame, model, model, EmbedConfig(batch_size=4))
    assert _reasons(scored) == [None, None, EMBED_ERROR, None, None]
    assert vectors["key"].tolist() == frame["key"].iloc[[0, 1, 3, 4]].tolist()
    # Batch 1: the batch, then its 4 rows alone; batch 2: the last row.
    assert (model.image_calls, model.text_calls) == (6, 2)


def test_a_model_that_refuses_every_image_of_a_batch_is_broken_and_raises():
    frame = _widths(_frame(3), [60, 61, 62])
    with pytest.raises(ValueError, match="cannot handle"):
        embed_pairs(frame, Faulty(PlaceholderModel(), refuse={60, 61, 62}), PlaceholderModel())
    # One row alone is not evidence against the model: it is the row's reason.
    scored, _ = embed_pairs(frame.iloc[:1], Faulty(PlaceholderModel(), refuse={60}), PlaceholderModel())
    assert _reasons(scored) == [EMBED_ERROR]


@pytest.mark.parametrize("role", ["embed", "align"])
def test_zero_nan_and_inf_vectors_are_reasons_and_never_stored(role):
    frame = _widths(_frame(5), [60, 61, 62, 63, 64])
    faulty = Faulty(PlaceholderModel(), zero={61}, nan={62}, inf={63})
    embed, align = (faulty, PlaceholderModel()) if role == "embed" else (PlaceholderModel(), faulty)
    scored, vectors = embed_pairs(frame, embed, align)
    assert _reasons(scored) == [None, EMBED_ERROR, EMBED_ERROR, EMBED_ERROR, None]
    assert vectors["key"].tolist() == frame["key"].iloc[[0, 4]].tolist()
    assert np.isfinite(np.stack(vectors["vector"].to_list())).all()


def test_a_nan_text_vector_is_a_reason():
    class NanText(Counting):
        def embed_texts(self, texts):
            out = super().embed_texts(texts).copy()
            out[[i for i, t in enumerate(texts) if t.startswith("第1张")]] = np.nan
            return out

    model = NanText(PlaceholderModel())
    scored, vectors = embed_pairs(_frame(3), model, model)
    assert _reasons(scored) == [None, EMBED_ERROR, None]
    assert len(vectors) == 2 and scored["align_cosine"].iloc[[0, 2]].notna().all()


def test_vectors_keep_the_snapshot_of_kept_rows_only():
    frame = _frame(3).assign(snapshot=["CC-MAIN-2024-10", "CC-MAIN-2024-18", "CC-MAIN-2024-22"])
    frame["image"] = pd.Series([frame["image"].iloc[0], b"", frame["image"].iloc[2]], dtype="object")
    _, vectors = embed_pairs(frame, PlaceholderModel(), PlaceholderModel())
    assert vectors["snapshot"].tolist() == ["CC-MAIN-2024-10", "CC-MAIN-2024-22"]


# --- tiny random-weight checkpoints (they exercise the code, they judge nothing) ---------------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, str]:
    builders = {
        "chinese_clip": build_tiny_chinese_clip,
        "siglip2": build_tiny_siglip2,
        "nsfw": lambda root: build_tiny_image_classifier(root, bias={"nsfw": 5.0}),
        "normal": lambda root: build_tiny_image_classifier(root, labels=("drawings", "neutral", "porn"),
                                                           bias={"neutral": 5.0}),
    }
    return {name: str(build(tmp_path_factory.mktemp(name))) for name, build in builders.items()}


def _tiny_model(tiny, kind: str):
    return load_model(resolve_model("embed", tiny[kind]), device="cpu", batch_size=2)


@pytest.mark.parametrize("kind", ["chinese_clip", "siglip2"])
def test_one_tiny_checkpoint_serves_both_roles(tiny, kind):
    model = _tiny_model(tiny, kind)
    frame = _frame(5)
    scored, vectors = embed_pairs(frame, model, model, EmbedConfig(batch_size=3))
    assert scored["drop_reason"].isna().all() and scored["align_cosine"].between(-1.0, 1.0).all()
    mat = np.stack(vectors["vector"].to_list())
    assert mat.shape == (5, model.dim) and mat.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(mat, axis=1), 1.0, atol=1e-5)
    with Image.open(io.BytesIO(frame["image"].iloc[4])) as image:
        image.load()
        np.testing.assert_allclose(mat[4], model.embed_images([image])[0], atol=1e-5)
    text = model.embed_texts([frame["caption"].iloc[4]])[0]
    assert scored["align_cosine"].iloc[4] == pytest.approx(float(np.dot(mat[4], text)), abs=1e-5)


@pytest.mark.parametrize(("embed_kind", "align_kind"), [("siglip2", "chinese_clip"), ("chinese_clip", "siglip2")])
def test_different_tiny_checkpoints_for_embed_and_align(tiny, embed_kind, align_kind):
    embed, align = _tiny_model(tiny, embed_kind), _tiny_model(tiny, align_kind)
    scored, vectors = embed_pairs(_frame(3), embed, align)
    assert scored["drop_reason"].isna().all() and scored["align_cosine"].notna().all()
    assert len(vectors["vector"].iloc[0]) == embed.dim
    alone, _ = embed_pairs(_frame(3), align, align)
    np.testing.assert_allclose(scored["align_cosine"], alone["align_cosine"], atol=1e-5)


def test_captions_longer_than_the_text_context_are_recorded_as_truncated(tiny):
    model = _tiny_model(tiny, "chinese_clip")  # Chinese-CLIP's context: 52 tokens, one per character here
    frame = _frame(3)
    frame["caption"] = ["猫" * 10, "猫" * 50, "猫" * 51]  # with [CLS] and [SEP]: 12, 52, 53 tokens
    scored, _ = embed_pairs(frame, model, model)
    assert scored["caption_truncated"].tolist() == [False, False, True]
    assert scored["drop_reason"].isna().all()


def test_the_image_classifier_scores_the_same_decoded_images(tiny):
    frame = _frame(5)
    fetched = []

    def image_of(key):
        fetched.append(key)
        return frame.set_index("key").loc[key, "image"]

    embed, align = PlaceholderModel(), _tiny_model(tiny, "siglip2")
    classifier = load_image_classifier(resolve_model("nsfw_image", tiny["nsfw"]), device="cpu")
    scored, _ = embed_pairs(frame.drop(columns=["image"]), embed, align, EmbedConfig(batch_size=2), image_of=image_of,
                            nsfw_model=classifier, nsfw_labels=NSFW_IMAGE_LABELS)
    assert fetched == frame["key"].tolist()  # each image read (and decoded) once for three models
    assert scored["nsfw_score"].dtype == "float64" and scored["nsfw_score"].between(0.5, 1.0).all()
    assert scored["nsfw_unsafe"].all() and scored["drop_reason"].isna().all()

    safe = load_image_classifier(resolve_model("nsfw_image", tiny["normal"]), device="cpu")
    frame["image"] = pd.Series([*frame["image"].iloc[:4], b"broken"], dtype="object")
    scored, _ = embed_pairs(frame, embed, embed, nsfw_model=safe, nsfw_labels=("porn", "hentai"))
    assert not scored["nsfw_unsafe"].any() and scored["nsfw_score"].iloc[:4].between(0.0, 0.5).all()
    assert np.isnan(scored["nsfw_score"].iloc[4]) and _reasons(scored)[4] == EMBED_ERROR


def test_nsfw_labels_naming_none_of_the_classes_fail_before_any_work(tiny):
    classifier = load_image_classifier(resolve_model("nsfw_image", tiny["nsfw"]), device="cpu")
    with pytest.raises(ValueError, match="image.nsfw_labels"):
        embed_pairs(_frame(0), PlaceholderModel(), PlaceholderModel(), nsfw_model=classifier, nsfw_labels=("porn",))

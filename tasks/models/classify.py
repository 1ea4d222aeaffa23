"""The optional text-safety classifier: a transformers sequence-classification model, loaded once per process."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from tasks.models.load import _LOCK, _default_device, _location
from tasks.models.resolve import ModelLoadError, ResolvedModel

MAX_TOKENS = 256  # captions are short (60 jieba words is ~120 characters); longer alt texts are truncated

_CLASSIFIERS: dict[tuple[str, str], TextClassifier] = {}


class TextClassifier:
    """Label probabilities for texts: softmax over the labels, or per-label sigmoid for multi-label models."""

    def __init__(self, model: Any, tokenizer: Any, device: str, name: str, batch_size: int = 64) -> None:
        self._model = model
        self._tokenizer = tokenizer
        self._device = device
        self.name = name
        self.batch_size = batch_size  # texts per forward pass
        config = model.config
        self.labels: tuple[str, ...] = tuple(str(config.id2label[i]) for i in range(config.num_labels))
        self._multi_label = config.problem_type == "multi_label_classification"
        limits = [MAX_TOKENS, tokenizer.model_max_length, getattr(config, "max_position_embeddings", None)]
        self._max_length = min(int(v) for v in limits if v)

    def label_ids(self, unsafe: Sequence[str]) -> list[int]:
        """Indices of the ``unsafe`` labels (case-insensitive); naming none of the model's labels is an error."""
        wanted = {u.lower() for u in unsafe}
        ids = [i for i, label in enumerate(self.labels) if label.lower() in wanted]
        if not ids:
            raise ValueError(
                f"text classifier {self.name!r} has labels {list(self.labels)}; the unsafe labels configured "
                f"({list(unsafe)}) name none of them: set source.text_nsfw_labels"
            )
        return ids

    def unsafe_scores(self, texts: Sequence[str], unsafe: Sequence[str]) -> np.ndarray:
        """Per text, the highest probability among the ``unsafe`` labels."""
        ids = self.label_ids(unsafe)
        return self.probabilities(texts)[:, ids].max(axis=1) if len(texts) else np.zeros(0, dtype=np.float32)

    def probabilities(self, texts: Sequence[str]) -> np.ndarray:
        import torch

        parts = []
        with torch.inference_mode():
            for start in range(0, len(texts), self.batch_size):
                inputs = self._tokenizer(list(texts[start : start + self.batch_size]), return_tensors="pt",
                                         padding=True, truncation=True, max_length=self._max_length)
                logits = self._model(**{k: v.to(self._device) for k, v in inputs.items()}).logits.float()
                probs = torch.sigmoid(logits) if self._multi_label else torch.softmax(logits, dim=-1)
                parts.append(probs.cpu().numpy())
        return np.concatenate(parts) if parts else np.zeros((0, len(self.labels)), dtype=np.float32)


def load_text_classifier(resolved: ResolvedModel, device: str | None = None) -> TextClassifier:
    """The classifier for ``resolved``, loaded once per process per ``(name, device)``; fp32 on every device, so
    a threshold on its probabilities means the same on a GPU as on a CPU."""
    if resolved.placeholder:
        raise ValueError("the text classifier has no placeholder: name a model for the nsfw_text role")
    device = device or _default_device()
    key = (resolved.name, device)
    with _LOCK:
        if key not in _CLASSIFIERS:
            _CLASSIFIERS[key] = _load(resolved, device)
        return _CLASSIFIERS[key]


def check_text_classifier(resolved: ResolvedModel, unsafe: Sequence[str]) -> None:
    """Before any work, from the config alone: a sequence classifier whose labels include an ``unsafe`` one."""
    from transformers import AutoConfig

    where, local_only = _location(resolved)
    try:
        config = AutoConfig.from_pretrained(where, local_files_only=local_only)
    except Exception as error:
        raise ModelLoadError(f"cannot load the config of {resolved.name!r}: {type(error).__name__}: {error}") from error
    labels = [str(v) for v in (getattr(config, "id2label", None) or {}).values()]
    if not {label.lower() for label in labels} & {u.lower() for u in unsafe}:
        raise ValueError(
            f"text classifier {resolved.name!r} has labels {labels}; the unsafe labels configured "
            f"({list(unsafe)}) name none of them: set source.text_nsfw_labels"
        )


def _load(resolved: ResolvedModel, device: str) -> TextClassifier:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    where, local_only = _location(resolved)
    try:
        model = AutoModelForSequenceClassification.from_pretrained(where, local_files_only=local_only)
        tokenizer = AutoTokenizer.from_pretrained(where, local_files_only=local_only)
    except Exception as error:
        raise ModelLoadError(
            f"cannot load text classifier {resolved.name!r} from {where}: {type(error).__name__}: {error}"
        ) from error
    return TextClassifier(model.to(device).eval(), tokenizer, device, resolved.name)

"""The safety classifiers: text (sequence classification) and image (image classification) models, loaded once
per process."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from tasks.models.embedding import to_rgb
from tasks.models.load import _LOCK, default_device, location, model_dtype, revision, to_device
from tasks.models.resolve import ModelLoadError, ResolvedModel
from tasks.models.safety import IMAGE_LABELS_SETTING, TEXT_LABELS_SETTING, ImageSafety, label_ids_of

if TYPE_CHECKING:
    from PIL import Image

MAX_TOKENS = 256  # captions are short (60 jieba words is ~120 characters); longer alt texts are truncated
# Unsafe class names of public NSFW image classifiers (e.g. "nsfw" of open_nsfw, the default, and of 2-class
# normal/nsfw ViTs; "porn" and "hentai" of the 5-class drawings/hentai/neutral/porn/sexy models), matched in any
# case. The paper's Freepik/nsfw_image_detector (neutral/low/medium/high) needs `image: {nsfw_labels: [high]}`.
NSFW_IMAGE_LABELS = ("nsfw", "porn", "hentai", "explicit", "sexual")
TIMM_WRAPPER = "timm_wrapper"  # transformers' model type for timm checkpoints

_CLASSIFIERS: dict[tuple[str, str, str], Any] = {}  # (kind, name, device) -> classifier


class TextClassifier:
    """Label probabilities for texts: softmax over the labels, or per-label sigmoid for multi-label models."""

    def __init__(self, model: Any, tokenizer: Any, device: str, name: str, batch_size: int = 64) -> None:
        self._model = model
        self._tokenizer = tokenizer
        self._device = device
        self.name = name
        self.batch_size = batch_size  # texts per forward pass
        config = model.config
        self.labels = _labels(config)
        self._multi_label = config.problem_type == "multi_label_classification"
        limits = [MAX_TOKENS, tokenizer.model_max_length, getattr(config, "max_position_embeddings", None)]
        self._max_length = min(int(v) for v in limits if v)

    def label_ids(self, unsafe: Sequence[str]) -> list[int]:
        """Indices of the ``unsafe`` labels (case-insensitive); naming none of the model's labels is an error."""
        return label_ids_of("text", self.name, self.labels, unsafe, TEXT_LABELS_SETTING)

    def unsafe_scores(self, texts: Sequence[str], unsafe: Sequence[str]) -> np.ndarray:
        """Per text, the highest probability among the ``unsafe`` labels."""
        ids = self.label_ids(unsafe)
        return self.probabilities(texts)[:, ids].max(axis=1) if len(texts) else np.zeros(0, dtype=np.float32)

    def probabilities(self, texts: Sequence[str]) -> np.ndarray:
        def encode(chunk):
            return self._tokenizer(list(chunk), return_tensors="pt", padding=True, truncation=True,
                                   max_length=self._max_length)

        return _probabilities(self._model, list(texts), encode, self.batch_size, self._device, None,
                              self._multi_label, len(self.labels))


class ImageClassifier(ImageSafety):
    """A transformers image-classification model (timm_wrapper models included, with the `timm` extra)."""

    def __init__(self, model: Any, processor: Any, device: str, dtype: Any, identity: dict,
                 batch_size: int = 32) -> None:
        self._model = model
        self._processor = processor
        self._device = device
        self._dtype = dtype
        self.identity = dict(identity)  # {"name": str, "revision": str | None}
        self.name = identity["name"]
        self.batch_size = batch_size  # images per forward pass
        self.labels = _labels(model.config)
        self.multi_label = model.config.problem_type == "multi_label_classification"

    def probabilities(self, images: Sequence[Image.Image]) -> np.ndarray:
        def encode(chunk):
            return self._processor(images=[to_rgb(image) for image in chunk], return_tensors="pt")

        return _probabilities(self._model, list(images), encode, self.batch_size, self._device, self._dtype,
                              self.multi_label, len(self.labels))


def load_text_classifier(resolved: ResolvedModel, device: str | None = None) -> TextClassifier:
    """The classifier for ``resolved``, loaded once per process per ``(name, device)``; fp32 on every device, so
    a threshold on its probabilities means the same on a GPU as on a CPU."""
    return _cached("text", resolved, device, _load_text)


def load_image_classifier(resolved: ResolvedModel, device: str | None = None) -> ImageSafety:
    """The classifier for ``resolved``, loaded once per process per ``(name, device)``: an ONNX model (open_nsfw,
    the default) through onnxruntime, or a transformers one, fp32 on CPU and half precision on CUDA; probabilities
    in float32."""
    if resolved.source == "onnx":
        from tasks.models.onnx_classify import load_onnx_classifier

        return _cached("image", resolved, device, load_onnx_classifier)
    return _cached("image", resolved, device, _load_image)


def check_text_classifier(resolved: ResolvedModel, unsafe: Sequence[str]) -> None:
    """Before any work, from the config alone: a sequence classifier whose labels include an ``unsafe`` one."""
    label_ids_of("text", resolved.name, _labels(model_config(resolved)), unsafe, TEXT_LABELS_SETTING)


def check_image_classifier(resolved: ResolvedModel, unsafe: Sequence[str]) -> None:
    """Before any work: an ONNX model that onnxruntime opens with open_nsfw's input and outputs, or, from the
    config alone, an image-classification model (a dual encoder such as SigLIP, or a text classifier, is refused);
    either way with labels that include an ``unsafe`` one. A timm_wrapper model needs the `timm` extra."""
    if resolved.source == "onnx":
        from tasks.models.onnx_classify import OPENNSFW_LABELS, open_session

        open_session(resolved.name)
        label_ids_of("image", resolved.name, OPENNSFW_LABELS, unsafe, IMAGE_LABELS_SETTING)
        return
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES

    config = model_config(resolved)
    architectures = getattr(config, "architectures", None) or []
    if config.model_type not in MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES or (
        architectures and not any(a.endswith("ForImageClassification") for a in architectures)
    ):
        raise ModelLoadError(
            f"model {resolved.name!r} (type {config.model_type!r}, architectures {architectures}) is not an image "
            "classifier: the nsfw_image role needs an image-classification model with NSFW classes"
        )
    label_ids_of("image", resolved.name, _labels(config), unsafe, IMAGE_LABELS_SETTING)
    if config.model_type == TIMM_WRAPPER:
        check_timm(resolved.name)


def check_timm(name: str) -> None:
    """transformers loads a timm_wrapper model (e.g. the paper's Freepik/nsfw_image_detector) only with timm."""
    from transformers.utils import is_timm_available

    if not is_timm_available():
        raise ModelLoadError(
            f"model {name!r} is a timm model (transformers' timm_wrapper), which needs the `timm` package: install "
            "the extra, `pip install 'danqing[timm]'` (timm also needs a torchvision built for your torch)"
        )


def _probabilities(model, items: list, encode: Callable, batch_size: int, device: str, dtype,
                   multi_label: bool, n_labels: int) -> np.ndarray:
    import torch

    parts = []
    with torch.inference_mode():
        for start in range(0, len(items), batch_size):
            inputs = encode(items[start : start + batch_size])
            inputs = {key: to_device(value, device, dtype or value.dtype) for key, value in inputs.items()}
            logits = model(**inputs).logits.float()
            probs = torch.sigmoid(logits) if multi_label else torch.softmax(logits, dim=-1)
            parts.append(probs.cpu().numpy())
    return np.concatenate(parts) if parts else np.zeros((0, n_labels), dtype=np.float32)


def _labels(config) -> tuple[str, ...]:
    return tuple(str(config.id2label[i]) for i in range(config.num_labels))


def model_config(resolved: ResolvedModel):
    """The model's transformers config (no weights read); unreadable, a ModelLoadError."""
    from transformers import AutoConfig

    where, local_only = location(resolved)
    try:
        return AutoConfig.from_pretrained(where, local_files_only=local_only)
    except Exception as error:
        raise ModelLoadError(f"cannot load the config of {resolved.name!r}: {type(error).__name__}: {error}") from error


def _cached(kind: str, resolved: ResolvedModel, device: str | None, load: Callable):
    """The model of `kind` ("text", "image": the safety classifiers; "recaption") for ``resolved``, loaded once per
    process per device."""
    if resolved.placeholder:
        raise ValueError(f"the {kind} model has no placeholder: name a model for the {resolved.role} role")
    device = device or default_device()
    key = (kind, resolved.name, device)
    with _LOCK:
        if key not in _CLASSIFIERS:
            _CLASSIFIERS[key] = load(resolved, device)
        return _CLASSIFIERS[key]


def pretrained(resolved: ResolvedModel, what: str, model_cls, processor_cls, model_kw: dict | None = None,
               processor_kw: dict | None = None) -> tuple[Any, Any, str, bool]:
    """(model, processor, where, local_only): both `from_pretrained` at the resolved location; any failure is one
    ModelLoadError naming `what` (the role's kind of model), the model and where it was looked for."""
    where, local_only = location(resolved)
    try:
        model = model_cls.from_pretrained(where, local_files_only=local_only, **(model_kw or {}))
        processor = processor_cls.from_pretrained(where, local_files_only=local_only, **(processor_kw or {}))
    except Exception as error:
        raise ModelLoadError(
            f"cannot load {what} {resolved.name!r} from {where}: {type(error).__name__}: {error}"
        ) from error
    return model, processor, where, local_only


def _load_text(resolved: ResolvedModel, device: str) -> TextClassifier:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model, tokenizer, _, _ = pretrained(resolved, "text classifier", AutoModelForSequenceClassification,
                                        AutoTokenizer)
    return TextClassifier(model.to(device).eval(), tokenizer, device, resolved.name)


def _load_image(resolved: ResolvedModel, device: str) -> ImageClassifier:
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    dtype = model_dtype(device)
    if model_config(resolved).model_type == TIMM_WRAPPER:
        check_timm(resolved.name)
    # No torchvision here: the PIL image processor, as for the embedding models.
    model, processor, where, local_only = pretrained(resolved, "image classifier", AutoModelForImageClassification,
                                                     AutoImageProcessor, {"dtype": dtype}, {"backend": "pil"})
    identity = {"name": resolved.name, "revision": revision(where, resolved.source, local_only)}
    return ImageClassifier(model.to(device).eval(), processor, device, dtype, identity)

"""Model roles: resolving names (hub, mirror, ModelScope, local), loading them, and the offline placeholder."""

from tasks.models.caption import Captioner, check_captioner, load_captioner
from tasks.models.classify import (
    NSFW_IMAGE_LABELS,
    ImageClassifier,
    TextClassifier,
    check_image_classifier,
    check_text_classifier,
    load_image_classifier,
    load_text_classifier,
)
from tasks.models.embedding import EmbeddingModel
from tasks.models.load import TransformersModel, count_unknown_tokens, load_model, model_revision
from tasks.models.placeholder import PLACEHOLDER, PlaceholderModel
from tasks.models.resolve import DEFAULT_MODELS, ROLES, ModelLoadError, ResolvedModel, resolve_model

__all__ = [
    "DEFAULT_MODELS",
    "NSFW_IMAGE_LABELS",
    "PLACEHOLDER",
    "ROLES",
    "Captioner",
    "EmbeddingModel",
    "ImageClassifier",
    "ModelLoadError",
    "PlaceholderModel",
    "ResolvedModel",
    "TextClassifier",
    "TransformersModel",
    "check_captioner",
    "check_image_classifier",
    "check_text_classifier",
    "count_unknown_tokens",
    "load_captioner",
    "load_image_classifier",
    "load_model",
    "load_text_classifier",
    "model_revision",
    "resolve_model",
]

"""Model roles: resolving names (hub, mirror, ModelScope, local), loading them, and the offline placeholder."""

from tasks.models.classify import TextClassifier, check_text_classifier, load_text_classifier
from tasks.models.embedding import EmbeddingModel
from tasks.models.load import TransformersModel, count_unknown_tokens, load_model
from tasks.models.placeholder import PLACEHOLDER, PlaceholderModel
from tasks.models.resolve import DEFAULT_MODELS, ROLES, ModelLoadError, ResolvedModel, resolve_model

__all__ = [
    "DEFAULT_MODELS",
    "PLACEHOLDER",
    "ROLES",
    "EmbeddingModel",
    "ModelLoadError",
    "PlaceholderModel",
    "ResolvedModel",
    "TextClassifier",
    "TransformersModel",
    "check_text_classifier",
    "count_unknown_tokens",
    "load_model",
    "load_text_classifier",
    "resolve_model",
]

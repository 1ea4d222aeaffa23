"""Loads resolved models once per process: transformers image-text models, their tokenizers, the placeholder."""

from __future__ import annotations

import hashlib
import inspect
import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from tasks.models.embedding import EmbeddingModel, l2_normalise, to_rgb
from tasks.models.placeholder import PLACEHOLDER_REVISION, PlaceholderModel, placeholder_unknown_tokens
from tasks.models.resolve import (
    MODELSCOPE_PREFIX,
    ModelLoadError,
    ResolvedModel,
    hub_reachable,
    modelscope_dir,
)

if TYPE_CHECKING:
    from PIL import Image

logger = logging.getLogger(__name__)

SIGLIP_TYPES = ("siglip", "siglip2")  # last-token pooling, trained on texts padded to max_length
CHINESE_CLIP_CONTEXT = 52  # Chinese-CLIP's context length in its own training and evaluation code
UNK_PROBE = "一只猫坐在桌子上"  # Chinese text a tokenizer for Chinese captions must not map to all-unknown

_LOCK = threading.RLock()  # re-entrant: loading a model also loads (and caches) its tokenizer
_MODELS: dict[tuple[str, str], _Loaded] = {}
_TEXT_SIDES: dict[str, _TextSide] = {}


@dataclass(frozen=True)
class _TextSide:
    tokenizer: Any
    lowercase: bool  # the checkpoint's tokenizer skips a lowercasing the model was trained with
    call_kwargs: dict  # padding / truncation / max_length the model expects


@dataclass(frozen=True)
class _Loaded:
    model: Any
    image_processor: Any
    image_kwargs: dict
    text: _TextSide
    device: str
    dtype: Any
    identity: dict


class TransformersModel:
    """A transformers dual encoder (SigLIP, SigLIP2, Chinese-CLIP, CLIP-like) behind ``EmbeddingModel``."""

    def __init__(self, loaded: _Loaded, batch_size: int = 32) -> None:
        self._loaded = loaded
        self.batch_size = batch_size  # rows per forward pass
        self.identity = dict(loaded.identity)
        self.dim = int(loaded.identity["dim"])

    def embed_images(self, images: list[Image.Image]) -> np.ndarray:
        loaded = self._loaded
        return self._batched(
            list(images),
            lambda chunk: loaded.image_processor(
                images=[to_rgb(image) for image in chunk], return_tensors="pt", **loaded.image_kwargs
            ),
            loaded.model.get_image_features,
        )

    def embed_texts(self, texts: list[str]) -> np.ndarray:
        text = self._loaded.text
        return self._batched(
            list(texts),
            lambda chunk: text.tokenizer(_prepare(chunk, text), return_tensors="pt", **text.call_kwargs),
            self._loaded.model.get_text_features,
        )

    def text_truncated(self, texts: list[str]) -> np.ndarray:
        text = self._loaded.text
        if not texts:
            return np.zeros(0, dtype=bool)
        # Counted as embed_texts tokenizes (special tokens included), minus the truncation.
        ids = text.tokenizer(_prepare(list(texts), text), truncation=False, verbose=False)["input_ids"]
        return np.array([len(row) > text.call_kwargs["max_length"] for row in ids], dtype=bool)

    def _batched(self, items: list, encode, forward) -> np.ndarray:
        import torch

        if not items:
            return np.zeros((0, self.dim), dtype=np.float32)
        accepted = _named_parameters(forward)
        parts = []
        with torch.inference_mode():
            for start in range(0, len(items), self.batch_size):
                inputs = encode(items[start : start + self.batch_size])
                inputs = {key: to_device(value, self._loaded.device, self._loaded.dtype)
                          for key, value in inputs.items() if key in accepted}
                output = forward(**inputs)
                # transformers 5 returns an output object here (v4 returned the projected tensor).
                features = output if torch.is_tensor(output) else output.pooler_output
                parts.append(features.float().cpu().numpy())
        # No fallback: a zero or non-finite output (an fp16 overflow, a broken input) is a failed row (NaN).
        return l2_normalise(np.concatenate(parts))


def to_device(value, device: str, dtype):
    """A model input on ``device``; floating-point inputs (pixels) in the model's ``dtype``, ids untouched."""
    if value.is_floating_point():
        return value.to(device, dtype=dtype)
    return value.to(device)


def model_dtype(device: str):
    """fp32 on CPU; on CUDA bf16 where supported, else fp16."""
    import torch

    if device.startswith("cuda"):
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def load_model(resolved: ResolvedModel, device: str | None = None, batch_size: int = 32) -> EmbeddingModel:
    """The model for ``resolved``, loaded once per process per ``(name, device)``.

    ``device`` None picks CUDA when available. Half precision on CUDA (bf16 where supported), fp32
    on CPU; outputs are float32 either way.
    """
    if resolved.placeholder:
        return PlaceholderModel()
    device = device or default_device()
    key = (resolved.name, device)
    with _LOCK:
        loaded = _MODELS.get(key)
        if loaded is None:
            loaded = _MODELS[key] = _load(resolved, device)
    return TransformersModel(loaded, batch_size=batch_size)


def count_unknown_tokens(resolved: ResolvedModel, texts: list[str]) -> list[int]:
    """Per text, how many tokens the model's tokenizer maps to its unknown id (special tokens excluded).

    The placeholder counts the characters outside a character-level Chinese vocabulary (it judges nothing).
    Byte-fallback tokenizers (SigLIP2's Gemma) rarely produce unknowns at all; that is their nature.
    """
    if resolved.placeholder:
        return placeholder_unknown_tokens(list(texts))
    text = _text_side(resolved)
    unk = text.tokenizer.unk_token_id
    if unk is None or not texts:
        return [0] * len(texts)
    encoded = text.tokenizer(_prepare(list(texts), text), add_special_tokens=False)["input_ids"]
    return [sum(1 for token in ids if token == unk) for ids in encoded]


def _prepare(texts: list[str], text: _TextSide) -> list[str]:
    return [t.lower() for t in texts] if text.lowercase else texts


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def location(resolved: ResolvedModel) -> tuple[str, bool]:
    """What ``from_pretrained`` gets for ``resolved``, and whether it must stay off the network."""
    if resolved.source == "modelscope":
        return str(modelscope_dir(resolved.name[len(MODELSCOPE_PREFIX) :])), True
    if resolved.source == "hub":
        # Offline, each from_pretrained call would retry for ~23 s before trying the cache; go to
        # the cache directly (a cache miss then fails at once with a clear error).
        return resolved.name, not hub_reachable(resolved.name)
    return resolved.name, True


def _load(resolved: ResolvedModel, device: str) -> _Loaded:
    from transformers import AutoConfig, AutoImageProcessor, AutoModel

    where, local_only = location(resolved)
    dtype = model_dtype(device)
    try:
        config = AutoConfig.from_pretrained(where, local_files_only=local_only)
        # transformers 5 takes `dtype`; `torch_dtype` is deprecated.
        model = AutoModel.from_pretrained(where, dtype=dtype, local_files_only=local_only).to(device).eval()
        # No torchvision here: ask for the PIL image processor explicitly (`use_fast=False` is deprecated in v5).
        image_processor = AutoImageProcessor.from_pretrained(where, backend="pil", local_files_only=local_only)
    except Exception as error:
        raise ModelLoadError(
            f"cannot load model {resolved.name!r} from {where}: {type(error).__name__}: {error}"
        ) from error
    text = _text_side(resolved, where=where, local_only=local_only, config=config)
    return _Loaded(
        model=model,
        image_processor=image_processor,
        image_kwargs=_image_kwargs(image_processor),
        text=text,
        device=device,
        dtype=dtype,
        identity={
            "name": resolved.name,
            "revision": revision(where, resolved.source, local_only),
            "dim": _embedding_dim(config),
            "placeholder": False,
        },
    )


def _text_side(resolved: ResolvedModel, where: str | None = None, local_only: bool = True, config=None) -> _TextSide:
    with _LOCK:
        cached = _TEXT_SIDES.get(resolved.name)
        if cached is not None:
            return cached
        from transformers import AutoConfig, AutoTokenizer

        if where is None:
            where, local_only = location(resolved)
        try:
            config = config or AutoConfig.from_pretrained(where, local_files_only=local_only)
            tokenizer = AutoTokenizer.from_pretrained(where, local_files_only=local_only)
        except Exception as error:
            raise ModelLoadError(
                f"cannot load the tokenizer of {resolved.name!r} from {where}: {type(error).__name__}: {error}"
            ) from error
        text = _TextSide(tokenizer, _needs_lowercase(config, tokenizer), _text_kwargs(config, tokenizer))
        _warn_if_all_unknown(resolved.name, text)
        _TEXT_SIDES[resolved.name] = text
        return text


def _needs_lowercase(config, tokenizer) -> bool:
    # SigLIP2 was trained on lowercased text. Its FixRes checkpoints (model_type "siglip", e.g. the
    # default google/siglip2-base-patch16-256) declare GemmaTokenizer, which transformers 5 loads as
    # is and which does not lowercase; only model_type "siglip2" is remapped to Siglip2Tokenizer.
    return config.model_type in SIGLIP_TYPES and type(tokenizer).__name__ == "GemmaTokenizer"


def _text_kwargs(config, tokenizer) -> dict:
    text_config = getattr(config, "text_config", config)
    positions = getattr(text_config, "max_position_embeddings", None) or tokenizer.model_max_length
    if config.model_type in SIGLIP_TYPES:
        # SigLIP pools the last position, so texts must be padded to the trained length, not the batch's longest.
        return {"padding": "max_length", "truncation": True, "max_length": positions}
    limit = CHINESE_CLIP_CONTEXT if config.model_type == "chinese_clip" else tokenizer.model_max_length
    return {"padding": True, "truncation": True, "max_length": min(positions, limit)}


def _image_kwargs(image_processor) -> dict:
    # SigLIP2 (NaFlex) processors can fall back to their class defaults (256 patches of 16 px) over
    # the saved config; passing the loaded values pins what the checkpoint says.
    if hasattr(image_processor, "max_num_patches") and hasattr(image_processor, "patch_size"):
        return {"max_num_patches": image_processor.max_num_patches, "patch_size": image_processor.patch_size}
    return {}


def _embedding_dim(config) -> int:
    projection = getattr(config, "projection_dim", None)  # CLIP, Chinese-CLIP
    if projection:
        return int(projection)
    return int(config.vision_config.hidden_size)  # SigLIP heads keep the hidden size


def model_revision(resolved: ResolvedModel) -> str | None:
    """``resolved``'s revision without loading its weights (the value ``identity["revision"]`` will have), so a
    resume marker can name it before any work: a re-run with other files at the same path is not a no-op."""
    if resolved.placeholder:
        return PLACEHOLDER_REVISION
    if resolved.source == "onnx":
        from tasks.models.onnx_classify import file_revision, model_file

        return file_revision(model_file(resolved))
    where, local_only = location(resolved)
    return revision(where, resolved.source, local_only)


def revision(where: str, source: str, local_only: bool) -> str | None:
    """What identifies the weights and settings loaded from ``where``: the hub's commit hash, or for a local
    directory (ModelScope snapshots included) a fingerprint of its files."""
    if source == "hub":
        from transformers.utils import cached_file, extract_commit_hash

        # transformers 5 no longer keeps the commit on the config; the cached file's snapshot folder names it.
        return extract_commit_hash(cached_file(where, "config.json", local_files_only=local_only), None)
    return _fingerprint(Path(where))


def _fingerprint(root: Path) -> str:
    # The settings files (configs, vocabularies: json and txt) by content, since an edit can keep their size;
    # every other file (weights, sentencepiece models) by name and size: hashing gigabytes of weights on
    # every start would be too slow.
    digest = hashlib.sha256()
    for path in sorted(p for p in root.iterdir() if p.is_file() and not p.name.startswith(".")):
        digest.update(f"{path.name}:{path.stat().st_size}\n".encode())
        if path.suffix in (".json", ".txt"):
            digest.update(path.read_bytes())
    return "sha256:" + digest.hexdigest()[:16]


def _named_parameters(function) -> set[str]:
    return {
        name
        for name, parameter in inspect.signature(function).parameters.items()
        if parameter.kind not in (inspect.Parameter.VAR_KEYWORD, inspect.Parameter.VAR_POSITIONAL)
    }


def _warn_if_all_unknown(name: str, text: _TextSide) -> None:
    unk = text.tokenizer.unk_token_id
    if unk is None:
        return
    ids = text.tokenizer(_prepare([UNK_PROBE], text), add_special_tokens=False)["input_ids"][0]
    if ids and all(token == unk for token in ids):
        logger.warning("tokenizer of %r maps Chinese text entirely to its unknown token %r", name, unk)

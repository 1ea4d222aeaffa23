"""The built-in deterministic placeholder model used when no real model can be loaded."""

from __future__ import annotations

import functools
import hashlib
import re
import unicodedata
from typing import TYPE_CHECKING

import numpy as np

from tasks.models.embedding import l2_normalise, to_rgb

if TYPE_CHECKING:
    from PIL import Image

PLACEHOLDER = "placeholder"
PLACEHOLDER_REVISION = "thumb16-gray-ngram123-blake2b-v1"  # bump when the features change: old vectors stop matching
THUMB_SIDE = 16  # 16x16 grayscale thumbnail -> 256 dims
DIM = THUMB_SIDE * THUMB_SIDE
NGRAM_SIZES = (1, 2, 3)  # character n-grams hashed into the text vector

# A flat image (or an empty text) has no direction of its own. The all-equal unit vector is orthogonal
# to every mean-centred thumbnail, so flat images sit at cosine distance 1 from every textured image
# and at 0 from each other, never NaN.
_FLAT = np.full(DIM, 1.0 / np.sqrt(DIM))


@functools.lru_cache(maxsize=1 << 16)
def _bucket(gram: str) -> tuple[int, float]:
    # blake2b, not hash(): Python salts str hashes per process, which would change vectors between runs.
    digest = hashlib.blake2b(gram.encode("utf-8"), digest_size=8).digest()
    value = int.from_bytes(digest, "little")
    # A sign bit makes colliding n-grams cancel on average instead of always adding up.
    return value % DIM, 1.0 if (value >> 63) & 1 else -1.0


class PlaceholderModel:
    """Deterministic features that need no weights: a thumbnail for images, hashed n-grams for texts.

    Images: grayscale, box-resized to 16x16, flattened, mean-centred, L2-normalised. This survives
    re-encoding, small resizes and brightness shifts (near-duplicates stay within cosine distance 0.1)
    while distinct photos stay apart, so the dedup rules can run on it.

    Texts: hashed character 1-3-grams. Image and text vectors live in unrelated spaces: their
    similarity means nothing, and any alignment result computed with it judges nothing.
    """

    def __init__(self) -> None:
        self.dim = DIM
        self.identity = {"name": PLACEHOLDER, "revision": PLACEHOLDER_REVISION, "dim": DIM, "placeholder": True}

    def embed_images(self, images: list[Image.Image]) -> np.ndarray:
        if not images:
            return np.zeros((0, DIM), dtype=np.float32)
        return l2_normalise(np.stack([_thumbnail(image) for image in images]), _FLAT)

    def embed_texts(self, texts: list[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, DIM), dtype=np.float32)
        return l2_normalise(np.stack([_hashed_ngrams(text) for text in texts]), _FLAT)

    def text_truncated(self, texts: list[str]) -> np.ndarray:
        return np.zeros(len(texts), dtype=bool)  # hashed n-grams read the whole text: no context limit


def _thumbnail(image: Image.Image) -> np.ndarray:
    from PIL import Image

    # BOX averages every source pixel, so JPEG noise and a few % of rescaling wash out.
    small = to_rgb(image).convert("L").resize((THUMB_SIDE, THUMB_SIDE), Image.Resampling.BOX)
    pixels = np.asarray(small, dtype=np.float64).reshape(-1)
    return pixels - pixels.mean()


def _hashed_ngrams(text: str) -> np.ndarray:
    # NFKC folds full-width Latin and digits, common in Chinese alt text, onto their ASCII forms.
    chars = unicodedata.normalize("NFKC", text).lower()
    vector = np.zeros(DIM, dtype=np.float64)
    for n in NGRAM_SIZES:
        for start in range(len(chars) - n + 1):
            index, sign = _bucket(chars[start : start + n])
            vector[index] += sign
    return vector


# The placeholder tokenizer's vocabulary, by character: ASCII, Latin-1 and Latin Extended-A, general
# punctuation, CJK symbols, kana, the basic CJK Unified Ideographs block and full-width forms, i.e. what a
# character-level Chinese vocabulary (BERT-Chinese style) covers. Anything else (rare Han characters of the
# extension blocks, other scripts) is one unknown token, as it would be under such a vocabulary.
_PLACEHOLDER_UNKNOWN = re.compile(
    r"[^\s\u0021-\u007e\u00a0-\u017f\u2000-\u206f\u3000-\u30ff\u4e00-\u9fff\uff00-\uffef]"
)


def placeholder_unknown_tokens(texts: list[str]) -> list[int]:
    """Per text, the characters outside the placeholder tokenizer's vocabulary: it exercises the [UNK] rule
    offline and judges nothing about any real tokenizer."""
    return [len(_PLACEHOLDER_UNKNOWN.findall(t)) for t in texts]

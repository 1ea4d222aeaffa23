"""The interface every embedding model honours, and the image/vector helpers its implementations share."""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol, runtime_checkable

import numpy as np

if TYPE_CHECKING:
    from PIL import Image


@runtime_checkable
class EmbeddingModel(Protocol):
    """Images and texts in, float32 ``(n, dim)`` rows of unit L2 norm out.

    A row the model could not embed (its output was zero, NaN or infinite) comes back as NaN, never as a
    made-up vector, so the caller can drop it with a reason.
    """

    identity: dict  # {"name": str, "revision": str | None, "dim": int, "placeholder": bool}
    dim: int

    def embed_images(self, images: list[Image.Image]) -> np.ndarray: ...

    def embed_texts(self, texts: list[str]) -> np.ndarray: ...

    def text_truncated(self, texts: list[str]) -> np.ndarray:
        """Per text, whether it is longer than the model's text context, so ``embed_texts`` saw only its start."""
        ...


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB view of ``image``, transparency composited on white.

    ``convert("RGB")`` alone keeps whatever colour sits under transparent pixels (often black), so a
    logo on a transparent background would embed like a logo on black.
    """
    from PIL import Image

    if image.mode == "RGB":
        return image
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def l2_normalise(vectors: np.ndarray, fallback: np.ndarray | None = None) -> np.ndarray:
    """Rows scaled to unit norm as float32.

    A row of (near) zero norm has no direction: it becomes ``fallback`` when one is given (the placeholder's
    fixed vector for flat images, a convention), else NaN. A row holding NaN or inf is NaN either way. NaN
    marks a failed row for the caller rather than hiding a model's failure behind a substitute.
    """
    vectors = np.asarray(vectors, dtype=np.float64)
    finite = np.isfinite(vectors).all(axis=1)
    norms = np.linalg.norm(np.where(finite[:, None], vectors, 0.0), axis=1, keepdims=True)
    flat = finite & (norms[:, 0] < 1e-9)
    out = vectors / np.where(norms < 1e-9, 1.0, norms)
    out[~finite] = np.nan
    out[flat] = np.nan if fallback is None else fallback
    return out.astype(np.float32)

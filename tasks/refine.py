"""Stage refine (stage 2): clean captions first, then Traditional -> Simplified; later rules drop."""

from __future__ import annotations

import html
import re
import unicodedata
from dataclasses import dataclass
from functools import lru_cache

import pandas as pd

STAGE = "refine"
RULES: tuple[str, ...] = ()  # lid, stop_words, no_noun, unk_tokens, low_entropy, text_safety: the refinement issue

# A URL ends at the first character URLs cannot hold (RFC 3986): Chinese text often follows with no space.
_URL = re.compile(r"(?:https?://|ftp://|www\.)[A-Za-z0-9\-._~:/?#\[\]@!$&'()*+,;=%]+", re.I)
_TAG = re.compile(r"<[^>]{0,200}>")
# Zero-width and bidi controls, and the marks an emoji leaves behind once its symbol is gone:
# variation selectors (❤️ = U+2764 U+FE0F) and the combining keycap (1️⃣ = 1 U+FE0F U+20E3).
_ZERO_WIDTH = re.compile(
    r"[\u200b-\u200f\u2028-\u202f\u2060-\u206f\ufeff\ufe00-\ufe0f\u20e3\U000e0100-\U000e01ef]"
)
_SPACE = re.compile(r"\s+")


@dataclass(frozen=True)
class RefineConfig:
    convert: str = "t2s"  # OpenCC conversion applied after cleaning; "" keeps the script as it is
    strip_urls: bool = True  # URLs in alt text are boilerplate, never caption content


def _keep_char(ch: str) -> bool:
    """Letters, digits, CJK and ordinary punctuation stay; emoji, symbols and control characters go."""
    cat = unicodedata.category(ch)
    return not cat.startswith(("S", "C")) or ch in "+-=%&@#$"


def clean_caption(text: str, config: RefineConfig = RefineConfig()) -> str:
    """Entities, markup, URLs, zero-width characters, emoji and special symbols removed; spaces collapsed."""
    text = html.unescape(text)
    text = _TAG.sub(" ", text)
    if config.strip_urls:
        text = _URL.sub(" ", text)
    text = _ZERO_WIDTH.sub("", text)
    text = "".join(ch if _keep_char(ch) else " " for ch in text)
    return _SPACE.sub(" ", text).strip()


@lru_cache(maxsize=4)
def _converter(name: str):
    import opencc

    return opencc.OpenCC(name)


def refine_text(frame: pd.DataFrame, config: RefineConfig = RefineConfig()) -> pd.DataFrame:
    """Add `caption` (the refined text); no rule of this stage drops anything yet."""
    out = frame.copy()
    cleaned = out["alt_norm"].map(lambda t: clean_caption(t, config))
    if config.convert:
        conv = _converter(config.convert)
        cleaned = cleaned.map(conv.convert)
    out["caption"] = cleaned.astype("str")
    out["drop_reason"] = pd.Series(pd.NA, index=out.index, dtype="str")
    return out

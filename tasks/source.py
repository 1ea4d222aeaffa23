"""Stage source (stage 1, coarse): the caption must be Chinese and 5-60 jieba words long."""

from __future__ import annotations

import html
import logging
import re
import unicodedata
from dataclasses import dataclass
from functools import lru_cache

import pandas as pd

from tasks.text import is_mostly_chinese

STAGE = "source"
RULES = ("caption_not_chinese", "word_count")  # text_nsfw and blacklisted_site come with the source issue
_SPACE = re.compile(r"\s+")


@dataclass(frozen=True)
class SourceConfig:
    min_words: int = 5  # paper: 5 <= jieba words
    max_words: int = 60  # paper: words <= 60
    min_han_share: float = 0.5  # caption units that must be Han characters (a Latin word is one unit)
    max_kana_share: float = 0.05  # more kana than this among CJK characters means Japanese


@lru_cache(maxsize=1)
def _jieba():
    import jieba

    jieba.setLogLevel(logging.WARNING)  # its dictionary-loading chatter is not our log
    jieba.initialize()
    return jieba


def normalise_alt(alt: str | None) -> str:
    """HTML entities decoded and whitespace collapsed: what the word count is computed on."""
    return _SPACE.sub(" ", html.unescape(alt if isinstance(alt, str) else "")).strip()


def _is_word(token: str) -> bool:
    return any(not unicodedata.category(ch).startswith(("P", "S", "Z", "C")) for ch in token)


def count_words(text: str) -> int:
    """Jieba tokens that are not whitespace, punctuation or symbols (emoji)."""
    return sum(1 for t in _jieba().lcut(text) if _is_word(t))


def select_sources(frame: pd.DataFrame, config: SourceConfig = SourceConfig()) -> pd.DataFrame:
    """Annotate candidates: alt_norm, word_count, and drop_reason for those that fail a rule."""
    out = frame.copy()
    norm = out["alt_text"].map(normalise_alt)
    out["alt_norm"] = norm.astype("str")
    chinese = norm.map(lambda t: is_mostly_chinese(t, config.min_han_share, config.max_kana_share)).astype(bool)
    words = pd.Series(0, index=out.index, dtype="int64")
    words[chinese] = norm[chinese].map(count_words).astype("int64")
    out["word_count"] = words
    reason = pd.Series(pd.NA, index=out.index, dtype="str")
    reason[~chinese] = f"{STAGE}.caption_not_chinese"
    bad_len = chinese & ((words < config.min_words) | (words > config.max_words))
    reason[bad_len] = f"{STAGE}.word_count"
    out["drop_reason"] = reason
    return out

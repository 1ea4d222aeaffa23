"""Stage source (stage 1, coarse): a Chinese caption, no NSFW text, no blacklisted site, 5-60 jieba words."""

from __future__ import annotations

import html
import logging
import re
import unicodedata
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING

import pandas as pd

from schemas.reasons import REASONS
from tasks.lexicon import Lexicon
from tasks.sites import SiteBlacklist, host_values
from tasks.text import is_mostly_chinese

if TYPE_CHECKING:
    from tasks.models import TextClassifier

STAGE = "source"
RULES = REASONS[STAGE]  # SPEC's order; a row takes the first rule it fails
_SPACE = re.compile(r"\s+")
_LISTS = ("keyword_lists", "extra_keyword_lists", "text_nsfw_labels", "site_blacklists", "extra_site_blacklists")


@dataclass(frozen=True)
class SourceConfig:
    min_words: int = 5  # paper: 5 <= jieba words
    max_words: int = 60  # paper: words <= 60
    min_han_share: float = 0.5  # caption units that must be Han characters (a Latin word is one unit)
    max_kana_share: float = 0.05  # more kana than this among CJK characters means Japanese
    # text_nsfw: keyword lists are built-in names (adult, ads, political, territorial) or UTF-8 files, one
    # keyword a line. Stage 1 drops adult text; ads, political and territorial are stage 2's safety rule.
    keyword_lists: tuple[str, ...] = ("adult",)  # replaces the default; () turns keywords off
    extra_keyword_lists: tuple[str, ...] = ()  # added to keyword_lists
    # The optional classifier is the nsfw_text model role (--nsfw-text-model); none by default.
    text_nsfw_labels: tuple[str, ...] = ("nsfw",)  # classifier labels (any case) that count as unsafe
    text_nsfw_threshold: float = 0.5  # drop when an unsafe label's probability is at least this
    # blacklisted_site: built-in "sites" or files of domains, one a line; a domain covers its subdomains
    site_blacklists: tuple[str, ...] = ("sites",)  # replaces the default; () turns the default off
    extra_site_blacklists: tuple[str, ...] = ()  # added to site_blacklists

    def __post_init__(self) -> None:
        for name in _LISTS:
            value = getattr(self, name)
            if not isinstance(value, tuple) or not all(isinstance(v, str) for v in value):
                raise ValueError(f"source.{name} must be a list of strings, got {value!r}")
        if not 0.0 <= self.text_nsfw_threshold <= 1.0:
            raise ValueError(f"source.text_nsfw_threshold must be within [0, 1], got {self.text_nsfw_threshold}")


@dataclass(frozen=True)
class SourceLists:
    """The keyword lists and site blacklists a config names, read once per shard."""

    keywords: Lexicon
    sites: SiteBlacklist

    @property
    def fingerprint(self) -> dict:
        """Of the lists' contents: part of the step's hash, so editing a list file recomputes the stage."""
        return {"keywords": self.keywords.fingerprint, "sites": self.sites.fingerprint}


def load_lists(config: SourceConfig) -> SourceLists:
    """The config's lists; a missing or empty list file is an error naming its path."""
    return SourceLists(Lexicon.load(config.keyword_lists + config.extra_keyword_lists),
                       SiteBlacklist.load(config.site_blacklists + config.extra_site_blacklists))


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


def select_sources(frame: pd.DataFrame, config: SourceConfig = SourceConfig(), lists: SourceLists | None = None,
                   classifier: TextClassifier | None = None) -> pd.DataFrame:
    """Annotate candidates: alt_norm, word_count, and drop_reason (the first rule, in RULES order, that fails).

    ``lists`` defaults to the config's (read here); ``classifier`` is the optional nsfw_text model, asked
    only about Chinese captions that no keyword caught.
    """
    lists = lists or load_lists(config)
    out = frame.copy()
    norm = out["alt_text"].map(normalise_alt)
    out["alt_norm"] = norm.astype("str")
    chinese = norm.map(lambda t: is_mostly_chinese(t, config.min_han_share, config.max_kana_share)).astype(bool)
    words = pd.Series(0, index=out.index, dtype="int64")
    words[chinese] = norm[chinese].map(count_words).astype("int64")
    out["word_count"] = words
    nsfw = _nsfw(norm, chinese, config, lists.keywords, classifier)
    listed = lists.sites.mask(host_values(out, "page_host", "page_url")) | \
        lists.sites.mask(host_values(out, "image_host", "url"))
    bad_len = (words < config.min_words) | (words > config.max_words)
    reason = pd.Series(pd.NA, index=out.index, dtype="str")
    # Assigned last rule first, so each row ends with the first rule it fails.
    for rule, failed in reversed([("caption_not_chinese", ~chinese), ("text_nsfw", chinese & nsfw),
                                  ("blacklisted_site", chinese & listed), ("word_count", chinese & bad_len)]):
        reason[failed] = f"{STAGE}.{rule}"
    out["drop_reason"] = reason
    return out


def _nsfw(norm: pd.Series, chinese: pd.Series, config: SourceConfig, keywords: Lexicon,
          classifier: TextClassifier | None) -> pd.Series:
    hit = pd.Series(False, index=norm.index, dtype=bool)
    hit[chinese] = keywords.hits(norm[chinese])["keyword"].notna()
    ask = chinese & ~hit
    if classifier is not None and ask.any():
        scores = classifier.unsafe_scores(norm[ask].tolist(), config.text_nsfw_labels)
        hit[ask] = scores >= config.text_nsfw_threshold
    return hit


HIST_MAX = 100  # caption word-count histogram: the last bin holds this many words or more


def word_count_hist(frame: pd.DataFrame, top: int = HIST_MAX) -> list[int]:
    """Counts of captions by word count (0..top, the last bin `top` or more) over the Chinese captions, the
    report's caption-length plot: captions the language rule turned away have no meaningful word count."""
    chinese = frame["drop_reason"].ne(f"{STAGE}.caption_not_chinese").fillna(True)
    hist = frame.loc[chinese, "word_count"].clip(upper=top).value_counts().sort_index()
    return [int(hist.get(i, 0)) for i in range(top + 1)]

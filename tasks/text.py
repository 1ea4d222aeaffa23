"""Character-class helpers shared by the text rules: Han, kana, hangul, Latin words."""

from __future__ import annotations

import re

_HAN = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0002ebef]")
_KANA = re.compile(r"[\u3040-\u30ff\u31f0-\u31ff\uff66-\uff9f]")
_HANGUL = re.compile(r"[\uac00-\ud7af\u1100-\u11ff\u3130-\u318f]")
_LATIN_WORD = re.compile(r"[A-Za-z\u00c0-\u024f]+")
_CYRILLIC_ETC_WORD = re.compile(r"[\u0370-\u03ff\u0400-\u04ff\u0590-\u06ff\u0e00-\u0e7f]+")


def script_counts(text: str) -> dict[str, int]:
    """Han characters, kana, hangul, and Latin/other alphabetic *words* (one unit per word)."""
    return {
        "han": len(_HAN.findall(text)),
        "kana": len(_KANA.findall(text)),
        "hangul": len(_HANGUL.findall(text)),
        "words": len(_LATIN_WORD.findall(text)) + len(_CYRILLIC_ETC_WORD.findall(text)),
    }


def is_mostly_chinese(text: str, min_han_share: float = 0.5, max_kana_share: float = 0.05) -> bool:
    """Han characters are most of the text's units, and kana are rare (kana means Japanese).

    A Latin word counts as one unit like one Han character, so brand names in a Chinese
    caption ("iPhone 15 手机壳") do not outweigh it.
    """
    return counts_mostly_chinese(script_counts(text), min_han_share, max_kana_share)


def counts_mostly_chinese(c: dict[str, int], min_han_share: float = 0.5, max_kana_share: float = 0.05) -> bool:
    """is_mostly_chinese on `script_counts` already taken (e.g. of a page's visible text)."""
    cjk = c["han"] + c["kana"] + c["hangul"]
    units = cjk + c["words"]
    if c["han"] == 0 or units == 0:
        return False
    if c["kana"] > max_kana_share * cjk or c["hangul"] > max_kana_share * cjk:
        return False
    return c["han"] / units >= min_han_share

"""Tests for tasks.source: the caption must be Chinese and 5-60 jieba words after normalisation."""

from __future__ import annotations

import jieba
import numpy as np
import pandas as pd
import pytest

from tasks.source import SourceConfig, count_words, normalise_alt, select_sources

# Common two-character words that jieba keeps whole; spaces between them make the segmentation certain.
WORDS = ["北京", "上海", "苹果", "手机", "电脑", "桌子", "椅子", "老师", "学生", "医院",
         "银行", "公园", "汽车", "飞机", "火车", "朋友", "家庭", "音乐", "电影", "天气"]


def _caption(n: int) -> str:
    return " ".join((WORDS * 4)[:n])


def _jieba_words(text: str) -> int:
    """Independent count: jieba tokens other than whitespace and punctuation."""
    return sum(1 for t in jieba.lcut(text) if t.strip() and t not in "，。！？、,.!?&")


def _frame(alts: list) -> pd.DataFrame:
    return pd.DataFrame({"key": [f"k{i}" for i in range(len(alts))], "alt_text": pd.Series(alts, dtype=object)})


def _reasons(out: pd.DataFrame) -> list:
    return [None if pd.isna(r) else r for r in out["drop_reason"]]


def test_non_chinese_captions_are_dropped():
    alts = ["一只可爱的小猫在草地上玩耍", "A cute cat playing on the grass in the garden",
            "草原でかわいい猫が遊んでいる写真です", "귀여운 고양이 사진", "", "   ", None, np.nan, "12345 678"]
    out = select_sources(_frame(alts))
    assert _reasons(out) == [None] + ["source.caption_not_chinese"] * 8
    assert out.loc[1:, "word_count"].eq(0).all()  # words are only counted for Chinese captions
    assert out["alt_norm"].tolist()[4:8] == ["", "", "", ""]  # missing alt is the empty caption


@pytest.mark.parametrize("n, reason", [(4, "source.word_count"), (5, None), (60, None), (61, "source.word_count")])
def test_word_count_bounds_are_inclusive(n, reason):
    caption = _caption(n)
    assert count_words(caption) == _jieba_words(caption) == n
    out = select_sources(_frame([caption]))
    assert out["word_count"].tolist() == [n]
    assert _reasons(out) == [reason]


def test_word_count_bounds_are_config():
    out = select_sources(_frame([_caption(4), _caption(8)]), SourceConfig(min_words=3, max_words=6))
    assert _reasons(out) == [None, "source.word_count"]


def test_punctuation_and_emoji_are_not_words():
    text = "北京，上海！😀😀 苹果……手机 🎉 电脑。"
    assert count_words(text) == 5
    assert _reasons(select_sources(_frame([text]))) == [None]


def test_brand_names_do_not_make_a_chinese_caption_foreign():
    caption = "iPhone 15 手机壳 透明 防摔 全包 保护套"
    out = select_sources(_frame([caption]))
    assert _reasons(out) == [None]
    assert out["word_count"].tolist() == [_jieba_words(caption)]


def test_html_entities_and_whitespace_are_normalised():
    raw = "苹果&amp;香蕉&nbsp;&nbsp;水果\n\t拼盘 &lt;新鲜&gt; 现切&#x6C34;果"
    assert normalise_alt(raw) == "苹果&香蕉 水果 拼盘 <新鲜> 现切水果"
    out = select_sources(_frame([raw]))
    assert out["alt_norm"].tolist() == [normalise_alt(raw)]
    assert out["alt_text"].tolist() == [raw]  # the raw attribute is kept as it was
    # the count is taken on the normalised text: an entity is not three words
    assert out["word_count"].tolist() == [count_words(normalise_alt(raw))]
    assert count_words(normalise_alt("北京&nbsp;上海")) == 2


def test_output_columns_and_types():
    out = select_sources(_frame(["北京 上海 苹果 手机 电脑", "hello"]))
    assert out["word_count"].dtype == "int64"
    assert str(out["alt_norm"].dtype) == "str"
    assert out["key"].tolist() == ["k0", "k1"]  # rows annotated, not removed or reordered


def test_all_foreign_and_empty_frames():
    out = select_sources(_frame(["hello world", "bonjour"]))
    assert _reasons(out) == ["source.caption_not_chinese"] * 2
    empty = select_sources(_frame([]))
    assert len(empty) == 0 and {"alt_norm", "word_count", "drop_reason"} <= set(empty.columns)

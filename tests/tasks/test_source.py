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


# --- text_nsfw, blacklisted_site and the rule order ------------------------------------------------------

CLEAN = "北京 上海 苹果 手机 电脑 桌子"  # Chinese, six words, no keyword
ADULT = "北京 上海 色情网站 手机 电脑 桌子"  # a built-in adult keyword, otherwise like CLEAN


def _sited(rows: list[tuple]) -> pd.DataFrame:
    """Candidates with hosts: (alt, page_url, image url), hosts taken from the URLs as extract does."""
    from urllib.parse import urlsplit

    alts, pages, urls = zip(*rows, strict=True) if rows else ((), (), ())
    frame = _frame(list(alts))
    frame["page_url"], frame["url"] = list(pages), list(urls)
    frame["page_host"] = [(urlsplit(u).hostname or "") for u in pages]
    frame["image_host"] = [(urlsplit(u).hostname or "") for u in urls]
    return frame


PAGE, IMG = "https://www.sample-zh.test/a.html", "https://img.sample-zh.test/1.jpg"
BAD_PAGE, BAD_IMG = "https://cn.pornhub.com/view/1.html", "https://img.xvideos.com/1.jpg"


def test_builtin_adult_keywords_drop_chinese_captions():
    alts = [CLEAN, ADULT, "北京 上海 ＡＶ女优 手机 电脑", "北京&nbsp;上海 &#x8272;情网站 手机 电脑",
            "北京 上海 加微信 手机 电脑"]
    out = select_sources(_frame(alts))
    # ads are stage 2's rule: the stage-1 default lists are adult only
    assert _reasons(out) == [None, "source.text_nsfw", "source.text_nsfw", "source.text_nsfw", None]


def test_keyword_lists_are_added_or_replaced_by_config(tmp_path):
    mine = tmp_path / "mine.txt"
    mine.write_text("苹果手机\n", encoding="utf-8")
    alts = ["北京 上海 苹果手机 电脑 桌子", ADULT, "北京 上海 加微信 手机 电脑"]
    assert _reasons(select_sources(_frame(alts))) == [None, "source.text_nsfw", None]
    added = SourceConfig(extra_keyword_lists=(str(mine), "ads"))
    assert _reasons(select_sources(_frame(alts), added)) == ["source.text_nsfw"] * 3
    replaced = SourceConfig(keyword_lists=(str(mine),))
    assert _reasons(select_sources(_frame(alts), replaced)) == ["source.text_nsfw", None, None]
    off = SourceConfig(keyword_lists=())
    assert _reasons(select_sources(_frame(alts), off)) == [None, None, None]


def test_missing_and_empty_list_files_are_errors_naming_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        select_sources(_frame([CLEAN]), SourceConfig(extra_keyword_lists=(str(tmp_path / "missing.txt"),)))
    (tmp_path / "blank.txt").write_text("\n  \n", encoding="utf-8")
    with pytest.raises(ValueError, match="blank.txt"):
        select_sources(_frame([CLEAN]), SourceConfig(extra_site_blacklists=(str(tmp_path / "blank.txt"),)))


def test_list_settings_must_be_lists():
    with pytest.raises(ValueError, match="keyword_lists must be a list of strings"):
        SourceConfig(keyword_lists="adult")
    with pytest.raises(ValueError, match="text_nsfw_threshold"):
        SourceConfig(text_nsfw_threshold=1.5)


def test_blacklisted_page_or_image_host_drops_the_pair():
    rows = [(CLEAN, PAGE, IMG), (CLEAN, BAD_PAGE, IMG), (CLEAN, PAGE, BAD_IMG),
            (CLEAN, "https://WWW.PornHub.com.:8443/x", IMG), (CLEAN, "https://notpornhub.com/x", IMG)]
    out = select_sources(_sited(rows))
    assert _reasons(out) == [None, "source.blacklisted_site", "source.blacklisted_site", "source.blacklisted_site",
                             None]


def test_hosts_come_from_urls_when_the_host_columns_are_absent():
    frame = _sited([(CLEAN, PAGE, IMG), (CLEAN, BAD_PAGE, IMG), (CLEAN, PAGE, BAD_IMG)]).drop(
        columns=["page_host", "image_host"])
    assert _reasons(select_sources(frame)) == [None, "source.blacklisted_site", "source.blacklisted_site"]


def test_site_lists_are_added_or_replaced_by_config(tmp_path):
    mine = tmp_path / "sites.txt"
    mine.write_text("\ufeffhttp://www.Bad.Example/path\r\n例子.测试,\r\n", encoding="utf-8")
    rows = [(CLEAN, "https://m.bad.example/", IMG), (CLEAN, PAGE, "https://图片.例子.测试/1.jpg"),
            (CLEAN, BAD_PAGE, IMG), (CLEAN, PAGE, IMG)]
    assert _reasons(select_sources(_sited(rows))) == [None, None, "source.blacklisted_site", None]
    added = select_sources(_sited(rows), SourceConfig(extra_site_blacklists=(str(mine),)))
    assert _reasons(added) == ["source.blacklisted_site"] * 3 + [None]
    replaced = select_sources(_sited(rows), SourceConfig(site_blacklists=(str(mine),)))
    assert _reasons(replaced) == ["source.blacklisted_site"] * 2 + [None, None]
    assert _reasons(select_sources(_sited(rows), SourceConfig(site_blacklists=()))) == [None] * 4


def test_each_row_gets_the_first_rule_it_fails():
    """SPEC order: caption_not_chinese, text_nsfw, blacklisted_site, word_count."""
    rows = [
        ("An English caption about some website: 色情网站", BAD_PAGE, BAD_IMG),  # fails all four
        ("色情网站", BAD_PAGE, IMG),  # nsfw, blacklisted, too few words
        ("风景", BAD_PAGE, IMG),  # blacklisted, too few words
        ("风景", PAGE, IMG),  # too few words
        (_caption(61), PAGE, BAD_IMG),  # blacklisted, too many words
        (None, BAD_PAGE, IMG),  # a missing alt is not Chinese
        (np.nan, PAGE, IMG),
        (CLEAN, PAGE, IMG),
    ]
    out = select_sources(_sited(rows))
    assert _reasons(out) == ["source.caption_not_chinese", "source.text_nsfw", "source.blacklisted_site",
                             "source.word_count", "source.blacklisted_site", "source.caption_not_chinese",
                             "source.caption_not_chinese", None]
    assert out["word_count"].tolist()[:5] == [0, count_words("色情网站"), 1, 1, 61]  # counted for every Chinese row


def test_lists_given_once_are_used_as_given(tmp_path):
    from tasks.source import load_lists

    mine = tmp_path / "mine.txt"
    mine.write_text("苹果手机\n", encoding="utf-8")
    lists = load_lists(SourceConfig(keyword_lists=(str(mine),)))
    mine.write_text("别的词\n", encoding="utf-8")  # the loaded lists, not the file, decide
    out = select_sources(_frame(["北京 上海 苹果手机 电脑 桌子"]), SourceConfig(), lists)
    assert _reasons(out) == ["source.text_nsfw"]
    assert lists.fingerprint != load_lists(SourceConfig(keyword_lists=(str(mine),))).fingerprint


# --- the optional text classifier (nsfw_text role), on tiny random-weight checkpoints that judge nothing ----

class _Spy:
    """Wraps a classifier and records which texts it was asked about."""

    def __init__(self, inner):
        self.inner, self.asked = inner, []

    def unsafe_scores(self, texts, unsafe):
        self.asked += list(texts)
        return self.inner.unsafe_scores(texts, unsafe)


def _classifier(tmp_path, name: str, **kw):
    from tiny_models import build_tiny_text_classifier

    from tasks.models import load_text_classifier, resolve_model

    return load_text_classifier(resolve_model("nsfw_text", str(build_tiny_text_classifier(tmp_path / name, **kw))),
                                device="cpu")


def test_classifier_label_and_threshold_decide_the_drop(tmp_path):
    """A placeholder checkpoint whose head is biased so 'nsfw' wins for every text: the mechanics, not a judgement."""
    classifier = _Spy(_classifier(tmp_path, "biased", bias={"nsfw": 10.0}))
    alts = [CLEAN, ADULT, "hello world", "北京 上海 公园 汽车 飞机 火车"]
    out = select_sources(_frame(alts), SourceConfig(), classifier=classifier)
    assert _reasons(out) == ["source.text_nsfw", "source.text_nsfw", "source.caption_not_chinese", "source.text_nsfw"]
    # asked only about Chinese captions no keyword caught, as normalised
    assert classifier.asked == [normalise_alt(CLEAN), normalise_alt(alts[3])]
    safe_label = select_sources(_frame(alts), SourceConfig(text_nsfw_labels=("SAFE",)), classifier=classifier)
    assert _reasons(safe_label) == [None, "source.text_nsfw", "source.caption_not_chinese", None]
    strict = select_sources(_frame(alts), SourceConfig(text_nsfw_threshold=1.0), classifier=classifier)
    assert _reasons(strict) == [None, "source.text_nsfw", "source.caption_not_chinese", None]


def test_classifier_threshold_splits_by_score(tmp_path):
    classifier = _classifier(tmp_path, "plain")
    alts = [_caption(n) for n in range(5, 25)]
    scores = classifier.unsafe_scores([normalise_alt(a) for a in alts], ["nsfw"])
    assert ((0 < scores) & (scores < 1)).all() and len(set(scores.round(6))) > 1
    threshold = float(np.median(scores))
    out = select_sources(_frame(alts), SourceConfig(text_nsfw_threshold=threshold), classifier=classifier)
    assert [r == "source.text_nsfw" for r in _reasons(out)] == (scores >= threshold).tolist()
    probabilities = classifier.probabilities([normalise_alt(a) for a in alts])
    assert np.allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)  # single-label: a softmax


def test_multi_label_classifier_uses_a_sigmoid_per_label(tmp_path):
    classifier = _classifier(tmp_path, "multi", labels=("porn", "violence", "ads"), multi_label=True)
    probabilities = classifier.probabilities([CLEAN, ADULT, "你好"])
    assert probabilities.shape == (3, 3) and not np.allclose(probabilities.sum(axis=1), 1.0)
    assert np.allclose(classifier.unsafe_scores([CLEAN], ["PORN", "ads"]), probabilities[0, [0, 2]].max())


def test_classifier_is_loaded_once_per_process(tmp_path):
    from tasks.models import load_text_classifier, resolve_model

    first = _classifier(tmp_path, "once")
    again = load_text_classifier(resolve_model("nsfw_text", str(tmp_path / "once")), device="cpu")
    assert again is first


def test_classifier_labels_that_name_none_of_the_models_are_a_clear_error(tmp_path):
    from tasks.models import check_text_classifier, resolve_model

    classifier = _classifier(tmp_path, "labels")
    with pytest.raises(ValueError, match=r"labels \['safe', 'nsfw'\].*text_nsfw_labels"):
        select_sources(_frame([CLEAN]), SourceConfig(text_nsfw_labels=("toxic",)), classifier=classifier)
    resolved = resolve_model("nsfw_text", str(tmp_path / "labels"))
    check_text_classifier(resolved, ["NSFW"])
    with pytest.raises(ValueError, match="toxic"):
        check_text_classifier(resolved, ["toxic"])


def test_a_named_classifier_that_cannot_load_is_a_clear_error(tmp_path):
    from tiny_models import build_tiny_text_classifier

    from tasks.models import ModelLoadError, load_text_classifier, resolve_model

    with pytest.raises(ModelLoadError, match="no such local directory"):
        resolve_model("nsfw_text", str(tmp_path / "absent"))
    broken = build_tiny_text_classifier(tmp_path / "broken")
    for weights in broken.glob("*.safetensors"):
        weights.write_bytes(b"not weights")
    resolved = resolve_model("nsfw_text", str(broken))  # the config alone still loads
    with pytest.raises(ModelLoadError, match="cannot load text classifier"):
        load_text_classifier(resolved, device="cpu")

"""Tests for tasks.lexicon: list files as people publish them, and the Aho-Corasick keyword matcher."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from _fixtures import fixture_path

from tasks.lexicon import BUILTIN_LISTS, Hit, Lexicon, normalise_text, read_list

FWWDN = "lexicons/fwwdn"


def _write(path, data: bytes):
    path.write_bytes(data)
    return path


def test_lines_are_normalised(tmp_path):
    lines = ["\ufeff# a comment line", "色情片,", "  成人视频 ，", "", "   ", "AV女优;", "色情片", "#注释", "ｓｍ"]
    raw = "\r\n".join([*lines, ""]).encode()
    name, entries = read_list(_write(tmp_path / "mine.txt", raw))
    assert name == "mine"
    assert entries == ["色情片", "成人视频", "AV女优", "色情片", "ｓｍ"]
    lexicon = Lexicon.load([tmp_path / "mine.txt"])
    assert lexicon.lists == {"mine": ("色情片", "成人视频", "av女优", "sm")}  # NFKC, lower case, no duplicates


def test_internal_whitespace_is_one_space_on_both_sides():
    lexicon = Lexicon({"l": ["出售  气枪\tQQ"]})
    assert lexicon.lists["l"] == ("出售 气枪 qq",)
    assert lexicon.find("出售\u3000气枪 ＱＱ 123") == Hit("l", "出售 气枪 qq")


@pytest.mark.parametrize("content", [b"", b"\n\n  \r\n\t\n", b"\xef\xbb\xbf# only comments\n#\n", b",\n,,\n"])
def test_a_list_without_entries_is_an_error_naming_the_path(tmp_path, content):
    path = _write(tmp_path / "empty.txt", content)
    with pytest.raises(ValueError, match="empty.txt.*holds no entries"):
        Lexicon.load([path])


def test_a_missing_list_is_an_error_naming_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.txt") as err:
        Lexicon.load(["adult", str(tmp_path / "nope.txt")])
    assert "adult" in str(err.value)  # the message lists the built-in names too
    with pytest.raises(FileNotFoundError, match="'adults'"):  # a misspelt built-in name is a missing file
        Lexicon.load(["adults"])


def test_a_list_that_is_not_utf8_is_a_clear_error(tmp_path):
    path = _write(tmp_path / "gbk.txt", "色情片\n".encode("gbk"))
    with pytest.raises(ValueError, match="gbk.txt is not UTF-8"):
        Lexicon.load([path])


def test_builtin_lists_load_and_are_short_simplified_chinese():
    import opencc

    to_simplified = opencc.OpenCC("t2s")
    for name in BUILTIN_LISTS:
        lexicon = Lexicon.load([name])
        keywords = lexicon.lists[name]
        assert 5 <= len(keywords) <= 60, name
        assert all(to_simplified.convert(k) == k for k in keywords), name


def test_builtin_lists_do_not_fire_on_ordinary_captions():
    """COCO-CN's human captions (read in place) are ordinary captions: no built-in keyword may fire."""
    path = fixture_path("images/coco_cn/coco-cn_ext.icap2020.txt")
    captions = pd.Series([line.split("\t", 1)[-1] for line in path.read_text(encoding="utf-8").splitlines()])
    assert len(captions) > 4000
    hits = Lexicon.load(BUILTIN_LISTS).hits(captions)
    assert hits["keyword"].isna().all(), hits.dropna().join(captions.rename("caption")).head()


def test_real_published_lists_crlf_and_trailing_commas():
    """fwwdn's lists as published (read in place): CRLF lines, entries ending in a comma, repeats."""
    ads = fixture_path(f"{FWWDN}/广告.txt")
    adult = fixture_path(f"{FWWDN}/色情类.txt")
    political = fixture_path(f"{FWWDN}/政治类.txt")
    assert b"\r\n" in ads.read_bytes() and b",\n" in adult.read_bytes()
    lexicon = Lexicon.load([ads, adult, political])
    assert set(lexicon.lists) == {"广告", "色情类", "政治类"}
    for name, keywords in lexicon.lists.items():
        assert len(keywords) > 50 and len(set(keywords)) == len(keywords), name
        assert not any(k.endswith((",", "\r", " ")) or k != k.strip() for k in keywords), name
    raw = read_list(political)[1]
    assert len(raw) > len(lexicon.lists["政治类"])  # the file repeats some entries; the lexicon keeps each once
    assert "xjp" in lexicon.lists["政治类"] and "xjp," not in lexicon.lists["政治类"]
    assert lexicon.find("this text mentions xjp once").keyword == "xjp"
    assert lexicon.find("xjpx is another word") is None


def test_overlapping_keywords_first_ending_then_longest():
    lexicon = Lexicon({"a": ["色情片", "情片段"], "b": ["成人", "成人电影", "电影院"]})
    assert lexicon.find("他在看成人电影院") == Hit("b", "成人")  # ends first
    assert lexicon.find("一段色情片段") == Hit("a", "色情片")
    assert lexicon.find("情片段") == Hit("a", "情片段")
    nested = Lexicon({"x": ["电影", "人电影"]})
    assert nested.find("成人电影") == Hit("x", "人电影")  # both end together: the longer one
    hits = nested.hits(pd.Series(["成人电影", "电影", "人电"]))
    assert hits["keyword"].tolist()[:2] == ["人电影", "电影"] and pd.isna(hits["keyword"].iloc[2])


def test_a_keyword_in_two_lists_reports_the_first_list():
    lexicon = Lexicon({"first": ["刷单"], "second": ["刷单", "日结"]})
    assert lexicon.find("刷单日结") == Hit("first", "刷单")
    assert lexicon.lists["second"] == ("刷单", "日结")


def test_full_width_and_case_are_normalised_on_both_sides():
    lexicon = Lexicon({"l": ["AV女优", "ｓｅｘ　ｓｈｏｐ"]})
    assert lexicon.lists["l"] == ("av女优", "sex shop")
    for text in ["ＡＶ女优写真", "av女优", "Av女优", "a sex shop", "SEX SHOP!"]:
        assert lexicon.find(text) is not None, text
    assert normalise_text("ＡＢＣ１２３　ｘ") == "abc123 x"


def test_ascii_keywords_match_whole_words_only():
    lexicon = Lexicon({"l": ["sm", "3p", "qq群"]})
    assert lexicon.find("SMS 短信") is None and lexicon.find("smart") is None and lexicon.find("3pm") is None
    assert lexicon.find("一张sm图片") == Hit("l", "sm")  # Han characters around it do not make it part of a word
    assert lexicon.find("sm") == Hit("l", "sm") and lexicon.find("(3P)") == Hit("l", "3p")
    assert lexicon.find("加qq群12345") == Hit("l", "qq群")  # mixed keywords are plain substrings


def test_non_strings_and_empty_lexicons():
    lexicon = Lexicon({"l": ["色情片"]})
    for value in [None, np.nan, pd.NA, 3, ""]:
        assert lexicon.find(value) is None
    texts = pd.Series([None, np.nan, "色情片", pd.NA, ""], index=[10, 11, 12, 13, 14], dtype=object)
    hits = lexicon.hits(texts)
    assert hits.index.tolist() == [10, 11, 12, 13, 14]
    assert hits["list_name"].isna().tolist() == [True, True, False, True, True]
    empty = Lexicon({})
    assert len(empty) == 0 and empty.find("色情片") is None
    assert empty.hits(pd.Series(["色情片"]))["keyword"].isna().all()
    assert Lexicon.load([]).hits(pd.Series([], dtype="str")).empty


def test_hits_agree_with_find_row_by_row():
    keywords = ["色情片", "情片", "sm", "成人视频", "😀坏", "av女优", "片"]
    lexicon = Lexicon({"l": keywords})
    rng = np.random.default_rng(0)
    alphabet = list("色情片成人视频坏好的 smSMａｖ女优😀\n") + ["AV"]
    texts = ["".join(rng.choice(alphabet, size=rng.integers(0, 12))) for _ in range(400)]
    hits = lexicon.hits(pd.Series(texts, dtype="str"))
    for text, name, keyword in zip(texts, hits["list_name"], hits["keyword"], strict=True):
        expected = lexicon.find(text)
        assert (None if pd.isna(keyword) else (name, keyword)) == (tuple(expected) if expected else None), text


def test_fingerprint_follows_the_contents_not_the_path(tmp_path):
    (tmp_path / "a").mkdir()
    a = _write(tmp_path / "a" / "list.txt", "色情片\n".encode())
    b = _write(tmp_path / "list.txt", "色情片,\r\n".encode())
    assert Lexicon.load([a]).fingerprint == Lexicon.load([b]).fingerprint
    b.write_text("色情片\n成人视频\n", encoding="utf-8")
    assert Lexicon.load([a]).fingerprint != Lexicon.load([b]).fingerprint

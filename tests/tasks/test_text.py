"""Tests for tasks.text: character-class counts and the mostly-Chinese rule."""

from __future__ import annotations

import pytest

from tasks.text import is_mostly_chinese, script_counts


def test_script_counts_count_han_kana_hangul_and_words():
    assert script_counts("iPhone 15 手机壳") == {"han": 3, "kana": 0, "hangul": 0, "words": 1}
    assert script_counts("東京タワーの夜景") == {"han": 4, "kana": 4, "hangul": 0, "words": 0}
    assert script_counts("한국 韓國") == {"han": 2, "kana": 0, "hangul": 2, "words": 0}
    assert script_counts("Москва и Café 北京") == {"han": 2, "kana": 0, "hangul": 0, "words": 3}
    assert script_counts("𠀀𪚥㐀") == {"han": 3, "kana": 0, "hangul": 0, "words": 0}  # extension B, A
    assert script_counts("，。！123 ...") == {"han": 0, "kana": 0, "hangul": 0, "words": 0}


@pytest.mark.parametrize("text, expected", [
    ("一只可爱的小猫", True),
    ("這是繁體中文", True),
    ("iPhone 15 手机壳 透明", True),
    ("", False),
    ("12345", False),
    ("A photo of a cat", False),
    ("草原でかわいい猫が遊んでいる", False),
    ("귀여운 고양이", False),
    ("中", True),
])
def test_is_mostly_chinese(text, expected):
    assert is_mostly_chinese(text) is expected


def test_han_share_boundary_counts_a_latin_word_as_one_unit():
    assert is_mostly_chinese("猫 cat") is True  # 1 of 2 units: exactly half passes
    assert is_mostly_chinese("猫 cute cat") is False  # 1 of 3
    assert is_mostly_chinese("小猫 cute cat") is True  # 2 of 4
    assert is_mostly_chinese("猫 cute cat", min_han_share=0.3) is True


def test_kana_share_boundary():
    han = "北京上海广州深圳天津重庆南京杭州苏州武汉成都西安长沙郑州济南青岛大连厦门"
    assert is_mostly_chinese(han[:19] + "の") is True  # 1 kana of 20 CJK = 5%: allowed
    assert is_mostly_chinese(han[:18] + "の") is False  # 1 of 19 > 5%
    assert is_mostly_chinese(han[:18] + "の", max_kana_share=0.1) is True
    assert is_mostly_chinese(han[:19] + "한") is True  # hangul has the same allowance
    assert is_mostly_chinese(han[:18] + "한") is False

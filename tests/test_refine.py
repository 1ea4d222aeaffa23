"""Tests for tasks.refine: caption cleaning first, then Traditional -> Simplified; nothing dropped yet."""

from __future__ import annotations

import pandas as pd
import pytest

from tasks.refine import RefineConfig, clean_caption, refine_text


@pytest.mark.parametrize("raw, clean", [
    ("可爱😀小猫🐱", "可爱 小猫"),
    ("爱心❤️礼物", "爱心 礼物"),  # the emoji's variation selector goes with it
    ("数字1️⃣号", "数字1号"),  # the keycap mark goes, the digit stays
    ("点赞👍🏻很好", "点赞 很好"),  # skin-tone modifier
    ("家庭👨\u200d👩\u200d👧合照", "家庭 合照"),  # ZWJ sequence
    ("国旗🇨🇳中国", "国旗 中国"),  # regional indicators
    ("访问 https://shop.example.cn/item?id=1&x=2 查看", "访问 查看"),
    ("见www.taobao.com店铺", "见 店铺"),  # Chinese right after a URL is not part of it
    ("详情http://x.cn/p?q=%E4%B8%AD#f，欢迎", "详情 ，欢迎"),
    ("FTP://files.example.cn/a.zip 下载", "下载"),
    ("零\u200b宽\ufeff字符\u200d测试\u2060", "零宽字符测试"),
    ("<b>粗体</b>文字<br/>换行", "粗体 文字 换行"),
    ("&lt;i&gt;斜体&lt;/i&gt;&amp;正文", "斜体 &正文"),
    ("多   空格\t\n换行\u3000全角空格", "多 空格 换行 全角空格"),
    ("™商标®标志©", "商标 标志"),
    ("控制\x07字符\x00", "控制 字符"),
    ("私用\ue000区", "私用 区"),
    ("50% 折扣 & 包邮 #新品 @店铺 +1", "50% 折扣 & 包邮 #新品 @店铺 +1"),  # ordinary signs stay
    ("中文，标点。符号！（括号）", "中文，标点。符号！（括号）"),
    ("  😀  ", ""),
])
def test_clean_caption(raw, clean):
    assert clean_caption(raw) == clean


def test_urls_can_be_kept():
    assert clean_caption("见 www.example.cn 店铺", RefineConfig(strip_urls=False)) == "见 www.example.cn 店铺"


def _frame(alt_norm: list[str]) -> pd.DataFrame:
    return pd.DataFrame({"key": [f"k{i}" for i in range(len(alt_norm))], "alt_norm": alt_norm,
                         "drop_reason": pd.Series([pd.NA] * len(alt_norm), dtype="str")})


def test_traditional_becomes_simplified_after_cleaning():
    frame = _frame(["繁體中文網頁😀", "這是一張美麗的風景圖片", "简体中文保持不变", "臺灣 發展 資訊 http://x.tw 歷史"])
    out = refine_text(frame)
    assert out["caption"].tolist() == [
        "繁体中文网页", "这是一张美丽的风景图片", "简体中文保持不变", "台湾 发展 资讯 历史"]
    assert out["alt_norm"].tolist() == frame["alt_norm"].tolist()  # the input column is left alone


def test_conversion_can_be_switched_off():
    out = refine_text(_frame(["繁體中文"]), RefineConfig(convert=""))
    assert out["caption"].tolist() == ["繁體中文"]


def test_refine_drops_nothing_and_keeps_order():
    frame = _frame(["😀😀", "可爱的小猫", "", "www.example.com"])
    out = refine_text(frame)
    assert out["key"].tolist() == frame["key"].tolist()
    assert out["drop_reason"].isna().all()
    assert out["caption"].tolist() == ["", "可爱的小猫", "", ""]
    assert str(out["caption"].dtype) == "str"

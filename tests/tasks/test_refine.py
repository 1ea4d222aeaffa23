"""Tests for tasks.refine: cleaning first, then each rule on captions that pass and captions that fail it."""

from __future__ import annotations

import pandas as pd
import pytest
from _fixtures import fixture_path

from tasks.lexicon import read_list
from tasks.refine import (
    SCORE_COLUMNS,
    Corpus,
    RefineConfig,
    clean_caption,
    count_corpus,
    load_resources,
    refine_text,
)

GOOD = "清晨的西湖边，一只橘猫安静地趴在窗台上晒太阳"  # passes every rule


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
    ("中文，标点。符号！（括号）", "中文，标点。符号！（括号）"),  # Chinese punctuation stays full width
    ("ｉＰｈｏｎｅ１５手机壳＆配件", "iPhone15手机壳&配件"),  # full-width ASCII folds to half width
    ("孤立\ud800代理\udfff字符", "孤立 代理 字符"),  # lone surrogates
    ("无效\uffff码位\U0010ffff", "无效 码位"),  # noncharacters
    ("  😀  ", ""),
    ("", ""),
])
def test_clean_caption(raw, clean):
    assert clean_caption(raw) == clean


def test_urls_can_be_kept():
    assert clean_caption("见 www.example.cn 店铺", RefineConfig(strip_urls=False)) == "见 www.example.cn 店铺"


def _frame(alt_norm: list[str]) -> pd.DataFrame:
    return pd.DataFrame({"key": [f"k{i}" for i in range(len(alt_norm))], "alt_norm": alt_norm,
                         "drop_reason": pd.Series([pd.NA] * len(alt_norm), dtype="str")})


def _reasons(captions: list[str], config: RefineConfig | None = None, **resources) -> list:
    config = config or RefineConfig()
    res = load_resources(config, **resources) if resources else None
    out = refine_text(_frame(captions), config, res)
    return [None if pd.isna(r) else r for r in out["drop_reason"]]


def test_traditional_becomes_simplified_after_cleaning():
    frame = _frame(["繁體中文網頁上的圖片😀", "這是一張美麗的風景圖片", "简体中文保持不变的句子",
                    "臺灣 發展 資訊 http://x.tw 歷史"])
    out = refine_text(frame, RefineConfig(lid_threshold=0.0))
    assert out["caption"].tolist() == [
        "繁体中文网页上的图片", "这是一张美丽的风景图片", "简体中文保持不变的句子", "台湾 发展 资讯 历史"]
    assert out["alt_norm"].tolist() == frame["alt_norm"].tolist()  # the input column is left alone


def test_conversion_can_be_switched_off():
    out = refine_text(_frame(["繁體中文"]), RefineConfig(convert=""))
    assert out["caption"].tolist() == ["繁體中文"]


def test_every_row_keeps_its_scores_and_order():
    frame = _frame(["😀😀", GOOD, "", "www.example.com"])
    out = refine_text(frame)
    assert out["key"].tolist() == frame["key"].tolist()
    assert out["caption"].tolist() == ["", GOOD, "", ""]
    assert str(out["caption"].dtype) == "str"
    assert set(SCORE_COLUMNS) <= set(out.columns)
    assert out["lid_score"].between(0, 1).all() and (out["word_entropy"] >= 0).all()
    assert pd.isna(out["drop_reason"].tolist()[1]) and out["drop_reason"].notna().sum() == 3


# --- each rule: a caption that passes and one that fails, by its reason -----------------------------------


def test_lid():
    assert _reasons([GOOD, "京都の古いお寺と紅葉がとてもきれいです", "Morning mist over the lake with herons",
                     "東京駅丸之内駅舎保存復原工事完成記念写真展示会場風景"]) == [
        None, "refine.lid", "refine.lid", "refine.lid"]  # the last: kanji-only Japanese, no kana to see
    # The threshold and the labels are settings.
    assert _reasons(["東京駅丸之内駅舎保存復原工事完成記念写真展示会場風景"], RefineConfig(lid_threshold=0.0)) == [None]


def test_stop_words(tmp_path):
    assert _reasons([GOOD, "点击查看原图，下载高清大图，更多图片请关注", "图片 1 2 3 高清 图片 下载"]) == [
        None, "refine.stop_words", "refine.stop_words"]  # bare numbers count as boilerplate
    words = tmp_path / "shop.txt"
    words.write_text("新品\n上市\n", encoding="utf-8")
    caption = "新品 上市 图片 新品 上市 高清 大图"
    assert _reasons([caption]) == [None]
    assert _reasons([caption], RefineConfig(extra_stop_word_lists=(str(words),))) == ["refine.stop_words"]
    assert _reasons([caption], RefineConfig(stop_word_lists=(), extra_stop_word_lists=(str(words),))) == [None]
    with pytest.raises(FileNotFoundError, match="stop-word list"):
        load_resources(RefineConfig(extra_stop_word_lists=(str(tmp_path / "absent.txt"),)))


def test_default_stop_list_is_the_projects_own():
    name, entries = read_list("zh", builtin_dir="stopwords", builtins=("zh",))
    assert name == "zh" and {"的", "图片", "点击", "logo"} <= set(entries)


def test_no_noun():
    assert _reasons([GOOD, "慢慢地走过来，然后轻轻地坐下，又悄悄地离开"]) == [None, "refine.no_noun"]
    assert _reasons(["慢慢地走过来，然后轻轻地坐下，又悄悄地离开"], RefineConfig(noun_tags=("n", "v"))) == [None]


def test_unk_tokens_with_the_placeholder_tokenizer():
    rare = "𠀋𡈽𡌛𡑮𡢽𠮟"  # CJK Extension B: outside a character-level vocabulary
    assert _reasons([f"古籍里有{rare[:5]}几个生僻字的博物馆展品", f"古籍里有{rare}几个生僻字的博物馆展品"]) == [
        None, "refine.unk_tokens"]
    assert _reasons([f"古籍里有{rare}几个生僻字的博物馆展品"], RefineConfig(max_unk_tokens=6)) == [None]


def test_unk_tokens_with_a_real_tokenizer(tmp_path):
    """A tiny checkpoint's character BertTokenizer (random weights; only its vocabulary matters here)."""
    from tiny_models import UNSEEN_CHAR, build_tiny_text_classifier

    from tasks.models import count_unknown_tokens, resolve_model

    resolved = resolve_model("tokenizer", str(build_tiny_text_classifier(tmp_path / "bert")))
    count = lambda texts: count_unknown_tokens(resolved, texts)  # noqa: E731
    seen = "一个男人和一个女人穿着军装在街上玩手机"  # characters of the captions the vocabulary was built from
    assert count([seen]) == [0]  # Chinese characters are in the vocabulary, not [UNK]
    captions = [seen, seen + UNSEEN_CHAR * 5, seen + UNSEEN_CHAR * 6]
    assert _reasons(captions, count_unknown=count) == [None, None, "refine.unk_tokens"]


def test_low_entropy_under_jieba_and_under_a_run_corpus():
    rare = "镧系 钆 铽 镝 钬 铒 铥 镱 镥"
    out = refine_text(_frame([GOOD, rare]))
    assert out["drop_reason"].tolist()[1] == "refine.low_entropy" and pd.isna(out["drop_reason"].tolist()[0])
    assert out["word_entropy"].tolist()[0] > 100 * RefineConfig().entropy_threshold > out["word_entropy"].tolist()[1]
    # Counted over a run where these rare words are common, the same caption carries information.
    counts = count_corpus(_frame([rare] * 20 + [GOOD]))
    assert counts["钆"] == 20 and counts["橘猫"] == 1
    assert _reasons([rare], count_unknown=None, corpus=Corpus.from_counts(counts, "run")) == [None]


def test_text_safety_keyword_lists():
    captions = [GOOD, "老街巷口的电线杆上贴满了兼职日结的小广告，清洁工人正在清理",
                "旅游手册的地图上把这片海域标成西菲律宾海，引起了游客的讨论"]
    out = refine_text(_frame(captions))
    assert out["drop_reason"].tolist()[1:] == ["refine.text_safety"] * 2
    assert out["safety_keyword"].tolist()[1:] == ["ads:兼职日结", "territorial:西菲律宾海"]
    assert _reasons(captions[1:], RefineConfig(keyword_lists=("adult",))) == [None, None]


def test_captions_built_from_the_adult_list_are_dropped_as_text_safety():
    _, keywords = read_list("adult")
    captions = [f"街边的墙上贴着一张{k}的海报，行人匆匆走过" for k in keywords]
    assert _reasons(captions) == ["refine.text_safety"] * len(captions)


def test_text_safety_classifier(tmp_path):
    """A tiny classifier biased toward its "nsfw" label (random weights: it judges nothing)."""
    from tiny_models import build_tiny_text_classifier

    from tasks.models import load_text_classifier, resolve_model

    model = resolve_model("nsfw_text", str(build_tiny_text_classifier(tmp_path / "clf", bias={"nsfw": 6.0})))
    classifier = load_text_classifier(model, device="cpu")
    out = refine_text(_frame([GOOD, "老街巷口的电线杆上贴满了兼职日结的小广告，清洁工人正在清理"]), RefineConfig(),
                      load_resources(RefineConfig(), classifier=classifier))
    assert out["drop_reason"].tolist() == ["refine.text_safety"] * 2
    assert out["text_nsfw_score"].tolist()[0] > 0.9 and pd.isna(out["text_nsfw_score"].tolist()[1])  # keyword first
    kept = refine_text(_frame([GOOD]), RefineConfig(text_nsfw_threshold=1.0),
                       load_resources(RefineConfig(), classifier=classifier))
    assert kept["drop_reason"].isna().all()


def test_first_failed_rule_names_the_drop():
    # Kana and an ads keyword: LID comes first in SPEC's order; only button verbs: stop words before nouns.
    assert _reasons(["点击查看の大图です加微信", "点击 查看 下载 分享 收藏 关注"]) == [
        "refine.lid", "refine.stop_words"]


# --- bad input ----------------------------------------------------------------------------------------


def test_bad_input_never_raises_and_every_kept_caption_is_usable():
    captions = {
        "empty": "", "whitespace": " \t\u3000\n ", "huge": GOOD * 5000, "surrogates": "\ud800\udfff" * 5,
        "invalid": "\uffff\U0010fffe\ue000", "only_emoji": "😀🐱👍🏻🇨🇳", "only_punctuation": "，。！？……——",
        "zwj": "\u200d\u200d家庭\u200d合照\u200d", "fullwidth": "ｉＰｈｏｎｅ１５手机壳，黑色硅胶材质，支持无线充电",
        "kana": "京都の古いお寺と紅葉がとてもきれいです、中国的游客也很多",
        "traditional": "這是一張美麗的風景圖片，湖邊的老人在釣魚",
        "markup": "<p class='x'>一只<b>橘猫</b>趴在窗台上</p><script>晒太阳</script>",
    }
    frame = _frame([""] * len(captions))
    frame["alt_norm"] = pd.Series(list(captions.values()), dtype=object)  # Arrow strings cannot hold surrogates
    out = refine_text(frame)
    got = dict(zip(captions, out["drop_reason"].tolist(), strict=True))
    cap = dict(zip(captions, out["caption"].tolist(), strict=True))
    for name in ("empty", "whitespace", "surrogates", "invalid", "only_emoji", "kana"):
        assert got[name] == "refine.lid", name  # nothing Chinese left to read
    assert got["only_punctuation"] == "refine.stop_words"  # Chinese punctuation reads as Chinese, but holds no word
    for name in ("huge", "fullwidth", "traditional", "markup"):
        assert pd.isna(got[name]), (name, got[name])
    assert cap["fullwidth"].startswith("iPhone15手机壳") and cap["traditional"].startswith("这是一张美丽的风景图片")
    assert "<" not in cap["markup"] and "橘猫" in cap["markup"]
    assert cap["zwj"] == "家庭合照"
    assert all(c for c, r in zip(out["caption"], out["drop_reason"], strict=True) if pd.isna(r))


def test_real_human_captions_pass():
    """At least 90% of the 4,712 COCO-CN captions survive the chain with the default thresholds."""
    path = fixture_path("images/coco_cn/coco-cn_ext.icap2020.txt")
    captions = [line.rstrip("\n").split("\t", 1)[-1] for line in path.open(encoding="utf-8")]
    out = refine_text(_frame(captions))
    assert len(captions) >= 4000 and out["drop_reason"].isna().mean() >= 0.9

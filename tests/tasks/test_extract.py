"""Tests for tasks.extract: page selection, decoding and <img> candidates, on real and tiny WARCs."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

import lxml.html
import pandas as pd
import pytest
from _fixtures import fixture_path
from selectolax.lexbor import LexborHTMLParser
from warcio.archiveiterator import ArchiveIterator

from schemas.contracts import row_key
from tasks.extract import (
    ExtractConfig,
    decode_html,
    extract_warc,
    img_and_base_nodes,
    primary_language,
    resolve_src,
    visible_counts,
)
from tasks.sample.warc import WarcWriter, languages_cld2

BACKENDS = ("fastwarc", "warcio")
SNAPSHOT = "CC-MAIN-2099-01"
ZH_TEXT = "这是一个关于中国传统文化的网页，介绍了书法、绘画和园林艺术的历史与发展。"
JA_TEXT = "これは日本の伝統文化についてのページです。書道と絵画の歴史を紹介します。"
EN_TEXT = "This page is about the history of gardens, calligraphy and painting in many countries."


# ---------------------------------------------------------------- the real Common Crawl excerpt


def _cc_excerpt():
    """Per response URL: body, CC's first cld2 language and CC's detected charset, read with warcio only."""
    path = fixture_path("warc/warcfile.warc.gz")
    bodies, meta = {}, {}
    with open(path, "rb") as fh:
        for rec in ArchiveIterator(fh):
            uri = rec.rec_headers.get_header("WARC-Target-URI")
            if rec.rec_type == "response":
                bodies[uri] = rec.content_stream().read()
            elif rec.rec_type == "metadata":
                fields = dict(line.split(": ", 1) for line in rec.content_stream().read().decode().splitlines()
                              if ": " in line)
                meta[uri] = (json.loads(fields["languages-cld2"])["languages"][0]["code"], fields["charset-detected"])
    return path, bodies, meta


def _lxml_imgs(body: bytes, charset: str) -> list[tuple[str | None, str | None]]:
    codec = {"gb2312": "gb18030", "gbk": "gb18030"}.get(charset.lower(), charset)
    doc = lxml.html.document_fromstring(body.decode(codec, errors="replace"))
    return [(img.get("src"), img.get("alt")) for img in doc.iter("img")]


def _plain(col: pd.Series) -> list:
    return [None if pd.isna(v) else v for v in col]


@pytest.fixture(scope="module")
def cc_excerpt():
    return _cc_excerpt()


@pytest.mark.parametrize("backend", BACKENDS)
def test_cc_excerpt_selects_the_pages_cc_labels_chinese(cc_excerpt, backend):
    path, bodies, meta = cc_excerpt
    result = extract_warc(str(path), ExtractConfig(backend=backend))
    chinese = [u for u, (lang, _) in meta.items() if lang == "zh"]
    expected_imgs = sum(len(_lxml_imgs(bodies[u], meta[u][1])) for u in chinese)
    assert (len(bodies), len(chinese), expected_imgs) == (16, 11, 96)  # the fixture README's figures
    assert result.stats["pages_total"] == len(bodies)
    assert result.stats["pages_selected"] == len(chinese)
    assert result.stats["img_elements"] == len(result.candidates) == expected_imgs
    assert set(result.candidates["page_url"]) <= set(chinese)
    assert result.stats["records_truncated"] == 0


def test_cc_excerpt_candidates_match_lxml_page_by_page(cc_excerpt):
    """Every <img> of every Chinese page, in document order, with the src and alt that lxml reads."""
    path, bodies, meta = cc_excerpt
    cand = extract_warc(str(path)).candidates
    for url, (lang, charset) in meta.items():
        if lang != "zh":
            continue
        rows = cand[cand["page_url"] == url]
        got = list(zip(_plain(rows["src"]), _plain(rows["alt_text"]), strict=True))
        assert got == _lxml_imgs(bodies[url], charset), url


def test_cc_excerpt_drop_reasons_follow_from_the_rows(cc_excerpt):
    path, _, _ = cc_excerpt
    cand = extract_warc(str(path)).candidates
    no_src = cand["src"].isna() | (cand["src"].fillna("").str.strip() == "")
    assert (cand["drop_reason"] == "extract.no_src").eq(no_src).all()
    kept = cand[cand["drop_reason"].isna()]
    assert not kept.duplicated(["page_url", "url"]).any()
    assert kept["url"].str.match(r"^https?://[^/\s]+").all()
    dup = cand[cand["drop_reason"] == "extract.duplicate"]
    assert len(dup) > 0
    for _, row in dup.iterrows():  # a duplicate repeats a URL kept earlier on the same page
        earlier = cand.loc[: row.name - 1]
        assert ((earlier["page_url"] == row["page_url"]) & (earlier["url"] == row["url"])
                & earlier["drop_reason"].isna()).any()
    assert set(cand["snapshot"]) == {"CC-MAIN-2020-34"}  # from the warcinfo record's isPartOf
    assert cand["key"].str.fullmatch(r"[0-9a-f]{20}").all()


def test_cc_excerpt_backends_give_the_same_frames(cc_excerpt):
    path, _, _ = cc_excerpt
    fast = extract_warc(str(path), ExtractConfig(backend="fastwarc"))
    slow = extract_warc(str(path), ExtractConfig(backend="warcio"))
    pd.testing.assert_frame_equal(fast.candidates, slow.candidates)
    pd.testing.assert_frame_equal(fast.replay, slow.replay)
    assert fast.stats == slow.stats


@pytest.mark.parametrize("backend", BACKENDS)
def test_japanese_clueweb_pages_are_read_but_not_selected(backend):
    result = extract_warc(str(fixture_path("warc/clueweb-quirk.warc.gz")), ExtractConfig(backend=backend))
    assert result.stats["pages_total"] == 29  # every EUC-JP page is read as a page (LF-only HTTP headers)
    assert result.stats["pages_selected"] == 0
    assert len(result.candidates) == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_clipped_record_is_counted_not_fatal(backend):
    result = extract_warc(str(fixture_path("warc/clipped.warc.gz")), ExtractConfig(backend=backend))
    assert result.stats["records_truncated"] == 1
    assert len(result.replay) == 1


@pytest.mark.parametrize("backend", BACKENDS)
def test_english_wget_crawl_has_pages_but_none_selected(backend):
    path = fixture_path("warc/sample-0000.warc.gz")
    with open(path, "rb") as fh:
        html_200 = sum(
            1 for rec in ArchiveIterator(fh) if rec.rec_type == "response"
            and rec.http_headers.get_statuscode() == "200"
            and (rec.http_headers.get_header("Content-Type") or "").startswith("text/html")
        )
    result = extract_warc(str(path), ExtractConfig(backend=backend))
    assert result.stats["pages_total"] == html_200 > 0
    assert result.stats["pages_selected"] == 0
    assert result.replay["url"].str.startswith("https://").all()  # wget's <...> around the URI is gone


# ---------------------------------------------------------------- tiny WARCs built here


@dataclass
class Resp:
    url: str
    body: bytes
    content_type: str = "text/html; charset=utf-8"
    status: int = 200
    langs: tuple[str, ...] | None = None  # languages-cld2 codes of a metadata record; None: no record


def _page(body_text: str, imgs: str = "", head: str = "") -> str:
    return f"<!DOCTYPE html><html><head>{head}</head><body><p>{body_text}</p>{imgs}</body></html>"


def write_warc(path, responses: list[Resp], snapshot: str = SNAPSHOT) -> dict[str, int]:
    """A gzipped Common Crawl-style WARC; returns each response's record offset (read back by warcio)."""
    with open(path, "wb") as fh:
        writer = WarcWriter(fh)
        writer.warcinfo(path.name, {"isPartOf": snapshot})
        for r in responses:
            response_id = writer.response(r.url, r.body, r.content_type, status=r.status)
            if r.langs is not None:
                writer.metadata(r.url, {"fetchTimeMs": 10, "charset-detected": "UTF-8",
                                        "languages-cld2": languages_cld2({"code": c} for c in r.langs)},
                                concurrent_to=response_id)
    offsets = {}
    with open(path, "rb") as fh:
        it = ArchiveIterator(fh)
        for rec in it:
            if rec.rec_type == "response":
                offsets[rec.rec_headers.get_header("WARC-Target-URI")] = it.offset
    return offsets


def _extract(tmp_path, responses, backend="fastwarc", **kw):
    path = tmp_path / "tiny.warc.gz"
    offsets = write_warc(path, responses)
    return extract_warc(str(path), ExtractConfig(backend=backend), **kw), offsets, path


@pytest.mark.parametrize("backend", BACKENDS)
def test_page_language_rules(tmp_path, backend):
    img = '<img src="/a.jpg" alt="图片">'
    responses = [
        Resp("http://zh.example.cn/", _page(ZH_TEXT, img).encode()),  # no metadata: the text decides
        Resp("http://ja.example.jp/", _page(JA_TEXT, img).encode()),  # no metadata, kana: Japanese
        Resp("http://en-zh.example.com/", _page(ZH_TEXT, img).encode(), langs=("en", "zh")),  # label wins
        Resp("http://zh-en.example.com/", _page(EN_TEXT, img).encode(), langs=("zh", "en")),
        Resp("http://hant.example.tw/", _page("這是繁體中文網頁，介紹書法與繪畫。", img).encode(), langs=("zh-Hant",)),
        Resp("http://en.example.com/", _page(EN_TEXT, img).encode()),
    ]
    result, _, _ = _extract(tmp_path, responses, backend)
    assert result.stats["pages_total"] == 6
    assert set(result.candidates["page_url"]) == {
        "http://zh.example.cn/", "http://zh-en.example.com/", "http://hant.example.tw/"}
    assert result.stats["pages_selected"] == 3


# ---------------------------------------------------------------- the no-label fallback judges visible text


# A news page as Chinese portals write them: a large inline analytics/app script, JSON-LD, CSS, a comment, a template.
_NEWS_ARTICLE = (
    "记者从市交通运输局获悉，今年以来全市新开通公交线路十二条，优化调整线路二十八条，"
    "新增公交站点一百余个。市民王女士告诉记者，家门口新开的线路让她上下班节省了将近半个小时。"
    "下一步，交通部门将继续完善城乡公交网络，推动地铁与公交的换乘衔接，方便群众出行。"
)
_APP_SCRIPT = "".join(
    f"function initSlider{i}(el,opts){{var cfg=Object.assign({{autoplay:true,interval:3000,loop:true}},opts);"
    f"el.addEventListener('click',function(e){{e.preventDefault();window.location.href=cfg.href||'/news/list';}});"
    f"document.querySelectorAll('.nav-item .sub-menu a').forEach(function(a){{a.classList.toggle('active')}});}}\n"
    for i in range(120)
)
_JSON_LD = json.dumps({
    "@context": "https://schema.org", "@type": "NewsArticle", "headline": "全市新开通公交线路十二条",
    "datePublished": "2024-05-20T08:00:00+08:00", "author": {"@type": "Organization", "name": "Example Daily News"},
    "publisher": {"@type": "Organization", "name": "Example Media Group",
                  "logo": {"@type": "ImageObject", "url": "https://news.example.cn/static/logo.png"}},
    "keywords": ["public transport", "bus routes", "city news", "commuting", "metro transfer"],
}, ensure_ascii=False)
_CSS = "".join(f".article-body .para-{i} {{ margin: 0 auto; padding: 12px 16px; line-height: 1.8; color: #333; "
               f"font-family: 'Helvetica Neue', Arial, sans-serif; }}\n" for i in range(150))


def _news_page(article: str, scripts: str = "", extra_body: str = "") -> bytes:
    return (
        "<!DOCTYPE html><html lang=\"zh-CN\"><head><meta charset=\"utf-8\"><title>本地新闻</title>"
        f"<style>{_CSS}</style><script type=\"application/ld+json\">{_JSON_LD}</script></head><body>"
        "<div class=\"nav\"><a href=\"/\">首页</a> <a href=\"/news/\">新闻</a> <a href=\"/video/\">视频</a></div>"
        f"<!-- main content starts here: tracking pixel and ad slots below -->"
        f"<div class=\"article-body\"><h1>全市新开通公交线路十二条</h1><p>{article}</p>"
        "<img src=\"/photos/bus.jpg\" alt=\"新开通的公交线路首班车驶出车站\"></div>"
        f"<script>{scripts}</script>{extra_body}"
        "<template id=\"comment-tpl\"><div class=\"comment\"><span class=\"user\">{user}</span></div></template>"
        "</body></html>"
    ).encode()


def _latin_words(text: str) -> int:
    return len(re.findall(r"[A-Za-z\u00c0-\u024f]+", text))


def test_a_chinese_page_heavy_in_script_json_ld_and_css_is_selected(tmp_path):
    body = _news_page(_NEWS_ARTICLE, _APP_SCRIPT, f"<style>{_CSS}</style>")
    everything = LexborHTMLParser(body).body.text(separator=" ")
    han = len(re.findall(r"[\u4e00-\u9fff]", everything))
    assert _latin_words(everything) > han  # judged on all text the page would be English: the defect
    result, _, _ = _extract(tmp_path, [Resp("http://news.example.cn/2024/0520/bus.html", body)])
    assert result.stats["pages_selected"] == 1 and result.stats["pages_not_chinese"] == 0
    assert list(result.candidates["alt_text"]) == ["新开通的公交线路首班车驶出车站"]


def test_chinese_only_inside_a_script_string_of_an_english_page_is_not_chinese(tmp_path):
    strings = json.dumps({"zh": {"share": "分享到微信朋友圈", "login": "登录后即可发表评论和收藏文章",
                                 "notice": _NEWS_ARTICLE * 3}}, ensure_ascii=False)
    body = (f"<!DOCTYPE html><html><head><title>City news</title></head><body><h1>New bus routes</h1>"
            f"<p>{EN_TEXT} The city opened twelve new bus routes this year.</p>"
            f"<img src=\"/bus.jpg\" alt=\"The first bus leaves the depot\"><script>var i18n = {strings};</script>"
            "</body></html>").encode()
    everything = LexborHTMLParser(body).body.text(separator=" ")
    assert len(re.findall(r"[\u4e00-\u9fff]", everything)) > 2 * _latin_words(everything)  # Chinese by all text
    result, _, _ = _extract(tmp_path, [Resp("http://news.example.com/bus", body)])
    assert (result.stats["pages_selected"], result.stats["pages_not_chinese"]) == (0, 1)
    assert result.candidates.empty


def test_pages_without_visible_chinese_are_counted_not_chinese(tmp_path):
    """All script; Chinese only in <title> and alt attributes (not page text: not Chinese); Chinese only in a
    template and comments; and a Chinese page beside them, so every page is either selected or counted."""
    alts = "".join(f'<img src="/p{i}.jpg" alt="美丽的山水风景照片第{i}张">' for i in range(20))
    responses = [
        Resp("http://a.example.cn/all-script", f"<html><body><script>var t='{_NEWS_ARTICLE}';</script>"
             "</body></html>".encode()),
        Resp("http://b.example.cn/title-alt", f"<html><head><title>{_NEWS_ARTICLE[:40]}</title></head><body>"
             f"<p>Gallery</p>{alts}</body></html>".encode()),
        Resp("http://c.example.cn/template", f"<html><body><p>{EN_TEXT}</p><!-- {_NEWS_ARTICLE} -->"
             f"<template><p>{_NEWS_ARTICLE}</p></template></body></html>".encode()),
        Resp("http://d.example.cn/zh", _news_page(_NEWS_ARTICLE, _APP_SCRIPT)),
        Resp("http://e.example.com/en", _page(EN_TEXT).encode(), langs=("en",)),  # labelled: counted too
    ]
    result, _, _ = _extract(tmp_path, responses)
    stats = result.stats
    assert set(result.candidates["page_url"]) == {"http://d.example.cn/zh"}
    assert (stats["pages_total"], stats["pages_selected"], stats["pages_not_chinese"]) == (5, 1, 4)
    assert stats["pages_unlabelled"] == 4


def test_noscript_text_is_not_page_text_but_its_images_are_still_candidates(tmp_path):
    notice = " ".join(["Please enable JavaScript in your browser to view the full article and comments."] * 8)
    body = _news_page(_NEWS_ARTICLE[:60], extra_body=f'<noscript><p>{notice}</p>'
                      '<img src="/photos/lazy.jpg" alt="夜色中的城市公交枢纽"></noscript>')
    result, _, _ = _extract(tmp_path, [Resp("http://news.example.cn/noscript", body)])
    assert result.stats["pages_selected"] == 1
    assert set(result.candidates["alt_text"]) == {"新开通的公交线路首班车驶出车站", "夜色中的城市公交枢纽"}


@pytest.mark.parametrize(("html", "want"), [
    ("<p>中文 text</p><script>var a = 'x y';</script>", {"han": 2, "words": 1}),
    ("<p>中文</p><noscript><p>no script</p><script>var z</script></noscript>", {"han": 2, "words": 0}),  # nested
    ("<p>中文</p><svg><style>.a{color:red}</style><text>图</text></svg>", {"han": 3, "words": 0}),
    ("<p>中文</p><template><script>var t</script><p>模板</p></template><!-- 注释 comment -->", {"han": 2, "words": 0}),
    ("<script>var only = '全是脚本';</script>", {"han": 0, "words": 0}),
    ("<p>中文</p><iframe>fallback text</iframe><textarea>框里 words</textarea>", {"han": 4, "words": 1}),
])
def test_visible_counts_leave_out_what_a_browser_does_not_show(html, want):
    counts = visible_counts(LexborHTMLParser(f"<html><head><title>标题 title</title></head><body>{html}</body></html>"))
    assert {k: counts[k] for k in want} == want


def test_fallback_thresholds_are_config(tmp_path):
    # Mixed page: 10 Han characters and 15 English words; half-Han is the default bar.
    text = "中文中文中文中文中文 " + " ".join(["word"] * 15)
    responses = [Resp("http://mixed.example.com/", _page(text, '<img src="a.jpg" alt="x">').encode())]
    strict, _, _ = _extract(tmp_path, responses)
    path = tmp_path / "tiny.warc.gz"
    lax = extract_warc(str(path), ExtractConfig(fallback_min_han_share=0.3))
    assert (strict.stats["pages_selected"], lax.stats["pages_selected"]) == (0, 1)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("where", ["http", "meta"])
def test_gbk_page_is_decoded(tmp_path, backend, where):
    alt = "红烧肉的做法图解，简单易学"
    head = '<meta http-equiv="Content-Type" content="text/html; charset=gb2312">' if where == "meta" else ""
    body = _page(ZH_TEXT, f'<img src="http://img.example.cn/1.jpg" alt="{alt}">', head).encode("gbk")
    ctype = "text/html; charset=GBK" if where == "http" else "text/html"
    result, _, _ = _extract(tmp_path, [Resp("http://gbk.example.cn/", body, ctype)], backend)
    assert result.candidates["alt_text"].tolist() == [alt]


def test_img_reasons_and_url_resolution(tmp_path):
    imgs = "".join([
        '<img alt="没有地址">',  # no src
        '<img src="" alt="空地址">',
        '<img src="   " alt="空白地址">',
        '<img src="data:image/png;base64,iVBORw0KGgo=" alt="内嵌图片">',
        '<img src="javascript:void(0)" alt="脚本">',
        '<img src="photos/a.jpg" alt="相对地址">',
        '<img src="/root.jpg" alt="根地址">',
        '<img src="//cdn.example.net/b.png" alt="协议相对">',
        '<img src="https://other.example.org/c.gif" alt="绝对地址">',
        '<img src="photos/a.jpg" alt="重复地址">',  # same URL as the first relative one
        '<img src="photos/a.jpg" alt="重复地址">',
    ])
    page_url = "https://www.example.cn/news/2024/index.html"
    result, offsets, path = _extract(tmp_path, [Resp(page_url, _page(ZH_TEXT, imgs).encode(), langs=("zh",))])
    cand = result.candidates
    got = list(zip(_plain(cand["alt_text"]), _plain(cand["url"]), _plain(cand["drop_reason"]), strict=True))
    assert got == [
        ("没有地址", None, "extract.no_src"),
        ("空地址", None, "extract.no_src"),
        ("空白地址", None, "extract.no_src"),
        ("内嵌图片", None, "extract.bad_url"),
        ("脚本", None, "extract.bad_url"),
        ("相对地址", "https://www.example.cn/news/2024/photos/a.jpg", None),
        ("根地址", "https://www.example.cn/root.jpg", None),
        ("协议相对", "https://cdn.example.net/b.png", None),
        ("绝对地址", "https://other.example.org/c.gif", None),
        ("重复地址", "https://www.example.cn/news/2024/photos/a.jpg", "extract.duplicate"),
        ("重复地址", "https://www.example.cn/news/2024/photos/a.jpg", "extract.duplicate"),
    ]
    kept = cand[cand["drop_reason"].isna()]
    assert kept["image_host"].tolist() == ["www.example.cn", "www.example.cn", "cdn.example.net", "other.example.org"]
    assert set(cand["page_host"]) == {"www.example.cn"}
    assert set(cand["warc_offset"]) == {offsets[page_url]}
    assert set(cand["warc_file"]) == {str(path)}
    assert set(cand["snapshot"]) == {SNAPSHOT}
    assert kept["key"].tolist() == [row_key(u, a, page_url) for u, a in zip(kept["url"], kept["alt_text"], strict=True)]


def test_base_href_changes_the_resolution(tmp_path):
    head = '<base href="/static/img/">'
    imgs = '<img src="x.jpg" alt="一"><img src="/y.jpg" alt="二"><img src="//cdn.example.net/z.jpg" alt="三">'
    page = Resp("http://www.example.cn/a/b/page.html", _page(ZH_TEXT, imgs, head).encode(), langs=("zh",))
    bad_base = Resp("http://bad.example.cn/a/page.html",
                    _page(ZH_TEXT, '<img src="x.jpg" alt="四">', '<base href="javascript:alert(1)">').encode(),
                    langs=("zh",))
    result, _, _ = _extract(tmp_path, [page, bad_base])
    assert result.candidates["url"].tolist() == [
        "http://www.example.cn/static/img/x.jpg",
        "http://www.example.cn/y.jpg",
        "http://cdn.example.net/z.jpg",
        "http://bad.example.cn/a/x.jpg",  # an unusable <base> falls back to the page URL
    ]


@pytest.mark.parametrize("html", [
    '<img src=a><IMG SRC=b><image src=c><svg><img src=d><image href=e></image><foreignObject><img src=f>'
    "</foreignObject></svg>",
    '<math><mi><img src=g></mi><mtext><img src=h></mtext><annotation-xml encoding="text/html"><img src=i>'
    "</annotation-xml></math>",
    "<template><img src=j></template><noscript><img src=k></noscript><select><img src=l><option><img src=m>"
    "</option></select>",
    "<table><img src=n><tr><td><img src=o></table><svg><svg:img src=p></svg:img><x:img src=q></svg><ns:img src=r>",
    '<select><selectedcontent></selectedcontent><option selected><img src=s></option></select>',
    "<p><b><img src=t></p></b><img src=u><frameset><img src=v></frameset>",
    "<iframe><img src=w></iframe><textarea><img src=x></textarea><xmp><img src=y></xmp>",
    '<base href="/x/"><svg><base href="/y/"></svg><BASE HREF=z><base>',
    "<base><head><base href=q></head><body><base href=r>", "<svg><base href=/svg/></svg><base href=/html/>",
    "<math><base href=/m/></math><base xlink:href=/xl/><base href>",
    "<img src=a><base href=/late/><p><img src=b><base href=/later/></p><img src=c>",
])
def test_one_walk_finds_what_the_separate_css_queries_find(html):
    """One walk with a selector list finds the nodes of css("img") and css_first("base[href]")."""
    tree = LexborHTMLParser(html)
    imgs, base = img_and_base_nodes(tree)
    assert [n.mem_id for n in imgs] == [n.mem_id for n in tree.css("img")]
    assert [n.attributes for n in imgs] == [n.attributes for n in tree.tags("img")]
    first = tree.css_first("base[href]")
    assert (base.mem_id if base else None) == (first.mem_id if first else None)


@pytest.mark.parametrize("backend", BACKENDS)
def test_only_html_200_responses_are_pages_but_all_are_replayable(tmp_path, backend):
    png = b"\x89PNG\r\n\x1a\n" + b"\0" * 32
    img_html = '<img src="/1.jpg" alt="图片">'
    responses = [
        Resp("http://www.example.cn/", _page(ZH_TEXT, img_html).encode(), langs=("zh",)),
        Resp("http://www.example.cn/logo.png", png, "image/png"),
        Resp("http://www.example.cn/api.json", json.dumps({"说明": ZH_TEXT}).encode(), "application/json"),
        Resp("http://www.example.cn/missing.html", _page(ZH_TEXT, img_html).encode(), status=404),
        Resp("http://www.example.cn/moved.html", _page(ZH_TEXT, img_html).encode(), status=301),
    ]
    result, offsets, path = _extract(tmp_path, responses, backend)
    assert result.stats["pages_total"] == 1
    assert set(result.candidates["page_url"]) == {"http://www.example.cn/"}
    replay = result.replay
    assert replay["url"].tolist() == [r.url for r in responses]
    assert replay["status"].tolist() == [200, 200, 200, 404, 301]
    assert replay["offset"].tolist() == [offsets[r.url] for r in responses]
    assert set(replay["warc_file"]) == {str(path)}


def test_snapshot_argument_overrides_warcinfo(tmp_path):
    responses = [Resp("http://www.example.cn/", _page(ZH_TEXT, '<img src="a.jpg" alt="图">').encode())]
    result, _, _ = _extract(tmp_path, responses, snapshot="my-run")
    assert set(result.candidates["snapshot"]) == {"my-run"}


def test_empty_warc_gives_empty_typed_frames(tmp_path):
    path = tmp_path / "empty.warc.gz"
    path.write_bytes(b"")
    result = extract_warc(str(path))
    assert len(result.candidates) == 0 and len(result.replay) == 0
    assert result.stats["pages_total"] == 0
    assert result.candidates["warc_offset"].dtype == "int64"
    assert {"key", "url", "alt_text", "page_url", "drop_reason"} <= set(result.candidates.columns)


# ---------------------------------------------------------------- helpers


def test_decode_html_charset_order():
    text = _page(ZH_TEXT)
    gbk = text.encode("gbk")
    assert decode_html(gbk, "gbk", None) == text
    assert decode_html(gbk, "gb2312", None) == text  # GB2312 labels are read as the GB18030 superset
    assert decode_html("镕".encode("gb18030"), "gb2312", None) == "镕"  # not in GB2312 proper
    assert decode_html(gbk, None, "GBK") == text  # CC's charset-detected when nothing is declared
    assert decode_html(gbk, "utf-8", None) == text  # a lying HTTP charset falls through to the others
    assert decode_html(gbk, "no-such-codec", None) == text
    hant = '<meta charset="big5">' + _page("這是繁體中文網頁，介紹書法與繪畫。")
    assert decode_html(hant.encode("big5"), None, None) == hant  # <meta charset> when HTTP says nothing
    assert decode_html(text.encode(), None, None) == text
    garbled = decode_html(b"\xff\xfe\xfd abc", None, None)  # nothing fits: replacement characters
    assert garbled.endswith(" abc") and "\ufffd" in garbled


def test_resolve_src_edge_cases():
    base = "http://www.example.cn/dir/page.html"
    assert resolve_src(" \n photos/\ta.jpg \t", base) == "http://www.example.cn/dir/photos/a.jpg"
    assert resolve_src("../up.jpg", base) == "http://www.example.cn/up.jpg"
    assert resolve_src("//cdn.example.net/x.jpg", "https://www.example.cn/") == "https://cdn.example.net/x.jpg"
    assert resolve_src("?v=2", base) == "http://www.example.cn/dir/page.html?v=2"
    for bad in ("", "   ", "data:image/gif;base64,R0lGOD", "DATA:image/png,x", "javascript:void(0)",
                "JavaScript:void(0)", "about:blank", "blob:https://x/1", "mailto:a@b.cn",
                "ftp://files.example.cn/a.jpg", "http://[::1", "file:///etc/passwd"):
        assert resolve_src(bad, base) is None, bad
    assert resolve_src("a.jpg", "") is None  # no base to resolve against


def test_primary_language_edge_cases():
    def meta(value):
        return {"languages-cld2": value}

    assert primary_language(meta('{"languages":[{"code":"zh"},{"code":"en"}]}')) == "zh"
    assert primary_language(meta('{"reliable":false,"languages":[{"code":"zh-Hant"}]}')) == "zh-Hant"
    assert primary_language(meta('{"languages":[{"code":"en"},{"code":"zh"}]}')) == "en"
    for broken in ('{"languages":[]}', "{}", "not json", "", "null", "[1, 2]", '{"languages":[5]}',
                   '{"languages":{"code":"zh"}}', '{"languages":"zh"}', '{"languages":[{}]}'):
        assert primary_language(meta(broken)) is None, broken
    assert primary_language({}) is None


def test_frames_are_built_as_pandas_builds_them():
    """_typed's column-wise build (pyarrow directly for strings) gives pandas' own frame, missing values included."""
    from tasks.extract import _COLUMNS, _typed

    rows = [tuple(f"{name}-{i}" if dtype == "str" else i for name, dtype in _COLUMNS.items()) for i in range(5)]
    rows.append(tuple(None if dtype == "str" else 7 for dtype in _COLUMNS.values()))
    rows.append(tuple("汉字\x00" if dtype == "str" else -1 for dtype in _COLUMNS.values()))
    for some in (rows, rows[:1], []):
        want = pd.DataFrame.from_records(some, columns=list(_COLUMNS)).astype(_COLUMNS) if some else (
            pd.DataFrame({name: pd.array([], dtype=dtype) for name, dtype in _COLUMNS.items()}))
        got = _typed(some, _COLUMNS)
        assert got.dtypes.tolist() == want.dtypes.tolist()
        pd.testing.assert_frame_equal(got, want)
    assert _typed(rows, _COLUMNS)["url"].isna().tolist() == [False] * 5 + [True, False]


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_file_cut_anywhere_gives_what_was_there(tmp_path, backend):
    """Cut inside WARC headers, HTTP headers or a payload: never an exception, never more than the whole file."""
    data = fixture_path("warc/warcfile.warc.gz").read_bytes()
    whole = extract_warc(str(fixture_path("warc/warcfile.warc.gz")), ExtractConfig(backend=backend))
    path = tmp_path / "cut.warc.gz"
    for cut in [100, *range(700, len(data), 2100)]:  # 100: inside the first record's WARC headers
        path.write_bytes(data[:cut])
        res = extract_warc(str(path), ExtractConfig(backend=backend))
        assert res.stats["pages_total"] <= whole.stats["pages_total"], cut
        assert set(res.candidates["key"]) <= set(whole.candidates["key"]), cut


def test_corrupt_data_part_way_keeps_what_was_read_and_counts_it(tmp_path):
    """A WARC whose later bytes are garbage: the pages before the damage are extracted, the damage counted."""
    good = fixture_path("warc/warcfile.warc.gz").read_bytes()
    damaged = tmp_path / "damaged.warc.gz"
    damaged.write_bytes(good + b"\x1f\x8b\x08\x00garbage that is not a gzip member" * 50)
    whole = extract_warc(str(fixture_path("warc/warcfile.warc.gz")))
    res = extract_warc(str(damaged))
    assert res.stats["read_errors"] == 1 and "damaged.warc.gz" in res.stats["read_error"]
    assert res.stats["pages_selected"] == whole.stats["pages_selected"]
    assert len(res.candidates) == len(whole.candidates)


@pytest.mark.parametrize("backend", ["fastwarc", "warcio"])
def test_a_damaged_member_costs_only_its_own_records(tmp_path, backend):
    """Bytes flipped inside one gzip member: counted once, and every page after the damage is still read."""
    source = fixture_path("warc/warcfile.warc.gz")
    whole = extract_warc(str(source), ExtractConfig(backend=backend))
    data = bytearray(source.read_bytes())
    position = 60_000
    for i in range(position, position + 64):
        data[i] ^= 0xA5
    damaged = tmp_path / "damaged.warc.gz"
    damaged.write_bytes(bytes(data))
    res = extract_warc(str(damaged), ExtractConfig(backend=backend))
    assert res.stats["read_errors"] == 1 and res.stats["bytes_skipped"] > 0
    after = whole.candidates[whole.candidates["warc_offset"] > position + 64]
    assert len(after) > 0
    got = res.candidates[res.candidates["warc_offset"] > position + 64]
    assert sorted(got["key"]) == sorted(after["key"])
    assert set(res.candidates["key"]) <= set(whole.candidates["key"])


def test_lazy_srcset_svg_and_beacons(tmp_path):
    imgs = "".join([
        '<img src="/loading.gif" data-src="/real/lazy.jpg" alt="懒加载">',
        '<img src="data:image/gif;base64,R0lGOD==" data-original="//cdn.example.net/o.jpg" alt="原图">',
        '<img src="/s.jpg" srcset="/s.jpg 320w, /l.jpg 1280w, /m.jpg 640w" alt="宽度描述">',
        '<img src="/a.jpg" srcset="/a.jpg, /a2x.jpg 2x" alt="密度描述">',
        '<img src="/x.jpg" srcset="data:image/png;base64,AA== 2000w" alt="内嵌候选">',
        '<img src="/icons/logo.svg?v=3" alt="矢量图">',
        '<img src="/t.gif" width="1" height="1px" alt="跟踪像素">',
        '<img src="/wide.gif" width="1" height="200" alt="细长图">',
        '<img data-src="" src="/plain.jpg" alt="空懒加载">',
        '<img title="只有标题" src="/t.jpg">',
    ])
    page_url = "https://www.example.cn/news/index.html"
    result, _, _ = _extract(tmp_path, [Resp(page_url, _page(ZH_TEXT, imgs).encode(), langs=("zh",))])
    cand = result.candidates
    got = list(zip(_plain(cand["url"]), _plain(cand["src_attr"]), _plain(cand["drop_reason"]), strict=True))
    assert got == [
        ("https://www.example.cn/real/lazy.jpg", "data-src", None),
        ("https://cdn.example.net/o.jpg", "data-original", None),
        ("https://www.example.cn/l.jpg", "srcset", None),
        ("https://www.example.cn/a2x.jpg", "srcset", None),
        ("https://www.example.cn/x.jpg", "src", None),
        ("https://www.example.cn/icons/logo.svg?v=3", "src", "extract.svg"),
        (None, "src", "extract.tracking_pixel"),
        ("https://www.example.cn/wide.gif", "src", None),
        ("https://www.example.cn/plain.jpg", "src", None),
        ("https://www.example.cn/t.jpg", "src", None),
    ]
    assert _plain(cand["src"])[:2] == ["/loading.gif", "data:image/gif;base64,R0lGOD=="]  # the raw src stays
    assert _plain(cand["alt_text"])[-1] is None and _plain(cand["title"])[-1] == "只有标题"
    titled = extract_warc(str(tmp_path / "tiny.warc.gz"), ExtractConfig(title_as_alt=True))
    assert _plain(titled.candidates["alt_text"])[-1] == "只有标题"


def test_largest_srcset_edge_cases():
    from tasks.extract import largest_srcset

    assert largest_srcset("a.jpg 100w, b.jpg 300w,c.jpg 200w") == "b.jpg"
    assert largest_srcset("a.jpg 1x, b.jpg 3x, c.jpg 2x") == "b.jpg"
    assert largest_srcset("a.jpg 3x, b.jpg 10w") == "b.jpg"  # a width beats a density
    assert largest_srcset("https://cdn.test/w_300,h_200/p.jpg 300w, https://cdn.test/w_900,h_600/p.jpg 900w") \
        == "https://cdn.test/w_900,h_600/p.jpg"  # commas inside a URL
    assert largest_srcset("a.jpg bogus, b.jpg") == "b.jpg"  # an invalid descriptor drops its candidate
    assert largest_srcset("  ,  ") is None and largest_srcset("") is None


def test_fast_resolution_agrees_with_urljoin():
    from tasks.extract import _Resolver

    bases = ["https://www.example.cn/a/b/page.html?x=1", "http://例子.中国/", "https://h.example:8080/p",
             "https://www.example.cn/", "https://h.example/a/./b/c.html", "https://h.example/dir/",
             "https://h.example", "https://h.example/a/../b/c.html#top"]
    srcs = ["/img/a.jpg", "/img/../b.jpg", "/./c.jpg", "//cdn.x.net/d.jpg", "https://o.example/e.jpg?q=1#f",
            "rel/f.jpg", "../g.jpg", "/h i.jpg", "/tab\tbed.jpg", "\\back.jpg", "/%E5%9B%BE.jpg", "/图片.jpg",
            "HTTPS://UP.EXAMPLE/J.JPG", "?only=query", "#frag", "/k.jpg?a=/../b", "http://a.example/x?",
            "https://user:pw@h.example/x", "https://[::1]/x", "https://[bad/x", "https://H.Example:80/X",
            "http://h.example/x#", "//h2.example/y?z", "//", "https:///nohost", "https://h.example/x?#",
            "https://h.example:port/x", "https://h.example/%41", "https://例子.中国/图.jpg", "http://h.example",
            "https://h.example./x", "https://h.example/a/../b", "//h3.example", "/\x00.jpg", "img/p.jpg?w=1",
            "img/../p.jpg", "a:b/c.jpg", "img/p.jpg#x", ".hidden.jpg", "x.jpg", "%20.jpg", "img//p.jpg", "/a//b.jpg",
            "//h4.example/a//b.jpg", "https://h5.example/a//b.jpg"]
    for base in bases:
        resolver = _Resolver(base)
        for src in srcs:
            url, host = resolver(src)
            expected = resolve_src(src, base)
            assert url == expected, (base, src)
            if url:
                assert host == (__import__("urllib.parse").parse.urlsplit(url).hostname or "").lower()


def test_invalid_bytes_huge_pages_and_attribute_floods(tmp_path):
    """Bytes invalid in the declared charset are replaced, not fatal; an oversize page is cut and counted; an
    <img> with thousands of attributes is one candidate."""
    bad = _page(ZH_TEXT, '<img src="/a.jpg" alt="坏字节的说明文字">').encode("utf-8")
    bad = bad.replace(b"<p>", b"<p>\xff\xfe\x80", 1)
    flood = "<img " + " ".join(f'data-x{i}="{i}"' for i in range(5000)) + ' src="/flood.jpg" alt="很多属性">'
    huge = _page(ZH_TEXT * 20000, '<img src="/big.jpg" alt="大页面的图片">')  # ~2.7 MB of text before the image
    result, _, _ = _extract(tmp_path, [
        Resp("https://a.example.cn/bad.html", bad, langs=("zh",)),
        Resp("https://a.example.cn/flood.html", _page(ZH_TEXT, flood).encode(), langs=("zh",)),
        Resp("https://a.example.cn/huge.html", huge.encode(), langs=("zh",)),
    ])
    cand = result.candidates
    assert _plain(cand["alt_text"])[:2] == ["坏字节的说明文字", "很多属性"]
    assert _plain(cand["url"])[1] == "https://a.example.cn/flood.jpg"
    assert result.stats["pages_oversize"] == 0
    path = tmp_path / "tiny.warc.gz"
    capped = extract_warc(str(path), ExtractConfig(max_page_bytes=1_000_000))
    assert capped.stats["pages_oversize"] == 1 and capped.stats["pages_selected"] == 3
    assert "大页面的图片" not in set(_plain(capped.candidates["alt_text"]))  # beyond the cap: not parsed

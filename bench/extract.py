"""Benchmark: stage extract (tasks/extract.py) on generated Common Crawl-like WARCs.

Figures, each a ratio of the fastest of `--repeat` alternating runs on the same input in the same run (the
machine is shared and noisy; absolute MB/s are printed for context only):

- ratio_vs_gunzip_{5,100}pct: time(plain ISA-L gunzip of the whole file to nowhere) / time(extract_warc), on a
  file whose HTML pages are 5% (a typical CC WARC) or 100% Chinese. 1.0 would mean extraction costs no more than
  inflating the file. fastwarc_scan_vs_gunzip_5pct, the same ratio for FastWARC reading every record and nothing
  else, is the ceiling that extract_warc's reader leaves. fastwarc_iterate_vs_gunzip_5pct is FastWARC iterating
  the records extract_warc asks for (HTTP headers parsed) without reading any payload: inflating and header parsing
  alone, the most any FastWARC-based extraction can reach (extract_warc's reader keeps the HTML payloads in
  FastWARC's memory until their metadata record decides, and reads only the Chinese pages').
- ratio_vs_gunzip_5pct_nometa: the same ratio on the 5% file's captures written without their metadata records
  (a user's own crawl): every page is decoded, parsed and judged by its visible text (no script, style or
  noscript text). chinese_pages_5pct_nometa is how many it takes as Chinese (the labelled file's count is
  chinese_pages_5pct), nometa_candidates_over_labelled its candidates over the labelled file's.
- speedup_vs_warcio_lxml: time(reference) / time(extract_warc) on the 5% file. The reference reads the WARC with
  warcio's ArchiveIterator and parses with lxml.html, and reuses tasks.extract's non-parsing helpers (decoding,
  metadata, choose_src, is_tracking_pixel, the URL resolver, the row and frame building), so the two differ only
  in the WARC reader and the HTML parser. Their candidates are asserted equal first.
- index_bytes_over_selected: bytes extract_selected received over HTTP / the selected records' summed
  warc_record_length, for the 5% file served by tests/cc_server.py (in its own process) with a columnar index
  from write_index and select_chinese; its candidates are asserted equal to extract_warc's.
  index_speedup_5pct = time(extract_warc) / time(extract_selected) (the index query itself not timed).
- speedup_2proc: time(two 5% files of the same size extracted one after the other) / time(the two extracted at
  once by two processes); warm spawned workers (imports and a first extraction done) in both cases.

The generated WARCs (cached under --work, rebuilt when GEN_VERSION changes; seeded, so deterministic) follow
Common Crawl's main WARC files (the real excerpt ../shared/fixtures/warc/warcfile.warc.gz, STACK.md):
a warcinfo record, then per capture a `request`, a `response` and a `metadata` record (fetchTimeMs,
charset-detected, languages-cld2 JSON with code and code-iso-639-3, largest share first, sometimes a second
language), each record its own gzip member (tasks.sample.warc's writer, over warcio's). A CC WARC is ~1 GB for
~40k captures, so:
- ~98% of responses are HTML, ~90 KB on average (lognormal, median ~60 KB, capped at CC's 1 MiB payload limit),
  ~20 KB once gzipped; the rest are PDFs, feeds and images, labelled without languages as CC does.
- A page has inline CSS and minified JS boilerplate, a navigation bar, paragraphs, related-link lists and a
  footer; 10-30 <img> (gamma-distributed, a few pages with none or many): absolute, root-relative, relative,
  protocol-relative and whitespace-padded URLs, lazy-loading (placeholder src + data-src/data-original), srcset,
  CDN query strings, non-ASCII paths, .svg icons, 1x1/0x0 tracking pixels, a repeated logo, a rare `<base href>`,
  a rare missing src or javascript: URL; alt texts in the page's language, often empty or missing.
- Languages of the non-Chinese pages roughly as CC's (English about half, then Russian, German, Japanese,
  Spanish, French, Italian, Dutch), some in windows-1251, Shift_JIS or ISO-8859-1. Chinese pages are Simplified
  Chinese (words drawn from jieba's dictionary by frequency); ~22% GBK-encoded with the HTTP charset and
  <meta> saying gbk/gb2312 (some with no HTTP charset), the rest UTF-8. Each page is Chinese or not independently
  (no runs of one host's pages), so the index path rarely joins two selected records into one request.
- No <noscript> (lxml and lexbor build its content differently) and no valueless attributes (lexbor gives None
  where lxml gives ""), so the reference can match extract_warc exactly.

Last stdout line: one JSON object of figures.
"""

from __future__ import annotations

import argparse
import bisect
import cProfile
import functools
import io
import json
import os
import pstats
import random
import subprocess
import sys
import tempfile
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from urllib.parse import urlsplit

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.common import best_of, report  # noqa: E402 - after the checkout is on sys.path

GEN_VERSION = 3  # bump when the generator's output changes: cached WARCs are rebuilt
CRAWL = "CC-MAIN-2020-34"
MIB = 1 << 20

try:
    from isal import igzip
except ImportError as err:  # the baseline is ISA-L's inflate; a slower one would flatter every ratio
    raise SystemExit("bench/extract.py needs isal for its gunzip baseline: pip install -e '.[dev]'") from err


# ---- text ---------------------------------------------------------------------------------------------------------


class _Vocab:
    """Words with Zipf-like frequencies; `words(rng, k)` draws k of them."""

    def __init__(self, words: list[str], weights: list[float]):
        self.items = words
        self.cum = []
        total = 0.0
        for w in weights:
            total += w
            self.cum.append(total)

    def words(self, rng: random.Random, k: int) -> list[str]:
        return rng.choices(self.items, cum_weights=self.cum, k=k)


def _zipf(words: list[str]) -> _Vocab:
    return _Vocab(words, [1.0 / (rank + 2.7) for rank in range(len(words))])


def _zh_vocab(size: int = 40_000) -> _Vocab:
    """Simplified Chinese words by frequency from jieba's dictionary (a project dependency: no download)."""
    import jieba

    rows = []
    with open(Path(jieba.__file__).parent / "dict.txt", encoding="utf-8") as fh:
        for line in fh:
            word, freq, _ = line.split(" ")
            if all("\u4e00" <= c <= "\u9fa5" for c in word):
                rows.append((-int(freq), word))
    rows.sort()
    rows = rows[:size]
    return _Vocab([w for _, w in rows], [-f for f, _ in rows])


def _pseudo_vocab(rng: random.Random, onsets: str, vowels: str, size: int = 20_000) -> _Vocab:
    """Pseudo-words of 1-4 syllables: the byte statistics of a language without its dictionary."""
    seen, words = set(), []
    while len(words) < size:
        n = rng.choice((1, 1, 2, 2, 2, 3, 3, 4))
        word = "".join(rng.choice(onsets) + rng.choice(vowels) + (rng.choice(onsets) if rng.random() < 0.3 else "")
                       for _ in range(n))
        if word not in seen:
            seen.add(word)
            words.append(word)
    words.sort(key=len)  # short words are the frequent ones
    return _zipf(words)


class _Lang:
    """One language's text pools (paragraphs by topic, captions, titles), its cld2 label and its encodings.

    A page draws its paragraphs from one topic, whose words recur in them, as an article's words do.
    """

    def __init__(self, code: str, iso3: str, name: str, vocab: _Vocab, rng: random.Random, sep: str,
                 charsets: tuple, html_lang: str, pool: int, topics: int = 40):
        self.code, self.iso3, self.name, self.sep, self.charsets, self.html_lang = (
            code, iso3, name, sep, charsets, html_lang)
        cjk = sep == ""
        comma, stop = ("，", "。") if cjk else (",", ".")

        def sentence(topic: list[str]) -> str:
            n = rng.randint(6, 22) if cjk else rng.randint(6, 24)
            words = [rng.choice(topic) if rng.random() < 0.25 else w for w in vocab.words(rng, n)]
            if rng.random() < 0.4:
                words.insert(rng.randint(1, n - 1), comma if cjk else words.pop() + comma)
            text = sep.join(words)
            return (text if cjk else text[:1].upper() + text[1:]) + stop

        mid = vocab.items[200:8_000]
        self.topics = []
        for _ in range(topics):
            words = rng.sample(mid, 40)
            self.topics.append([sep.join(sentence(words) for _ in range(rng.randint(1, 6)))
                                for _ in range(pool // topics)])
        self.paragraphs = [p for t in self.topics for p in t]
        self.captions = [sep.join(vocab.words(rng, rng.randint(2, 8))) for _ in range(pool)]
        self.titles = [sep.join(vocab.words(rng, rng.randint(3, 12))) for _ in range(pool)]
        self.nav = [sep.join(vocab.words(rng, rng.randint(1, 2))) for _ in range(200)]


_LATIN = "bcdfghjklmnprstvwz"
_CYRILLIC = "бвгджзклмнпрстфхцчшщ"
_HIRAGANA = "かきくけこさしすせそたちつてとなにぬねのはひふへほまみむめもやゆよらりるれろわ"
# (code, iso3, cld2 name, share among the non-Chinese HTML pages, html lang, charsets with weights)
_OTHER = (
    ("en", "eng", "ENGLISH", 0.52, "en", (("utf-8", 0.9), ("iso-8859-1", 0.1))),
    ("ru", "rus", "RUSSIAN", 0.09, "ru", (("utf-8", 0.7), ("windows-1251", 0.3))),
    ("de", "deu", "GERMAN", 0.08, "de", (("utf-8", 0.85), ("iso-8859-1", 0.15))),
    ("ja", "jpn", "Japanese", 0.08, "ja", (("utf-8", 0.8), ("shift_jis", 0.2))),
    ("es", "spa", "SPANISH", 0.07, "es", (("utf-8", 0.9), ("iso-8859-1", 0.1))),
    ("fr", "fra", "FRENCH", 0.07, "fr", (("utf-8", 0.9), ("iso-8859-1", 0.1))),
    ("it", "ita", "ITALIAN", 0.05, "it", (("utf-8", 0.9), ("iso-8859-1", 0.1))),
    ("nl", "nld", "DUTCH", 0.04, "nl", (("utf-8", 0.9), ("iso-8859-1", 0.1))),
)
_ZH_CHARSETS = (("utf-8", 0.78), ("gbk", 0.22))


@functools.cache
def _languages(pool: int) -> tuple[_Lang, list[_Lang], list[float]]:
    """The text pools, the same for every file (the page choices come from each file's seed)."""
    rng = random.Random(0)
    zh_vocab = _zh_vocab()
    zh = _Lang("zh", "zho", "Chinese", zh_vocab, rng, "", _ZH_CHARSETS, "zh-CN", pool)
    others = []
    for code, iso3, name, _, html_lang, charsets in _OTHER:
        if code == "ja":  # kana pseudo-words and kanji compounds, no spaces
            kana = _pseudo_vocab(rng, _HIRAGANA, "あいうえおんっー", 8_000)
            kanji = zh_vocab.items[:6_000]
            vocab = _zipf([w for pair in zip(kana.items[:6_000], kanji, strict=True) for w in pair])
            others.append(_Lang(code, iso3, name, vocab, rng, "", charsets, html_lang, pool // 2))
            continue
        onsets, vowels = (_CYRILLIC, "аеиоуыя") if code == "ru" else (_LATIN, "aeiouy" + {
            "de": "äöü", "fr": "éèà", "es": "áéñ", "it": "àè"}.get(code, ""))
        others.append(_Lang(code, iso3, name, _pseudo_vocab(rng, onsets, vowels), rng, " ", charsets, html_lang,
                            pool // 2))
    return zh, others, [share for _, _, _, share, _, _ in _OTHER]


# ---- boilerplate: minified JS and CSS -------------------------------------------------------------------------------

_JS_WORDS = ("function", "return", "var", "this", "new", "null", "true", "false", "typeof", "document", "window",
             "length", "prototype", "push", "call", "apply", "indexOf", "undefined", "addEventListener",
             "getElementById", "querySelector", "setTimeout", "className", "style", "display", "innerHTML",
             "createElement", "appendChild", "parentNode", "location", "href", "navigator", "userAgent")
_JS_PARTS = ("get", "set", "on", "init", "load", "ad", "nav", "img", "slide", "tab", "menu", "item", "data", "opt",
             "cfg", "ele", "btn", "box", "list", "page", "url", "src", "lazy", "show", "hide", "toggle", "Click",
             "Scroll", "Size", "Index", "Node", "Event", "Handler", "Timer", "Banner", "Swiper", "Share")
_CLASSES = ("nav", "header", "footer", "main", "side", "box", "list", "item", "pic", "txt", "tit", "con", "top",
            "bot", "art", "news", "hot", "ad", "menu", "logo", "link", "btn", "wrap", "clearfix", "fl", "fr", "more")


def _js_blob(rng: random.Random, size: int) -> str:
    """Inline JS: minified library code (short names, dense) or page code (jQuery-style calls, selectors)."""
    minified = rng.random() < 0.5
    if minified:
        names = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.choice((1, 1, 2))))
                 for _ in range(rng.randint(20, 60))]
    else:
        names = ["".join(rng.choice(_JS_PARTS) for _ in range(rng.randint(2, 3))) for _ in range(rng.randint(15, 40))]
    sels = [f"{rng.choice(('.', '#', '.'))}{rng.choice(_CLASSES)}{rng.choice(('', '-', '_'))}{rng.choice(_CLASSES)}"
            + rng.choice(("", " li", " a", " img", " span")) for _ in range(20)]
    out, n = [], 0
    while n < size:
        a, b, c = rng.choice(names), rng.choice(names), rng.choice(names)
        w = rng.choice(_JS_WORDS)
        kind = rng.random()
        if minified:
            if kind < 0.3:
                s = f"function {a}({b},{c}){{var {rng.choice(names)}={b}.{w}({c});"
            elif kind < 0.5:
                s = f"if({a}&&{b}.{w}>{rng.randint(0, 99)}){{{c}[{a}]={b}}}"
            elif kind < 0.7:
                s = f"return {a}?{b}({c}):{w}}}"
            elif kind < 0.9:
                s = f"for(var {a}=0;{a}<{b}.length;{a}++){{{c}.push({b}[{a}])}}"
            else:
                s = f'{a}.{w}="{b}";'
        elif kind < 0.35:
            s = (f'\n    $("{rng.choice(sels)}").{rng.choice(("hover", "click", "on", "each"))}(function(){{\n'
                 f'        $(this).addClass("{rng.choice(_CLASSES)}").siblings().removeClass("{rng.choice(_CLASSES)}");'
                 "\n    });")
        elif kind < 0.6:
            s = f"\n    var {a} = document.{rng.choice(('getElementById', 'querySelector'))}(\"{rng.choice(sels)}\");"
        elif kind < 0.8:
            s = (f"\n    function {a}({b}) {{\n        if ({b}.{w} > {rng.randint(0, 999)}) {{\n"
                 f"            {c}.style.display = \"{rng.choice(('none', 'block'))}\";\n        }}\n    }}")
        else:
            s = (f'\n    var _hmt = _hmt || [];\n    (function() {{\n      var hm = document.createElement("script");'
                 f'\n      hm.src = "https://hm.baidu.com/hm.js?{rng.getrandbits(128):032x}";\n'
                 '      var s = document.getElementsByTagName("script")[0];\n'
                 "      s.parentNode.insertBefore(hm, s);\n    })();")
        out.append(s)
        n += len(s)
    return "".join(out)


_CSS_PROPS = ("margin", "padding", "color", "background", "font-size", "line-height", "width", "height", "border",
              "display", "float", "position", "top", "left", "overflow", "text-align", "z-index", "opacity")
_CSS_VALUES = ("0", "auto", "none", "block", "inline-block", "left", "right", "hidden", "relative", "absolute",
               "100%", "50%", "center", "bold", "normal", "inherit", "10px", "12px", "14px", "16px", "20px", "30px")


def _css_blob(rng: random.Random, size: int) -> str:
    classes = [rng.choice(_CLASSES) + rng.choice(("", "-", "_")) + rng.choice(("", "l", "r", "1", "2", "bd", "hd",
                                                                               "wrap", "in", "ct"))
               for _ in range(60)]
    values = [*_CSS_VALUES, *(f"#{rng.getrandbits(24):06x}" for _ in range(8)),
              *(f"{rng.randint(1, 120) * 5}px" for _ in range(10))]
    out, n = [], 0
    while n < size:
        props = ";".join(f"{rng.choice(_CSS_PROPS)}:{rng.choice(values)}" for _ in range(rng.randint(1, 6)))
        tail = rng.choice(("", " a", " li", ":hover", " img"))
        s = f".{rng.choice(classes)} .{rng.choice(classes)}{tail}{{{props}}}\n"
        out.append(s)
        n += len(s)
    return "".join(out)


# ---- pages ---------------------------------------------------------------------------------------------------------

_PINYIN = ("zhong", "guo", "xin", "hua", "wang", "tian", "di", "ren", "min", "bao", "shang", "hai", "bei", "jing",
           "dong", "fang", "cai", "jing", "ke", "ji", "you", "xi", "yi", "le", "jia", "ju", "qi", "che", "fang",
           "chan", "jian", "kang", "lv", "shi", "pin", "mei", "nv", "tu", "wen", "hui", "jin", "long", "feng", "yun")
_TLD_ZH = ("cn", "com", "com.cn", "net", "com", "cc", "org", "net.cn")
_TLD = ("com", "com", "net", "org", "de", "ru", "fr", "es", "it", "nl", "co.uk", "info", "jp")
_TRACKERS = (
    '<img src="https://hm.{h}.com/hm.gif?si={x}&amp;rnd={n}" width="1" height="1" style="display:none" alt="">',
    '<img height="1" width="1" style="display:none" src="https://www.facebook.com/tr?id={n}&amp;ev=PageView">',
    '<img src="//stat.{h}.cn/count.gif?id={n}" width="0" height="0" border="0">',
    '<img src="https://pixel.{h}.net/p.gif?u={x}" width="1px" height="1px" alt="">',
)
_PLACEHOLDERS = ("data:image/gif;base64,R0lGODlhAQABAIAAAAAAAP///yH5BAEAAAAALAAAAAABAAEAAAIBRAA7",
                 "/static/images/grey.gif", "/images/loading.gif", "data:image/png;base64,iVBORw0KGgo=")


@functools.cache
def _boilerplate() -> tuple[list[str], list[str]]:
    """Pools of inline JS and CSS blobs, the same for every file."""
    rng = random.Random(0)
    js = [_js_blob(rng, int(min(60_000, rng.lognormvariate(8.3, 0.9)))) for _ in range(150)]
    css = [_css_blob(rng, int(min(40_000, rng.lognormvariate(8.0, 0.8)))) for _ in range(80)]
    return js, css


def _cum(weights) -> list[float]:
    out, total = [], 0.0
    for w in weights:
        total += w
        out.append(total)
    return out


class _PageMaker:
    """Builds one capture at a time: (url, HTML bytes, HTTP headers, metadata fields)."""

    def __init__(self, seed: int, zh_share: float, pool: int = 1200):
        self.rng = random.Random(seed)
        self.zh_share = zh_share
        self.zh, self.others, shares = _languages(pool)
        self.other_cum = _cum(shares)
        self.js, self.css = _boilerplate()
        self.n = 0

    def _host(self, zh: bool) -> str:
        r = self.rng
        name = "".join(r.choice(_PINYIN) for _ in range(r.randint(1, 3))) if zh else "".join(
            r.choice(_LATIN) + r.choice("aeiou") for _ in range(r.randint(2, 5)))
        prefix = r.choice(("www.", "www.", "", "m.", "news.", "bbs."))
        number = r.randint(0, 99) if r.random() < .2 else ""
        return f"{prefix}{name}{number}.{r.choice(_TLD_ZH if zh else _TLD)}"

    def _path(self) -> str:
        r = self.rng
        n = r.randint(1000, 9_999_999)
        return r.choice((f"/news/{r.randint(2015, 2020)}{r.randint(1, 12):02d}/{n}.html", f"/a/{n}.html",
                         f"/?p={n}", f"/article/{n}.shtml", f"/thread-{n}-1-1.html", f"/{r.choice(_PINYIN)}/{n}/",
                         f"/show.asp?id={n}&page={r.randint(1, 9)}", f"/p/{r.getrandbits(40):010x}"))

    def capture(self) -> tuple[str, bytes, str, dict]:
        """(url, body, Content-Type, metadata fields) of the next capture; metadata without languages for
        non-HTML captures."""
        r = self.rng
        self.n += 1
        kind = r.random()
        if kind < 0.01:  # PDFs: incompressible, large
            host = self._host(False)
            size = int(min(MIB, r.lognormvariate(11.5, 1.0)))
            return f"https://{host}/files/{self.n}.pdf", b"%PDF-1.4\n" + r.randbytes(size), "application/pdf", {}
        if kind < 0.015:
            host = self._host(False)
            return f"https://{host}/{self.n}.jpg", b"\xff\xd8\xff\xe0" + r.randbytes(r.randint(5_000, 80_000)), \
                "image/jpeg", {}
        if kind < 0.02:
            lang = self._other()
            host = self._host(False)
            items = "".join(f"<item><title>{r.choice(lang.titles)}</title><link>https://{host}{self._path()}</link>"
                            f"<description>{r.choice(lang.paragraphs)}</description></item>"
                            for _ in range(r.randint(5, 40)))
            body = f'<?xml version="1.0" encoding="utf-8"?><rss version="2.0"><channel>{items}</channel></rss>'
            return f"https://{host}/feed/", body.encode(), "application/rss+xml", {"charset-detected": "UTF-8"}
        zh = r.random() < self.zh_share
        lang = self.zh if zh else self._other()
        host = self._host(zh)
        url = f"{r.choice(('http', 'https'))}://{host}{self._path()}"
        charset = r.choices([c for c, _ in lang.charsets], weights=[w for _, w in lang.charsets])[0]
        html = self._html(lang, url, host, charset)
        body = html.encode(charset, errors="xmlcharrefreplace")
        if charset == "gbk":
            http_cs, detected = r.choice(("gbk", "gb2312", None)), r.choice(("GBK", "GB2312", "GB18030"))
        else:
            http_cs, detected = (charset if r.random() < 0.6 else None), charset.upper()
        ctype = "text/html" + (f"; charset={http_cs}" if http_cs else "")
        return url, body, ctype, {"charset-detected": detected, "languages-cld2": self._cld2(lang, len(html))}

    def _other(self) -> _Lang:
        return self.others[bisect.bisect_left(self.other_cum, self.rng.random() * self.other_cum[-1])]

    def _cld2(self, lang: _Lang, chars: int) -> str:
        r = self.rng
        top = round(r.uniform(0.75, 0.99), 2)
        langs = [{"code": lang.code, "code-iso-639-3": lang.iso3, "text-covered": top,
                  "score": round(r.uniform(600, 2100), 1), "name": lang.name}]
        if r.random() < 0.3:  # a second language: English on most pages, Chinese on a few non-Chinese ones
            code, iso3, name = ("zh", "zho", "Chinese") if lang.code != "zh" and r.random() < 0.2 else (
                ("en", "eng", "ENGLISH") if lang.code != "en" else ("de", "deu", "GERMAN"))
            langs.append({"code": code, "code-iso-639-3": iso3, "text-covered": round((1 - top) * 0.8, 2),
                          "score": round(r.uniform(400, 2000), 1), "name": name})
        return json.dumps({"reliable": True, "text-bytes": chars // 4, "languages": langs}, separators=(",", ":"))

    def _img_url(self, host: str, img_hosts: list[str], zh: bool) -> str:
        r = self.rng
        x = r.getrandbits(48)
        ext = r.choice(("jpg", "jpg", "jpg", "png", "png", "gif", "webp", "jpeg"))
        form = r.random()
        if form < 0.38:
            return f"https://{r.choice(img_hosts)}/uploads/{r.randint(2015, 2020)}/{r.randint(1, 12)}/{x:012x}.{ext}"
        if form < 0.6:
            return f"/uploads/allimg/{r.randint(150101, 201231)}/{r.randint(1, 9)}-{x % 10**9}.{ext}"
        if form < 0.67:
            return r.choice((f"images/{x:x}.{ext}", f"../upload/{x % 10**6}.{ext}", f"./pic/{x:x}_s.{ext}"))
        if form < 0.8:
            return f"//{r.choice(img_hosts)}/img/{x:012x}.{ext}"
        if form < 0.88:
            width = r.choice((200, 300, 640))
            return f"https://{r.choice(img_hosts)}/{x:012x}.{ext}?x-oss-process=image/resize,m_fill,w_{width}"
        if form < 0.92 and zh:
            return f"/uploads/{r.choice(self.zh.nav)}{r.randint(1, 20)}.{ext}"  # unescaped non-ASCII path
        if form < 0.95:
            return f"  /upload/{x:x}.{ext}\n"
        return f"http://{host}/d/file/{x % 10**8}.{ext}"

    def _img(self, lang: _Lang, host: str, img_hosts: list[str], zh: bool) -> str:
        r = self.rng
        alt_kind = r.random()
        if alt_kind < 0.45:
            alt = f' alt="{r.choice(lang.captions)}"'
        elif alt_kind < 0.6:
            alt = f' alt="{r.choice(lang.nav)}"'
        elif alt_kind < 0.85:
            alt = ' alt=""'
        else:
            alt = ""
        title = f' title="{r.choice(lang.titles)}"' if r.random() < 0.08 else ""
        w, h = r.choice((120, 160, 200, 300, 480, 600, 750)), r.choice((90, 120, 150, 225, 400))
        size = f' width="{w}" height="{h}"' if r.random() < 0.4 else ""
        cls = r.choice(("lazy", "img-responsive", "thumb", "pic", f"wp-image-{r.randint(1, 9999)}"))
        cls = f' class="{cls}"' if r.random() < 0.5 else ""
        kind = r.random()
        if kind < 0.14:  # lazy loading: a placeholder in src, the picture elsewhere
            attr = r.choice(("data-src", "data-original", "data-lazy-src", "data-actualsrc"))
            real = self._img_url(host, img_hosts, zh)
            return f'<img src="{r.choice(_PLACEHOLDERS)}" {attr}="{real}"{alt}{cls}{size}>'
        if kind < 0.22:
            u = self._img_url(host, img_hosts, zh).strip().rsplit(".", 1)[0]
            srcset = ", ".join(f"{u}-{w}.jpg {w}w" for w in r.sample((320, 480, 640, 768, 1024, 1280), r.randint(2, 4)))
            return f'<img src="{u}-320.jpg" srcset="{srcset}" sizes="(max-width: 640px) 100vw, 640px"{alt}{cls}>'
        if kind < 0.26:
            icon = r.choice(("search", "share", "weixin", "weibo", "qq", "arrow", "close"))
            return f'<img src="/static/icons/{icon}.svg" width="16" height="16"{alt}>'
        if kind < 0.263:
            return f"<img{alt}{cls}>"
        if kind < 0.266:
            return f'<img src="javascript:void(0)"{alt}>'
        return f'<img src="{self._img_url(host, img_hosts, zh)}"{alt}{title}{cls}{size}>'

    def _html(self, lang: _Lang, url: str, host: str, charset: str) -> str:
        r = self.rng
        zh = lang is self.zh
        site = url[: url.index("/", 8)]
        target = int(min(MIB, max(3_000, r.lognormvariate(11.05, 0.9))))
        n_img = min(150, int(r.gammavariate(4.0, 5.0)))
        img_hosts = [f"{p}.{host.split('.', 1)[-1]}" for p in ("img", "pic", "static", "i1")][: r.randint(1, 4)]
        img_hosts += [self._host(zh) for _ in range(r.randint(0, 2))]
        meta_cs = {"gbk": r.choice(("gb2312", "gbk"))}.get(charset, charset)
        head = [
            "<!DOCTYPE html>", f'<html lang="{lang.html_lang}">', "<head>",
            f'<meta http-equiv="Content-Type" content="text/html; charset={meta_cs}" />' if r.random() < 0.5
            else f'<meta charset="{meta_cs}">',
            f"<title>{r.choice(lang.titles)}_{r.choice(lang.nav)}</title>",
            f'<meta name="keywords" content="{",".join(r.choice(lang.nav) for _ in range(r.randint(3, 8)))}" />',
            f'<meta name="description" content="{r.choice(lang.paragraphs)[:160]}" />',
            '<meta name="viewport" content="width=device-width, initial-scale=1.0" />',
        ]
        if r.random() < 0.02:
            head.append(f'<base href="{r.choice((f"https://{host}/", f"https://{host}/m/", "/static/"))}">')
        head += [f'<link rel="stylesheet" type="text/css" href="{site}/static/css/'
                 f'{r.choice(("main", "style", "common", "index"))}.css?v={r.randint(1, 99999)}" />'
                 for _ in range(r.randint(1, 5))]
        head += [f'<script type="text/javascript" src="//{r.choice(img_hosts)}/js/'
                 f'{r.choice(("jquery.min", "common", "app", "swiper"))}.js"></script>' for _ in range(r.randint(1, 5))]
        parts = ["\n".join(head)]
        size = len(parts[0])
        boiler = target * r.uniform(0.1, 0.45)  # inline CSS and JS
        while boiler > 0:
            blob = f"\n<style type=\"text/css\">\n{r.choice(self.css)}</style>" if r.random() < 0.35 else \
                f'\n<script type="text/javascript">{r.choice(self.js)}\n</script>'
            parts.append(blob)
            boiler -= len(blob)
            size += len(blob)
        logo = f'<img src="/static/images/logo.png" alt="{r.choice(lang.nav)}">'
        cats = [r.choice(_PINYIN) + r.choice(_PINYIN) for _ in range(r.randint(6, 40))]
        nav = "".join(f'\n      <li data-id="{r.randint(1000, 9_999_999)}"><a href="{site}/{c}/index.html">'
                      f"{r.choice(lang.nav)}</a></li>" for c in cats)
        parts.append(f'\n</head>\n<body>\n<div class="header">\n  <div class="logo"><a href="{site}/">{logo}</a></div>'
                     f'\n  <div class="nav">\n    <ul class="clearfix">{nav}\n    </ul>\n  </div>\n</div>'
                     f'\n<div class="main clearfix">\n  <div class="main-l fl">\n    <h1>{r.choice(lang.titles)}</h1>'
                     f'\n    <div class="info"><span>{r.randint(2015, 2020)}-{r.randint(1, 12):02d}-'
                     f"{r.randint(1, 28):02d}</span><span>{r.choice(lang.nav)}</span></div>"
                     '\n    <div class="content">')
        size += len(parts[-1].encode())
        # Article text and link lists until the page reaches its size (image tags counted in advance).
        topic = r.choice(lang.topics)
        text_share = r.uniform(0.2, 0.7)
        size += 180 * n_img
        blocks = []
        while size < target:
            if r.random() < text_share:
                block = f'\n      <p style="text-indent:2em;">{r.choice(topic)}</p>'
            else:
                items = "".join(
                    f'\n          <li><a href="{site}{self._path()}" target="_blank" title="{t}">{t}</a>'
                    f'<span class="time">{r.randint(1, 12):02d}-{r.randint(1, 28):02d}</span></li>'
                    for t in (r.choice(lang.titles) for _ in range(r.randint(5, 15))))
                block = (f'\n      <div class="box">\n        <div class="tit"><h3>{r.choice(lang.nav)}</h3>'
                         f'<a href="{site}/{r.choice(cats)}/" class="more">more</a></div>\n        <ul class="list">'
                         f"{items}\n        </ul>\n      </div>")
            blocks.append(block)
            size += len(block.encode())
        for _ in range(n_img):
            tag = self._img(lang, host, img_hosts, zh)
            blocks.insert(r.randint(0, len(blocks)), f'\n      <p style="text-align:center">{tag}</p>'
                          if r.random() < 0.5 else f'\n      <div class="pic">{tag}</div>')
        parts += blocks
        tail = [f'\n    </div>\n  </div>\n</div>\n<div class="footer">\n  <p>Copyright © {r.randint(2005, 2020)} '
                f"{host} {r.choice(lang.nav)}</p>"]
        if r.random() < 0.3:
            tail.append(f"\n  <p>{logo}</p>")  # the logo again: a duplicate URL
        if r.random() < 0.6:
            tail += ["\n  " + r.choice(_TRACKERS).format(h=r.choice(_PINYIN), x=f"{r.getrandbits(64):016x}",
                                                        n=r.randint(1, 10**12)) for _ in range(r.randint(1, 2))]
        parts += [*tail, "\n</div>\n</body>\n</html>\n"]
        return "".join(parts)


def write_warc(path: Path, target_bytes: int, zh_share: float, seed: int, metadata: bool = True) -> None:
    """A Common Crawl-like WARC of about target_bytes (compressed); see the module docstring. `metadata=False`:
    the same captures without their metadata records (a user's own crawl), so every page goes to the text fallback."""
    import uuid
    from datetime import UTC, datetime

    from tasks.sample.warc import WarcWriter

    maker = _PageMaker(seed, zh_share)
    r = maker.rng
    ids = random.Random(seed + 1)
    start = 1596906857  # 2020-08-08T17:14:17Z, the crawl of the real excerpt

    def rid(*_) -> str:  # seeded: the writer's content-hashed ids name a request by its URL, which may repeat here
        return f"<urn:uuid:{uuid.UUID(int=ids.getrandbits(128), version=4)}>"

    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as fh:
        writer = WarcWriter(fh, datetime.fromtimestamp(start, UTC), record_id=rid)
        writer.warcinfo(path.name, {"isPartOf": CRAWL, "publisher": "Common Crawl",
                                    "description": "danqing benchmark WARC", "format": "WARC File Format 1.1"})
        t = start
        while fh.tell() < target_bytes:
            url, body, ctype, meta = maker.capture()
            t += r.expovariate(4.0)
            req_hdr = [("User-Agent", "CCBot/2.0 (https://commoncrawl.org/faq/)"),
                       ("Accept", "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"),
                       ("Accept-Language", "en-US,en;q=0.5"), ("Accept-Encoding", "br,gzip"),
                       ("Host", url.split("/")[2]), ("Connection", "Keep-Alive")]
            ip = f"{r.randint(1, 223)}.{r.randint(0, 255)}.{r.randint(0, 255)}.{r.randint(1, 254)}"
            server = r.choice((("Server", "nginx"), ("Server", "Microsoft-IIS/7.5"), ("Server", "Apache"),
                               ("Server", "nginx/1.16.1"), ("Server", "Tengine")))
            encoding = [("X-Crawler-Content-Encoding", "gzip")] if r.random() < 0.7 else []
            resp_hdr = [server, ("Date", time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(t - 1))),
                        ("Content-Type", ctype), *encoding, ("Vary", "Accept-Encoding"),
                        ("Content-Length", str(len(body)))]
            resp_id = writer.capture(url, body, ctype, ip=ip, headers=resp_hdr, payload_type=ctype.split(";")[0],
                                     request_headers=req_hdr, when=datetime.fromtimestamp(t, UTC))
            fields = {"fetchTimeMs": int(r.expovariate(1 / 600)), **meta}  # drawn either way: the same pages
            if metadata:
                writer.metadata(url, fields, concurrent_to=resp_id)
    tmp.replace(path)


def warc_file(work: Path, name: str, mb: float, zh_share: float, seed: int, metadata: bool = True) -> Path:
    """The cached WARC for these parameters, generated when missing (or made by another GEN_VERSION)."""
    path = work / f"v{GEN_VERSION}-{name}-{mb:g}mb-zh{zh_share:g}-s{seed}{'' if metadata else '-nometa'}.warc.gz"
    if not path.exists():
        for old in work.glob(f"v*-{name}-*.warc.gz"):
            if not old.name.startswith(f"v{GEN_VERSION}-"):
                old.unlink()
        t0 = time.perf_counter()
        write_warc(path, int(mb * 1e6), zh_share, seed, metadata)
        print(f"generated {path.name} in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    return path


# ---- the reference: warcio + lxml, the same rules --------------------------------------------------------------------


def scan(path: str):
    """extract_warc as a Common Crawl run calls it: images fetched over HTTP, so no replay listing."""
    from tasks.extract import extract_warc

    return extract_warc(path, replay=False)


def reference_extract(path: str, config=None, replay: bool = False):
    """extract_warc's full scan with warcio's ArchiveIterator and lxml.html instead of FastWARC and lexbor.

    Same record pairing (an HTML response, then its metadata record), decoding, rules and row and frame building
    (tasks.extract's own helpers, private ones included), so the candidates must be equal and the time differs by
    the WARC reader and the HTML parser only. URLs go through plain resolve_src (urljoin), not extract_warc's
    _Resolver, so the equality also checks _Resolver's shortcuts (at ~1% of the reference's time). Pages without a
    languages-cld2 label (none here, as in CC's WARCs) are not selected: extract_warc's fallback parses with lexbor.
    """
    import lxml.html
    from lxml.etree import ParserError
    from warcio.archiveiterator import ArchiveIterator

    from schemas.contracts import row_key
    from tasks import extract as ex
    from tasks.io.warc import split_content_type

    config = config or ex.ExtractConfig()
    rows, rows_replay = [], []
    stats = {"records": 0, "pages_selected": 0}
    snapshot = "unknown"

    def collect(rec, offset: int, body: bytes, meta: dict[str, str]) -> None:
        if ex.primary_language(meta) not in config.chinese_codes:
            return
        _, charset = split_content_type(rec.http_headers.get_header("Content-Type"))
        html = ex.decode_html(body[: config.max_page_bytes], charset, meta.get("charset-detected"))
        try:
            doc = lxml.html.document_fromstring(html)
        except ParserError:  # an empty document: no <img>
            return
        stats["pages_selected"] += 1
        page_url = rec.rec_headers.get_header("WARC-Target-URI") or ""
        base = page_url
        bases = doc.xpath("//base[@href]")
        if bases:
            base = ex.resolve_src(bases[0].get("href") or "", page_url) or page_url
        page_host = (urlsplit(page_url).hostname or "").lower()
        date = rec.rec_headers.get_header("WARC-Date")
        seen = set()
        for node in doc.iter("img"):
            attrs = node.attrib
            raw, attr = ex.choose_src(attrs, config)
            alt, title = attrs.get("alt"), attrs.get("title")
            url, host, reason = None, "", None
            if raw is None or not raw.strip():
                reason = "extract.no_src"
            elif config.max_pixel_side > 0 and ex.is_tracking_pixel(attrs, config):
                reason = "extract.tracking_pixel"
            else:
                url = ex.resolve_src(raw, base)
                host = (urlsplit(url).hostname or "").lower() if url else ""
                if url is None:
                    reason = "extract.bad_url"
                elif ex._SVG.search(urlsplit(url).path if "?" in url or "#" in url else url):
                    reason = "extract.svg"
                elif url in seen:
                    reason = "extract.duplicate"
                else:
                    seen.add(url)
            rows.append((row_key(url or (raw or ""), alt, page_url), url, alt, page_url, page_host, host, snapshot,
                         path, offset, date, attrs.get("src"), attr, title, reason))

    pending = None  # (record, offset, body) of an HTML response waiting for its metadata record
    with open(path, "rb") as fh:
        it = ArchiveIterator(fh)
        for rec in it:
            stats["records"] += 1
            kind = rec.rec_type
            uri = rec.rec_headers.get_header("WARC-Target-URI")
            if kind == "warcinfo":
                snapshot = ex.parse_metadata(rec.content_stream().read()).get("ispartof") or snapshot
            elif kind == "metadata":
                if pending is not None and uri == pending[0].rec_headers.get_header("WARC-Target-URI"):
                    collect(*pending, ex.parse_metadata(rec.content_stream().read()))
                pending = None
            elif kind == "response":
                offset = it.offset
                status = int(rec.http_headers.get_statuscode() or 0)
                if replay:
                    rows_replay.append((uri, path, offset, status))
                mime, _ = split_content_type(rec.http_headers.get_header("Content-Type"))
                if status != 200 or (mime or "").startswith(config.image_mimes) or (
                        mime is not None and mime not in ex.HTML_TYPES):
                    continue
                body = rec.content_stream().read()
                if mime is None and not body.lstrip()[:15].lower().startswith((b"<!doctype html", b"<html")):
                    continue
                pending = (rec, offset, body)
    return ex.ExtractResult(ex._frame(rows, stats), ex._replay_frame(rows_replay), stats)


# ---- measuring -----------------------------------------------------------------------------------------------------


def gunzip(path: Path) -> int:
    """Inflate the whole file with ISA-L, discarding the output: the floor of any full scan. Returns its size."""
    buf = bytearray(MIB)
    n = 0
    with igzip.open(path, "rb") as fh:
        while got := fh.readinto(buf):
            n += got
    return n


def fastwarc_iterate(path: Path) -> int:
    """FastWARC's iteration as extract_warc's reader sets it up, no payload read: inflating and headers alone."""
    from fastwarc.warc import ArchiveIterator, WarcRecordType

    kinds = WarcRecordType.warcinfo | WarcRecordType.response | WarcRecordType.metadata | WarcRecordType.resource
    n = 0
    with open(path, "rb") as fh:
        for _ in ArchiveIterator(fh, parse_http=True, record_types=kinds, quirks_mode=True):
            n += 1
    return n


def fastwarc_scan(path: Path) -> int:
    """Every record of the file through FastWARC, payloads read, nothing parsed: extract_warc's reading floor."""
    from fastwarc.warc import ArchiveIterator

    n = 0
    with open(path, "rb") as fh:
        for rec in ArchiveIterator(fh, parse_http=False):
            n += len(rec.reader.read())
    return n


def candidate_rows(frame) -> Counter:
    """(page_url, url, alt_text, drop_reason) rows of a candidates frame, as a multiset with None for missing."""
    cols = ["page_url", "url", "alt_text", "drop_reason"]
    plain = frame[cols].astype(object)
    return Counter(plain.where(plain.notna(), None).itertuples(index=False, name=None))


def assert_same(name: str, got: Counter, want: Counter) -> None:
    if got != want:
        extra, missing = list((got - want).items())[:3], list((want - got).items())[:3]
        raise AssertionError(f"{name}: candidates differ from extract_warc's ({sum(got.values())} vs "
                             f"{sum(want.values())} rows); extra {extra}, missing {missing}")


class _Server:
    """tests/cc_server.py serving `root` in its own process (a thread here would share the extractor's GIL).

    The server switches Nagle's algorithm off (else each request waits ~40 ms for a delayed ACK, an artifact of
    the stand-in that Common Crawl's servers do not have).
    """

    def __init__(self, root: Path):
        self.root = root

    def __enter__(self) -> str:
        code = ("import sys; from pathlib import Path; sys.path.insert(0, sys.argv[1])\n"
                "from cc_server import serve\n"
                "with serve(Path(sys.argv[2])) as s:\n    print(s.url, flush=True); sys.stdin.read()")
        self.proc = subprocess.Popen([sys.executable, "-c", code, str(ROOT / "tests"), str(self.root)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        url = self.proc.stdout.readline().strip()
        if not url.startswith("http://"):
            self.proc.kill()
            raise RuntimeError(f"tests/cc_server.py did not start (said {url!r})")
        return url

    def __exit__(self, *exc) -> None:
        self.proc.stdin.close()  # the server process ends when its stdin does
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def index_figures(work: Path, warc: Path, full, repeat: int) -> dict:
    """extract_selected over HTTP against the full scan `full` of the same WARC: bytes, equality, time."""
    import shutil

    from tasks.extract import extract_selected
    from tasks.io.ccconfig import CCConfig
    from tasks.io.ccindex import select_chinese

    if str(ROOT / "tests") not in sys.path:
        sys.path.insert(0, str(ROOT / "tests"))
    from cc_server import build_layout

    root = work / "cc-layout"
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    layout = build_layout(root, [warc], crawl=CRAWL)  # the WARC linked in CC's layout, indexed by write_index
    rel = layout["warcs"][0]
    selected = select_chinese([str(root / p) for p in layout["index"]], [rel])
    with _Server(root) as base:
        cfg = CCConfig.for_base_url(base)
        url = f"{base}/{rel}"
        times, results = best_of({"full": lambda: scan(str(warc)),
                                  "index": lambda: extract_selected(url, selected, cc=cfg)}, repeat)
    got = results["index"]
    assert_same("extract_selected", candidate_rows(got.candidates), candidate_rows(full.candidates))
    if got.stats["read_errors"]:
        raise AssertionError(f"extract_selected: {got.stats['read_errors']} read errors: {got.stats.get('read_error')}")
    wanted = int(selected["warc_record_length"].sum())
    if not wanted:
        raise AssertionError(f"the index selects no record of {warc}: no Chinese page in it")
    return {"index_records": len(selected), "index_mb_selected": round(wanted / 1e6, 2),
            "index_bytes_over_selected": round(got.stats["bytes_read"] / wanted, 4),
            "index_speedup_5pct": round(times["full"] / times["index"], 3),
            "index_mb_s_5pct": round(warc.stat().st_size / 1e6 / times["index"], 1)}


def two_process_figures(a: Path, b: Path, warm: Path, repeat: int) -> dict:
    """Two same-size WARCs one after the other vs both at once, on two warm spawned worker processes."""
    import functools
    import importlib

    from tasks.extract import extract_warc

    job = functools.partial(extract_warc, replay=False)  # scan() as a picklable callable for the workers


    ctx = get_context("spawn")
    with ProcessPoolExecutor(2, mp_context=ctx, initializer=importlib.import_module,
                             initargs=("tasks.extract",)) as pool:
        # Both workers started (a second submit while the first is busy spawns the second) and warm.
        for f in [pool.submit(job, str(warm)) for _ in range(4)]:
            f.result()

        def serial() -> None:
            for p in (a, b):
                pool.submit(job, str(p)).result()

        def parallel() -> None:
            for f in [pool.submit(job, str(p)) for p in (a, b)]:
                f.result()

        times, _ = best_of({"serial": serial, "parallel": parallel}, repeat)
    mb = (a.stat().st_size + b.stat().st_size) / 1e6
    return {"speedup_2proc": round(times["serial"] / times["parallel"], 3),
            "mb_s_1proc": round(mb / times["serial"], 1), "mb_s_2proc": round(mb / times["parallel"], 1)}


def profile(path: Path, top: int = 15) -> str:
    """cProfile of extract_warc on `path`: the `top` functions by own time."""

    prof = cProfile.Profile()
    prof.runcall(scan, str(path))
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(top)
    return out.getvalue()


SIZES = {  # (MB per file, repeats)
    "default": (150.0, 3),
    "quick": (25.0, 5),
    "tiny": (1.5, 1),  # the smoke test's
}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mb", type=float, help="size of each generated WARC (compressed MB); default 150")
    ap.add_argument("--repeat", type=int, help="alternating rounds; the fastest of each is compared (default 3)")
    ap.add_argument("--quick", action="store_true", help="25 MB files: about a minute (more on the first run)")
    ap.add_argument("--tiny", action="store_true", help="1.5 MB files, one round: the smoke test's size")
    ap.add_argument("--profile", action="store_true", help="print a cProfile of extract_warc on the 5%% file")
    ap.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "danqing-bench-extract"))
    args = ap.parse_args(argv)
    mb, repeat = SIZES["tiny" if args.tiny else "quick" if args.quick else "default"]
    mb, repeat = args.mb or mb, max(1, args.repeat or repeat)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)


    z5 = warc_file(work, "zh5", mb, 0.05, seed=1)
    z5b = warc_file(work, "zh5b", mb, 0.05, seed=2)  # the second file of the two-process figure
    z100 = warc_file(work, "zh100", mb, 1.0, seed=3)
    z5n = warc_file(work, "zh5n", mb, 0.05, seed=1, metadata=False)  # z5's captures, no metadata records
    warm = warc_file(work, "warm", 0.3, 1.0, seed=4)
    for fn in (gunzip, fastwarc_scan, fastwarc_iterate, scan, reference_extract):  # imports, lazy initialisation
        fn(str(warm))

    times, results = best_of({
        "gunzip_5": lambda: gunzip(z5), "fastwarc_5": lambda: fastwarc_scan(z5),
        "fastwarc_iterate_5": lambda: fastwarc_iterate(z5),
        "extract_5": lambda: scan(str(z5)),
        "gunzip_5n": lambda: gunzip(z5n), "extract_5n": lambda: scan(str(z5n)),
        "reference_5": lambda: reference_extract(str(z5)),
        "gunzip_100": lambda: gunzip(z100), "extract_100": lambda: scan(str(z100)),
    }, repeat)
    full = results["extract_5"]
    assert_same("reference (warcio + lxml)", candidate_rows(results["reference_5"].candidates),
                candidate_rows(full.candidates))
    size5, size100 = z5.stat().st_size / 1e6, z100.stat().st_size / 1e6
    nometa = results["extract_5n"]
    figures = {
        "file_mb": round(size5, 1), "repeats": repeat,
        "pages_5pct": full.stats["pages_total"], "chinese_pages_5pct": full.stats["pages_selected"],
        "candidates_5pct": len(full.candidates),
        "pages_100pct": results["extract_100"].stats["pages_total"],
        "inflated_over_compressed": round(results["gunzip_5"] / 1e6 / size5, 2),
        "ratio_vs_gunzip_5pct": round(times["gunzip_5"] / times["extract_5"], 3),
        "ratio_vs_gunzip_100pct": round(times["gunzip_100"] / times["extract_100"], 3),
        # no metadata records: every page judged by its visible text (the label-free fallback)
        "ratio_vs_gunzip_5pct_nometa": round(times["gunzip_5n"] / times["extract_5n"], 3),
        "chinese_pages_5pct_nometa": nometa.stats["pages_selected"],
        "nometa_candidates_over_labelled": round(len(nometa.candidates) / max(1, len(full.candidates)), 3),
        "speedup_vs_warcio_lxml": round(times["reference_5"] / times["extract_5"], 3),
        "fastwarc_scan_vs_gunzip_5pct": round(times["gunzip_5"] / times["fastwarc_5"], 3),  # the reader's ceiling
        "fastwarc_iterate_vs_gunzip_5pct": round(times["gunzip_5"] / times["fastwarc_iterate_5"], 3),  # inflate only
        "gunzip_mb_s": round(size5 / times["gunzip_5"], 1),
        "extract_mb_s_5pct": round(size5 / times["extract_5"], 1),
        "extract_mb_s_100pct": round(size100 / times["extract_100"], 1),
        "reference_mb_s_5pct": round(size5 / times["reference_5"], 1),
    }
    figures.update(index_figures(work, z5, full, repeat))
    figures.update(two_process_figures(z5, z5b, warm, repeat))
    figures["loadavg_1m"] = round(os.getloadavg()[0], 2)  # the machine is shared: context for the figures
    if args.profile:
        for name, path in (("5%", z5), ("100%", z100)):
            print(f"cProfile of extract_warc on the {name} file, by own time:\n{profile(path)}")
    return report(figures)


if __name__ == "__main__":
    main()

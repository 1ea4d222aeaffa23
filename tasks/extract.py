"""Stage extract: Chinese pages of a WARC file -> <img> URL + alt-text candidates with provenance."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from urllib.parse import urljoin, urlsplit

import pandas as pd
import pyarrow as pa
from selectolax.lexbor import LexborHTMLParser

from schemas.contracts import row_key
from schemas.reasons import REASONS
from tasks.io.warc import Record, iter_records, next_member
from tasks.io.warc import parse_fields as parse_metadata  # languages-cld2, charset-detected, ...
from tasks.text import counts_mostly_chinese, script_counts

STAGE = "extract"
RULES = REASONS[STAGE]
HTML_TYPES = ("text/html", "application/xhtml+xml")
_META_CHARSET = re.compile(rb"""<meta[^>]+charset\s*=\s*["']?\s*([A-Za-z0-9_.:-]+)""", re.I)
_WS = re.compile(r"[\t\n\r]")


@dataclass(frozen=True)
class ExtractConfig:
    chinese_codes: tuple[str, ...] = ("zh", "zh-Hant", "zh-Hans")  # cld2 codes taken as Chinese (primary only)
    fallback_min_han_share: float = 0.5  # no metadata record: Han share of the page's visible text units
    fallback_max_kana_share: float = 0.05  # no metadata record: more kana than this is Japanese
    max_page_bytes: int = 8_000_000  # larger HTML bodies are parsed up to this many bytes (counted: pages_oversize)
    backend: str = "auto"  # WARC reader: auto (FastWARC), fastwarc, warcio
    image_mimes: tuple[str, ...] = ("image/",)  # response types never read as pages
    # Lazy-loading pages keep the real image in one of these and a placeholder in src; first present wins.
    lazy_src_attrs: tuple[str, ...] = ("data-src", "data-original", "data-lazy-src", "data-actualsrc", "data-url")
    use_srcset: bool = True  # take the largest srcset candidate over src
    title_as_alt: bool = False  # the paper's captions are alt texts: title stands in only when asked
    max_pixel_side: int = 1  # declared width and height both <= this: a tracking pixel, dropped
    min_cjk_bytes: int = 6  # pages without a CC language label: fewer non-ASCII bytes (2 Han in UTF-8) are not Chinese


@dataclass
class ExtractResult:
    candidates: pd.DataFrame  # every <img> on a selected page, drop_reason set for the dropped
    replay: pd.DataFrame  # every response record: url, warc_file, offset, status (for WARC replay)
    stats: dict = field(default_factory=dict)


# Aliases of legacy Chinese encodings to their superset, so no byte decodes to U+FFFD needlessly.
_SUPERSETS = {"gb2312": "gb18030", "gbk": "gb18030", "x-gbk": "gb18030", "big5": "big5hkscs", "cp936": "gb18030"}


def decode_html(body: bytes, http_charset: str | None, detected: str | None) -> str:
    """Decode with the HTTP charset, then <meta charset>, then CC's charset-detected, then UTF-8/GB18030."""
    tried = []
    meta = _META_CHARSET.search(body[:4096])
    for cand in (http_charset, meta.group(1).decode("ascii", "ignore") if meta else None, detected):
        if cand:
            cand = _SUPERSETS.get(cand.lower(), cand.lower())
            tried.append(cand)
    for enc in [*tried, "utf-8", "gb18030"]:
        try:
            return body.decode(enc)
        except (LookupError, UnicodeDecodeError):
            continue
    return body.decode(tried[0] if tried else "utf-8", errors="replace") if tried else body.decode(
        "utf-8", errors="replace"
    )


_FIRST_CODE = '"languages":[{"code":"'


def primary_language(meta: dict[str, str]) -> str | None:
    """The first (largest) language of `languages-cld2`, or None when absent or unreadable."""
    value = meta.get("languages-cld2", "")
    start = value.find(_FIRST_CODE)  # Common Crawl writes compact JSON: the first code without a JSON parse
    if start != -1 and value.endswith("}"):
        start += len(_FIRST_CODE)
        end = value.find('"', start)
        if end != -1 and "\\" not in value[start:end]:
            return value[start:end]
    try:
        langs = json.loads(value).get("languages") or []
        return langs[0].get("code") if langs else None
    except (ValueError, AttributeError, TypeError, LookupError):  # malformed JSON must not end the WARC file
        return None


def _host(url: str) -> str:
    try:
        return (urlsplit(url).hostname or "").lower()
    except ValueError:
        return ""


_NOT_FETCHABLE = ("data:", "javascript:", "about:", "blob:", "mailto:")


def resolve_src(src: str, base: str) -> str | None:
    """Absolute http(s) URL for an <img> src, or None when it is not a fetchable URL."""
    src = _WS.sub("", src.strip())  # browsers drop tabs/newlines inside URLs
    if not src or src[:11].lower().startswith(_NOT_FETCHABLE):
        return None
    try:
        url = urljoin(base, src)
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            return None
    except ValueError:  # e.g. an invalid IPv6 literal
        return None
    return url


class _Resolver:
    """resolve_src for one page, with the common cases done by string operations (urljoin is the hot spot).

    Absolute http(s) URLs are taken as they are, protocol-relative ones get the page's scheme, and root-relative
    paths are appended to the page's origin, whenever they hold nothing urljoin would rewrite (dot segments,
    backslashes, an empty query or fragment, control characters, userinfo or IPv6 hosts); everything else
    goes through urljoin. Both give the same URL (a test compares them).
    """

    def __init__(self, base: str):
        self.base = base
        parts = urlsplit(base) if base.startswith(("http://", "https://")) else None
        self.origin = f"{parts.scheme}://{parts.netloc}" if parts is not None and parts.hostname else None
        self.scheme = parts.scheme if self.origin else None
        self.host = _host(base) if self.origin else ""
        directory = self.origin + parts.path[: parts.path.rfind("/") + 1] if self.origin else None
        if directory is not None and (not parts.path.startswith("/") or "/." in directory):
            directory = None  # urljoin would normalise the base's own path: leave it to urljoin
        self.directory = directory

    def __call__(self, src: str) -> tuple[str | None, str]:
        raw = src
        if "\t" in src or "\n" in src or "\r" in src:
            src = _WS.sub("", src)
        src = src.strip()
        if self.origin is not None and _plain(src):
            if src[:1] == "/" and "//" not in src:  # urljoin drops empty path segments
                return self.origin + src, self.host
            if src.startswith("//"):
                host = _plain_host(src, 2)
                if host:
                    return f"{self.scheme}:{src}", host
            elif src.startswith("http://") or src.startswith("https://"):
                host = _plain_host(src, src.index("//") + 2)
                if host:
                    return src, host
            elif (self.directory is not None and src and src[0] not in ".?#" and "//" not in src
                  and ":" not in src.split("/", 1)[0]):
                return self.directory + src, self.host  # page-relative: the base's directory + the path
        url = resolve_src(raw, self.base)
        return url, (_host(url) if url else "")


def _plain(src: str) -> bool:
    """Nothing in `src` that urljoin would rewrite."""
    return (src.isprintable() and "\\" not in src and " " not in src and "/." not in src and "?#" not in src
            and not src.endswith(("?", "#")))


def _plain_host(url: str, start: int) -> str:
    """The host of an authority without userinfo, IPv6 brackets or an odd port; '' to send it through urljoin."""
    end = len(url)
    for sep in "/?#":
        i = url.find(sep, start)
        if i != -1 and i < end:
            end = i
    netloc = url[start:end]
    if not netloc or "@" in netloc or "[" in netloc or "%" in netloc:
        return ""
    host, _, port = netloc.partition(":")
    if port and not port.isdigit() or not host:
        return ""
    return host.lower()


_SRCSET_URL = re.compile(r"[\s,]*(\S+)")


def _srcset_candidates(srcset: str) -> Iterator[tuple[str, str]]:
    """(URL, descriptors) of a srcset, split as HTML's parser does: a URL is a run of non-space characters
    (commas inside it stay, trailing ones end it), its descriptors run to the next comma outside parentheses."""
    pos, n = 0, len(srcset)
    while pos < n:
        m = _SRCSET_URL.match(srcset, pos)
        if m is None:
            return
        url, pos = m.group(1), m.end()
        if url.endswith(","):
            yield url.rstrip(","), ""
            continue
        comma = srcset.find(",", pos)
        end = n if comma == -1 else comma
        if "(" in srcset[pos:end]:  # a comma inside parentheses does not end the descriptors
            depth, end = 0, pos
            while end < n and (srcset[end] != "," or depth):
                depth += {"(": 1, ")": -1 if depth else 0}.get(srcset[end], 0)
                end += 1
        yield url, srcset[pos:end].strip()
        pos = end + 1


def largest_srcset(srcset: str) -> str | None:
    """The URL of a srcset's largest candidate: by width descriptor, else density; none means 1x. data: URIs
    (inline placeholders) are passed over."""
    best, best_size = None, -1.0
    for url, desc in _srcset_candidates(srcset):
        desc = desc.lower()
        if not url or url[:5].lower() == "data:":
            continue
        size = 1.0
        if desc:
            try:
                if desc.endswith(("w", "x")) and " " not in desc:
                    size = float(desc[:-1]) * (1.0 if desc.endswith("x") else 1e6)  # any width beats any density
                else:
                    continue  # an invalid descriptor drops the candidate (HTML's srcset parsing)
            except ValueError:
                continue
        if size > best_size:
            best, best_size = url, size
    return best


_SVG = re.compile(r"\.svgz?(?:$|[?#])", re.I)


def choose_src(attrs: dict, config: ExtractConfig) -> tuple[str | None, str]:
    """(raw URL, attribute it came from) of an <img>: lazy-load attributes, then srcset's largest, then src."""
    for name in config.lazy_src_attrs:
        value = attrs.get(name)
        if value and value.strip() and not value.strip()[:5].lower().startswith("data:"):
            return value, name
    if config.use_srcset:
        srcset = attrs.get("srcset")
        if srcset and srcset.strip():
            best = largest_srcset(srcset)
            if best is not None and not best.lower().startswith("data:"):
                return best, "srcset"
    return attrs.get("src"), "src"


def _declared_px(value: str | None) -> float | None:
    if not value:
        return None
    value = value.strip().lower().removesuffix("px").strip()
    try:
        return float(value)
    except ValueError:
        return None


def is_tracking_pixel(attrs: dict, config: ExtractConfig) -> bool:
    """Declared width and height (attributes) both at most max_pixel_side: a beacon, not a picture."""
    w, h = _declared_px(attrs.get("width")), _declared_px(attrs.get("height"))
    return w is not None and h is not None and w <= config.max_pixel_side and h <= config.max_pixel_side


class _Page:
    """An HTML response, its metadata record's fields and Common Crawl's label; the body read when first asked."""

    __slots__ = ("rec", "_body", "meta", "chinese")

    def __init__(self, rec: Record, body: bytes | None = None, meta: dict[str, str] | None = None,
                 chinese: bool | None = None):
        self.rec = rec
        self._body = body  # None: held by the record (Record.hold), read on first use
        self.meta = meta
        self.chinese = chinese  # decided by Common Crawl's label (metadata record or index); None: not labelled

    @property
    def body(self) -> bytes:
        if self._body is None:
            self._body = self.rec.read()
        return self._body


def _pages(path: str, config: ExtractConfig, stats: dict, replay: list | None, cc=None) -> Iterator[_Page]:
    """HTML pages paired with the metadata record that follows them (when there is one).

    Common Crawl writes the metadata record (the page's language) after the response, so a page's payload is
    held (Record.hold: FastWARC keeps it without making a bytes object) until that record says whether it is
    read at all. Damaged data part-way (a gzip member that does not inflate) is counted in read_errors and
    skipped: reading goes on at the next intact record, so one bad member never costs the rest of the file.
    """
    pending: _Page | None = None
    image_mimes = config.image_mimes
    start = 0
    while True:
        last = None
        try:
            for rec in iter_records(path, config.backend, cc, start):
                last = rec.offset
                stats["records"] += 1
                kind = rec.type
                if kind == "metadata":
                    if pending is not None and rec.uri == pending.rec.uri:
                        pending.meta = parse_metadata(rec.read())
                        yield pending
                        pending = None
                    continue
                if kind != "response":
                    if kind == "warcinfo":
                        info = parse_metadata(rec.read())
                        stats.setdefault("snapshot", info.get("ispartof"))
                    continue
                status = rec.status
                if replay is not None:
                    replay.append((rec.uri, path, last, status))  # any response may be asked for by URL
                mime = rec.mime
                if status != 200 or (mime or "").startswith(image_mimes):
                    continue
                if mime is None:  # no Content-Type: sniffed
                    body = rec.read()
                    if rec.truncated:
                        stats["records_truncated"] += 1
                    if not body.lstrip()[:15].lower().startswith((b"<!doctype html", b"<html")):
                        continue
                elif mime not in HTML_TYPES:
                    continue
                else:
                    body = None
                    rec.hold()
                    if rec.truncated:
                        stats["records_truncated"] += 1
                if pending is not None:
                    yield pending
                pending = _Page(rec, body)
            break
        except FileNotFoundError:
            raise
        except OSError as err:
            if not (start and last is None):  # a resume that fails before its first record: the same damage
                stats["read_errors"] += 1
            stats.setdefault("read_error", str(err)[:300])
            damaged = last if last is not None else start
            resume = next_member(path, damaged + 1, cc)
            if resume is None:
                break
            stats["bytes_skipped"] = stats.get("bytes_skipped", 0) + resume - damaged
            start = resume
    if pending is not None:
        yield pending


def _label(page: _Page, config: ExtractConfig) -> bool | None:
    """Common Crawl's own label (the index's, or the metadata record's primary language); None without one."""
    if page.chinese is None and page.meta is not None and "languages-cld2" in page.meta:
        page.chinese = primary_language(page.meta) in config.chinese_codes
    return page.chinese


_HIGH_BYTES = bytes(range(0x80, 0x100))


def _cjk_possible(body: bytes, config: ExtractConfig) -> bool:
    """Byte-level pre-check for unlabelled pages: Chinese text needs non-ASCII bytes (or numeric references)."""
    high = len(body) - len(body.translate(None, _HIGH_BYTES))
    return high >= config.min_cjk_bytes or body.count(b"&#") >= config.min_cjk_bytes // 2


# Elements whose text a browser does not show: not page text for the no-label language fallback. Template content
# and comments are outside lexbor's text() already; attributes (alt, title) and <head>'s <title> are not body text.
UNSHOWN = ("script", "style", "noscript", "noembed", "noframes", "iframe")
_UNSHOWN_SELECTOR = ", ".join(UNSHOWN)


def visible_counts(tree: LexborHTMLParser) -> dict[str, int]:
    """`script_counts` of the body's visible text: all of its text less that of the UNSHOWN elements.

    The body's text joins text nodes with a space, so each hidden element's counts are exactly its share of the
    whole and are subtracted (one text() call and one walk for the hidden elements, no copy of the tree); an
    element inside another hidden one is in that one's text already.
    """
    body = tree.body
    if body is None:
        return script_counts("")
    counts = script_counts(body.text(separator=" "))
    for node in body.css(_UNSHOWN_SELECTOR):
        parent = node.parent
        while parent is not None and parent.tag not in UNSHOWN:
            parent = parent.parent
        if parent is not None:
            continue
        for unit, n in script_counts(node.text(separator=" ")).items():
            counts[unit] -= n
    return {unit: max(n, 0) for unit, n in counts.items()}


def _new_stats() -> dict:
    # pages_not_chinese: pages turned away as not Chinese, by Common Crawl's label or, unlabelled
    # (pages_unlabelled), by the text fallback; a full scan has pages_total == pages_selected + pages_not_chinese.
    return {"records": 0, "pages_total": 0, "pages_selected": 0, "pages_not_chinese": 0, "pages_unlabelled": 0,
            "records_truncated": 0, "read_errors": 0, "pages_oversize": 0}


def _collect(pages: Iterator[_Page], path: str, config: ExtractConfig, stats: dict, snapshot: str | None,
             rows: list[tuple]) -> None:
    """Select the Chinese pages among `pages` and append their <img> candidates to `rows`."""
    for page in pages:
        stats["pages_total"] += 1
        if _label(page, config) is False:
            stats["pages_not_chinese"] += 1
            continue  # the cheap path: labelled non-Chinese pages are neither decoded nor parsed
        body = page.body
        if len(body) > config.max_page_bytes:
            stats["pages_oversize"] += 1
            body = body[: config.max_page_bytes]
        if page.chinese is None:
            stats["pages_unlabelled"] += 1
            if not _cjk_possible(body, config):
                stats["pages_not_chinese"] += 1
                continue
        detected = (page.meta or {}).get("charset-detected")
        if detected is not None and detected.lower().replace("-", "") == "utf8":
            tree = LexborHTMLParser(body)  # CC detected UTF-8: lexbor decodes it itself, a third faster
        else:
            tree = LexborHTMLParser(decode_html(body, page.rec.charset, detected))
        if page.chinese is None and not counts_mostly_chinese(  # no label: the visible text must be mostly Chinese
                visible_counts(tree), config.fallback_min_han_share, config.fallback_max_kana_share):
            stats["pages_not_chinese"] += 1
            continue
        stats["pages_selected"] += 1
        _page_candidates(page, tree, snapshot or stats.get("snapshot") or "unknown", path, config, rows)


def extract_warc(path: str, config: ExtractConfig = ExtractConfig(), snapshot: str | None = None,
                 cc=None, replay: bool = True) -> ExtractResult:
    """All <img> candidates of the Chinese pages of one WARC file (a full scan), the dropped ones with a reason.

    `replay`: also list every response record by URL (for the WARC replay fetcher); a run that fetches over
    HTTP does without it.
    """
    stats = _new_stats()
    replay = [] if replay else None
    rows: list[tuple] = []
    try:
        _collect(_pages(path, config, stats, replay, cc), path, config, stats, snapshot, rows)
    except FileNotFoundError:
        raise
    except OSError as err:  # corrupt data part-way through: keep what was read, count the damaged file
        stats["read_errors"] += 1
        stats["read_error"] = str(err)[:300]
    stats.pop("snapshot", None)
    return ExtractResult(_frame(rows, stats), _replay_frame(replay or []), stats)


def extract_selected(path: str, selected: pd.DataFrame, config: ExtractConfig = ExtractConfig(),
                     snapshot: str | None = None, cc=None, pages_total: int | None = None) -> ExtractResult:
    """Candidates of the index-selected records of one WARC file, read by byte range (no full scan).

    `selected`: index rows (warc_record_offset, warc_record_length, content_languages, content_charset) of the
    pages to read, all Chinese by the index's primary-language rule. A record that cannot be read is counted in
    `read_errors` (first error in `read_error`); the others still come. `pages_total`: the HTML captures of the
    file according to the index (the full scan's pages_total), when known.
    """
    from tasks.io.ranges import RangeStats
    from tasks.io.warc import read_records_at

    stats = _new_stats()
    range_stats = RangeStats()
    ranges = list(zip(selected["warc_record_offset"].astype("int64"), selected["warc_record_length"].astype("int64"),
                      strict=True))
    charsets = dict(zip(selected["warc_record_offset"].astype("int64"), selected["content_charset"], strict=True))

    def pages() -> Iterator[_Page]:
        for offset, rec, payload, error in read_records_at(path, ranges, cc, range_stats, config.backend):
            stats["records"] += 1
            if error is not None:
                stats["read_errors"] += 1
                stats.setdefault("read_error", error[:300])
                continue
            meta = {"charset-detected": charsets.get(offset)} if isinstance(charsets.get(offset), str) else None
            yield _Page(rec, payload, meta=meta, chinese=True)

    rows: list[tuple] = []
    _collect(pages(), path, config, stats, snapshot, rows)
    if pages_total is not None:
        stats["pages_total"] = int(pages_total)
    stats["bytes_read"] = range_stats.bytes_read
    stats["bytes_selected"] = range_stats.bytes_selected
    return ExtractResult(_frame(rows, stats), _replay_frame([]), stats)


_STR = pd.api.types.pandas_dtype("str")
_ARROW_STR = isinstance(_STR, pd.StringDtype) and _STR.storage == "pyarrow"  # pandas 3's default string dtype


def _array(values, dtype: str):
    """pd.array(values, dtype), a string column built by pyarrow directly where "str" is arrow-backed (pandas 3):
    the same array in half the time, without pandas' per-element check (the rows hold str or None only)."""
    if dtype == "str" and _ARROW_STR:
        return pd.arrays.ArrowStringArray(pa.chunked_array([pa.array(values, pa.large_string(), from_pandas=True)]),
                                          dtype=_STR)
    return pd.array(values, dtype=dtype)


def _typed(rows: list[tuple], dtypes: dict[str, str]) -> pd.DataFrame:
    """A frame of `rows` (tuples in the order of `dtypes`) built column by column, each straight into its dtype.

    The same frame as DataFrame.from_records(rows).astype(dtypes) in a fraction of the time: no object frame first.
    """
    columns = zip(*rows, strict=True) if rows else [()] * len(dtypes)
    return pd.DataFrame({name: _array(col, dtype) for (name, dtype), col in zip(dtypes.items(), columns,
                                                                               strict=True)})


def _frame(rows: list[tuple], stats: dict) -> pd.DataFrame:
    stats["img_elements"] = len(rows)
    return _typed(rows, _COLUMNS)


_REPLAY_COLUMNS = {"url": "str", "warc_file": "str", "offset": "int64", "status": "Int64"}


def response_index(path: str, backend: str = "auto") -> pd.DataFrame:
    """Every response record of one WARC file by URL, as `extract_warc(replay=True)` lists them, without reading
    a page: for a batch whose replayed images may lie in the run's other batches' WARC files. A file damaged
    part-way gives what precedes the damage (the batch that extracts that file counts it in read_errors)."""
    rows = []
    try:
        for rec in iter_records(path, backend):
            if rec.type == "response":
                rows.append((rec.uri, path, rec.offset, rec.status))
    except OSError:
        pass
    return _replay_frame(rows)


def _replay_frame(replay: list[tuple]) -> pd.DataFrame:
    rep = _typed(replay, _REPLAY_COLUMNS)
    return rep.dropna(subset=["url"]) if rep["url"].hasnans else rep


_COLUMNS = {
    "key": "str", "url": "str", "alt_text": "str", "page_url": "str", "page_host": "str",
    "image_host": "str", "snapshot": "str", "warc_file": "str", "warc_offset": "int64",
    "warc_date": "str", "src": "str", "src_attr": "str", "title": "str", "drop_reason": "str",
}
_NO_SRC, _BAD_URL, _SVG_R, _PIXEL, _DUP = (f"{STAGE}.{r}" for r in ("no_src", "bad_url", "svg", "tracking_pixel",
                                                                  "duplicate"))


def img_and_base_nodes(tree: LexborHTMLParser) -> tuple[list, object | None]:
    """The page's <img> elements in document order and its first <base href> (None without one), in one walk.

    img and base[href] as one selector list: a second walk of the tree costs a tenth of the candidates' time (a
    test checks they are the nodes css("img") and css_first("base[href]") find).
    """
    imgs, base = [], None
    for node in tree.css("base[href], img"):
        if node.tag != "base":
            imgs.append(node)
        elif base is None:
            base = node
    return imgs, base


def _page_candidates(page: _Page, tree: LexborHTMLParser, snapshot: str, path: str, config: ExtractConfig,
                     rows: list[tuple]) -> None:
    """Append one row per <img> of the page: rules that need no URL first, then resolution (the costly part)."""
    page_url = page.rec.uri or ""
    imgs, base_node = img_and_base_nodes(tree)
    if not imgs:
        return
    base = page_url
    if base_node is not None:
        base = resolve_src(base_node.attributes["href"] or "", page_url) or page_url
    resolver = _Resolver(base)
    page_host = _host(page_url)
    offset, date = page.rec.offset, page.rec.date
    seen: set[str] = set()
    title_as_alt, pixels = config.title_as_alt, config.max_pixel_side > 0
    append, svg = rows.append, _SVG.search
    for node in imgs:
        attrs = node.attributes
        raw, attr = choose_src(attrs, config)
        alt = attrs.get("alt")
        if alt is None and "alt" in attrs:
            alt = ""  # <img alt>: HTML's empty alt (a decorative image), which lexbor reports as None
        title = attrs.get("title")
        if alt is None and title_as_alt:
            alt = title
        url, host, reason = None, "", None
        if raw is None or not raw.strip():
            reason = _NO_SRC
        elif pixels and "width" in attrs and "height" in attrs and is_tracking_pixel(attrs, config):
            reason = _PIXEL
        else:
            url, host = resolver(raw)
            if url is None:
                reason = _BAD_URL
            # a .svg at the end of the path is one in the URL too (before its ? or #): urlsplit only for those
            elif svg(url) and svg(urlsplit(url).path if "?" in url or "#" in url else url):
                reason = _SVG_R
            elif url in seen:
                reason = _DUP
            else:
                seen.add(url)
        append((row_key(url or (raw or ""), alt, page_url), url, alt, page_url, page_host, host, snapshot, path,
                offset, date, attrs.get("src"), attr, title, reason))

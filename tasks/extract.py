"""Stage extract: Chinese pages of a WARC file -> <img> URL + alt-text candidates with provenance."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from urllib.parse import urljoin, urlsplit

import pandas as pd
from selectolax.lexbor import LexborHTMLParser

from schemas.contracts import row_key
from tasks.io.warc import Record, iter_records
from tasks.text import is_mostly_chinese

STAGE = "extract"
RULES = ("no_src", "bad_url", "duplicate")
HTML_TYPES = ("text/html", "application/xhtml+xml")
_META_CHARSET = re.compile(rb"""<meta[^>]+charset\s*=\s*["']?\s*([A-Za-z0-9_.:-]+)""", re.I)
_WS = re.compile(r"[\t\n\r]")


@dataclass(frozen=True)
class ExtractConfig:
    chinese_codes: tuple[str, ...] = ("zh", "zh-Hant", "zh-Hans")  # cld2 codes taken as Chinese (primary only)
    fallback_min_han_share: float = 0.5  # no metadata record: Han share of the page's text units
    fallback_max_kana_share: float = 0.05  # no metadata record: more kana than this is Japanese
    max_page_bytes: int = 8_000_000  # larger HTML bodies are parsed up to this many bytes
    backend: str = "auto"  # WARC reader: auto (FastWARC), fastwarc, warcio
    image_mimes: tuple[str, ...] = ("image/",)  # response types never read as pages


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


def parse_metadata(body: bytes) -> dict[str, str]:
    """Common Crawl's metadata record: `name: value` lines (languages-cld2, charset-detected, ...)."""
    out = {}
    for line in body.decode("utf-8", errors="replace").splitlines():
        name, sep, value = line.partition(":")
        if sep:
            out[name.strip().lower()] = value.strip()
    return out


def primary_language(meta: dict[str, str]) -> str | None:
    """The first (largest) language of `languages-cld2`, or None when absent or unreadable."""
    try:
        langs = json.loads(meta.get("languages-cld2", "")).get("languages") or []
        return langs[0].get("code") if langs else None
    except (ValueError, AttributeError, TypeError, LookupError):  # malformed JSON must not end the WARC file
        return None


def _host(url: str) -> str:
    try:
        return (urlsplit(url).hostname or "").lower()
    except ValueError:
        return ""


def resolve_src(src: str, base: str) -> str | None:
    """Absolute http(s) URL for an <img> src, or None when it is not a fetchable URL."""
    src = _WS.sub("", src.strip())  # browsers drop tabs/newlines inside URLs
    if not src or src.lower().startswith(("data:", "javascript:", "about:", "blob:", "mailto:")):
        return None
    try:
        url = urljoin(base, src)
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            return None
    except ValueError:  # e.g. an invalid IPv6 literal
        return None
    return url


@dataclass
class _Page:
    rec: Record
    body: bytes
    meta: dict[str, str] | None = None


def _pages(path: str, config: ExtractConfig, stats: dict, replay: list) -> Iterator[_Page]:
    """HTML pages paired with the metadata record that follows them (when there is one)."""
    pending: _Page | None = None
    for rec in iter_records(path, config.backend):
        stats["records"] += 1
        if rec.type == "warcinfo":
            info = parse_metadata(rec.read())
            stats.setdefault("snapshot", info.get("ispartof"))
            continue
        if rec.type == "metadata":
            if pending is not None and rec.uri == pending.rec.uri:
                pending.meta = parse_metadata(rec.read())
                yield pending
                pending = None
            continue
        if rec.type != "response":
            continue
        replay.append((rec.uri, path, rec.offset, rec.status))  # any response may be asked for by URL
        if rec.status != 200 or (rec.mime or "").startswith(config.image_mimes):
            continue
        body = rec.read()
        if rec.truncated:
            stats["records_truncated"] += 1
        sniffed_html = rec.mime is None and body.lstrip()[:15].lower().startswith((b"<!doctype html", b"<html"))
        if rec.mime not in HTML_TYPES and not sniffed_html:
            continue
        if pending is not None:
            yield pending
        pending = _Page(rec, body[: config.max_page_bytes])
    if pending is not None:
        yield pending


def is_chinese_page(page: _Page, text: str | None, config: ExtractConfig) -> bool:
    """Common Crawl's own label when there is one; else the page text must be mostly Chinese."""
    if page.meta is not None and "languages-cld2" in page.meta:
        return primary_language(page.meta) in config.chinese_codes
    return text is not None and is_mostly_chinese(
        text, config.fallback_min_han_share, config.fallback_max_kana_share
    )


def extract_warc(path: str, config: ExtractConfig = ExtractConfig(), snapshot: str | None = None) -> ExtractResult:
    """All <img> candidates of the Chinese pages of one WARC file, the dropped ones with a reason."""
    stats = {"records": 0, "pages_total": 0, "pages_selected": 0, "records_truncated": 0, "read_errors": 0}
    replay: list[tuple] = []
    rows: list[dict] = []
    try:
        for page in _pages(path, config, stats, replay):
            stats["pages_total"] += 1
            if page.meta is not None and "languages-cld2" in page.meta and not is_chinese_page(page, None, config):
                continue  # the cheap path: non-Chinese pages are neither decoded nor parsed
            html = decode_html(page.body, page.rec.charset, (page.meta or {}).get("charset-detected"))
            tree = LexborHTMLParser(html)
            if page.meta is None or "languages-cld2" not in page.meta:
                text = tree.body.text(separator=" ") if tree.body is not None else ""
                if not is_chinese_page(page, text, config):
                    continue
            stats["pages_selected"] += 1
            rows.extend(_page_candidates(page, tree, snapshot or stats.get("snapshot") or "unknown", path))
    except FileNotFoundError:
        raise
    except OSError as err:  # corrupt data part-way through: keep what was read, count the damaged file
        stats["read_errors"] += 1
        stats["read_error"] = str(err)[:300]
    stats["img_elements"] = len(rows)
    cand = pd.DataFrame(rows, columns=list(_COLUMNS))
    cand = cand.astype(_COLUMNS)
    rep = pd.DataFrame(replay, columns=["url", "warc_file", "offset", "status"])
    rep = rep.dropna(subset=["url"]).astype({"url": "str", "warc_file": "str", "offset": "int64"})
    rep["status"] = rep["status"].astype("Int64")
    stats.pop("snapshot", None)
    return ExtractResult(cand, rep, stats)


_COLUMNS = {
    "key": "str", "url": "str", "alt_text": "str", "page_url": "str", "page_host": "str",
    "image_host": "str", "snapshot": "str", "warc_file": "str", "warc_offset": "int64",
    "warc_date": "str", "src": "str", "drop_reason": "str",
}


def _page_candidates(page: _Page, tree: LexborHTMLParser, snapshot: str, path: str) -> Iterator[dict]:
    page_url = page.rec.uri or ""
    base = page_url
    base_node = tree.css_first("base[href]")
    if base_node is not None:
        href = resolve_src(base_node.attributes.get("href") or "", page_url)
        base = href or page_url
    seen: set[str] = set()
    for node in tree.css("img"):
        attrs = node.attributes
        src = attrs.get("src")
        alt = attrs.get("alt")
        reason = None
        url = None
        if src is None or not src.strip():
            reason = f"{STAGE}.no_src"
        else:
            url = resolve_src(src, base)
            if url is None:
                reason = f"{STAGE}.bad_url"
            elif url in seen:
                reason = f"{STAGE}.duplicate"
            else:
                seen.add(url)
        yield {
            "key": row_key(url or (src or ""), alt, page_url),
            "url": url,
            "alt_text": alt,
            "page_url": page_url,
            "page_host": _host(page_url),
            "image_host": _host(url) if url else "",
            "snapshot": snapshot,
            "warc_file": path,
            "warc_offset": page.rec.offset,
            "warc_date": page.rec.date,
            "src": src,
            "drop_reason": reason,
        }

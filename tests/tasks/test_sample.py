"""The generated sample crawl: deterministic, Common Crawl's layout, and a manifest that matches its pages."""

from __future__ import annotations

import collections
import html
import io
import json
import logging
import re
import shutil
import unicodedata
import zlib
from pathlib import Path
from urllib.parse import urljoin

import lxml.html
import numpy as np
import pytest
from fastwarc.warc import ArchiveIterator as FastIterator
from fastwarc.warc import WarcRecordType
from PIL import Image, UnidentifiedImageError
from warcio.archiveiterator import ArchiveIterator

from schemas.reasons import REASONS
from tasks.sample import COMPLETION_FILE, SAMPLE_SNAPSHOT, write_sample_crawl

SPEC_REASONS = {f"{stage}.{r}" for stage, reasons in REASONS.items() for r in reasons}
_KANA = re.compile(r"[\u3040-\u30ff]")
_HAN = re.compile(r"[\u4e00-\u9fff]")
_LATIN = re.compile(r"[A-Za-z]+")
REFINE_RULES = ("lid", "stop_words", "no_noun", "unk_tokens", "low_entropy", "text_safety")
SOURCE_FILTER_CASES = {  # stage 1's safety and site rules, and their order on a page that fails several
    "nsfw_keyword", "nsfw_keyword_fullwidth", "nsfw_keyword_entity", "blacklisted_page_host",
    "blacklisted_image_host", "order_not_chinese_first", "order_nsfw_before_site", "order_site_before_word_count",
}


@pytest.fixture(scope="module")
def crawl(tmp_path_factory):
    return write_sample_crawl(tmp_path_factory.mktemp("sample"))


@pytest.fixture(scope="module")
def manifest(crawl):
    return [json.loads(line) for line in crawl.manifest.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def records(crawl):
    """Every record of every file: (file name, type, headers, http status, http headers, payload)."""
    out = []
    for path in crawl.warcs:
        with path.open("rb") as fh:
            for rec in ArchiveIterator(fh):
                http = rec.http_headers if rec.rec_type in ("request", "response") else None
                status = int(http.get_statuscode()) if rec.rec_type == "response" else None
                out.append((path.name, rec.rec_type, rec.rec_headers, status, http, rec.content_stream().read()))
    return out


@pytest.fixture(scope="module")
def responses(records):
    return {h.get_header("WARC-Target-URI"): (name, status, http, body)
            for name, kind, h, status, http, body in records if kind == "response"}


def _files(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


def test_byte_identical_and_rerun_rewrites_nothing(crawl, tmp_path):
    again = write_sample_crawl(tmp_path / "other")
    assert _files(crawl.manifest.parent) == _files(again.manifest.parent)
    assert [p.name for p in again.warcs] == ["sample-00000.warc.gz", "sample-00001.warc.gz", "sample-00002.warc.gz"]
    before = {p.name: p.stat().st_mtime_ns for p in again.manifest.parent.iterdir()}
    assert write_sample_crawl(tmp_path / "other") == again
    assert {p.name: p.stat().st_mtime_ns for p in again.manifest.parent.iterdir()} == before
    assert not [p for p in again.manifest.parent.iterdir() if p.name.endswith(".tmp")]


def test_damaged_directory_is_rewritten(crawl, tmp_path):
    shutil.copytree(crawl.manifest.parent, tmp_path, dirs_exist_ok=True)
    assert (tmp_path / COMPLETION_FILE).is_file()
    damaged = tmp_path / crawl.warcs[1].name
    damaged.write_bytes(damaged.read_bytes()[:1000])  # the marker no longer matches what is on disk
    write_sample_crawl(tmp_path)
    assert _files(tmp_path) == _files(crawl.manifest.parent)


def test_common_crawl_layout(crawl, records):
    by_file = collections.defaultdict(list)
    for rec in records:
        by_file[rec[0]].append(rec)
    assert sorted(by_file) == [p.name for p in crawl.warcs]
    for recs in by_file.values():
        _, kind, headers, _, _, body = recs[0]
        assert kind == "warcinfo" and headers.protocol == "WARC/1.0"
        assert f"isPartOf: {SAMPLE_SNAPSHOT}" in body.decode()
        assert all(h.protocol == "WARC/1.0" for _, _, h, _, _, _ in recs)
        ids = [h.get_header("WARC-Record-ID") for _, _, h, _, _, _ in recs]
        assert len(set(ids)) == len(ids)
        for prev, rec in zip(recs, recs[1:], strict=False):
            if rec[1] == "metadata":  # follows its page's response and points at it, as in Common Crawl
                assert prev[1] == "response" and prev[4].get_header("Content-Type").startswith("text/html")
                assert rec[2].get_header("WARC-Concurrent-To") == prev[2].get_header("WARC-Record-ID")
                assert rec[2].get_header("WARC-Target-URI") == prev[2].get_header("WARC-Target-URI")
                fields = dict(line.split(": ", 1) for line in rec[5].decode().splitlines())
                assert fields["charset-detected"]
                langs = json.loads(fields["languages-cld2"])["languages"]
                covered = [lang["text-covered"] for lang in langs]
                assert covered == sorted(covered, reverse=True)


def test_one_gzip_member_per_record(crawl, records):
    members = 0
    for path in crawl.warcs:
        data = path.read_bytes()
        while data:
            d = zlib.decompressobj(wbits=31)
            d.decompress(data)
            assert d.eof
            assert data[4:8] == b"\0\0\0\0"  # gzip mtime 0: the bytes do not depend on when they were written
            data = d.unused_data
            members += 1
    assert members == len(records)


def test_fastwarc_reads_every_record(crawl, records):
    n = 0
    for path in crawl.warcs:
        with path.open("rb") as fh:
            for rec in FastIterator(fh, parse_http=False):  # parsing HTTP would consume part of the block
                assert rec.verify_block_digest()
                n += 1
        with path.open("rb") as fh:
            for rec in FastIterator(fh, parse_http=True, record_types=WarcRecordType.response):
                assert rec.http_headers.status_code in (200, 404)
    assert n == len(records)


def _page_imgs(status_http_body) -> tuple[list, str | None]:
    _, _, http, body = status_http_body
    charset = http.get_header("Content-Type").split("charset=")[1]
    doc = lxml.html.document_fromstring(body.decode(charset))
    base = doc.find(".//base")
    return list(doc.iter("img")), None if base is None else base.get("href")


def test_manifest_lines_are_the_pages_img_elements(manifest, responses):
    pages = [m for m in manifest if m["kind"] == "page"]
    imgs = collections.defaultdict(list)
    for m in manifest:
        if m["kind"] == "img":
            imgs[m["page_url"]].append(m)
    assert len(pages) == len({p["page_url"] for p in pages}) >= 30
    assert set(imgs) <= {p["page_url"] for p in pages if p["selected"]}
    for page in pages:
        warc, status, _, _ = responses[page["page_url"]]
        assert (warc, status) == (page["warc"], 200)
        elements, base = _page_imgs(responses[page["page_url"]])
        assert len(elements) == page["n_img"] > 0
        lines = imgs[page["page_url"]]
        if not page["selected"]:
            assert lines == []
            continue
        assert [(m["src"], m["alt_text"]) for m in lines] == [(e.get("src"), e.get("alt")) for e in elements]
        for m, e in zip(lines, elements, strict=True):
            assert m["warc"] == page["warc"]
            # the attribute the image is taken from: a lazy-load one or srcset's largest, else src
            lazy = e.get("data-src") or e.get("data-original")
            srcset = e.get("srcset")
            assert m["taken"] == (lazy or (srcset.split(",")[-1].split()[0] if srcset else m["src"]))
            if m["taken"] is None or m["taken"].startswith(("data:", "javascript:")) or m["case"] == "tracking_pixel":
                assert m["url"] is None
            else:
                assert m["url"] == urljoin(base or page["page_url"], m["taken"])


def test_page_selection_follows_the_language_label(manifest, records):
    labels = {h.get_header("WARC-Target-URI"): json.loads(body.decode().split("languages-cld2: ")[1])
              for _, kind, h, _, _, body in records if kind == "metadata"}
    for page in (m for m in manifest if m["kind"] == "page"):
        label = labels.get(page["page_url"])
        assert (label is None) == (page["languages"] is None)
        if label is not None:
            assert page["selected"] == (label["languages"][0]["code"] in ("zh", "zh-Hant"))
            assert page["languages"] == [lang["code"] for lang in label["languages"]]
    cases = {m["case"]: m["selected"] for m in manifest if m["kind"] == "page"}
    assert cases["no_metadata_chinese"] and not cases["no_metadata_japanese"]
    assert not cases["english"] and not cases["japanese"] and not cases["english_first_mixed"]
    assert cases["gbk"] and cases["gb2312"] and cases["traditional"] and cases["zh_first_mixed"]


def test_legacy_charsets_are_really_used(manifest, responses):
    for page in (m for m in manifest if m["kind"] == "page" and m["case"] in ("gbk", "gb2312")):
        _, _, http, body = responses[page["page_url"]]
        assert http.get_header("Content-Type").lower().endswith(f"charset={page['charset'].lower()}")
        assert f"charset={page['charset'].lower()}".encode() in body
        with pytest.raises(UnicodeDecodeError):
            body.decode("utf-8")
        assert _HAN.search(body.decode(page["charset"]))


def test_every_reason_is_a_spec_name_and_every_case_is_present(manifest):
    imgs = [m for m in manifest if m["kind"] == "img"]
    assert {m["expected"] for m in imgs} <= SPEC_REASONS | {"kept"}
    assert {
        "extract.no_src", "extract.bad_url", "extract.duplicate", "source.caption_not_chinese", "source.text_nsfw",
        "source.blacklisted_site", "source.word_count", "fetch.http_error", "fetch.not_image", "fetch.decode_error",
        "fetch.opt_out", "fetch.robots", "fetch.blocked_address", "image.geometry", "image.low_texture", "image.blur",
        "image.low_entropy", *(f"refine.{r}" for r in REFINE_RULES),
    } <= {m["expected"] for m in imgs}
    expected_cases = {
        "good", "gbk", "traditional", "no_src", "data_uri", "javascript_src", "duplicate_src", "relative_src",
        "protocol_relative", "base_href", "english_alt", "japanese_alt", "empty_alt", "missing_alt",
        "too_few_words", "too_many_words", "html_entities", "emoji", "url_in_caption", "extra_whitespace",
        "missing_record", "http_404", "html_as_image", "random_bytes", "truncated_jpeg", "tiny_80x80",
        "wide_640x100", "narrow_100x300", "boundary_450x150", "duplicate_image", "near_duplicate_image",
        "png", "image_in_other_warc", "no_metadata_page", "uppercase_tag",
        *SOURCE_FILTER_CASES,
    }
    assert expected_cases <= {m["case"] for m in imgs}
    assert 140 <= len(imgs) <= 195
    assert sum(m["expected"] == "kept" for m in imgs) >= 100


def _words(text: str) -> tuple[int, int]:
    """Jieba words without, then with, symbol tokens (emoji): the rule's count lies between the two."""
    import jieba

    jieba.setLogLevel(logging.WARNING)
    tokens = [t for t in jieba.lcut(" ".join(html.unescape(text).split())) if t.strip()]
    cats = [{unicodedata.category(ch)[0] for ch in t} for t in tokens]
    return sum(bool(c - {"P", "S", "Z", "C"}) for c in cats), sum(bool(c - {"P", "Z", "C"}) for c in cats)


def test_captions_sit_clearly_inside_or_outside_the_rules(manifest):
    for m in (m for m in manifest if m["kind"] == "img"):
        alt = html.unescape(m["alt_text"] or "")
        if m["case"] in ("english_alt", "empty_alt", "missing_alt", "order_not_chinese_first"):
            assert not _HAN.search(alt)
        elif m["case"] == "japanese_alt":
            assert _KANA.search(alt)
        elif m["case"] in ("too_few_words", "order_site_before_word_count"):
            assert _words(alt)[1] in (1, 2, 3)
        elif m["case"] == "too_many_words":
            assert _words(alt)[0] >= 90
        elif m["expected"] not in ("extract.no_src", "extract.bad_url", "extract.duplicate"):
            low, high = _words(alt)
            assert 8 <= low and high <= 25, (m["case"], alt)
            assert not _KANA.search(alt)
            assert len(_HAN.findall(alt)) >= 2 * len(_LATIN.findall(alt))  # Latin words count one unit each


def _decode(body: bytes) -> Image.Image:
    im = Image.open(io.BytesIO(body))
    im.load()
    return im


def _laplacian_var(grey: np.ndarray) -> float:
    g = grey.astype(np.float64)
    p = np.pad(g, 1, mode="reflect")  # OpenCV's default border, BORDER_REFLECT_101
    return float((p[:-2, 1:-1] + p[2:, 1:-1] + p[1:-1, :-2] + p[1:-1, 2:] - 4 * g).var())


def test_source_filter_cases_fire_under_the_default_lists(manifest):
    """Each case's caption or host is caught by the default lists, as loaded by the stage itself."""
    from tasks.source import SourceConfig, load_lists, normalise_alt

    lists = load_lists(SourceConfig())
    imgs = [m for m in manifest if m["kind"] == "img" and m["case"] in SOURCE_FILTER_CASES]
    assert {m["case"] for m in imgs} == SOURCE_FILTER_CASES
    for m in imgs:
        nsfw = lists.keywords.find(normalise_alt(m["alt_text"])) is not None
        listed = lists.sites.listed(m["page_url"]) or lists.sites.listed(m["url"])
        assert nsfw == m["case"].startswith(("nsfw", "order_nsfw")), m
        assert listed == (not m["case"].startswith("nsfw")), m  # the order cases sit on a blacklisted page
    others = [m for m in manifest if m["kind"] == "img" and m["case"] not in SOURCE_FILTER_CASES and m["url"]]
    assert not any(lists.keywords.find(normalise_alt(m["alt_text"])) for m in others)
    assert not any(lists.sites.listed(m["page_url"]) or lists.sites.listed(m["url"]) for m in others)


def _thumb(im: Image.Image) -> np.ndarray:
    v = np.asarray(im.convert("L").resize((16, 16), Image.Resampling.BILINEAR), dtype=np.float64).ravel()
    v -= v.mean()
    return v / np.linalg.norm(v)


def test_image_records_give_each_fate(manifest, responses):
    imgs = [m for m in manifest if m["kind"] == "img" and m["url"] and not m["expected"].startswith("extract.")]
    for m in imgs:
        hit = responses.get(m["url"])
        if m["case"] == "missing_record" or m["expected"] == "fetch.blocked_address":
            assert hit is None
            continue
        _, status, _, body = hit
        if m["case"] == "http_404":
            assert status == 404
            continue
        assert status == 200
        if m["expected"] == "fetch.not_image":
            with pytest.raises(UnidentifiedImageError):
                _decode(body)
        elif m["case"] == "png_bomb":
            with pytest.raises(Image.DecompressionBombError):
                Image.open(io.BytesIO(body))
        elif m["expected"] == "fetch.decode_error":
            Image.open(io.BytesIO(body))  # the header is fine ...
            with pytest.raises(OSError):
                _decode(body)  # ... the pixels are not all there
        else:
            w, h = _decode(body).size
            fits = 1 / 3 <= w / h <= 3 and min(w, h) > 100
            assert fits == (m["expected"] != "image.geometry"), m["case"]
    noai = [m for m in imgs if m["expected"] == "fetch.opt_out"]
    assert noai and all("noai" in responses[m["url"]][2].get_header("X-Robots-Tag") for m in noai)
    robots = responses["https://img3.sample-zh.test/robots.txt"][3].decode()
    assert all(f"Disallow: /{m['url'].split('/')[3]}/" in robots for m in imgs if m["expected"] == "fetch.robots")
    geometry = {"tiny_80x80": (80, 80), "wide_640x100": (640, 100), "narrow_100x300": (100, 300),
                "boundary_450x150": (450, 150)}
    assert {m["case"]: _decode(responses[m["url"]][3]).size for m in imgs if m["case"] in geometry} == geometry
    others = [m for m in imgs if m["case"] == "image_in_other_warc"]
    assert others and all(responses[m["url"]][0] != m["warc"] for m in others)
    pngs = [m for m in imgs if m["case"] == "png"]
    assert pngs and all(responses[m["url"]][2].get_header("Content-Type") == "image/png" for m in pngs)


def test_kept_images_are_distinct_photo_like_and_pass_quality_rules(manifest, responses):
    kept = [m for m in manifest if m["kind"] == "img" and m["expected"] in ("kept", "image.duplicate")]
    bodies = {m["url"]: responses[m["url"]][3] for m in kept}
    assert [m["expected"] for m in kept if m["case"].endswith("duplicate_image")] == [
        "kept", "kept", "image.duplicate", "image.duplicate"]  # the first copy of each pair is kept
    dup = [bodies[m["url"]] for m in kept if m["case"] == "duplicate_image"]
    near = [bodies[m["url"]] for m in kept if m["case"] == "near_duplicate_image"]
    assert len(dup) == 2 and dup[0] == dup[1]
    assert len(near) == 2 and near[0] != near[1]
    assert float(_thumb(_decode(near[0])) @ _thumb(_decode(near[1]))) > 0.99
    unique = {}
    for url, body in bodies.items():
        if body not in dup and body != near[1]:
            unique[url] = _decode(body)
    thumbs = np.stack([_thumb(im) for im in unique.values()])
    sims = thumbs @ thumbs.T
    np.fill_diagonal(sims, -1.0)
    assert sims.max() < 0.8  # cosine distance > 0.2: far outside a 0.1 dedup radius
    for im in unique.values():
        grey = im.convert("L")
        pixels = np.asarray(grey)
        hist = np.bincount(pixels.ravel(), minlength=256) / pixels.size
        hist = hist[hist > 0]
        assert pixels.std() > 10
        assert -(hist * np.log2(hist)).sum() > 5
        assert _laplacian_var(np.asarray(grey.resize((256, 256), Image.Resampling.BILINEAR))) > 1500
        w, h = grey.size
        scale = 256 / max(w, h)
        longest = grey.resize((round(w * scale), round(h * scale)), Image.Resampling.BILINEAR)
        assert _laplacian_var(np.asarray(longest)) > 1500


def test_sample_stays_small(crawl):
    # a few MB: small enough for every end-to-end test (6.3 MB with the refine, fetch-policy and quality cases)
    assert sum(p.stat().st_size for p in [*crawl.warcs, crawl.manifest]) < 6_300_000


def test_refine_cases_fail_their_rule_under_the_default_config(manifest):
    """Each refine case passes stage 1 and is dropped by its own rule, as the stage itself computes it."""
    import pandas as pd

    from tasks.refine import refine_text
    from tasks.source import select_sources

    imgs = [m for m in manifest if m["kind"] == "img" and m["expected"].startswith("refine.")]
    assert {m["expected"] for m in imgs} == {f"refine.{r}" for r in REFINE_RULES}
    frame = pd.DataFrame({"key": [f"{i:020x}" for i in range(len(imgs))], "alt_text": [m["alt_text"] for m in imgs],
                          "url": [m["url"] for m in imgs], "page_url": [m["page_url"] for m in imgs]})
    sourced = select_sources(frame)
    assert sourced["drop_reason"].isna().all()
    assert refine_text(sourced)["drop_reason"].tolist() == [m["expected"] for m in imgs]

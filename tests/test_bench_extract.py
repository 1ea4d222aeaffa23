"""Smoke test of bench/extract.py on tiny generated WARCs: the generator, the reference, the printed figures."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from _fixtures import load_bench
from warcio.archiveiterator import ArchiveIterator

from tasks.extract import extract_warc

MB = 1.5  # the bench's --tiny size: ~60 captures a file


@pytest.fixture(scope="module")
def bench():
    module = load_bench("extract")
    return module


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("bench-extract")


def _captures(path: Path) -> list[dict]:
    """Per capture, read with warcio alone: the record types in order, its HTTP type and its metadata fields."""
    captures, types = [], []
    with open(path, "rb") as fh:
        for rec in ArchiveIterator(fh):
            types.append(rec.rec_type)
            if rec.rec_type == "response":
                captures.append({"url": rec.rec_headers.get_header("WARC-Target-URI"),
                                 "type": rec.http_headers.get_header("Content-Type"),
                                 "body": rec.content_stream().read()})
            elif rec.rec_type == "metadata":
                assert rec.rec_headers.get_header("WARC-Target-URI") == captures[-1]["url"]
                captures[-1]["meta"] = dict(line.split(": ", 1) for line in
                                            rec.content_stream().read().decode().splitlines() if ": " in line)
    assert types[0] == "warcinfo" and types[1:] == ["request", "response", "metadata"] * len(captures)
    return captures


@pytest.mark.parametrize(("share", "seed"), [(0.05, 1), (1.0, 3)])
def test_the_generator_writes_cc_like_warcs_with_the_intended_chinese_share(bench, work, share, seed):
    path = bench.warc_file(work, f"zh{share:g}", MB, share, seed=seed)
    assert 0.9 * MB * 1e6 < path.stat().st_size < 1.3 * MB * 1e6
    html = [c for c in _captures(path) if c["type"].startswith("text/html")]
    langs = [json.loads(c["meta"]["languages-cld2"])["languages"][0]["code"] for c in html]
    spread = 3 * (len(html) * share * (1 - share)) ** 0.5  # pages are Chinese independently
    assert langs.count("zh") > 0 and abs(langs.count("zh") - share * len(html)) <= spread
    assert len(html) > 40 and 40_000 < sum(len(c["body"]) for c in html) / len(html) < 200_000
    assert all(b"<noscript" not in c["body"] for c in html)  # lxml and lexbor build it differently
    if share == 1.0:  # some pages in GBK, the HTTP charset saying so, and decodable as such
        gbk = [c for c in html if "charset=gb" in c["type"]]
        assert gbk and all("的" in c["body"].decode("gb18030") for c in gbk)
    assert path == bench.warc_file(work, f"zh{share:g}", MB, share, seed=seed)  # cached, not regenerated


@pytest.mark.parametrize(("share", "seed"), [(0.05, 1), (1.0, 3)])
def test_the_warcio_lxml_reference_finds_the_same_candidates_as_extract_warc(bench, work, share, seed):
    path = str(bench.warc_file(work, f"zh{share:g}", MB, share, seed=seed))
    got, want = extract_warc(path), bench.reference_extract(path)
    rows = bench.candidate_rows(got.candidates)
    assert rows and rows == bench.candidate_rows(want.candidates)
    if share == 1.0:  # the generated pages exercise every rule and every source attribute
        reasons = set(got.candidates["drop_reason"].dropna())
        assert {"extract.svg", "extract.tracking_pixel", "extract.duplicate"} <= reasons
        assert {"src", "srcset", "data-src", "data-original"} <= set(got.candidates["src_attr"])


def test_main_prints_every_figure_and_the_json_line_last(bench, work, capsys):
    figures = bench.main(["--tiny", "--work", str(work)])
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert json.loads(last) == figures
    for key in ("ratio_vs_gunzip_5pct", "ratio_vs_gunzip_100pct", "speedup_vs_warcio_lxml",
                "fastwarc_iterate_vs_gunzip_5pct", "index_bytes_over_selected", "index_speedup_5pct", "speedup_2proc"):
        assert figures[key] > 0, key
    assert figures["index_bytes_over_selected"] >= 1.0

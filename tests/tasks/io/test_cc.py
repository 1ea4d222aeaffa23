"""Tests for Common Crawl access (tasks.io.cc, ccconfig, cchttp, stream, ranges and ccindex, and the remote side of
tasks.io.warc) against a local server in Common Crawl's layout, built around the real CC-MAIN-2020-34 excerpt."""

from __future__ import annotations

import gzip
import json
import zlib

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from _fixtures import fixture_path
from cc_server import CRAWL, OTHER_CRAWL, build_layout, serve

from tasks.io.cc import check_snapshot, index_paths, list_crawls, pick, warc_paths
from tasks.io.ccconfig import CCConfig, resolve
from tasks.io.ccindex import SCHEMA, cld2_languages, read_part, registered_domain, select_chinese, select_run, split_run
from tasks.io.ranges import BAD_RANGE, PAST_END, TRUNCATED, UNREADABLE, RangeStats, coalesce, read_records
from tasks.io.stream import open_stream
from tasks.io.warc import BAD_MEMBER, iter_member_records, iter_records, read_records_at

FAST = {"retries": 3, "backoff_s": 0.001, "backoff_max_s": 0.005}  # retry policy of every test: no real waits


@pytest.fixture(scope="module")
def layout(tmp_path_factory):
    root = tmp_path_factory.mktemp("cc")
    warc = fixture_path("warc/warcfile.warc.gz")
    info = build_layout(root, [warc], extra_listed=("second.warc.gz", "third.warc.gz"))
    return {"root": root, "warc": warc, "data": warc.read_bytes(), **info}


@pytest.fixture
def server(layout):
    with serve(layout["root"]) as srv:
        yield srv


def _cfg(server, **fields) -> CCConfig:
    return CCConfig.for_base_url(server.url, **{**FAST, **fields})


def _warc_url(server, layout) -> str:
    return f"{server.url}/{layout['warcs'][0]}"


def _chinese_truth(path) -> set[str]:
    """URLs whose metadata record has zh first in languages-cld2: the fixture's README's 11 Chinese pages."""
    urls, meta = set(), {}
    for rec in iter_records(str(path)):
        if rec.type == "metadata":
            meta = dict(line.split(": ", 1) for line in rec.read().decode().splitlines() if ": " in line)
            first = json.loads(meta.get("languages-cld2", "{}")).get("languages", [{}])[0].get("code")
            if first in ("zh", "zh-Hant"):
                urls.add(rec.uri)
    return urls


# ---- listings ----------------------------------------------------------------------------------------------------


def test_crawls_are_listed_and_an_unknown_snapshot_names_the_newest(server):
    cfg = _cfg(server)
    assert [c["id"] for c in list_crawls(cfg)] == [CRAWL, OTHER_CRAWL]
    check_snapshot(CRAWL, cfg)
    with pytest.raises(ValueError, match=f"unknown Common Crawl snapshot 'CC-MAIN-2099-01'.*{CRAWL}, {OTHER_CRAWL}"):
        check_snapshot("CC-MAIN-2099-01", cfg)


def test_one_base_url_serves_index_and_data_and_s3_urls_map_onto_it():
    cfg = CCConfig.for_base_url("http://mirror.test/cc/", retries=1)
    assert (cfg.index_base, cfg.data_base, cfg.retries) == ("http://mirror.test/cc", "http://mirror.test/cc", 1)
    assert resolve("s3://commoncrawl/crawl-data/x.warc.gz", cfg) == "http://mirror.test/cc/crawl-data/x.warc.gz"
    assert resolve("s3://commoncrawl/x", CCConfig(s3_via_https=False)) == "s3://commoncrawl/x"


def test_warc_paths_are_full_urls_and_pick_chooses_among_them(server, layout):
    paths = warc_paths(CRAWL, _cfg(server))
    assert paths == [f"{server.url}/{p}" for p in layout["listed"]]
    assert pick(paths) == paths
    assert pick(paths, limit=2) == paths[:2]
    assert pick(paths, limit=1, offset=1) == paths[1:2]
    assert pick(paths, offset=2) == paths[2:]
    # by file name, by crawl-data path, by s3 URL; order as given, duplicates once
    explicit = ["third.warc.gz", layout["listed"][0], f"s3://commoncrawl/{layout['listed'][1]}", "third.warc.gz"]
    assert pick(paths, explicit=explicit) == [paths[2], paths[0], paths[1]]
    with pytest.raises(ValueError, match="not in the crawl's listing: nope.warc.gz"):
        pick(paths, explicit=["warcfile.warc.gz", "nope.warc.gz"])
    with pytest.raises(ValueError, match="not both"):
        pick(paths, limit=1, explicit=["third.warc.gz"])
    with pytest.raises(ValueError, match="past the end"):
        pick(paths, offset=3)
    with pytest.raises(FileNotFoundError, match="CC-MAIN-2020-29"):
        warc_paths(OTHER_CRAWL, _cfg(server))  # listed in collinfo.json, no listing on this server


def test_index_paths_keep_the_warc_subset_only(server, layout):
    assert index_paths(CRAWL, _cfg(server)) == [f"{server.url}/{p}" for p in layout["index"]]


# ---- streaming ---------------------------------------------------------------------------------------------------


def _records(path, cc=None, backend="auto") -> list[tuple]:
    return [(r.type, r.offset, r.uri, r.status, r.read()) for r in iter_records(path, backend, cc)]


@pytest.mark.parametrize("backend", ["fastwarc", "warcio"])
def test_a_streamed_warc_equals_the_local_file(server, layout, backend):
    url = _warc_url(server, layout)
    with open_stream(url, _cfg(server, chunk_bytes=4096)) as fh:
        assert fh.read() == layout["data"]
    assert _records(url, _cfg(server), backend) == _records(str(layout["warc"]), backend=backend)


def test_a_dropped_connection_is_resumed_from_the_drop_point(server, layout):
    url = _warc_url(server, layout)
    server.faults.drop_after, server.faults.drop_times = 50_000, 1
    assert _records(url, _cfg(server)) == _records(str(layout["warc"]))
    seen = server.requests_for(layout["warcs"][0])
    assert [(s.range, s.status) for s in seen] == [(None, 200), ("bytes=50000-", 206)]  # resumed, not restarted


def test_a_silent_connection_times_out_and_is_resumed(server, layout):
    server.faults.drop_after, server.faults.stall_s = 30_000, 2.0
    with open_stream(_warc_url(server, layout), _cfg(server, read_timeout_s=0.3)) as fh:
        assert fh.read() == layout["data"]
    first, second = [s.range for s in server.requests_for(layout["warcs"][0])]
    # bytes inside a read that timed out are lost with it: the resume starts where the data received ended
    assert first is None and 0 < int(second.removeprefix("bytes=").rstrip("-")) <= 30_000


def test_slow_down_answers_are_retried(server, layout):
    url = _warc_url(server, layout)
    server.faults.status, server.faults.status_times = 503, 2
    with open_stream(url, _cfg(server)) as fh:
        assert fh.read() == layout["data"]
    server.faults.status, server.faults.status_times = 503, 2
    stats = RangeStats()
    assert list(read_records(url, [(940, 10905)], _cfg(server), stats)) == [(940, layout["data"][940:11845], None)]
    assert [s.status for s in server.requests_for(layout["warcs"][0])] == [503, 503, 200, 503, 503, 206]
    assert (stats.requests, stats.retries) == (3, 2)


def test_a_stream_that_never_recovers_names_the_url_and_offset(server, layout):
    url = _warc_url(server, layout)
    server.faults.drop_after, server.faults.drop_times = 0, None
    with pytest.raises(OSError, match=rf"{url}: gave up at byte 5000 after 3 failed attempts"):
        with open_stream(url, _cfg(server, retries=2), start=5000) as fh:
            fh.read()
    with pytest.raises(FileNotFoundError, match="HTTP 404"):
        with open_stream(f"{server.url}/crawl-data/none.warc.gz", _cfg(server)) as fh:
            fh.read()


# ---- index -------------------------------------------------------------------------------------------------------


def test_the_index_is_in_common_crawls_schema_and_layout(layout):
    path = layout["root"] / layout["index"][0]
    assert f"crawl={CRAWL}/subset=warc/part-00000.parquet" in path.as_posix()
    table = pq.read_table(path, partitioning=None)
    assert table.schema == SCHEMA
    rows = table.to_pylist()
    assert len(rows) == 16 and {r["warc_filename"] for r in rows} == {layout["warcs"][0]}
    data = layout["data"]
    for row in rows:  # each row is exactly one gzip member holding its response record
        member = data[row["warc_record_offset"]:row["warc_record_offset"] + row["warc_record_length"]]
        assert zlib.decompressobj(31).decompress(member).startswith(b"WARC/1.0\r\nWARC-Type: response")
    by_url = {r["url"]: r for r in rows}
    assert by_url["http://003338.cn/l41/481397.html"]["content_languages"] == "zho"
    assert by_url["http://01spb.ru/company/"]["content_charset"] == "windows-1251"


def test_index_selection_picks_exactly_the_eleven_chinese_pages(server, layout):
    cfg = _cfg(server)
    selected = select_chinese(index_paths(CRAWL, cfg), cfg=cfg)
    assert set(selected["url"]) == _chinese_truth(layout["warc"])
    assert len(selected) == 11 and "http://037426.cn/" not in set(selected["url"])
    assert list(selected["warc_record_offset"]) == sorted(selected["warc_record_offset"])
    assert set(selected["crawl"]) == {CRAWL} and set(selected["subset"]) == {"warc"}
    assert selected["fetch_status"].dtype == "int16" and selected["warc_record_offset"].dtype == "int32"
    assert len(select_chinese(index_paths(CRAWL, cfg), [_warc_url(server, layout)], cfg)) == 11
    assert select_chinese(index_paths(CRAWL, cfg), ["crawl-data/other.warc.gz"], cfg).empty


def test_index_selection_rules_on_a_tiny_index(tmp_path):
    rows = [  # (url, status, mime, languages): only the first two are Chinese HTML captures
        ("a", 200, "text/html", "zho"), ("b", 200, "application/xhtml+xml", "zho,eng"),
        ("c", 200, "text/html", "eng,zho"), ("d", 404, "text/html", "zho"), ("e", 200, "image/jpeg", "zho"),
        ("f", 200, "text/html", None), ("g", 200, "text/html", "zhon"),
    ]
    table = pa.Table.from_pylist([
        {"url": u, "fetch_status": s, "content_mime_detected": m, "content_languages": lang,
         "warc_filename": "crawl-data/X/w.warc.gz", "warc_record_offset": 100 - i, "warc_record_length": 10}
        for i, (u, s, m, lang) in enumerate(rows)], schema=SCHEMA)
    files = []
    for subset in ("warc", "crawldiagnostics"):
        path = tmp_path / f"crawl=X/subset={subset}/part-0.parquet"
        path.parent.mkdir(parents=True)
        pq.write_table(table, path)
        files.append(str(path))
    selected = select_chinese(files)
    assert list(selected["url"]) == ["b", "a"]  # sorted by offset; the crawldiagnostics file is left out
    assert list(selected["crawl"]) == ["X", "X"]


def test_one_pass_over_the_index_gives_each_batch_what_its_own_selection_gives(tmp_path):
    """split_run reads each index file once for a run in batches; each batch's part, read back, is the table and
    the stats that selecting for that batch's WARC files alone gives (checked against select_run)."""
    rng = np.random.default_rng(3)
    warcs = [f"crawl-data/X/segments/s/warc/w{i}.warc.gz" for i in range(7)]
    files = []
    for f in range(3):  # three index files, each holding rows of every WARC in no particular order
        rows = [{"url": f"http://h{f}.cn/{j}", "fetch_status": int(rng.choice([200, 404])),
                 "content_mime_detected": str(rng.choice(["text/html", "image/png"])),
                 "content_languages": str(rng.choice(["zho", "eng", "zho,eng"])),
                 "warc_filename": warcs[int(rng.integers(0, 6))],  # w6 has no row: a WARC without pages
                 "warc_record_offset": int(rng.integers(0, 10**6)), "warc_record_length": 10} for j in range(300)]
        path = tmp_path / f"crawl=X/subset=warc/part-{f}.parquet"
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.Table.from_pylist(rows, schema=SCHEMA), path)
        files.append(str(path))
    batches = [warcs[0:3], warcs[3:5], warcs[5:7], ["crawl-data/X/segments/s/warc/none.warc.gz"]]
    stats = split_run(files, batches, tmp_path / "parts")
    assert stats["index_files"] == 3 and stats["batches"] == 4
    total = 0
    for k, batch in enumerate(batches):
        got, got_stats = read_part(tmp_path / "parts" / f"{k}.parquet", batch)
        want, want_stats = select_run(files, batch)
        pd.testing.assert_frame_equal(got, want)
        assert got_stats == want_stats
        total += len(got)
    assert total == stats["selected"] > 0
    assert read_part(tmp_path / "parts" / "3.parquet", batches[3])[1] == {
        "index_files": 3, "selected": 0, "warcs_without_pages": 1}
    assert select_run(files, batches[2])[1]["warcs_without_pages"] == 1  # w6


def test_cld2_codes_and_registered_domains():
    value = json.dumps({"languages": [{"code": "zh-Hant"}, {"code": "en", "code-iso-639-3": "eng"}, {"code": "un"}]})
    assert cld2_languages(value) == "zho,eng"
    assert cld2_languages("not json") is None
    assert registered_domain("www.example.com.cn") == "example.com.cn"
    assert registered_domain("0760.jxtdw.com") == "jxtdw.com"
    assert registered_domain("127.0.0.1") is None


# ---- range reads -------------------------------------------------------------------------------------------------


def _selected(server, layout) -> list[tuple[int, int]]:
    cfg = _cfg(server)
    rows = select_chinese(index_paths(CRAWL, cfg), cfg=cfg)
    return list(zip(rows["warc_record_offset"].tolist(), rows["warc_record_length"].tolist(), strict=True))


def test_range_reads_return_the_records_byte_identical_and_read_little_else(server, layout):
    ranges = _selected(server, layout)
    stats = RangeStats()
    got = list(read_records(_warc_url(server, layout), ranges, _cfg(server), stats))
    data = layout["data"]
    assert got == [(o, data[o:o + n], None) for o, n in sorted(ranges)]
    assert list(read_records(str(layout["warc"]), ranges)) == got  # a local file reads the same
    assert stats.bytes_selected == sum(n for _, n in ranges)
    assert stats.bytes_read / stats.bytes_selected <= 1.2
    assert stats.requests == len(server.requests_for(layout["warcs"][0])) <= len(ranges)
    assert all(s.status == 206 for s in server.requests_for(layout["warcs"][0]))
    urls = {o: u for o, u in zip(*_index_columns(server, "warc_record_offset", "url"), strict=True)}
    for offset, data_, _ in got:
        (rec,) = list(iter_member_records(data_, offset))
        assert (rec.type, rec.offset, rec.uri, rec.status) == ("response", offset, urls[offset], 200)


def _index_columns(server, *names):
    cfg = _cfg(server)
    rows = select_chinese(index_paths(CRAWL, cfg), cfg=cfg)
    return [rows[n].tolist() for n in names]


def test_ranges_are_joined_only_across_small_gaps():
    cfg = CCConfig(max_gap_bytes=100, max_overread=0.2)
    groups = coalesce([(10_000, 1000), (0, 1000), (1050, 1000), (2100, 10)], cfg)
    assert [(g.start, g.end, g.members) for g in groups] == [
        (0, 2110, [(0, 1000), (1050, 1000), (2100, 10)]),  # gaps of 50: 100 gap bytes on 2010 wanted
        (10_000, 11_000, [(10_000, 1000)]),  # gap too wide
    ]
    # a small gap that would still be 50 bytes read for 20 wanted (> 20%) is not joined
    assert [(g.start, g.end) for g in coalesce([(0, 10), (60, 10)], cfg)] == [(0, 10), (60, 70)]


def test_a_short_range_response_is_asked_again_for_its_remainder(server, layout):
    ranges = _selected(server, layout)
    server.faults.truncate_to, server.faults.truncate_times = 3000, 2
    data = layout["data"]
    got = list(read_records(_warc_url(server, layout), ranges, _cfg(server)))
    assert got == [(o, data[o:o + n], None) for o, n in sorted(ranges)]
    first, n = min(ranges)
    assert [s.range for s in server.requests_for(layout["warcs"][0])][:2] == [
        f"bytes={first}-{first + n - 1}", f"bytes={first + 3000}-{first + n - 1}"]


def test_a_server_that_keeps_truncating_gives_errors_for_the_records_it_did_not_send(server, layout):
    data = layout["data"]
    ranges = [(0, 481), (481, 459), (940, 10905)]  # warcinfo, request, response: one request of 11845 bytes
    server.faults.truncate_to = 3000
    stats = RangeStats()
    got = list(read_records(_warc_url(server, layout), ranges, _cfg(server, retries=1), stats))
    assert got[:2] == [(0, data[:481], None), (481, data[481:940], None)]
    assert got[2][:2] == (940, None) and got[2][2].startswith(f"{TRUNCATED}: bytes 6000-11844 still missing")
    assert (stats.requests, stats.retries, stats.errors) == (2, 1, 1)


def test_a_dropped_range_response_is_resumed(server, layout):
    ranges = _selected(server, layout)
    server.faults.drop_after = 2000
    data = layout["data"]
    got = list(read_records(_warc_url(server, layout), ranges, _cfg(server)))
    assert got == [(o, data[o:o + n], None) for o, n in sorted(ranges)]
    first, n = min(ranges)
    assert server.requests_for(layout["warcs"][0])[1].range == f"bytes={first + 2000}-{first + n - 1}"


def test_ranges_past_the_end_and_bad_ranges_are_per_record_errors(server, layout):
    data = layout["data"]
    size = len(data)
    ranges = [(940, 10905), (size + 100_000, 50), (size - 100, 500), (-1, 10), (5, 0)]  # 416, short 206
    stats = RangeStats()
    got = {o: (b, e) for o, b, e in read_records(_warc_url(server, layout), ranges, _cfg(server), stats)}
    assert got[940] == (data[940:11845], None)
    for offset in (size + 100_000, size - 100):
        assert got[offset][0] is None and got[offset][1].startswith(f"{PAST_END}: ")
    assert got[-1][1].startswith(BAD_RANGE) and got[5][1].startswith(BAD_RANGE)
    assert stats.errors == 4 and 416 in {s.status for s in server.requests_for(layout["warcs"][0])}


def test_a_missing_file_is_an_error_per_record_asked_for_once(server):
    stats = RangeStats()
    got = list(read_records(f"{server.url}/crawl-data/none.warc.gz", [(0, 10), (100_000, 10)], _cfg(server), stats))
    assert [(o, b) for o, b, _ in got] == [(0, None), (100_000, None)]
    assert all(e.startswith(f"{UNREADABLE}: ") and "HTTP 404" in e for _, _, e in got)
    assert stats.requests == 1 and len(server.requests_for("none.warc.gz")) == 1


def test_a_server_that_ignores_range_is_read_once_from_the_start(server, layout):
    ranges = _selected(server, layout)
    server.faults.ignore_range = True
    stats = RangeStats()
    data = layout["data"]
    got = list(read_records(_warc_url(server, layout), ranges, _cfg(server), stats))
    assert got == [(o, data[o:o + n], None) for o, n in sorted(ranges)]
    assert [s.status for s in server.requests_for(layout["warcs"][0])] == [200]
    assert stats.bytes_read <= len(data)


@pytest.mark.parametrize("backend", ["fastwarc", "warcio"])
def test_a_member_that_does_not_inflate_is_that_records_error_alone(server, layout, backend):
    data = bytearray(layout["data"])
    ranges = _selected(server, layout)[:3]
    bad, n = ranges[1]
    data[bad + n // 2:bad + n // 2 + 64] = bytes(64)  # zeros in the middle of the deflate stream
    (layout["root"] / "broken.warc.gz").write_bytes(bytes(data))
    try:
        got = list(read_records_at(f"{server.url}/broken.warc.gz", ranges, _cfg(server), backend=backend))
    finally:
        (layout["root"] / "broken.warc.gz").unlink()
    assert [o for o, *_ in got] == [o for o, _ in ranges]
    assert got[1][1:3] == (None, None) and got[1][3].startswith(f"{BAD_MEMBER}: ")
    for offset, rec, payload, error in (got[0], got[2]):
        assert error is None and rec.offset == offset and rec.type == "response" and b"</html>" in payload
    with pytest.raises(OSError, match="WARC at byte 7: (no WARC record|unreadable)"):
        list(iter_member_records(gzip.compress(b"not a warc record"), 7, backend=backend))

"""Tests for tasks.io.warc: both readers (FastWARC, warcio) on real WARCs, and broken files."""

from __future__ import annotations

import hashlib
import re

import pytest
from _fixtures import fixture_path
from warcio.archiveiterator import ArchiveIterator

from tasks.io.warc import WANTED, iter_records, read_record_at

BACKENDS = ("fastwarc", "warcio")


def _summary(path, backend: str) -> list[tuple]:
    """Every record as plain values; payloads are read while iterating, as the readers stream."""
    out = []
    for rec in iter_records(str(path), backend):
        body = rec.read()
        out.append((rec.type, rec.offset, rec.uri, rec.record_id, rec.status, rec.mime, rec.charset,
                    hashlib.sha256(body).hexdigest(), rec.truncated))
    return out


def _warcio_truth(path) -> list[tuple]:
    """(type, offset, uri, status) of the wanted records straight from warcio's own iterator."""
    out = []
    with open(path, "rb") as fh:
        it = ArchiveIterator(fh)
        for rec in it:
            if rec.rec_type in WANTED:
                status = int(rec.http_headers.get_statuscode()) if rec.rec_type == "response" else None
                out.append((rec.rec_type, it.offset, rec.rec_headers.get_header("WARC-Target-URI"), status))
    return out


def test_backends_agree_on_every_record_of_the_cc_excerpt():
    path = fixture_path("warc/warcfile.warc.gz")
    fast, slow = _summary(path, "fastwarc"), _summary(path, "warcio")
    assert fast == slow
    # 1 warcinfo, then a response and a metadata record for each of the 16 pages (requests are skipped)
    kinds = [r[0] for r in fast]
    assert kinds.count("warcinfo") == 1 and kinds.count("response") == 16 and kinds.count("metadata") == 16
    assert "request" not in kinds
    assert [(t, off, uri, status) for t, off, uri, _, status, *_ in fast] == _warcio_truth(path)
    assert {r[5] for r in fast if r[0] == "response"} == {"text/html"}
    assert not any(r[8] for r in fast)


@pytest.mark.parametrize("backend", BACKENDS)
def test_lf_only_http_headers_are_parsed(backend):
    # ClueWeb09 ends its HTTP header lines with a bare LF: a strict parser reads the body as headers.
    path = fixture_path("warc/clueweb-quirk.warc.gz")
    responses = [r for r in _summary(path, backend) if r[0] == "response"]
    assert len(responses) == 29
    assert {(r[4], r[5], r[6]) for r in responses} == {(200, "text/html", "euc-jp")}


def test_backends_agree_on_the_clueweb_payloads():
    path = fixture_path("warc/clueweb-quirk.warc.gz")
    assert _summary(path, "fastwarc") == _summary(path, "warcio")


@pytest.mark.parametrize("backend", BACKENDS)
def test_angle_bracketed_target_uri_is_unwrapped(backend):
    # wget writes WARC-Target-URI as <https://...> (the WARC/1.0 grammar); the URL inside is the URI.
    uris = [r[2] for r in _summary(fixture_path("warc/sample-0000.warc.gz"), backend) if r[0] == "response"]
    assert uris and all(u.startswith("https://") and not u.endswith(">") for u in uris)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["warcio_example.warc.gz", "warcio_example-iana.org-chunked.warc"])
def test_http_content_and_transfer_encodings_are_undone(name, backend):
    """A gzip Content-Encoding and a chunked Transfer-Encoding both read back as the plain HTML."""
    path = fixture_path(f"warc/{name}")
    bodies = [rec.read() for rec in iter_records(str(path), backend) if rec.type == "response"]
    assert len(bodies) == 1
    assert bodies[0].lstrip().lower().startswith(b"<!doctype html")
    assert bodies[0].rstrip().endswith(b"</html>")


@pytest.mark.parametrize("backend", BACKENDS)
def test_clipped_response_is_marked_truncated_after_read(backend):
    path = fixture_path("warc/clipped.warc.gz")
    seen = []
    for rec in iter_records(str(path), backend):
        before = rec.truncated
        body = rec.read()
        seen.append((rec.type, before, rec.truncated, len(body)))
    assert [(t, b, a) for t, b, a, _ in seen] == [("response", False, True)]
    assert seen[0][3] > 0  # what was there is still returned


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["warcfile.warc.gz", "clipped.warc.gz", "clueweb-quirk.warc.gz",
                                  "warcio_example.warc.gz", "warcio_example-iana.org-chunked.warc", "cut"])
def test_a_held_payload_reads_back_after_the_reader_moved_on(tmp_path, backend, name):
    """hold() then read() once later, past other records: the same bytes and truncation as read() in the loop."""
    if name == "cut":  # ends mid-record
        path = tmp_path / "cut.warc.gz"
        path.write_bytes(fixture_path("warc/warcfile.warc.gz").read_bytes()[:50_000])
    else:
        path = fixture_path(f"warc/{name}")
    want = [(rec.offset, rec.read(), rec.truncated) for rec in iter_records(str(path), backend)]
    held = []
    for rec in iter_records(str(path), backend):
        rec.hold()
        held.append((rec, rec.truncated))  # known at hold()
    got = [(rec.offset, rec.read(), truncated) for rec, truncated in held]
    assert got == want
    assert any(body for _, body, _ in got)
    assert [rec.read() for rec, _ in held] == [b""] * len(held)  # a payload is read once, as without hold()


@pytest.mark.parametrize("backend", BACKENDS)
def test_read_record_at_round_trips_every_record(backend):
    path = str(fixture_path("warc/warcfile.warc.gz"))
    expected = {}
    for rec in iter_records(path, backend):
        expected[rec.offset] = (rec.type, rec.uri, rec.status, rec.read())
    for offset, (kind, uri, status, body) in expected.items():
        rec, payload = read_record_at(path, offset, backend)
        assert (rec.offset, rec.type, rec.uri, rec.status, payload) == (offset, kind, uri, status, body)


@pytest.mark.parametrize("backend", BACKENDS)
def test_read_record_at_refuses_an_offset_that_is_not_a_wanted_record(backend):
    path = fixture_path("warc/warcfile.warc.gz")
    request = next(off for kind, off, *_ in _all_offsets(path) if kind == "request")
    with pytest.raises(OSError, match=re.escape(f"no WARC record at offset {request}")):
        read_record_at(str(path), request, backend)  # it must not hand back the response that follows
    response = next(off for kind, off, *_ in _all_offsets(path) if kind == "response")
    with pytest.raises(OSError, match=re.escape(str(path))):
        read_record_at(str(path), response + 7, backend)
    with pytest.raises(OSError, match=re.escape(str(path))):
        read_record_at(str(path), path.stat().st_size + 100, backend)


def _all_offsets(path) -> list[tuple[str, int]]:
    with open(path, "rb") as fh:
        it = ArchiveIterator(fh)
        return [(rec.rec_type, it.offset) for rec in it]


def _read_everything(path, backend: str) -> None:
    for rec in iter_records(str(path), backend):
        rec.read()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["junk.warc.gz", "junk.warc"])
def test_random_bytes_raise_an_oserror_naming_the_file(tmp_path, backend, name):
    path = tmp_path / name
    path.write_bytes(bytes((i * 7919 + 13) % 251 for i in range(5000)))
    with pytest.raises(OSError, match=re.escape(str(path))):
        _read_everything(path, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_plain_text_is_not_read_as_records(tmp_path, backend):
    path = tmp_path / "notes.warc"
    path.write_bytes(b"hello world this is not a warc file\n" * 40)
    with pytest.raises(OSError, match=re.escape(str(path))):
        _read_everything(path, backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("position", [20_000, 60_000, 117_000])
def test_corrupt_gzip_member_raises_an_oserror_naming_the_file(tmp_path, backend, position):
    """Damage inside a member: an OSError, never another type and never a silently shorter file."""
    good = bytearray(fixture_path("warc/warcfile.warc.gz").read_bytes())
    for i in range(position, position + 64):
        good[i] ^= 0xA5
    path = tmp_path / "corrupt.warc.gz"
    path.write_bytes(bytes(good))
    with pytest.raises(OSError, match=re.escape(str(path))):
        _read_everything(path, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gzip_magic_followed_by_garbage_raises_an_oserror(tmp_path, backend):
    path = tmp_path / "bad.warc.gz"
    path.write_bytes(b"\x1f\x8b\x08\x00" + bytes((i * 31) % 256 for i in range(3000)))
    with pytest.raises(OSError, match=re.escape(str(path))):
        _read_everything(path, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_file_has_no_records(tmp_path, backend):
    path = tmp_path / "empty.warc.gz"
    path.write_bytes(b"")
    assert list(iter_records(str(path), backend)) == []


@pytest.mark.parametrize("backend", BACKENDS)
def test_file_cut_mid_record_ends_without_error(tmp_path, backend):
    """The docstring's promise: a file that ends mid-record raises nothing; the cut record is truncated."""
    data = fixture_path("warc/warcfile.warc.gz").read_bytes()
    path = tmp_path / "cut.warc.gz"
    path.write_bytes(data[:50_000])
    seen = [(rec.read(), rec.truncated) for rec in iter_records(str(path), backend)]
    assert seen and seen[-1][1] is True
    assert not any(t for _, t in seen[:-1])


def test_unsupported_schemes_and_remote_seeks_are_refused():
    # http(s) and s3 URLs stream through tasks.io.stream (tests/test_cc.py); other schemes are refused.
    with pytest.raises(ValueError, match="unsupported URL scheme"):
        list(iter_records("ftp://example.test/file.warc.gz"))
    with pytest.raises(ValueError, match="read_records"):
        read_record_at("https://example.test/file.warc.gz", 0)

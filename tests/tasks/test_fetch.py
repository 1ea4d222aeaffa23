"""Tests for tasks.fetch (sniffing, decoding, the stage) and tasks.io.replay (images served from a WARC)."""

from __future__ import annotations

import hashlib
import io
import struct
import zlib

import numpy as np
import pandas as pd
import pytest
from aiohttp import web
from local_http import serve
from PIL import Image

from tasks.fetch import (
    FetchConfig,
    Previous,
    decode_image,
    decode_resized,
    fetch_images,
    fetch_shard,
    image_metrics,
    sniff_mime,
)
from tasks.image import filter_images
from tasks.io.http import HTTP_ERROR, TIMEOUT, TOO_LARGE, FetchResult, HttpConfig, HttpFetcher
from tasks.io.polite import BLOCKED_ADDRESS, OPT_OUT, ROBOTS
from tasks.io.replay import ReplayConfig, ReplayFetcher
from tasks.io.warc import iter_records
from tasks.sample.warc import WarcWriter


def _pixels(w: int = 64, h: int = 48, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)


def _encode(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def jpeg(w: int = 64, h: int = 48, mode: str = "RGB", seed: int = 0) -> bytes:
    return _encode(Image.fromarray(_pixels(w, h, seed)).convert(mode), "JPEG", quality=90)


def png_rgba(w: int = 40, h: int = 30) -> bytes:
    rgba = np.zeros((h, w, 4), dtype=np.uint8)
    rgba[..., 0] = 200  # red where opaque
    rgba[:, : w // 2, 3] = 255  # left half opaque, right half fully transparent
    return _encode(Image.fromarray(rgba, "RGBA"), "PNG")


def gif_transparent(w: int = 40, h: int = 30) -> bytes:
    im = Image.new("P", (w, h), 0)
    im.putpalette([0, 0, 0, 0, 0, 255] + [0] * 762)  # index 0 black (made transparent), index 1 blue
    im.paste(1, (0, 0, w // 2, h))  # left half blue, right half the transparent index
    return _encode(im, "GIF", transparency=0)


def webp(w: int = 50, h: int = 20) -> bytes:
    return _encode(Image.fromarray(_pixels(w, h)), "WEBP", quality=90)


# ---------------------------------------------------------------- sniffing and decoding


def test_sniff_mime_reads_magic_bytes_not_names():
    assert sniff_mime(jpeg()) == "image/jpeg"
    assert sniff_mime(png_rgba()) == "image/png"
    assert sniff_mime(gif_transparent()) == "image/gif"
    assert sniff_mime(webp()) == "image/webp"
    assert sniff_mime(_encode(Image.fromarray(_pixels()), "BMP")) == "image/bmp"
    for junk in (b"", b"<!DOCTYPE html><html></html>", b"RIFF\0\0\0\0WAVEfmt ", b"\xff\xd8", b"GIF88a", b"%PDF-1.4"):
        assert sniff_mime(junk) is None, junk


@pytest.mark.parametrize("mode", ["RGB", "L"])
def test_jpeg_bytes_are_kept_as_they_are(mode):
    data = jpeg(70, 30, mode)
    out = decode_image(data, "image/jpeg")
    assert out.jpeg == data
    assert (out.width, out.height) == (70, 30)


def test_cmyk_jpeg_is_re_encoded_as_rgb():
    data = jpeg(32, 32, "CMYK")
    out = decode_image(data, "image/jpeg")
    assert out.jpeg != data
    with Image.open(io.BytesIO(out.jpeg)) as im:
        assert (im.format, im.mode, im.size) == ("JPEG", "RGB", (32, 32))


@pytest.mark.parametrize("make, mime, size", [
    (png_rgba, "image/png", (40, 30)),
    (gif_transparent, "image/gif", (40, 30)),
    (webp, "image/webp", (50, 20)),
])
def test_other_formats_become_jpeg(make, mime, size):
    out = decode_image(make(), mime)
    with Image.open(io.BytesIO(out.jpeg)) as im:
        assert (im.format, im.mode, im.size) == ("JPEG", "RGB", size)
    assert (out.width, out.height) == size


@pytest.mark.parametrize("make, opaque", [(png_rgba, (200, 0, 0)), (gif_transparent, (0, 0, 255))])
def test_transparent_pixels_become_white(make, opaque):
    out = decode_image(make(), sniff_mime(make()))
    with Image.open(io.BytesIO(out.jpeg)) as im:
        px = np.asarray(im.convert("RGB"), dtype=int)
    w = px.shape[1]
    assert np.abs(px[:, -5:] - 255).max() < 12  # transparent right half: white, not black
    assert np.abs(px[:, : w // 2 - 4] - np.array(opaque)).max() < 40  # opaque left half keeps its colour


def test_truncated_jpeg_fails_to_decode():
    data = jpeg(200, 200)
    with pytest.raises(OSError):
        decode_image(data[: len(data) // 2], "image/jpeg")


def test_pixel_limit_is_a_decode_error():
    with pytest.raises(ValueError, match="exceeds 100 pixels"):
        decode_image(jpeg(20, 20), "image/jpeg", FetchConfig(max_pixels=100))


def png_bomb(side: int = 10_000) -> bytes:
    """A greyscale PNG of side x side zero pixels: ~100 KB on the wire, 100 MB once decoded."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    comp = zlib.compressobj(9)
    row = b"\0" * (side + 1)  # filter byte + pixels
    idat = b"".join(comp.compress(row) for _ in range(side)) + comp.flush()
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def animated_gif() -> bytes:
    frames = [Image.new("RGB", (120, 120), c) for c in ((255, 0, 0), (0, 0, 255))]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    return buf.getvalue()


def rotated_jpeg(w: int = 60, h: int = 40, orientation: int = 6) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return _encode(Image.fromarray(_pixels(w, h)), "JPEG", quality=90, exif=exif)


SVG = b'<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg" width="200" height="200"><rect/></svg>'


def test_exif_orientation_is_applied():
    out = decode_image(rotated_jpeg(), "image/jpeg")
    assert (out.width, out.height, out.original_width, out.original_height) == (40, 60, 40, 60)
    with Image.open(io.BytesIO(out.jpeg)) as im:
        assert im.size == (40, 60) and im.getexif().get(0x0112, 1) == 1


@pytest.mark.parametrize("size, stored", [((1600, 1200), (256, 192)), ((300, 900), (85, 256)),
                                          ((200, 100), (200, 100))])
def test_max_side_shrinks_keeping_the_ratio_never_enlarges(size, stored):
    data = jpeg(*size)
    out = decode_image(data, "image/jpeg", FetchConfig(max_side=256))
    assert (out.width, out.height) == stored and (out.original_width, out.original_height) == size
    with Image.open(io.BytesIO(out.jpeg)) as im:
        assert im.size == stored and im.mode == "RGB"
    assert (out.jpeg == data) == (size == stored)  # a JPEG needing no change is stored as fetched


def test_decompression_bomb_png_is_refused_before_decoding():
    with pytest.raises(ValueError, match="exceeds 90000000 pixels"):
        decode_image(png_bomb(), "image/png")


def test_animated_gif_keeps_its_first_frame():
    out = decode_image(animated_gif(), "image/gif")
    with Image.open(io.BytesIO(out.jpeg)) as im:
        assert np.abs(np.asarray(im.convert("RGB"), dtype=int)[60, 60] - [255, 0, 0]).max() < 16


def test_decode_resized_is_exact_size_rgb():
    for data in (jpeg(1600, 1200), jpeg(512, 512), jpeg(300, 200, "CMYK"), png_rgba()):
        im = decode_resized(data, (224, 224))
        assert (im.size, im.mode) == ((224, 224), "RGB")


def test_image_metrics_at_a_fixed_resolution():
    flat = Image.new("L", (300, 200), 128)
    assert image_metrics(flat, 256) == (0.0, 0.0, 0.0)
    checker = Image.fromarray(((np.indices((256, 256)).sum(0) // 4 % 2) * 255).astype(np.uint8))
    std, lap, ent = image_metrics(checker, 256)
    assert abs(std - 127.5) < 0.1 and lap > 1000 and abs(ent - 1.0) < 1e-9
    ramp = Image.fromarray(np.tile(np.linspace(0, 255, 256), (256, 1)).astype(np.uint8))
    std, lap, ent = image_metrics(ramp, 256)
    assert std > 50 and lap < 5 and ent > 7.9
    noise = Image.fromarray(_pixels(512, 512)).convert("L")
    assert image_metrics(noise, 256) != image_metrics(noise, 512)  # scale-dependent: hence one fixed side


# ---------------------------------------------------------------- the stage with a fake fetcher


class FakeFetcher:
    """Answers from a dict; records every call so the test can count requests."""

    def __init__(self, answers: dict[str, FetchResult]):
        self.answers = answers
        self.calls: list[list[str]] = []

    def fetch_many(self, urls: list[str]) -> list[FetchResult]:
        self.calls.append(list(urls))
        return [self.answers[u] for u in urls]


def _ok(url: str, body: bytes | None) -> FetchResult:
    return FetchResult(url, True, None, 200, body, {"content-type": "image/jpeg"}, None)


def _failed(url: str, reason: str, status: int | None = None) -> FetchResult:
    return FetchResult(url, False, reason, status, None, {}, "detail")


def _plain(col: pd.Series) -> list:
    return [None if pd.isna(v) else v for v in col]


def test_fetch_images_maps_every_outcome_and_requests_each_url_once():
    u = "http://img.example.cn/"
    jpg, png = jpeg(120, 80), png_rgba()
    cut = jpeg(200, 200)
    answers = {
        u + "a.jpg": _ok(u + "a.jpg", jpg),
        u + "b.png": _ok(u + "b.png", png),
        u + "404": _failed(u + "404", HTTP_ERROR, 404),
        u + "slow": _failed(u + "slow", TIMEOUT),
        u + "huge": _failed(u + "huge", TOO_LARGE, 200),
        u + "page.html": _ok(u + "page.html", b"<html><body>not an image</body></html>"),
        u + "empty": _ok(u + "empty", None),
        u + "noise": _ok(u + "noise", np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes()),
        u + "cut.jpg": _ok(u + "cut.jpg", cut[: len(cut) // 2]),
        u + "fake.jpg": _ok(u + "fake.jpg", b"\xff\xd8\xff\xe0" + b"\x00" * 64),
    }
    urls = [u + "a.jpg", u + "b.png", u + "404", u + "a.jpg", u + "slow", u + "huge", u + "page.html",
            u + "empty", u + "noise", u + "cut.jpg", u + "fake.jpg", u + "404", u + "a.jpg"]
    frame = pd.DataFrame({"key": [f"k{i}" for i in range(len(urls))], "url": urls},
                         index=range(100, 100 + len(urls)))
    fetcher = FakeFetcher(answers)
    out = fetch_images(frame, fetcher)
    assert fetcher.calls == [list(dict.fromkeys(urls))]  # one call, each distinct URL once, in order
    assert _plain(out["drop_reason"]) == [
        None, None, "fetch.http_error", None, "fetch.timeout", "fetch.too_large", "fetch.not_image",
        "fetch.not_image", "fetch.not_image", "fetch.decode_error", "fetch.decode_error", "fetch.http_error", None]
    assert out.index.tolist() == frame.index.tolist()
    kept = out[out["drop_reason"].isna()]
    assert kept["image"].iloc[0] == jpg  # a JPEG is stored as fetched
    assert kept["image"].iloc[1][:3] == b"\xff\xd8\xff" != png[:3]  # a PNG is stored as JPEG
    assert kept["image"].iloc[2] == kept["image"].iloc[3] == jpg
    sha = [hashlib.sha256(b).hexdigest() for b in (jpg, png, jpg, jpg)]
    assert kept["sha256"].tolist() == sha  # of the bytes as fetched, not as stored
    assert kept["mime"].tolist() == ["image/jpeg", "image/png", "image/jpeg", "image/jpeg"]
    sizes = list(zip(kept["original_width"], kept["original_height"], strict=True))
    assert sizes == [(120, 80), (40, 30), (120, 80), (120, 80)]
    assert (kept["width"] == kept["original_width"]).all() and (kept["height"] == kept["original_height"]).all()
    dropped = out[out["drop_reason"].notna()]
    assert dropped["image"].isna().all() and dropped["sha256"].isna().all()
    assert (dropped[["width", "height"]] == 0).all().all()
    assert out["width"].dtype == "int64" and str(out["sha256"].dtype) == "str"


def test_fetch_images_pixel_limit_is_a_decode_error():
    url = "http://img.example.cn/big.jpg"
    out = fetch_images(pd.DataFrame({"url": [url]}), FakeFetcher({url: _ok(url, jpeg(20, 20))}),
                       FetchConfig(max_pixels=100))
    assert _plain(out["drop_reason"]) == ["fetch.decode_error"]


def test_fetch_images_on_an_empty_shard():
    fetcher = FakeFetcher({})
    out = fetch_images(pd.DataFrame({"key": pd.Series([], dtype="str"), "url": pd.Series([], dtype="str")}), fetcher)
    assert len(out) == 0
    assert {"drop_reason", "image", "width", "height", "sha256", "mime"} <= set(out.columns)
    assert fetcher.calls in ([], [[]])


# ---------------------------------------------------------------- WARC replay


def _write_image_warc(path, records: list[tuple]) -> None:
    """Records of (url, status, content type, body[, extra headers])."""
    with open(path, "wb") as fh:
        writer = WarcWriter(fh)
        for url, status, ctype, body, *extra in records:
            writer.response(url, body, ctype, status=status, extra_headers=extra[0] if extra else ())


def _replay_index(paths) -> pd.DataFrame:
    rows = [(rec.uri, str(p), rec.offset, rec.status) for p in paths
            for rec in iter_records(str(p)) if rec.type == "response"]
    return pd.DataFrame(rows, columns=["url", "warc_file", "offset", "status"])


@pytest.fixture
def image_warc(tmp_path):
    jpg, gif = jpeg(150, 120, seed=1), gif_transparent()
    path = tmp_path / "images.warc.gz"
    _write_image_warc(path, [
        ("http://img.example.cn/a.jpg", 200, "image/jpeg", jpg),
        ("http://img.example.cn/b.gif", 200, "image/gif", gif),
        ("http://img.example.cn/gone.jpg", 404, "text/html", b"<html>Not Found</html>"),
        ("http://img.example.cn/moved.jpg", 301, "text/html", b""),
    ])
    return path, jpg, gif


def test_replay_fetcher_serves_bodies_and_failures(image_warc):
    path, jpg, gif = image_warc
    fetcher = ReplayFetcher(_replay_index([path]))
    urls = ["http://img.example.cn/a.jpg", "http://img.example.cn/b.gif", "http://img.example.cn/gone.jpg",
            "http://img.example.cn/moved.jpg", "http://img.example.cn/never-crawled.jpg"]
    res = fetcher.fetch_many(urls)
    assert [r.url for r in res] == urls
    assert [(r.ok, r.reason, r.status) for r in res] == [
        (True, None, 200), (True, None, 200), (False, HTTP_ERROR, 404), (False, HTTP_ERROR, 301),
        (False, HTTP_ERROR, None)]
    assert (res[0].body, res[1].body) == (jpg, gif)
    assert res[0].headers.get("content-type") == "image/jpeg"
    assert all(r.body is None for r in res[2:])


def test_replay_fetcher_size_cap(image_warc):
    path, jpg, _ = image_warc
    fetcher = ReplayFetcher(_replay_index([path]), ReplayConfig(max_bytes=len(jpg) - 1))
    (res,) = fetcher.fetch_many(["http://img.example.cn/a.jpg"])
    assert (res.ok, res.reason) == (False, TOO_LARGE)


def test_replay_first_capture_wins(tmp_path):
    first, second = tmp_path / "1.warc.gz", tmp_path / "2.warc.gz"
    url = "http://img.example.cn/same.jpg"
    _write_image_warc(first, [(url, 200, "image/jpeg", jpeg(seed=1))])
    _write_image_warc(second, [(url, 200, "image/jpeg", jpeg(seed=2))])
    (res,) = ReplayFetcher(_replay_index([first, second])).fetch_many([url])
    assert res.body == jpeg(seed=1)


def test_fetch_stage_over_replay(image_warc):
    path, jpg, gif = image_warc
    urls = ["http://img.example.cn/a.jpg", "http://img.example.cn/gone.jpg", "http://img.example.cn/b.gif",
            "http://img.example.cn/never-crawled.jpg"]
    out = fetch_images(pd.DataFrame({"url": urls}), ReplayFetcher(_replay_index([path])))
    assert _plain(out["drop_reason"]) == [None, "fetch.http_error", None, "fetch.http_error"]
    assert out["image"].iloc[0] == jpg
    assert out["sha256"].iloc[2] == hashlib.sha256(gif).hexdigest()
    assert list(zip(out["width"], out["height"], strict=True)) == [(150, 120), (0, 0), (40, 30), (0, 0)]


def test_replay_applies_the_fetch_policy(tmp_path):
    """Opt-out headers on the record, the host's robots.txt record, and literal private addresses."""
    path = tmp_path / "policy.warc.gz"
    jpg = jpeg(150, 120)
    _write_image_warc(path, [
        ("http://img.example.cn/robots.txt", 200, "text/plain", b"User-agent: *\nDisallow: /members/\n"),
        ("http://img.example.cn/members/a.jpg", 200, "image/jpeg", jpg),
        ("http://img.example.cn/public/b.jpg", 200, "image/jpeg", jpg),
        ("http://img.example.cn/public/c.jpg", 200, "image/jpeg", jpg, [("X-Robots-Tag", "noimageai")]),
        ("http://10.0.0.1/d.jpg", 200, "image/jpeg", jpg),
        ("http://other.example.cn/members/e.jpg", 200, "image/jpeg", jpg),  # no robots.txt held: allowed
    ])
    urls = ["http://img.example.cn/members/a.jpg", "http://img.example.cn/public/b.jpg",
            "http://img.example.cn/public/c.jpg", "http://10.0.0.1/d.jpg", "http://other.example.cn/members/e.jpg"]
    res = ReplayFetcher(_replay_index([path])).fetch_many(urls)
    assert [r.reason for r in res] == [ROBOTS, None, OPT_OUT, BLOCKED_ADDRESS, None]
    relaxed = ReplayFetcher(_replay_index([path]), ReplayConfig(robots=False, opt_out=False,
                                                                allow_networks=("10.0.0.0/8",)))
    assert all(r.ok for r in relaxed.fetch_many(urls))


# ---------------------------------------------------------------- bad input over real HTTP


async def _static(request: web.Request) -> web.Response:
    ctype, body = request.app[FILES][request.path]
    return web.Response(body=body, headers={"Content-Type": ctype})


FILES = web.AppKey("files", dict)


def test_bad_inputs_over_http_end_in_their_reasons():
    """Bodies sniffed, not trusted from Content-Type; bombs, truncation, CMYK, animation, 1x1 and SVG."""
    cut = jpeg(200, 200)
    one = _encode(Image.new("RGB", (1, 1), (0, 0, 0)), "PNG")
    files = {
        "/jpeg-as-html": ("text/html", jpeg(150, 120)),
        "/html-as-jpeg.jpg": ("image/jpeg", b"<!DOCTYPE html><html><body>404</body></html>"),
        "/bomb.png": ("image/png", png_bomb()),
        "/truncated.jpg": ("image/jpeg", cut[: len(cut) // 2]),
        "/cmyk.jpg": ("image/jpeg", jpeg(150, 120, "CMYK")),
        "/animated.gif": ("image/gif", animated_gif()),
        "/one.png": ("image/png", one),
        "/logo.svg": ("image/svg+xml", SVG),
    }
    app = web.Application()
    app[FILES] = files
    for path in files:
        app.router.add_get(path, _static)
    with serve(app) as port:
        urls = [f"http://127.0.0.1:{port}{p}" for p in files]
        fetcher = HttpFetcher(HttpConfig(allow_networks=("127.0.0.1/32",), retries=0))
        out = fetch_images(pd.DataFrame({"key": [f"k{i}" for i in range(len(urls))], "url": urls}), fetcher)
    assert _plain(out["drop_reason"]) == [None, "fetch.not_image", "fetch.decode_error", "fetch.decode_error",
                                          None, None, None, "fetch.not_image"]
    with Image.open(io.BytesIO(out["image"].iloc[4])) as im:
        assert im.mode == "RGB"  # CMYK stored as RGB
    kept = out[out["drop_reason"].isna()]
    # the GIF is two flat colours: its first frame has no texture
    assert _plain(filter_images(kept)["drop_reason"]) == [None, None, "image.low_texture", "image.geometry"]


# ---------------------------------------------------------------- the ledger and retries of transient failures


def test_ledger_records_every_url_and_a_retry_asks_only_transient_failures():
    u = "http://img.example.cn/"
    jpg = jpeg(120, 80)
    first = FakeFetcher({
        u + "ok": _ok(u + "ok", jpg),
        u + "404": _failed(u + "404", HTTP_ERROR, 404),
        u + "503": FetchResult(u + "503", False, HTTP_ERROR, 503, None, {}, "HTTP 503", 3, True),
        u + "slow": FetchResult(u + "slow", False, TIMEOUT, None, None, {}, "deadline", 3, True),
    })
    frame = pd.DataFrame({"key": ["a", "b", "c", "d", "e"],
                          "url": [u + "ok", u + "404", u + "503", u + "slow", u + "ok"]})
    out, ledger = fetch_shard(frame, first)
    assert ledger["url"].tolist() == [u + "ok", u + "404", u + "503", u + "slow"]
    assert _plain(ledger["reason"]) == [None, HTTP_ERROR, HTTP_ERROR, TIMEOUT]
    assert ledger["transient"].tolist() == [False, False, True, True]
    assert ledger["attempts"].tolist() == [1, 1, 3, 3]
    assert _plain(ledger["status"]) == [200, 404, 503, None]

    second = FakeFetcher({u + "503": _ok(u + "503", jpeg(130, 90, seed=3)),
                          u + "slow": FetchResult(u + "slow", False, TIMEOUT, None, None, {}, "deadline", 3, True)})
    previous = Previous(ledger, image_of={u + "ok": jpg}.get)
    again, ledger2 = fetch_shard(frame, second, previous=previous)
    assert second.calls == [[u + "503", u + "slow"]]  # never the success or the 404
    assert _plain(again["drop_reason"]) == [None, HTTP_ERROR, None, TIMEOUT, None]
    assert ledger2["attempts"].tolist() == [1, 1, 4, 6]
    assert again["image"].iloc[0] == jpg and again["original_width"].iloc[2] == 130

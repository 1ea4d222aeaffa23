"""Stage fetch: download each candidate's image, sniff and decode it (Pillow), keep it as JPEG."""

from __future__ import annotations

import hashlib
import io
import warnings
from dataclasses import dataclass
from typing import Protocol

import pandas as pd
from PIL import Image

from tasks.io.http import FetchResult

STAGE = "fetch"
RULES = ("http_error", "timeout", "too_large", "not_image", "decode_error", "opt_out", "robots", "blocked_address")

# Magic bytes -> MIME: Content-Type headers lie too often to be trusted.
_MAGIC = (
    (b"\xff\xd8\xff", "image/jpeg"),
    (b"\x89PNG\r\n\x1a\n", "image/png"),
    (b"GIF87a", "image/gif"),
    (b"GIF89a", "image/gif"),
    (b"BM", "image/bmp"),
)


class Fetcher(Protocol):
    def fetch_many(self, urls: list[str]) -> list[FetchResult]: ...


@dataclass(frozen=True)
class FetchConfig:
    jpeg_quality: int = 95  # re-encoding quality for images that are not already JPEG
    max_pixels: int = 90_000_000  # decompression-bomb limit: larger images are decode errors


def sniff_mime(data: bytes) -> str | None:
    """The image type named by the leading bytes, or None when they are not an image we decode."""
    for magic, mime in _MAGIC:
        if data.startswith(magic):
            return mime
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    return None


@dataclass
class Decoded:
    jpeg: bytes
    width: int
    height: int


def decode_image(data: bytes, mime: str, config: FetchConfig = FetchConfig()) -> Decoded:
    """Fully decode (a truncated file fails here, not later); JPEG bytes kept as they are, others re-encoded."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with Image.open(io.BytesIO(data)) as im:
            if im.width * im.height > config.max_pixels:
                raise ValueError(f"{im.width}x{im.height} exceeds {config.max_pixels} pixels")
            im.load()
            if mime == "image/jpeg" and im.mode in ("RGB", "L"):
                return Decoded(data, im.width, im.height)
            rgb = im.convert("RGBA") if im.mode in ("P", "LA") else im
            if rgb.mode == "RGBA":  # transparent pixels become white, as a browser shows them
                bg = Image.new("RGB", rgb.size, (255, 255, 255))
                bg.paste(rgb, mask=rgb.getchannel("A"))
                rgb = bg
            buf = io.BytesIO()
            rgb.convert("RGB").save(buf, "JPEG", quality=config.jpeg_quality)
            return Decoded(buf.getvalue(), im.width, im.height)


def fetch_images(frame: pd.DataFrame, fetcher: Fetcher, config: FetchConfig = FetchConfig()) -> pd.DataFrame:
    """Annotate each row with its image (JPEG bytes, size, sha256 of the fetched bytes) or a fetch.* reason."""
    out = frame.copy()
    urls = list(dict.fromkeys(out["url"]))  # one request per distinct URL in the shard
    results = dict(zip(urls, fetcher.fetch_many(urls), strict=True))
    decoded: dict[str, tuple] = {}
    for url, res in results.items():
        if not res.ok:
            decoded[url] = (res.reason, None, 0, 0, None, None)
            continue
        mime = sniff_mime(res.body or b"")
        if mime is None:
            decoded[url] = (f"{STAGE}.not_image", None, 0, 0, None, None)
            continue
        try:
            d = decode_image(res.body, mime, config)
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError, Image.DecompressionBombWarning):
            decoded[url] = (f"{STAGE}.decode_error", None, 0, 0, None, None)
            continue
        decoded[url] = (None, d.jpeg, d.width, d.height, hashlib.sha256(res.body).hexdigest(), mime)
    cols = list(zip(*(decoded[u] for u in out["url"]), strict=True)) if len(out) else [[]] * 6
    out["drop_reason"] = pd.Series(cols[0], index=out.index, dtype="str")
    out["image"] = pd.Series(cols[1], index=out.index, dtype="object")
    for name, values in (("original_width", cols[2]), ("original_height", cols[3])):
        out[name] = pd.Series(values, index=out.index, dtype="int64")
    out["width"] = out["original_width"]
    out["height"] = out["original_height"]
    out["sha256"] = pd.Series(cols[4], index=out.index, dtype="str")
    out["mime"] = pd.Series(cols[5], index=out.index, dtype="str")
    return out

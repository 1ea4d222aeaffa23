"""Stage fetch: download each candidate's image, sniff and decode it (Pillow), keep it as JPEG."""

from __future__ import annotations

import hashlib
import io
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import pandas as pd
from PIL import Image, ImageOps

from schemas.reasons import REASONS
from tasks.io.http import FetchResult

STAGE = "fetch"
RULES = REASONS[STAGE]

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
    jpeg_quality: int = 95  # re-encoding quality for images that cannot be kept as fetched
    max_pixels: int = 90_000_000  # decompression-bomb limit: larger images are decode errors, never decoded
    max_side: int = 1024  # stored JPEG's longer side at most this (ratio kept, only shrinking); 0: original size
    metric_side: int = 256  # the image-quality metrics are computed on the greyscale image at this longer side


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
    jpeg: bytes  # what is stored: RGB JPEG, at most max_side
    width: int  # stored size
    height: int
    original_width: int  # size as fetched, upright (EXIF orientation applied)
    original_height: int
    gray_std: float  # the metrics image.low_texture, image.blur, image.low_entropy judge (see image_metrics)
    laplacian_var: float
    gray_entropy: float


def _fit(w: int, h: int, side: int) -> tuple[int, int]:
    """(w, h) scaled so the longer side is `side`, ratio kept, never below 1 px."""
    scale = side / max(w, h)
    return max(1, round(w * scale)), max(1, round(h * scale))


def image_metrics(gray: Image.Image, side: int) -> tuple[float, float, float]:
    """(pixel std, Laplacian variance, 256-bin histogram entropy in bits) of a greyscale image at `side`.

    The image is first scaled (bilinear, up or down) so its longer side is `side`: the Laplacian variance
    depends on scale, so one fixed resolution makes the blur threshold mean the same for every image. The
    Laplacian is OpenCV's default 3x3 kernel (0 1 0 / 1 -4 1 / 0 1 0) with reflected borders.
    """
    if max(gray.size) != side:
        gray = gray.resize(_fit(*gray.size, side), Image.Resampling.BILINEAR)
    pixels = np.asarray(gray)
    hist = np.bincount(pixels.ravel(), minlength=256).astype(np.float64)
    prob = hist / hist.sum()
    levels = np.arange(256, dtype=np.float64)
    mean = prob @ levels
    std = float(np.sqrt(max(0.0, prob @ (levels - mean) ** 2)))  # from the histogram: no float copy of the image
    a = pixels.astype(np.int16)  # the Laplacian of 8-bit pixels lies in [-1020, 1020]: int16 holds it exactly
    p = np.pad(a, 1, mode="reflect")
    lap = (p[:-2, 1:-1] + p[2:, 1:-1] + p[1:-1, :-2] + p[1:-1, 2:] - 4 * a).astype(np.float32)
    nz = prob[prob > 0]
    return std, float(lap.var()), float(-(nz * np.log2(nz)).sum())


def _to_rgb(im: Image.Image) -> Image.Image:
    if im.mode in ("P", "LA", "PA") or (im.mode == "RGBA"):
        rgba = im.convert("RGBA")  # transparent pixels become white, as a browser shows them
        bg = Image.new("RGB", rgba.size, (255, 255, 255))
        bg.paste(rgba, mask=rgba.getchannel("A"))
        return bg
    return im if im.mode == "RGB" else im.convert("RGB")


def _open(data: bytes, max_pixels: int) -> Image.Image:
    with warnings.catch_warnings():
        # max_pixels, not Pillow's global default, is the limit (Pillow still raises past twice its own)
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        im = Image.open(io.BytesIO(data))
    if im.width * im.height > max_pixels:  # judged on the header, before a single pixel is decoded
        im.close()
        raise ValueError(f"{im.width}x{im.height} exceeds {max_pixels} pixels")
    return im


def decode_image(data: bytes, mime: str, config: FetchConfig = FetchConfig()) -> Decoded:
    """Decode (a truncated file fails here, not later), orient, shrink to max_side, measure, store as JPEG.

    A JPEG is decoded at a reduced DCT scale (Pillow's draft) when only a smaller copy is stored: the
    scale is the smallest that still leaves max_side pixels. A JPEG that needs no change is kept as fetched.
    """
    with _open(data, config.max_pixels) as im:
        orientation = im.getexif().get(0x0112, 1) if mime == "image/jpeg" else 1
        ow, oh = (im.height, im.width) if orientation in (5, 6, 7, 8) else (im.width, im.height)
        shrink = config.max_side and max(ow, oh) > config.max_side
        if mime == "image/jpeg" and shrink:
            im.draft(im.mode if im.mode in ("RGB", "L") else None, _fit(im.width, im.height, config.max_side))
        im.load()
        upright = ImageOps.exif_transpose(im) if orientation != 1 else im
        keep = mime == "image/jpeg" and im.mode in ("RGB", "L") and orientation == 1 and not shrink
        rgb = _to_rgb(upright)
        if shrink:
            rgb = rgb.resize(_fit(ow, oh, config.max_side), Image.Resampling.BICUBIC, reducing_gap=3.0)
        std, lap, ent = image_metrics(rgb.convert("L"), config.metric_side)
        if keep:
            jpeg = data
        else:
            buf = io.BytesIO()
            rgb.save(buf, "JPEG", quality=config.jpeg_quality)
            jpeg = buf.getvalue()
        return Decoded(jpeg, rgb.width, rgb.height, ow, oh, std, lap, ent)


def decode_resized(data: bytes, size: tuple[int, int], max_pixels: int = FetchConfig.max_pixels) -> Image.Image:
    """An RGB image of exactly `size` (bicubic), as a model's input: JPEGs decoded at the smallest DCT scale
    that still covers `size`, so a 1600x1200 photo for a 224x224 input is never decoded at full size."""
    with _open(data, max_pixels) as im:
        im.draft("RGB" if im.mode in ("RGB", "L") else None, size)
        return _to_rgb(im).resize(size, Image.Resampling.BICUBIC, reducing_gap=3.0)


# One row per distinct URL of a shard: how its fetch ended. Stored beside the shard, it lets a later run
# fetch again only what failed transiently and reuse everything else (see fetch_shard's `previous`).
_LEDGER_DTYPES = {
    "url": "str", "reason": "str", "status": "Int64", "attempts": "int64", "error": "str", "transient": "bool",
    "width": "int64", "height": "int64", "original_width": "int64", "original_height": "int64",
    "sha256": "str", "mime": "str", "gray_std": "float64", "laplacian_var": "float64", "gray_entropy": "float64",
}
_FROM_LEDGER = ("width", "height", "original_width", "original_height", "sha256", "mime", "gray_std",
                "laplacian_var", "gray_entropy")


def _outcome(res: FetchResult, config: FetchConfig) -> tuple[dict, bytes | None]:
    row = {"url": res.url, "reason": res.reason, "status": res.status, "attempts": res.attempts,
           "error": res.error, "transient": res.transient}
    if not res.ok:
        return row, None
    body = res.body or b""
    mime = sniff_mime(body)
    if mime is None:
        return {**row, "reason": f"{STAGE}.not_image", "error": f"leading bytes {body[:8]!r} are no image format"}, None
    try:
        d = decode_image(body, mime, config)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        return {**row, "reason": f"{STAGE}.decode_error", "error": f"{type(exc).__name__}: {exc}"[:200]}, None
    row.update(width=d.width, height=d.height, original_width=d.original_width, original_height=d.original_height,
               sha256=hashlib.sha256(body).hexdigest(), mime=mime, gray_std=d.gray_std,
               laplacian_var=d.laplacian_var, gray_entropy=d.gray_entropy)
    return row, d.jpeg


def _ledger_frame(rows: list[dict]) -> pd.DataFrame:
    frame = pd.DataFrame(rows, columns=list(_LEDGER_DTYPES))
    defaults = {"width": 0, "height": 0, "original_width": 0, "original_height": 0, "gray_std": 0.0,
                "laplacian_var": 0.0, "gray_entropy": 0.0}
    return frame.fillna(defaults).astype(_LEDGER_DTYPES)


@dataclass
class Previous:
    """An earlier attempt at this shard: its ledger and the stored image of each URL it fetched."""

    ledger: pd.DataFrame
    image_of: Callable[[str], bytes | None]  # URL -> stored JPEG of a successful URL, None when not stored


def fetch_shard(frame: pd.DataFrame, fetcher: Fetcher, config: FetchConfig = FetchConfig(),
                previous: Previous | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(rows annotated with image or fetch.* reason, ledger). With `previous`, only the URLs that failed
    transiently there are asked again (their attempts add up); every other outcome is reused as it was."""
    urls = list(dict.fromkeys(frame["url"]))  # one request per distinct URL in the shard
    rows: dict[str, dict] = {}
    images: dict[str, bytes] = {}
    todo = urls
    if previous is not None:
        rows = {row["url"]: row for row in previous.ledger.to_dict("records")}
        todo = []
        for u in urls:
            row = rows.get(u)
            if row is None or (row["transient"] and not pd.isna(row["reason"])):
                todo.append(u)
            elif pd.isna(row["reason"]):
                image = previous.image_of(u)
                if image is None:  # its stored copy is gone (e.g. every row of it quarantined): fetch again
                    rows.pop(u)
                    todo.append(u)
                else:
                    images[u] = image
    for res in fetcher.fetch_many(todo) if todo else []:
        row, jpeg = _outcome(res, config)
        if res.url in rows:
            row["attempts"] += int(rows[res.url]["attempts"])
        rows[res.url] = row
        if jpeg is not None:
            images[res.url] = jpeg
    ledger = _ledger_frame([rows[u] for u in urls])
    return _annotate(frame, ledger, images), ledger


def fetch_images(frame: pd.DataFrame, fetcher: Fetcher, config: FetchConfig = FetchConfig()) -> pd.DataFrame:
    """Annotate each row with its image (JPEG bytes, size, sha256 of the fetched bytes, quality metrics) or a
    fetch.* reason."""
    return fetch_shard(frame, fetcher, config)[0]


def _annotate(frame: pd.DataFrame, ledger: pd.DataFrame, images: dict[str, bytes]) -> pd.DataFrame:
    out = frame.copy()
    by_url = ledger.set_index("url")
    at = by_url.reindex(out["url"])
    out["drop_reason"] = pd.Series(at["reason"].to_numpy(), index=out.index, dtype="str")
    out["image"] = pd.Series([images.get(u) for u in out["url"]], index=out.index, dtype="object")
    for name in _FROM_LEDGER:
        out[name] = pd.Series(at[name].to_numpy(), index=out.index, dtype=_LEDGER_DTYPES[name])
    return out


def transient_failures(ledger: pd.DataFrame) -> int:
    """URLs of a ledger that failed transiently: what --retry-failed would fetch again."""
    return int((ledger["transient"] & ledger["reason"].notna()).sum())


def ledger_stats(ledger: pd.DataFrame, previous: Previous | None = None) -> dict:
    """The fetch step's marker stats: requests made by this attempt (not the earlier one it continues) and the
    transient failures left."""
    asked = ledger["attempts"].sum() - (previous.ledger["attempts"].sum() if previous else 0)
    return {"requests": int(asked), "transient_failures": transient_failures(ledger)}

"""The sample variants: two small batches, curated one after the other into one output root, for cross-batch dedup."""

from __future__ import annotations

import collections
import functools
import io
import json
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import numpy as np
from PIL import Image

from tasks.sample.catalogue import Builder, Img, encode
from tasks.sample.crawl import CRAWL_START, SAMPLE_SNAPSHOT, SampleCrawl, generator_version, write_once, write_warc
from tasks.sample.fates import Fates, predict_fates

# Variant 1 is one run's batch; variant 2, curated after it into the same output root, serves some of variant 1's
# kept photos again, re-encoded under new URLs, beside new photos. Every pair passes stages 1-2 and the quality
# rules; what happens to it after that is predicted with the library's own functions under the placeholder model.
VARIANTS = (1, 2)
BAND_MARGIN = 0.005  # no row entering align lies closer than this to an edge of its band: float noise flips none
_VARIANT_SALT = 7_000_000  # far above any image count, so a variant's seeds and URLs are no other crawl's
_VARIANT_PAGE_SIZES = (5, 5, 4, 4)  # 18 candidates: the band's quantiles fall well between two rows' scores
_VARIANT_STEMS = {1: ("huaniao", "shanshui", "jiexiang", "tianyuan"), 2: ("haibian", "gucheng", "caoyuan", "xuejing")}
# Variant 2's run order: new photos; re-encodings of photos variant 1 keeps ("repeat"), of variant 1's in-batch
# duplicate pair ("pair") and of a photo variant 1's band drops ("stale"): that one is in no one's dataset.
_VARIANT2_ORDER = ("new", "repeat", "new", "repeat", "new",
                   "repeat", "new", "pair", "new", "repeat",
                   "new", "stale", "new", "repeat",
                   "new", "repeat", "new", "new")
_CAPTION_TRIES = 40  # caption windows tried until every row sits clear of the band's edges
# The modules whose results the manifests hold (the band's defaults, the stored image, the placeholder's
# features): they key a variant's marker.
_PREDICTOR_MODULES = ("tasks.align", "tasks.fetch", "tasks.models.placeholder", "tasks.models.embedding")


def _reencode(pixels: np.ndarray, k: int) -> bytes:
    """The same photo as another site serves it: compressed harder (even k) or 10% smaller (odd k)."""
    if k % 2 == 0:
        return encode(pixels, quality=70)
    h, w = pixels.shape[:2]
    smaller = Image.fromarray(pixels).resize((round(w * 0.9), round(h * 0.9)), Image.Resampling.LANCZOS)
    return encode(np.asarray(smaller), quality=85)


@dataclass
class _Variant:
    b: Builder
    rows: list[dict]  # the manifest: one object per <img>, in run order
    fates: Fates
    pixels: dict[str, np.ndarray]  # variant 1's: image URL -> the photo it serves, before encoding


def _variant_pages(b: Builder, n: int, imgs: list[Img]) -> None:
    start = 0
    for stem, size in zip(_VARIANT_STEMS[n], _VARIANT_PAGE_SIZES, strict=True):
        b.page(0, f"https://www.sample-zh.test/album/2025/{3 + 3 * n:02d}/{stem}.html", imgs[start:start + size])
        start += size


def _predicted(b: Builder, repeats: dict[str, str], pixels: dict[str, np.ndarray],
               committed: np.ndarray | None = None) -> _Variant:
    imgs = [(page, img) for page in b.pages for img in page.imgs]
    fates = predict_fates([b.blobs[img.src].body for _, img in imgs], [img.alt_html for _, img in imgs], committed)
    rows = [{"url": img.src, "expected": fate, "repeats": repeats.get(img.src), "page_url": page.url,
             "alt_text": img.alt_html, "case": img.case}
            for (page, img), fate in zip(imgs, fates.expected, strict=True)]
    return _Variant(b, rows, fates, pixels)


def _variant_one(first_caption: int) -> _Variant:
    """18 candidates: 17 photos, one of them served again on a later page, re-encoded (an in-batch duplicate)."""
    b = Builder((_VARIANT_SALT + 1,), first_caption)
    pixels: dict[str, np.ndarray] = {}
    imgs = []
    for _ in range(sum(_VARIANT_PAGE_SIZES) - 1):
        drawn = b.pixels()
        imgs.append(Img(b.serve(b.image_url(), encode(drawn)), b.caption(), "", "good"))
        pixels[imgs[-1].src] = drawn
    first = imgs[2]
    first.case = "in_batch_first"
    again = b.serve(b.image_url(), _reencode(pixels[first.src], 0))
    pixels[again] = np.asarray(Image.open(io.BytesIO(b.blobs[again].body)).convert("RGB"))
    imgs.insert(11, Img(again, b.caption(), "", "in_batch_reencoded"))
    _variant_pages(b, 1, imgs)
    return _predicted(b, {}, pixels)


def _variant_two(v1: _Variant, first_caption: int) -> _Variant:
    """18 candidates in _VARIANT2_ORDER; the repeated photos are picked by variant 1's predicted fates."""
    b = Builder((_VARIANT_SALT + 2,), first_caption, avoid=v1.b.thumbs)
    kept = iter(r["url"] for r in v1.rows if r["case"] == "good" and r["expected"] == "kept")
    # (the URL `repeats` names, the URL whose photo is re-encoded): the pair's re-encoding starts from its second,
    # dropped member, whose keeper, the first, is in variant 1's dataset
    sources = {
        "pair": (next(r["url"] for r in v1.rows if r["case"] == "in_batch_first"),
                 next(r["url"] for r in v1.rows if r["case"] == "in_batch_reencoded")),
        "stale": (next(r["url"] for r in v1.rows if r["expected"] == "align.out_of_band"),) * 2,
    }
    cases = {"new": "new", "repeat": "crossbatch_repeat", "pair": "crossbatch_repeat_of_pair",
             "stale": "repeat_of_out_of_band"}
    repeats: dict[str, str] = {}
    imgs = []
    for k, kind in enumerate(_VARIANT2_ORDER):
        if kind == "new":
            url = b.serve(b.image_url(), encode(b.pixels()))
        else:
            named, reused = sources[kind] if kind in sources else (next(kept),) * 2
            url = b.serve(b.image_url(), _reencode(v1.pixels[reused], k))
            repeats[url] = named
        imgs.append(Img(url, b.caption(), "", cases[kind]))
    _variant_pages(b, 2, imgs)
    committed = v1.fates.vectors[[e == "kept" for e in v1.fates.expected]]
    return _predicted(b, repeats, {}, committed)


def _first_clear(make: Callable[[int], _Variant], want: dict[str, tuple[str, int]]) -> _Variant:
    """The first caption window whose rows all sit clear of the band's edges, with at least `count` rows of each
    case given the fate it is there for."""
    for attempt in range(_CAPTION_TRIES):
        v = make(attempt)
        fates = collections.Counter((r["case"], r["expected"]) for r in v.rows)
        if v.fates.band_margin > BAND_MARGIN and all(fates[c, fate] >= k for c, (fate, k) in want.items()):
            return v
    raise RuntimeError(f"no caption window of {_CAPTION_TRIES} gives every case its fate clear of the band's edges")


@functools.lru_cache(maxsize=1)
def _variants() -> dict[int, _Variant]:
    # Only the captions move between attempts (the photos stay), so only the band's fit changes.
    v1 = _first_clear(lambda t: _variant_one(500 + 20 * t), {
        "in_batch_first": ("kept", 1), "in_batch_reencoded": ("image.duplicate", 1), "good": ("kept", 6)})
    v2 = _first_clear(lambda t: _variant_two(v1, 1300 + 20 * t), {
        "crossbatch_repeat": ("crossbatch.duplicate", 5), "crossbatch_repeat_of_pair": ("crossbatch.duplicate", 1),
        "new": ("kept", 8), "repeat_of_out_of_band": ("kept", 1)})
    return {1: v1, 2: v2}


def write_sample_variant(n: int, out_dir: Path) -> SampleCrawl:
    """Writes out_dir/sample-vN.warc.gz and out_dir/manifest-vN.json, for N in VARIANTS.

    The manifest lists one object per <img>, in run order: `url`, `expected` ("kept" or the drop reason an offline
    run gives it, variant 2 after variant 1 into the same output root), `repeats` (the variant-1 URL whose photo it
    serves re-encoded, or null), `page_url`, `alt_text`, `case`. Byte-identical and left untouched when complete,
    like write_sample_crawl; each variant has its own marker, so variants and the default crawl can share out_dir.
    """
    if n not in VARIANTS:
        raise ValueError(f"unknown sample variant {n!r}: the variants are {', '.join(map(str, VARIANTS))}")
    out_dir = Path(out_dir)
    warc, manifest = f"sample-v{n}.warc.gz", f"manifest-v{n}.json"

    def build() -> dict[str, Callable[[Path], None]]:
        v = _variants()[n]
        start = CRAWL_START + timedelta(days=90 * n)
        text = json.dumps(v.rows, ensure_ascii=False, indent=1) + "\n"
        return {warc: lambda tmp: write_warc(tmp, 0, v.b, warc, start, f"{SAMPLE_SNAPSHOT}-V{n}"),
                manifest: lambda tmp: tmp.write_text(text, encoding="utf-8")}

    generator = generator_version(*_PREDICTOR_MODULES)
    write_once(out_dir, f"_SAMPLE_V{n}_COMPLETE.json", generator, [warc, manifest], build)
    return SampleCrawl(warcs=[out_dir / warc], manifest=out_dir / manifest)

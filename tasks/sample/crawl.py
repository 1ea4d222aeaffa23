"""The sample crawl on disk: a builder's pages and images as Common-Crawl-style WARC files, the manifest, and the
completion marker that makes a rewrite of an unchanged crawl a no-op."""

from __future__ import annotations

import hashlib
import html
import json
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from importlib.metadata import version
from pathlib import Path
from urllib.parse import urlsplit

from tasks.sample.catalogue import Builder, Img, Page, build_default, resolve
from tasks.sample.warc import WarcWriter, languages_cld2

SAMPLE_SNAPSHOT = "DANQING-SAMPLE"  # the warcinfo isPartOf value
COMPLETION_FILE = "_SAMPLE_COMPLETE.json"
MANIFEST_FILE = "manifest.jsonl"
N_WARCS = 3

CRAWL_START = datetime(2025, 3, 14, 8, 0, 0, tzinfo=UTC)


@dataclass(frozen=True)
class SampleCrawl:
    warcs: list[Path]  # sorted
    manifest: Path  # JSONL: one line per page, then one per <img> of each selected page (a variant's: a JSON list)


def _render(page: Page) -> bytes:
    if page.charset == "utf-8":
        meta = '<meta charset="utf-8">'
    else:
        meta = f'<meta http-equiv="Content-Type" content="text/html; charset={page.charset_label.lower()}">'
    head = [meta, f"<title>{page.title}</title>"]
    if page.base_href:
        head.append(f'<base href="{page.base_href}">')
    body = [f"<h1>{page.title}</h1>"]
    paragraphs = list(page.paragraphs)
    for img in page.imgs:
        if paragraphs:
            body.append(f"<p>{paragraphs.pop(0)}</p>")
        body.append(f"<figure>{_img_tag(img)}</figure>")
    body += [f"<p>{p}</p>" for p in paragraphs]
    if page.trailer:
        body.append(page.trailer)
    host = urlsplit(page.url).netloc
    text = "\n".join([
        "<!DOCTYPE html>",
        f'<html lang="{page.html_lang}">',
        "<head>", *head, "</head>",
        "<body>",
        f'<header><a href="/">{host}</a></header>',
        "<article>", *body, "</article>",
        f"<footer>{host}</footer>",
        "</body>",
        "</html>",
        "",
    ])
    return text.encode(page.charset)


def _img_tag(img: Img) -> str:
    src, alt, tag = ("SRC", "ALT", "IMG") if img.upper else ("src", "alt", "img")
    attrs = [tag]
    if img.src is not None:
        attrs.append(f'{src}="{img.src}"')
    if img.alt_html is not None:
        attrs.append(f'{alt}="{img.alt_html}"')
    attrs += [f'{name}="{value}"' for name, value in img.extra]
    return "<" + " ".join(attrs) + ">"


def _metadata(page: Page) -> dict[str, str]:
    text_bytes = sum(len(p.encode()) for p in [page.title, *page.paragraphs])
    languages = [
        {"code": code, "code-iso-639-3": iso3, "text-covered": covered, "score": float(round(600 + 1400 * covered)),
         "name": name}
        for code, iso3, name, covered in page.languages or []
    ]
    return {"fetchTimeMs": str(100 + len(page.url) * 7), "charset-detected": page.charset_label,
            "languages-cld2": languages_cld2(languages, text_bytes)}


def _sniff(body: bytes) -> str:
    if body.startswith(b"\xff\xd8\xff"):
        return "image/jpeg"
    if body.startswith(b"\x89PNG"):
        return "image/png"
    if body.lstrip().lower().startswith(b"<"):
        return "text/html"
    return "application/octet-stream"


def write_warc(path: Path, index: int, b: Builder, name: str, start: datetime,
                snapshot: str = SAMPLE_SNAPSHOT) -> None:
    """Writes the builder's file `index` (its pages, then the images they link) as `name`."""
    pages = [p for p in b.pages if p.warc == index]
    linked = {resolve(p, i.taken) for p in b.pages for i in p.imgs}
    with path.open("wb") as fh:
        out = WarcWriter(fh, start)
        out.warcinfo(name, {
            "isPartOf": snapshot,
            "publisher": "danqing (generated sample crawl)",
            "description": "Deterministic offline sample for danqing run; every host is under .test but those of the"
                           " blacklisted-site cases, whose pairs are dropped before any fetch",
            "software": "danqing tasks.sample",
            "format": "WARC File Format 1.0",
        })
        written: set[str] = set()

        def serve(url: str | None, ip: str) -> None:
            blob = b.blobs.get(url or "")
            if blob is None or blob.warc != index or blob.url in written:
                return
            written.add(blob.url)
            out.capture(blob.url, blob.body, blob.content_type, status=blob.status, ip=ip, extra_headers=blob.headers,
                        payload_type=_sniff(blob.body))

        for page in pages:
            ctype = f"text/html; charset={page.charset_label}"
            response_id = out.capture(page.url, _render(page), ctype, ip=page.ip, payload_type="text/html")
            if page.languages is not None:
                out.metadata(page.url, _metadata(page), concurrent_to=response_id)
            for img in page.imgs:
                serve(resolve(page, img.taken), page.ip)
        # Images whose pages live in another file come last, as a later fetch would.
        for url in sorted(u for u in linked if u):
            serve(url, "192.0.2.251")
        for blob in b.blobs.values():  # records no page links to, such as a host's robots.txt
            if blob.standalone:
                serve(blob.url, "192.0.2.252")


def _manifest_lines(b: Builder) -> list[str]:
    lines = []
    for page in sorted(b.pages, key=lambda p: p.warc):
        warc = f"sample-{page.warc:05d}.warc.gz"
        lines.append({"kind": "page", "warc": warc, "page_url": page.url, "selected": page.selected,
                      "case": page.case, "charset": page.charset_label,
                      "languages": [code for code, *_ in page.languages] if page.languages is not None else None,
                      "n_img": len(page.imgs)})
        if not page.selected:
            continue
        for img in page.imgs:
            lines.append({"kind": "img", "warc": warc, "page_url": page.url, "src": img.src, "taken": img.taken,
                          "url": resolve(page, img.taken) if img.resolved else None,
                          "alt_text": None if img.alt_html is None else html.unescape(img.alt_html),
                          "expected": img.expected, "case": img.case})
    return [json.dumps(line, ensure_ascii=False) + "\n" for line in lines]


def generator_version(*modules: str) -> str:
    # The bytes depend on this package's modules, on the encoders they drive and on any module whose results they
    # write (`modules`: a variant's expected fates), so all of them key the marker.
    h = hashlib.sha256()
    for path in sorted(Path(__file__).parent.glob("*.py")):
        h.update(path.read_bytes())
    for name in modules:
        h.update(Path(sys.modules[name].__file__).read_bytes())
    for dist in ("numpy", "pillow", "warcio"):
        h.update(f"{dist}={version(dist)}".encode())
    return h.hexdigest()


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _complete(out_dir: Path, marker_name: str, names: list[str], generator: str) -> bool:
    marker = out_dir / marker_name
    try:
        recorded = json.loads(marker.read_text())
    except (OSError, ValueError):
        return False
    if recorded.get("generator") != generator or sorted(recorded.get("files", {})) != sorted(names):
        return False
    return all((out_dir / n).is_file() and _sha256(out_dir / n) == recorded["files"][n] for n in names)


def _replace_into(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_once(out_dir: Path, marker_name: str, generator: str, names: list[str],
                build: Callable[[], dict[str, Callable[[Path], None]]]) -> None:
    """Writes `names` through the writers `build` returns (each to a temp name, then renamed), then the marker.

    A directory whose marker records this generator and the files as they are on disk is left untouched;
    `build` is only called when something has to be written.
    """
    if _complete(out_dir, marker_name, names, generator):
        return
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / marker_name).unlink(missing_ok=True)
    writers = build()
    for name in names:
        _replace_into(out_dir / name, writers[name])
    marker = {"generator": generator, "files": {n: _sha256(out_dir / n) for n in names}}
    _replace_into(out_dir / marker_name, lambda tmp: tmp.write_text(json.dumps(marker, indent=1) + "\n"))


def write_sample_crawl(out_dir: Path) -> SampleCrawl:
    """Writes out_dir/sample-00000.warc.gz .. sample-00002.warc.gz and out_dir/manifest.jsonl.

    Byte-identical on every call and machine with the same numpy, Pillow and warcio: fixed WARC-Date
    values, record ids hashed from content, gzip mtime 0, seeded RNG. A directory that already holds a
    complete crawl from this generator version (see COMPLETION_FILE, written last) is left untouched.
    """
    out_dir = Path(out_dir)
    warc_names = [f"sample-{i:05d}.warc.gz" for i in range(N_WARCS)]

    def build() -> dict[str, Callable[[Path], None]]:
        b = build_default()
        writers = {name: (lambda tmp, i=i, name=name: write_warc(tmp, i, b, name, CRAWL_START + timedelta(hours=i)))
                   for i, name in enumerate(warc_names)}
        lines = _manifest_lines(b)
        writers[MANIFEST_FILE] = lambda tmp: tmp.write_text("".join(lines), encoding="utf-8")
        return writers

    write_once(out_dir, COMPLETION_FILE, generator_version(), [*warc_names, MANIFEST_FILE], build)
    return SampleCrawl(warcs=[out_dir / n for n in warc_names], manifest=out_dir / MANIFEST_FILE)


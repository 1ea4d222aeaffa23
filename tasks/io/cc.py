"""Common Crawl's catalogue: its crawls, each crawl's WARC and index listings, and the WARCs a run takes."""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterable

from tasks.io.ccconfig import CCConfig
from tasks.io.stream import fetch_bytes


def list_crawls(cfg: CCConfig = CCConfig()) -> list[dict]:
    """Common Crawl's crawls from collinfo.json, newest first, each with at least `id` and `name`."""
    url = f"{cfg.index_base.rstrip('/')}/collinfo.json"
    crawls = json.loads(fetch_bytes(url, cfg))
    if not isinstance(crawls, list) or not all(isinstance(c, dict) and "id" in c for c in crawls):
        raise ValueError(f"{url}: expected a JSON list of crawls with an 'id' each")
    return crawls


def check_snapshot(snapshot: str, cfg: CCConfig = CCConfig()) -> None:
    """Raise a ValueError naming the newest crawls when `snapshot` is not one of them: before any work starts."""
    ids = [c["id"] for c in list_crawls(cfg)]
    if snapshot not in ids:
        newest = ", ".join(ids[:5]) or "none"
        raise ValueError(f"unknown Common Crawl snapshot {snapshot!r}; the newest known are: {newest} "
                         f"({len(ids)} listed at {cfg.index_base})")


def warc_paths(snapshot: str, cfg: CCConfig = CCConfig()) -> list[str]:
    """Full URLs of the snapshot's WARC files, in the order of its warc.paths.gz."""
    return _listing(snapshot, "warc.paths.gz", cfg)


def index_paths(snapshot: str, cfg: CCConfig = CCConfig()) -> list[str]:
    """Full URLs of the snapshot's columnar index files of subset=warc (the successful captures)."""
    return [p for p in _listing(snapshot, "cc-index-table.paths.gz", cfg) if "/subset=warc/" in p]


def _listing(snapshot: str, name: str, cfg: CCConfig) -> list[str]:
    url = f"{cfg.data_base.rstrip('/')}/crawl-data/{snapshot}/{name}"
    try:
        text = gzip.decompress(fetch_bytes(url, cfg)).decode("utf-8")
    except FileNotFoundError as err:
        raise FileNotFoundError(f"{url} does not exist: is {snapshot!r} a crawl with this listing?") from err
    except (gzip.BadGzipFile, EOFError, UnicodeDecodeError) as err:
        raise ValueError(f"{url}: not a gzip text listing: {err}") from err
    return [f"{cfg.data_base.rstrip('/')}/{line.strip()}" for line in text.splitlines() if line.strip()]


def pick(paths: list[str], limit: int | None = None, offset: int = 0, explicit: Iterable[str] | None = None,
         ) -> list[str]:
    """The WARCs to process: `explicit` ones (URLs, crawl-data/... paths or file names, each in `paths`), or
    `limit` of them after skipping `offset`. A name that is not in the listing is a ValueError, not a silent skip.
    """
    if limit is not None and limit < 0 or offset < 0:
        raise ValueError(f"limit and offset must be >= 0, got {limit}, {offset}")
    if explicit is not None:
        explicit = list(explicit)
        if limit is not None or offset:
            raise ValueError("give either explicit WARC paths or a limit/offset, not both")
        return _match_explicit(paths, explicit)
    if offset and offset >= len(paths):
        raise ValueError(f"offset {offset} is past the end of the listing ({len(paths)} WARC files)")
    return paths[offset:] if limit is None else paths[offset:offset + limit]


def _match_explicit(paths: list[str], explicit: list[str]) -> list[str]:
    chosen, missing = [], []
    for name in explicit:
        key = name[name.index("crawl-data/"):] if "crawl-data/" in name else name.strip("/")
        hits = [p for p in paths if p == name or p.endswith("/" + key)]
        if len(hits) > 1:
            raise ValueError(f"WARC name {name!r} matches {len(hits)} files of the listing; give its full path")
        if not hits:
            missing.append(name)
        elif hits[0] not in chosen:
            chosen.append(hits[0])
    if missing:
        example = paths[0] if paths else "(the listing is empty)"
        raise ValueError(f"{len(missing)} WARC file(s) not in the crawl's listing: {', '.join(missing[:5])}; "
                         f"a listed one looks like {example}")
    return chosen

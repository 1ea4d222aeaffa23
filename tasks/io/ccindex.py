"""Common Crawl's columnar URL index: select the Chinese HTML captures, or write a small index for local WARCs."""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from pathlib import Path
from urllib.parse import urlsplit

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq
from pyarrow import fs

from tasks.io.ccconfig import CCConfig, resolve
from tasks.io.ranges import RangeFile
from tasks.io.stream import s3_filesystem
from tasks.io.warc import parse_fields, split_content_type

# Columns read and written, typed as in Common Crawl's published schema. `crawl` and `subset` are partitions:
# Common Crawl's files hold them only in their path (crawl=.../subset=...), and so do the files written here.
SCHEMA = pa.schema([
    ("url", pa.string()),
    ("url_host_name", pa.string()),
    ("url_host_registered_domain", pa.string()),
    ("fetch_status", pa.int16()),
    ("content_mime_detected", pa.string()),
    ("content_charset", pa.string()),
    ("content_languages", pa.string()),
    ("warc_filename", pa.string()),
    ("warc_record_offset", pa.int32()),
    ("warc_record_length", pa.int32()),
])
PARTITIONS = ("crawl", "subset")
COLUMNS = (*SCHEMA.names, *PARTITIONS)
HTML_MIMES = ("text/html", "application/xhtml+xml")
LANGUAGE = "zho"  # ISO-639-3; content_languages lists codes by share, so the first one is the page's language

# cld2 codes of the metadata records -> ISO-639-3, for records whose JSON lacks "code-iso-639-3" (older crawls).
CLD2_TO_ISO3 = {
    "zh": "zho", "zh-Hant": "zho", "zh-Hans": "zho", "en": "eng", "ja": "jpn", "ko": "kor", "ru": "rus",
    "de": "deu", "fr": "fra", "es": "spa", "pt": "por", "it": "ita", "nl": "nld", "pl": "pol", "tr": "tur",
    "vi": "vie", "th": "tha", "id": "ind", "ms": "msa", "ar": "ara", "fa": "fas", "hi": "hin", "uk": "ukr",
    "cs": "ces", "sv": "swe", "da": "dan", "no": "nor", "fi": "fin", "el": "ell", "he": "heb", "hu": "hun",
    "ro": "ron", "bg": "bul",
}
# Second-level labels under which a country code registers names (www.example.com.cn -> example.com.cn).
_SECOND_LEVEL = frozenset({"com", "net", "org", "gov", "edu", "ac", "co", "or", "ne", "go", "mil", "gen"})
_PARTITION = re.compile(r"/(crawl|subset)=([^/]+)")


# ---- selection --------------------------------------------------------------------------------------------------


def select_chinese(index_files: Iterable[str], warc_filenames: Iterable[str] | None = None,
                   cfg: CCConfig | None = None) -> pd.DataFrame:
    """Index rows of Chinese HTML pages, sorted by (warc_filename, warc_record_offset).

    A row is kept when subset is 'warc', fetch_status is 200, content_mime_detected is HTML and the first of
    content_languages is zho ('eng,zho' is an English page). `warc_filenames` (crawl-data/... paths, or URLs
    ending so) limits the rows to those WARCs. Files are local paths, http(s) URLs (read by Range requests with
    this module's retries) or s3:// URLs; only the needed columns and row groups are read (filter pushdown).
    """
    cfg = cfg or CCConfig()
    names = None if warc_filenames is None else sorted({warc_key(w) for w in warc_filenames})
    frames = [_select_file(path, names, cfg) for path in index_files]
    frames = [f for f in frames if f.num_rows]
    if not frames:
        return pa.Table.from_pylist([], schema=_full_schema()).to_pandas()
    table = pa.concat_tables(frames).sort_by([("warc_filename", "ascending"), ("warc_record_offset", "ascending")])
    return table.to_pandas()


def split_run(index_files: list[str], batches: list[list[str]], out_dir: Path, cfg: CCConfig | None = None) -> dict:
    """One pass over a snapshot's index for a run in batches: each index file is read once, for all the run's
    WARC files, and its rows are appended to their batch's `<out_dir>/<k>.parquet` (unsorted; every batch gets
    a file, empty when its WARCs hold no Chinese page). Memory: one index file's selection, not the run's.
    Each part records how many index files were read (schema metadata `index_files`)."""
    cfg = cfg or CCConfig()
    names = sorted({warc_key(w) for b in batches for w in b})
    batch_of = {warc_key(w): k for k, b in enumerate(batches) for w in b}
    value_set = pa.array(names)
    of_name = pa.array([batch_of[n] for n in names], pa.int32())  # name's place in `names` -> its batch
    schema = _full_schema().with_metadata({"index_files": str(len(index_files))})
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    writers: dict[int, pq.ParquetWriter] = {}
    selected = 0
    try:
        for path in index_files:
            table = _select_file(path, names, cfg)
            if not table.num_rows:
                continue
            selected += table.num_rows
            batch = pc.take(of_name, pc.index_in(table.column("warc_filename"), value_set=value_set))
            for k in pc.unique(batch).to_pylist():
                if k not in writers:
                    writers[k] = pq.ParquetWriter(out_dir / f"{k}.parquet", schema)
                writers[k].write_table(table.filter(pc.equal(batch, k)).replace_schema_metadata(schema.metadata))
    finally:
        for w in writers.values():
            w.close()
    for k in range(len(batches)):
        if k not in writers:
            pq.write_table(schema.empty_table(), out_dir / f"{k}.parquet")
    return {"index_files": len(index_files), "selected": selected, "batches": len(batches)}


def read_part(part: str | Path, warcs: list[str]) -> tuple[pd.DataFrame, dict]:
    """A batch's rows of `split_run`, as `select_run` gives them for its WARC files: sorted, with its stats."""
    table = pq.read_table(part)
    files = int((table.schema.metadata or {}).get(b"index_files", b"0"))
    table = table.replace_schema_metadata(None).sort_by([("warc_filename", "ascending"),
                                                         ("warc_record_offset", "ascending")])
    return _stats(table.to_pandas(), warcs, files)


def _full_schema() -> pa.Schema:
    return pa.schema([*SCHEMA, *(pa.field(p, pa.string()) for p in PARTITIONS)])


def warc_key(name: str) -> str:
    """crawl-data/... as the index spells warc_filename, from a URL or an s3:// path ending so."""
    return name[name.index("crawl-data/"):] if "crawl-data/" in name else name


def chinese_filter(warc_filenames: list[str] | None = None) -> pc.Expression:
    """The row filter of select_chinese (partition columns aside), as a pyarrow expression."""
    langs = pc.field("content_languages")
    expr = ((pc.field("fetch_status") == 200) & pc.field("content_mime_detected").isin(list(HTML_MIMES))
            & ((langs == LANGUAGE) | pc.starts_with(langs, f"{LANGUAGE},")))
    if warc_filenames is not None:
        expr &= pc.field("warc_filename").isin(warc_filenames)
    return expr


def _select_file(path: str, warc_filenames: list[str] | None, cfg: CCConfig) -> pa.Table:
    parts = dict(_PARTITION.findall("/" + path))
    if parts.get("subset", "warc") != "warc":
        return pa.Table.from_pylist([], schema=_full_schema())
    source, filesystem = _source(path, cfg)
    try:
        fragment = ds.ParquetFileFormat().make_fragment(source, filesystem=filesystem)
        in_file = set(fragment.physical_schema.names)
        missing = [c for c in SCHEMA.names if c not in in_file]
        if missing:
            raise ValueError(f"{path}: not a Common Crawl index file, it lacks the column(s) {missing}")
        expr = chinese_filter(warc_filenames)
        if "subset" in in_file:
            expr &= pc.field("subset") == "warc"
        table = fragment.to_table(columns=[c for c in COLUMNS if c in in_file], filter=expr)
    finally:
        if hasattr(source, "close"):
            source.close()
    for name in PARTITIONS:
        if name not in table.column_names:
            table = table.append_column(name, pa.array([parts.get(name)] * table.num_rows, pa.string()))
    return table.select(list(COLUMNS)).cast(_full_schema())


def _source(path: str, cfg: CCConfig):
    """What a parquet fragment reads: (a file object or path, its pyarrow filesystem or None)."""
    url = resolve(path, cfg)
    scheme = urlsplit(url).scheme
    if scheme in ("http", "https"):
        return RangeFile(url, cfg), None
    if scheme == "s3":
        return url[len("s3://"):], s3_filesystem(cfg)
    if "://" in url:
        raise ValueError(f"unsupported URL scheme: {url}")
    return str(Path(url).absolute()), fs.LocalFileSystem()


# ---- writing a small index for local WARCs ----------------------------------------------------------------------


def write_index(warcs: list[str | Path], root: Path, crawl: str) -> list[Path]:
    """A columnar index of local WARC files in Common Crawl's schema and layout, for tests and benchmarks.

    Every response record becomes a row: its offset and compressed length (up to the next record), HTTP status,
    detected mime (WARC-Identified-Payload-Type, else the HTTP type), charset (the metadata record's
    charset-detected, else HTTP's) and content_languages from the following metadata record's languages-cld2
    in its order, as ISO-639-3. warc_filename is the path relative to `root` (crawl-data/... in CC's layout).
    2xx rows go to subset=warc, others to subset=crawldiagnostics, one part-00000.parquet each.
    """
    root = Path(root)
    rows = [row for warc in warcs for row in _scan(Path(warc), root)]
    rows.sort(key=lambda r: (r["warc_filename"], r["warc_record_offset"]))
    written = []
    for subset in ("warc", "crawldiagnostics"):
        part = [r for r in rows if (200 <= (r["fetch_status"] or 0) < 300) == (subset == "warc")]
        if not part and subset != "warc":
            continue
        out = root / "cc-index/table/cc-main/warc" / f"crawl={crawl}" / f"subset={subset}" / "part-00000.parquet"
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(".tmp")
        pq.write_table(pa.Table.from_pylist(part, schema=SCHEMA), tmp)
        tmp.replace(out)
        written.append(out)
    return written


def _scan(path: Path, root: Path) -> list[dict]:
    from fastwarc.warc import ArchiveIterator, WarcRecordType

    try:
        name = path.absolute().relative_to(root.absolute()).as_posix()
    except ValueError:
        name = path.as_posix()
    starts, rows, by_id = [], [], {}
    with open(path, "rb") as fh:
        for rec in ArchiveIterator(fh, parse_http=True):  # every record type: each one ends the one before
            starts.append(rec.stream_pos)
            if rec.record_type == WarcRecordType.response and rec.is_http:
                row = _response_row(rec, name)
                row["_index"] = len(starts) - 1
                rows.append(row)
                by_id[rec.headers.get("WARC-Record-ID")] = row
            elif rec.record_type == WarcRecordType.metadata:
                row = by_id.get(rec.headers.get("WARC-Concurrent-To"))
                if row is not None:
                    _add_metadata(row, rec.reader.read())
    starts.append(path.stat().st_size)
    for row in rows:
        i = row.pop("_index")
        row["warc_record_length"] = starts[i + 1] - starts[i]
    return rows


def _response_row(rec, warc_filename: str) -> dict:
    url = rec.headers.get("WARC-Target-URI") or ""
    url = url[1:-1] if url.startswith("<") and url.endswith(">") else url
    host = (urlsplit(url).hostname or "").lower() or None
    mime, charset = split_content_type(rec.http_headers.get("Content-Type"))
    return {
        "url": url,
        "url_host_name": host,
        "url_host_registered_domain": registered_domain(host),
        "fetch_status": rec.http_headers.status_code,
        "content_mime_detected": (rec.headers.get("WARC-Identified-Payload-Type") or mime or None),
        "content_charset": charset,
        "content_languages": None,
        "warc_filename": warc_filename,
        "warc_record_offset": rec.stream_pos,
    }


def _add_metadata(row: dict, body: bytes) -> None:
    fields = parse_fields(body)
    if fields.get("charset-detected"):
        row["content_charset"] = fields["charset-detected"]
    row["content_languages"] = cld2_languages(fields.get("languages-cld2"))


def cld2_languages(value: str | None) -> str | None:
    """A languages-cld2 JSON value as content_languages: ISO-639-3 codes by share, comma-separated.

    Codes with no ISO-639-3 equivalent known here are left out, as Common Crawl leaves out cld2's "un".
    """
    try:
        langs = json.loads(value or "").get("languages") or []
    except (ValueError, AttributeError):
        return None
    codes = []
    for lang in langs:
        code = lang.get("code-iso-639-3") or CLD2_TO_ISO3.get(lang.get("code", ""))
        if code and code not in codes:
            codes.append(code)
    return ",".join(codes) or None


def registered_domain(host: str | None) -> str | None:
    """An approximation of the public-suffix rule Common Crawl uses: the last two labels, three under a
    country code's generic second level (example.com.cn). Good enough for test and benchmark indexes."""
    if not host or re.fullmatch(r"[\d.]+|\[?[0-9a-f:]+\]?", host):
        return None
    labels = host.rstrip(".").split(".")
    if len(labels) >= 3 and len(labels[-1]) == 2 and labels[-2] in _SECOND_LEVEL:
        return ".".join(labels[-3:])
    return ".".join(labels[-2:])


def select_run(index_files: list[str], warcs: list[str], cfg: CCConfig | None = None) -> tuple[pd.DataFrame, dict]:
    """The index rows of the Chinese HTML pages in a run's WARC files (one index file at a time: a snapshot's
    whole index is far larger than memory) and how many there are: the cc_index reduce's table and stats."""
    return _stats(select_chinese(index_files, warcs, cfg).reset_index(drop=True), warcs, len(index_files))


def _stats(selected: pd.DataFrame, warcs: list[str], index_files: int) -> tuple[pd.DataFrame, dict]:
    found = set(selected["warc_filename"])
    return selected, {"index_files": index_files, "selected": int(len(selected)),
                      "warcs_without_pages": int(sum(warc_key(w) not in found for w in warcs))}

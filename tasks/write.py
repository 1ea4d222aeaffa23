"""Stage write: webdataset tar shards (<key>.jpg/.txt/.json) and parquet metadata, byte-for-byte reproducible."""

from __future__ import annotations

import json
import tarfile
from collections.abc import Callable
from pathlib import Path

import pandas as pd

from tasks.refine import SCORE_COLUMNS as REFINE_SCORES

# The dataset's metadata columns: img2dataset's names where they exist, DanQing's `alt_text`, then scores.
METADATA_COLUMNS = [
    "key", "url", "caption", "alt_text", "page_url", "snapshot", "width", "height", "sha256",
    "original_width", "original_height", "mime", "word_count", "gray_std", "laplacian_var", "gray_entropy",
    "align_cosine", "caption_truncated", "nsfw_score", "group_key", "group_size",
    "page_host", "image_host", "warc_file", "warc_offset", "warc_date",
    *REFINE_SCORES,
]
# Scores a rejects file keeps when the frame has them, so thresholds can be refitted from kept rows and rejects.
SCORE_COLUMNS = [*REFINE_SCORES, "align_cosine", "nsfw_score", "group_key", "group_size", "crossbatch_match_key",
                 "crossbatch_match_run", "crossbatch_distance"]
REJECT_COLUMNS = [
    "key", "url", "page_url", "alt_text", "drop_reason", "snapshot", "page_host", "image_host",
    "warc_file", "warc_offset",
]


def metadata(frame: pd.DataFrame) -> pd.DataFrame:
    return frame[[c for c in METADATA_COLUMNS if c in frame.columns]].reset_index(drop=True)


def rejects(frame: pd.DataFrame) -> pd.DataFrame:
    """The columns every rejects file has, whatever stage dropped the rows."""
    out = pd.DataFrame({c: frame[c] if c in frame.columns else pd.Series(pd.NA, index=frame.index, dtype="str")
                        for c in REJECT_COLUMNS})
    for c in SCORE_COLUMNS:
        if c in frame.columns:
            out[c] = frame[c]
    return out.reset_index(drop=True)


def _member(name: str, data: bytes) -> tuple[bytes, bytes, bytes]:
    """A ustar member (header, data, padding) with fixed metadata (mtime 0, mode 0444, no owner names), so
    re-runs write identical bytes."""
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode, info.uname, info.gname = len(data), 0, 0o444, "", ""
    padding = tarfile.NUL * (-len(data) % tarfile.BLOCKSIZE)
    return info.tobuf(tarfile.USTAR_FORMAT, "utf-8", "surrogateescape"), data, padding


def _json_value(v):
    if isinstance(v, float) and v != v:
        return None
    if hasattr(v, "item"):
        return v.item()
    return None if v is pd.NA else v


def write_webdataset(frame: pd.DataFrame, tar_path: Path, image_of: Callable[[str], bytes] | None = None) -> int:
    """One tar shard: per sample the JPEG, the caption and the metadata as JSON; returns samples written.

    Image bytes come from the frame's `image` column, or from `image_of(key)` one sample at a time. The archive
    is what tarfile writes in ustar format, built here and written one sample at a time: tarfile's addfile
    copies each member in 16 KiB writes, about a third slower (1.15 s against 0.82 s for 7,709 samples).
    """
    meta = metadata(frame)
    images = frame["image"].tolist() if image_of is None else None
    with open(tar_path, "wb") as fh:
        for i, row in enumerate(meta.to_dict("records")):
            key = row["key"]
            record = {k: _json_value(v) for k, v in row.items()}
            image = bytes(images[i] if images is not None else image_of(key))
            fh.write(sample_bytes(key, image, row["caption"], record))
        fh.write(end_of_archive(fh.tell()))
    return len(meta)


def sample_bytes(key: str, image: bytes, caption: str, record: dict, extra: dict[str, bytes] | None = None) -> bytes:
    """One webdataset sample as tar members: `<key>.jpg`, `<key>.txt`, `<key>.json`, then `<key>.<name>` for each
    extra member (a release's `recaption.txt`)."""
    parts = [
        *_member(f"{key}.jpg", image),
        *_member(f"{key}.txt", caption.encode("utf-8")),
        *_member(f"{key}.json", json.dumps(record, ensure_ascii=False, sort_keys=True).encode("utf-8")),
    ]
    for name, data in (extra or {}).items():
        parts += _member(f"{key}.{name}", data)
    return b"".join(parts)


def end_of_archive(position: int) -> bytes:
    """tarfile's end of archive after `position` bytes of members, padded to a whole record."""
    end = tarfile.NUL * (2 * tarfile.BLOCKSIZE)
    return end + tarfile.NUL * (-(position + len(end)) % tarfile.RECORDSIZE)

"""Shard storage: atomic writes (temp name, rename), completion markers, stable hashes."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq


def stable_hash(obj) -> str:
    """sha256 of a JSON rendering with sorted keys: equal configs and inputs give equal hashes."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def _tmp(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def write_parquet(frame: pd.DataFrame, path: Path, compression: str = "zstd") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp(path)
    pq.write_table(_arrow(frame.reset_index(drop=True)), tmp, compression=compression)
    os.replace(tmp, path)


def _arrow(frame: pd.DataFrame) -> pa.Table:
    """The frame as Arrow; a column of equal-length numpy vectors becomes one fixed-size list array (pyarrow
    would otherwise convert it element by element: seconds per shard of embeddings)."""
    vectors = {}
    for col in frame.columns:
        values = frame[col].to_numpy()
        if frame[col].dtype == object and len(values) and all(isinstance(v, np.ndarray) for v in values):
            try:
                mat = np.stack(values)
            except ValueError:  # ragged: leave it to pyarrow
                continue
            if mat.ndim == 2 and mat.shape[1] > 0:
                vectors[col] = pa.FixedSizeListArray.from_arrays(pa.array(mat.ravel()), mat.shape[1])
    table = pa.Table.from_pandas(frame.drop(columns=list(vectors)), preserve_index=False)
    for col, arr in vectors.items():
        table = table.append_column(col, arr)
    return table.select(list(frame.columns))


def write_blobs(keys: list[str], blobs: list[bytes], path: Path) -> Path:
    """key -> bytes as one flat file plus a parquet index (key, offset, length); returns the index path.

    Image bytes neither compress nor need columnar access: a flat file writes and reads at disk speed,
    where building an Arrow binary column costs more than decoding the images.
    """
    index = path.with_name(path.name + ".idx.parquet")
    offsets, pos = [], 0
    for b in blobs:
        offsets.append(pos)
        pos += len(b)

    def dump(tmp: Path) -> None:
        with open(tmp, "wb") as fh:
            for b in blobs:
                fh.write(b)

    write_with(path, dump)
    frame = pd.DataFrame({"key": pd.Series(keys, dtype="str"), "offset": pd.Series(offsets, dtype="int64"),
                          "length": pd.Series([len(b) for b in blobs], dtype="int64")})
    write_parquet(frame, index)
    return index


class BlobReader:
    """Lazy key -> bytes over a write_blobs file: one positioned read per lookup.

    pread copies straight from the page cache; slicing an mmap costs a page fault per 4 KB on first touch.
    """

    def __init__(self, path: Path):
        index = pd.read_parquet(path.with_name(path.name + ".idx.parquet"))
        self._where = dict(zip(index["key"], zip(index["offset"], index["length"], strict=True), strict=True))
        self._fd = os.open(path, os.O_RDONLY)

    def __getitem__(self, key: str) -> bytes:
        offset, length = self._where[key]
        data = os.pread(self._fd, length, offset)
        if len(data) != length:
            raise OSError(f"blob {key} truncated: {len(data)} of {length} bytes")
        return data

    def close(self) -> None:
        os.close(self._fd)

    def __enter__(self) -> BlobReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def write_json(obj, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp(path)
    tmp.write_text(json.dumps(obj, sort_keys=True, indent=1, ensure_ascii=False, default=str))
    os.replace(tmp, path)


def write_with(path: Path, writer) -> None:
    """Run `writer(tmp_path)` then rename into place, so readers never see a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp(path)
    writer(tmp)
    os.replace(tmp, path)


def read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, ValueError):
        return None


def read_parquet(path: Path, columns: list[str] | None = None) -> pd.DataFrame:
    return pd.read_parquet(path, columns=columns)


def file_identity(path: str) -> dict:
    """What identifies an input file cheaply: its path, size and modification time; a URL by itself (Common
    Crawl's files never change once published)."""
    if "://" in path:
        return {"url": path}
    st = os.stat(path)
    return {"path": os.path.abspath(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns}

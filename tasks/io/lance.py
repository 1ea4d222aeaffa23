"""LanceDB: one embeddings table per model under <out>/lancedb, written by a single writer."""

from __future__ import annotations

import re

import numpy as np
import pandas as pd
import pyarrow as pa

# An unenforced primary key makes concurrent upserts of the same ids conflict (and retry) instead of
# silently duplicating rows (STACK.md); the flow still keeps one writer per table.
_PK = {"lance-schema:unenforced-primary-key": "true"}


def table_name(model_name: str, dim: int) -> str:
    """A table per model and dimension: vectors of different models are never compared."""
    base = model_name.rstrip("/").rsplit("/", 1)[-1] if model_name.startswith("/") else model_name
    slug = re.sub(r"[^A-Za-z0-9]+", "_", base).strip("_").lower()
    return f"embed_{slug}_{dim}"


def _schema(dim: int) -> pa.Schema:
    return pa.schema([
        pa.field("row_id", pa.string(), nullable=False, metadata=_PK),  # "<run_id>/<key>"
        pa.field("key", pa.string(), nullable=False),
        pa.field("run_id", pa.string(), nullable=False),
        pa.field("snapshot", pa.string()),
        pa.field("sha256", pa.string()),
        pa.field("model", pa.string()),
        pa.field("committed", pa.bool_()),  # set once the run that wrote the row has finished (cross-batch)
        pa.field("vector", pa.list_(pa.float32(), dim)),
    ])


def upsert_embeddings(uri: str, model_name: str, run_id: str, snapshot: str, vectors: pd.DataFrame) -> str:
    """Insert or update one shard's vectors (idempotent on run id + key); returns the table name.

    A `snapshot` column in `vectors` (the crawl each row came from) wins over the `snapshot` argument.
    """
    import lancedb

    dim = len(vectors["vector"].iloc[0]) if len(vectors) else 0
    if dim == 0:
        return ""
    name = table_name(model_name, dim)
    schema = _schema(dim)
    db = lancedb.connect(uri)
    table = db.create_table(name, schema=schema, exist_ok=True)
    data = pa.table({
        "row_id": [f"{run_id}/{k}" for k in vectors["key"]],
        "key": vectors["key"].astype(str).tolist(),
        "run_id": [run_id] * len(vectors),
        "snapshot": vectors["snapshot"].astype(str).tolist() if "snapshot" in vectors else [snapshot] * len(vectors),
        "sha256": vectors["sha256"].astype(str).tolist(),
        "model": [model_name] * len(vectors),
        "committed": [False] * len(vectors),
        "vector": pa.FixedSizeListArray.from_arrays(
            pa.array(np.concatenate([np.asarray(v, np.float32) for v in vectors["vector"]])), dim
        ),
    }).cast(schema)
    table.merge_insert("row_id").when_matched_update_all().when_not_matched_insert_all().execute(data)
    return name

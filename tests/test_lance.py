"""Tests for tasks.io.lance: idempotent upserts per run and one table per model."""

from __future__ import annotations

import lancedb
import numpy as np
import pandas as pd

from tasks.io.lance import table_name, upsert_embeddings


def _vectors(keys: list[str], seed: int = 0, dim: int = 8) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    vecs = rng.normal(size=(len(keys), dim)).astype(np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    return pd.DataFrame({"key": keys, "vector": list(vecs), "sha256": [f"{i:064x}" for i in range(len(keys))]})


def _rows(uri: str, name: str) -> pd.DataFrame:
    import lancedb

    return lancedb.connect(uri).open_table(name).to_arrow().to_pandas()


def test_table_name_per_model_and_dimension():
    paper = table_name("OFA-Sys/chinese-clip-vit-large-patch14", 768)
    assert paper == "embed_ofa_sys_chinese_clip_vit_large_patch14_768"
    assert table_name("google/siglip2-base-patch16-256", 768) != table_name("google/siglip2-base-patch16-256", 512)
    assert table_name("/models/siglip2-base/", 768) == "embed_siglip2_base_768"  # a local directory: its name
    assert table_name("placeholder", 256) == "embed_placeholder_256"


def test_upserting_the_same_shard_twice_leaves_no_duplicates(tmp_path):
    uri = str(tmp_path / "lancedb")
    first = _vectors(["a", "b", "c"], seed=0)
    name = upsert_embeddings(uri, "placeholder", "run-1", "CC-MAIN-2099-01", first)
    again = _vectors(["a", "b", "c"], seed=1)  # a retried shard: same keys, recomputed vectors
    assert upsert_embeddings(uri, "placeholder", "run-1", "CC-MAIN-2099-01", again) == name
    rows = _rows(uri, name).sort_values("key")
    assert rows["row_id"].tolist() == ["run-1/a", "run-1/b", "run-1/c"]
    assert np.allclose(np.stack(rows["vector"].to_list()), np.stack(again["vector"].to_list()))  # updated
    assert not rows["committed"].any()


def test_two_runs_keep_their_own_rows(tmp_path):
    uri = str(tmp_path / "lancedb")
    name = upsert_embeddings(uri, "placeholder", "run-1", "S1", _vectors(["a", "b"]))
    upsert_embeddings(uri, "placeholder", "run-2", "S2", _vectors(["a", "z"]))
    rows = _rows(uri, name)
    assert sorted(rows["row_id"]) == ["run-1/a", "run-1/b", "run-2/a", "run-2/z"]
    assert dict(zip(rows["row_id"], rows["snapshot"], strict=True))["run-2/a"] == "S2"


def test_an_empty_shard_writes_nothing(tmp_path):
    uri = str(tmp_path / "lancedb")
    empty = pd.DataFrame({"key": [], "vector": [], "sha256": []})
    assert upsert_embeddings(uri, "placeholder", "run-1", "S", empty) == ""


def test_a_snapshot_column_wins_over_the_argument(tmp_path):
    uri = str(tmp_path / "lancedb")
    vectors = _vectors(["a", "b"])
    vectors["snapshot"] = ["CC-MAIN-2024-10", "CC-MAIN-2024-18"]
    name = upsert_embeddings(uri, "placeholder", "run-1", "fallback", vectors)
    rows = lancedb.connect(uri).open_table(name).to_pandas().sort_values("key")
    assert rows["snapshot"].tolist() == ["CC-MAIN-2024-10", "CC-MAIN-2024-18"]

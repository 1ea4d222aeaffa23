"""Tests for tasks.io.lance: idempotent upserts per run, one table per model, the commit register, the search."""

from __future__ import annotations

import lancedb
import numpy as np
import pandas as pd
import pytest

from tasks.io.lance import (
    SearchConfig,
    TableMismatch,
    commit_run,
    earlier_runs,
    ensure_index,
    open_embeddings,
    search_committed,
    table_name,
    upsert_embeddings,
)

PH = {"name": "placeholder", "revision": "v1", "dim": 8}


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
    name = upsert_embeddings(uri, PH, "run-1", "CC-MAIN-2099-01", first)
    again = _vectors(["a", "b", "c"], seed=1)  # a retried shard: same keys, recomputed vectors
    assert upsert_embeddings(uri, PH, "run-1", "CC-MAIN-2099-01", again) == name
    rows = _rows(uri, name).sort_values("key")
    assert rows["row_id"].tolist() == ["run-1/a", "run-1/b", "run-1/c"]
    assert np.allclose(np.stack(rows["vector"].to_list()), np.stack(again["vector"].to_list()))  # updated
    assert not rows["committed"].any()


def test_two_runs_keep_their_own_rows(tmp_path):
    uri = str(tmp_path / "lancedb")
    name = upsert_embeddings(uri, PH, "run-1", "S1", _vectors(["a", "b"]))
    upsert_embeddings(uri, PH, "run-2", "S2", _vectors(["a", "z"]))
    rows = _rows(uri, name)
    assert sorted(rows["row_id"]) == ["run-1/a", "run-1/b", "run-2/a", "run-2/z"]
    assert dict(zip(rows["row_id"], rows["snapshot"], strict=True))["run-2/a"] == "S2"


def test_an_empty_shard_writes_nothing(tmp_path):
    uri = str(tmp_path / "lancedb")
    empty = pd.DataFrame({"key": [], "vector": [], "sha256": []})
    assert upsert_embeddings(uri, PH, "run-1", "S", empty) == ""


def test_a_snapshot_column_wins_over_the_argument(tmp_path):
    uri = str(tmp_path / "lancedb")
    vectors = _vectors(["a", "b"])
    vectors["snapshot"] = ["CC-MAIN-2024-10", "CC-MAIN-2024-18"]
    name = upsert_embeddings(uri, PH, "run-1", "fallback", vectors)
    rows = lancedb.connect(uri).open_table(name).to_pandas().sort_values("key")
    assert rows["snapshot"].tolist() == ["CC-MAIN-2024-10", "CC-MAIN-2024-18"]


def test_a_table_of_another_model_revision_or_dimension_is_refused(tmp_path):
    uri = str(tmp_path / "lancedb")
    upsert_embeddings(uri, PH, "run-1", "S", _vectors(["a"]))
    with pytest.raises(TableMismatch, match="revision=v1.*revision=v2"):
        upsert_embeddings(uri, {**PH, "revision": "v2"}, "run-2", "S", _vectors(["b"]))
    with pytest.raises(TableMismatch, match="dimension 4"):
        upsert_embeddings(uri, PH, "run-2", "S", _vectors(["b"], dim=4))
    assert _rows(uri, "embed_placeholder_8")["row_id"].tolist() == ["run-1/a"]  # nothing mixed in


def _upsert_in_process(uri: str, seed: int) -> None:
    upsert_embeddings(uri, PH, "run-1", "S", _vectors([f"k{i}" for i in range(200)], seed=seed))


def test_two_processes_upserting_the_same_rows_at_once_never_duplicate_them(tmp_path):
    import multiprocessing as mp

    uri = str(tmp_path / "lancedb")
    open_embeddings(uri, PH)  # the table exists; both writers race on the same new ids
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_upsert_in_process, args=(uri, seed)) for seed in (1, 2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0]
    rows = _rows(uri, "embed_placeholder_8")
    assert len(rows) == 200 and rows["row_id"].is_unique


def test_commit_marks_only_kept_rows_and_registers_the_run_once(tmp_path):
    uri = str(tmp_path / "lancedb")
    name = upsert_embeddings(uri, PH, "run-1", "S1", _vectors(["a", "b", "c"]))
    first = commit_run(uri, name, "run-1", "S1", ["a", "c"])
    assert first["seq"] == 1 and first["new"]
    again = commit_run(uri, name, "run-1", "S1", ["a", "c"])  # a re-run after a kill commits nothing twice
    assert again == {**first, "new": False}
    rows = _rows(uri, name).set_index("key")
    assert rows["committed"].to_dict() == {"a": True, "b": False, "c": True}
    assert lancedb.connect(uri).open_table("runs").count_rows() == 1


def test_earlier_runs_are_those_committed_before_in_commit_order(tmp_path):
    uri = str(tmp_path / "lancedb")
    assert earlier_runs(uri, "x") == []
    for run in ("run-1", "run-2"):
        name = upsert_embeddings(uri, PH, run, "S", _vectors(["a"]))
        commit_run(uri, name, run, "S", ["a"])
    upsert_embeddings(uri, PH, "run-3", "S", _vectors(["a"]))  # unfinished: never compared against
    assert [r["run_id"] for r in earlier_runs(uri, "run-3")] == ["run-1", "run-2"]
    assert [r["run_id"] for r in earlier_runs(uri, "run-2")] == ["run-1"]  # a re-run of run-2 ignores later runs
    assert earlier_runs(uri, "run-1") == []


def _at_distance(base: np.ndarray, distance: float, rng) -> np.ndarray:
    """A unit vector at exactly `distance` (1 - cos) from the unit vector `base`."""
    noise = rng.normal(size=base.shape)
    noise -= (noise @ base) * base
    noise /= np.linalg.norm(noise)
    cos = 1.0 - distance
    return (cos * base + np.sqrt(1 - cos**2) * noise).astype(np.float32)


@pytest.mark.parametrize("indexed", [False, True])
def test_search_finds_committed_rows_within_the_radius_only(tmp_path, indexed):
    rng = np.random.default_rng(3)
    uri = str(tmp_path / "lancedb")
    committed = _vectors([f"c{i}" for i in range(400)], seed=5, dim=8)
    name = upsert_embeddings(uri, PH, "run-1", "S", committed)
    commit_run(uri, name, "run-1", "S", [f"c{i}" for i in range(0, 400, 2)])  # odd rows: dropped by run-1
    vecs = np.stack(committed["vector"].to_list())
    queries = np.stack([_at_distance(vecs[0], 0.05, rng), _at_distance(vecs[2], 0.15, rng),
                        _at_distance(vecs[1], 0.01, rng), _at_distance(vecs[4], 0.0, rng)])
    config = SearchConfig(index_min_rows=256 if indexed else 10**9, nprobes=16, refine_factor=20, recall_sample=4)
    table = open_embeddings(uri, PH)
    assert ensure_index(table, config)["index"] == ("IVF_PQ" if indexed else None)
    (qi, keys, runs, dist), info = search_committed(table, queries, ["run-1"], config)
    # query 1 is beyond the radius; query 2 is next to a row run-1 dropped, which is never compared against
    assert qi.tolist() == [0, 3] and keys.tolist() == ["c0", "c4"] and set(runs) == {"run-1"}
    assert dist[0] == pytest.approx(0.05, abs=2e-3)
    assert info["method"] == ("ann" if indexed else "exact") and info["committed_rows"] == 200
    if indexed:
        assert info["pair_recall"] == 1.0
    assert search_committed(table, queries, [], config)[0][0].size == 0  # no earlier run: nothing to compare

"""Tests for tasks.io.lance: idempotent upserts per run, one table per model, the commit register, the index and
the nearest-committed-row searches."""

from __future__ import annotations

import lancedb
import numpy as np
import pandas as pd
import pytest
from unit_vectors import PH, at_distance, vectors_frame

from tasks.io.lance import (
    TableMismatch,
    commit_run,
    committed_filter,
    earlier_runs,
    ensure_index,
    is_indexed,
    nearest_indexed,
    nearest_scan,
    open_embeddings,
    table_name,
    upsert_embeddings,
)


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
    first = vectors_frame(["a", "b", "c"], seed=0)
    name = upsert_embeddings(uri, PH, "run-1", "CC-MAIN-2099-01", first)
    again = vectors_frame(["a", "b", "c"], seed=1)  # a retried shard: same keys, recomputed vectors
    assert upsert_embeddings(uri, PH, "run-1", "CC-MAIN-2099-01", again) == name
    rows = _rows(uri, name).sort_values("key")
    assert rows["row_id"].tolist() == ["run-1/a", "run-1/b", "run-1/c"]
    assert np.allclose(np.stack(rows["vector"].to_list()), np.stack(again["vector"].to_list()))  # updated
    assert not rows["committed"].any()


def test_two_runs_keep_their_own_rows(tmp_path):
    uri = str(tmp_path / "lancedb")
    name = upsert_embeddings(uri, PH, "run-1", "S1", vectors_frame(["a", "b"]))
    upsert_embeddings(uri, PH, "run-2", "S2", vectors_frame(["a", "z"]))
    rows = _rows(uri, name)
    assert sorted(rows["row_id"]) == ["run-1/a", "run-1/b", "run-2/a", "run-2/z"]
    assert dict(zip(rows["row_id"], rows["snapshot"], strict=True))["run-2/a"] == "S2"


def test_an_empty_shard_writes_nothing(tmp_path):
    uri = str(tmp_path / "lancedb")
    empty = pd.DataFrame({"key": [], "vector": [], "sha256": []})
    assert upsert_embeddings(uri, PH, "run-1", "S", empty) == ""


def test_a_snapshot_column_wins_over_the_argument(tmp_path):
    uri = str(tmp_path / "lancedb")
    vectors = vectors_frame(["a", "b"])
    vectors["snapshot"] = ["CC-MAIN-2024-10", "CC-MAIN-2024-18"]
    name = upsert_embeddings(uri, PH, "run-1", "fallback", vectors)
    rows = lancedb.connect(uri).open_table(name).to_pandas().sort_values("key")
    assert rows["snapshot"].tolist() == ["CC-MAIN-2024-10", "CC-MAIN-2024-18"]


def test_a_table_of_another_model_revision_or_dimension_is_refused(tmp_path):
    uri = str(tmp_path / "lancedb")
    upsert_embeddings(uri, PH, "run-1", "S", vectors_frame(["a"]))
    with pytest.raises(TableMismatch, match="revision=v1.*revision=v2"):
        upsert_embeddings(uri, {**PH, "revision": "v2"}, "run-2", "S", vectors_frame(["b"]))
    with pytest.raises(TableMismatch, match="dimension 4"):
        upsert_embeddings(uri, PH, "run-2", "S", vectors_frame(["b"], dim=4))
    assert _rows(uri, "embed_placeholder_8")["row_id"].tolist() == ["run-1/a"]  # nothing mixed in


def _upsert_in_process(uri: str, seed: int) -> None:
    upsert_embeddings(uri, PH, "run-1", "S", vectors_frame([f"k{i}" for i in range(200)], seed=seed))


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
    name = upsert_embeddings(uri, PH, "run-1", "S1", vectors_frame(["a", "b", "c"]))
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
        name = upsert_embeddings(uri, PH, run, "S", vectors_frame(["a"]))
        commit_run(uri, name, run, "S", ["a"])
    upsert_embeddings(uri, PH, "run-3", "S", vectors_frame(["a"]))  # unfinished: never compared against
    assert [r["run_id"] for r in earlier_runs(uri, "run-3")] == ["run-1", "run-2"]
    assert [r["run_id"] for r in earlier_runs(uri, "run-2")] == ["run-1"]  # a re-run of run-2 ignores later runs
    assert earlier_runs(uri, "run-1") == []


def test_the_index_is_built_once_the_table_holds_enough_rows(tmp_path):
    uri = str(tmp_path / "lancedb")
    upsert_embeddings(uri, PH, "run-1", "S", vectors_frame([f"c{i}" for i in range(300)]))
    table = open_embeddings(uri, PH)
    assert ensure_index(table, 1000) == {"index": None, "rows": 300} and not is_indexed(table)
    assert ensure_index(table, 256) == {"index": "IVF_PQ", "rows": 300} and is_indexed(table)


def test_nearest_searches_see_only_the_committed_rows_of_the_named_runs(tmp_path):
    rng = np.random.default_rng(1)
    uri = str(tmp_path / "lancedb")
    rows = vectors_frame([f"c{i}" for i in range(40)], seed=2)
    name = upsert_embeddings(uri, PH, "run-1", "S", rows)
    commit_run(uri, name, "run-1", "S", [f"c{i}" for i in range(0, 40, 2)])  # odd rows: dropped by run-1
    vecs = np.stack(rows["vector"].to_list())
    queries = np.stack([at_distance(vecs[0], 0.02, rng), vecs[1], at_distance(vecs[6], 0.3, rng)])
    table = open_embeddings(uri, PH)
    where = committed_filter(["run-1"])
    scan = nearest_scan(table, queries, where, block=7)  # blocks smaller than the table: the best of several
    flat = nearest_indexed(table, queries, where, nprobes=1, refine_factor=1, batch=2, exact=True)
    for qi, keys, runs, dist in (scan, flat):
        assert qi.tolist() == [0, 1, 2] and set(runs) == {"run-1"}
        assert keys[0] == "c0" and keys[1] != "c1" and int(keys[1][1:]) % 2 == 0  # c1 was never committed
        assert dist[0] == pytest.approx(0.02, abs=1e-3) and dist.dtype == np.float32
    assert scan[1].tolist() == flat[1].tolist() and np.allclose(scan[3], flat[3], atol=1e-4)
    assert nearest_scan(table, queries, committed_filter(["run-9"]), block=7)[0].size == 0  # no such run


def test_a_commit_streams_its_keys_and_the_indexed_search_sees_the_rows_it_committed(tmp_path):
    uri = str(tmp_path / "lancedb")
    first = vectors_frame([f"a{i}" for i in range(300)], seed=3)
    name = upsert_embeddings(uri, PH, "run-1", "S", first)
    commit_run(uri, name, "run-1", "S", [])
    second = vectors_frame([f"b{i}" for i in range(300)], seed=4)
    upsert_embeddings(uri, PH, "run-2", "S", second)
    table = open_embeddings(uri, PH)
    ensure_index(table, 256)  # the index covers run-2's rows before they are committed
    kept = (f"b{i}" for i in range(0, 300, 3))
    result = commit_run(uri, name, "run-2", "S", kept, chunk_rows=7)  # a generator, 7 keys a merge
    assert result == {"run_id": "run-2", "seq": 2, "rows": 100, "new": True}
    rows = _rows(uri, name)
    committed = set(rows.loc[rows["committed"], "row_id"])
    assert committed == {f"run-2/b{i}" for i in range(0, 300, 3)} and rows["row_id"].is_unique
    assert any(i.columns == ["row_id"] for i in table.list_indices())
    table.checkout_latest()
    vecs = np.stack(second["vector"].to_list())
    found = nearest_indexed(table, vecs[:6], committed_filter(["run-2"]), nprobes=32, refine_factor=20, batch=6)
    assert found[1].tolist()[::3] == ["b0", "b3"] and (found[3][::3] < 1e-4).all()


def test_a_commit_naming_a_row_without_an_embedding_registers_nothing(tmp_path):
    uri = str(tmp_path / "lancedb")
    name = upsert_embeddings(uri, PH, "run-1", "S", vectors_frame(["a", "b"]))
    with pytest.raises(RuntimeError, match="1 kept rows have no embedding"):
        commit_run(uri, name, "run-1", "S", iter(["a", "zz"]))
    assert earlier_runs(uri, "other") == []

"""Tests for tasks.crossbatch: rows matching committed rows of earlier runs are dropped, with the match recorded;
the search against those rows, its recall figure and the match frame it yields."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from unit_vectors import PH, at_distance, vectors_frame

from tasks.crossbatch import (
    CrossbatchConfig,
    Query,
    ann_recall,
    mark_crossbatch,
    match_frame,
    plan_queries,
    search_batch,
    search_committed,
)
from tasks.io.lance import commit_run, ensure_index, open_embeddings, upsert_embeddings
from tasks.io.shards import write_parquet


def test_matched_rows_are_dropped_and_say_what_they_repeat():
    frame = pd.DataFrame({"key": ["a", "b", "c"]})
    matches = pd.DataFrame({"key": ["b"], "match_key": ["x"], "match_run": ["run-1"], "match_distance": [0.03]})
    out = mark_crossbatch(frame, matches)
    assert out["drop_reason"].isna().tolist() == [True, False, True]
    assert out.loc[1, "drop_reason"] == "crossbatch.duplicate"
    assert out.loc[1, ["crossbatch_match_key", "crossbatch_match_run"]].tolist() == ["x", "run-1"]
    assert out.loc[1, "crossbatch_distance"] == 0.03 and out["crossbatch_distance"].isna().sum() == 2


def test_no_matches_keeps_everything():
    frame = pd.DataFrame({"key": ["a"]})
    empty = pd.DataFrame({"key": pd.Series([], dtype="str"), "match_key": pd.Series([], dtype="str"),
                          "match_run": pd.Series([], dtype="str"), "match_distance": pd.Series([], dtype="float64")})
    assert mark_crossbatch(frame, empty)["drop_reason"].isna().all()


def _found(qi, keys, runs, dist):
    return (np.array(qi, np.int64), np.array(keys, object), np.array(runs, object), np.array(dist, np.float32))


def test_the_match_frame_names_each_query_by_its_key():
    found = _found([0, 2], ["x", "y"], ["run-1", "run-2"], [0.03, 0.0])
    frame = match_frame(["a", "b", "c"], found)
    assert frame.to_dict("list") == {"key": ["a", "c"], "match_key": ["x", "y"], "match_run": ["run-1", "run-2"],
                                     "match_distance": [pytest.approx(0.03), 0.0]}
    assert frame.dtypes.astype(str).tolist() == ["str", "str", "str", "float64"]
    empty = match_frame(["a"], _found([], [], [], []))
    assert empty.empty and empty.dtypes.astype(str).tolist() == ["str", "str", "str", "float64"]
    assert mark_crossbatch(pd.DataFrame({"key": ["a", "c"]}), frame)["drop_reason"].notna().all()  # what it reads


def test_ann_recall_counts_the_exact_matches_within_the_radius_that_the_ann_search_found():
    sample = np.array([1, 4, 7, 9])  # query rows; the exact search ran on these four, indexed 0..3
    exact = _found([0, 1, 2, 3], ["p", "q", "r", "s"], ["run-1"] * 4, [0.02, 0.05, 0.08, 0.5])
    # row 1 found right; row 4 found, but a different row; row 7 missed; row 9 (beyond the radius) found right
    ann = _found([1, 4, 9], ["p", "z", "s"], ["run-1"] * 3, [0.02, 0.04, 0.5])
    figures = ann_recall(sample, exact, ann, threshold=0.1)
    assert figures == {"recall_sample": 4, "pair_recall": pytest.approx(1 / 3), "nearest_recall": 0.5}
    nothing_close = _found([0], ["p"], ["run-1"], [0.5])
    assert ann_recall(sample[:1], nothing_close, ann, 0.1)["pair_recall"] is None


def _run_1_committed(tmp_path, seed: int):
    """400 rows of run-1 in LanceDB, its even rows committed (the odd ones it dropped): the uri and the vectors."""
    uri = str(tmp_path / "lancedb")
    committed = vectors_frame([f"c{i}" for i in range(400)], seed=seed, dim=8)
    name = upsert_embeddings(uri, PH, "run-1", "S", committed)
    commit_run(uri, name, "run-1", "S", (f"c{i}" for i in range(0, 400, 2)))
    return uri, np.stack(committed["vector"].to_list())


@pytest.mark.parametrize("indexed", [False, True])
def test_search_finds_committed_rows_within_the_radius_only(tmp_path, indexed):
    rng = np.random.default_rng(3)
    uri, vecs = _run_1_committed(tmp_path, seed=5)
    queries = np.stack([at_distance(vecs[0], 0.05, rng), at_distance(vecs[2], 0.15, rng),
                        at_distance(vecs[1], 0.01, rng), at_distance(vecs[4], 0.0, rng)])
    config = CrossbatchConfig(index_min_rows=256 if indexed else 10**9, nprobes=16, refine_factor=20, recall_sample=4)
    table = open_embeddings(uri, PH)
    assert ensure_index(table, config.index_min_rows)["index"] == ("IVF_PQ" if indexed else None)
    (qi, keys, runs, dist), info = search_committed(table, queries, ["run-1"], 0.1, config)
    # query 1 is beyond the radius; query 2 is next to a row run-1 dropped, which is never compared against
    assert qi.tolist() == [0, 3] and keys.tolist() == ["c0", "c4"] and set(runs) == {"run-1"}
    assert dist[0] == pytest.approx(0.05, abs=2e-3)
    assert info["method"] == ("ann" if indexed else "exact") and info["committed_rows"] == 200
    if indexed:
        assert info["pair_recall"] == 1.0 and info["nprobes"] == 16 and info["refine_factor"] == 20
    wider = search_committed(table, queries, ["run-1"], 0.16, config)[0]  # the radius is the one given
    assert {0, 1, 3} <= set(wider[0].tolist())  # query 1, at 0.15 from c2, is within it now
    assert search_committed(table, queries, [], 0.1, config)[0][0].size == 0  # no earlier run: nothing to compare
    none = search_committed(None, queries, ["run-1"], 0.1, config)  # no embeddings table yet
    assert none[0][0].size == 0 and none[1] == {"method": "none", "committed_rows": 0}


def _batch(folder, queries: np.ndarray, sizes: list[int]) -> list[Query]:
    """The queries as shards: survivors files (every other key: the rest were dropped before crossbatch) and the
    embed step's vectors files, holding the dropped rows too."""
    shards, at = [], 0
    for k, size in enumerate(sizes):
        keys = [f"q{i}" for i in range(at, at + size)]
        vectors = pd.DataFrame({"key": keys + [f"x{k}"], "sha256": ["0" * 64] * (size + 1),
                                "vector": list(queries[at:at + size]) + [queries[0]]})  # x<k> is not a survivor
        write_parquet(vectors, folder / f"{k:05d}.vectors.parquet")
        write_parquet(pd.DataFrame({"key": keys}), folder / f"{k:05d}.parquet")
        shards.append(Query(f"{k:05d}", str(folder / f"{k:05d}.parquet"), str(folder / f"{k:05d}.vectors.parquet"),
                            size))
        at += size
    return shards


@pytest.mark.parametrize("indexed", [False, True])
def test_a_batch_searched_in_several_tasks_finds_what_one_search_finds(tmp_path, indexed):
    rng = np.random.default_rng(4)
    uri, vecs = _run_1_committed(tmp_path, seed=6)
    queries = np.stack([at_distance(vecs[rng.integers(400)], d, rng) for d in rng.uniform(0, 0.2, 60)])
    config = CrossbatchConfig(index_min_rows=256 if indexed else 10**9, nprobes=16, refine_factor=20,
                              recall_sample=30, chunk_rows=15)
    table = open_embeddings(uri, PH)
    ensure_index(table, config.index_min_rows)
    want, want_info = search_committed(table, queries, ["run-1"], 0.1, config)
    shards = _batch(tmp_path, queries, [10, 0, 5, 25, 20])  # an empty shard among them
    assert [[q.shard for q in c] for c in plan_queries(shards, 15)] == [["00000", "00001", "00002"], ["00003"],
                                                                        ["00004"]]
    out = tmp_path / "matches"
    info = search_batch(uri, PH, shards, ["run-1"], 0.1, config, out)
    got = pd.concat([pd.read_parquet(out / f"{q.shard}.parquet").assign(shard=q.shard) for q in shards])
    expected = match_frame([f"q{i}" for i in range(60)], want)
    assert sorted(got["key"]) == sorted(expected["key"]) and len(got) > 5
    assert got.set_index("key")["match_key"].to_dict() == expected.set_index("key")["match_key"].to_dict()
    shard_of = {f"q{i}": f"{k:05d}" for k, (a, b) in enumerate([(0, 10), (10, 10), (10, 15), (15, 40), (40, 60)])
                for i in range(a, b)}
    assert all(shard_of[k] == s for k, s in zip(got["key"], got["shard"], strict=True))  # each in its own file
    assert info["queries"] == 60 and info["matches"] == len(got) and info["tasks"] == 3
    assert info["method"] == want_info["method"] and info["committed_rows"] == 200
    if indexed:
        assert info["recall_sample"] == 30 and info["pair_recall"] == 1.0
    nothing = search_batch(uri, PH, shards, [], 0.1, config, out)  # no earlier run: empty files, no search
    assert nothing["method"] == "none" and nothing["matches"] == 0
    assert all(pd.read_parquet(out / f"{q.shard}.parquet").empty for q in shards)

"""The pure functions the step wrappers call for their reduces and stats, on frames of a few rows."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from tasks import align, crossbatch, dedup, embed, fetch, refine, source
from tasks.io import replay


def test_word_count_hist_counts_chinese_captions_only_and_clips_the_last_bin():
    frame = pd.DataFrame({"word_count": [1, 1, 3, 250, 7],
                          "drop_reason": [pd.NA, "source.word_count", pd.NA, pd.NA, "source.caption_not_chinese"]})
    hist = source.word_count_hist(frame, top=5)
    assert hist == [0, 2, 0, 1, 0, 1]  # 250 words land in the last bin; the non-Chinese caption in none


def test_score_histogram_spans_the_band_when_it_reaches_past_the_scores():
    hist = align.score_histogram(np.array([0.25, 0.35, 0.35]), align.Band(0.0, 0.5, True, 3), bins=5)
    assert hist["edges"] == [0.0, 0.1, 0.2, 0.3, 0.4, 0.5]
    assert hist["counts"] == [0, 0, 1, 2, 0]
    empty = align.score_histogram(np.zeros(0), align.Band(-1.0, 1.0, True, 0), bins=2)
    assert empty == {"counts": [0, 0], "edges": [-1.0, 0.0, 1.0]}


def test_group_frame_names_each_row_by_its_groups_first_key():
    result = dedup.DedupResult(group=np.array([0, 0, 2]), group_size=np.array([2, 2, 1]),
                               keep=np.array([True, False, True]), distance_to_mean=np.array([0.1, 0.1, 0.0]),
                               pairs=1, stats={}, method="exact")
    frame = dedup.group_frame(["a", "b", "c"], ["00000", "00001", "00001"], result)
    assert frame["group_key"].tolist() == ["a", "a", "c"]
    assert frame["shard"].tolist() == ["00000", "00001", "00001"]
    assert frame["keep"].tolist() == [True, False, True] and frame["group_size"].dtype == "int64"
    assert dedup.group_frame([], [], dedup.DedupResult(np.zeros(0, int), np.zeros(0, int), np.zeros(0, bool),
                                                       np.zeros(0), 0, {}, "exact")).empty


def test_cluster_sizes_add_up_to_the_rows_and_come_largest_first():
    rng = np.random.default_rng(1)
    centres = np.eye(8)[:3]
    sizes_in = (30, 20, 10)
    vectors = np.concatenate([c + 0.01 * rng.standard_normal((n, 8)) for c, n in zip(centres, sizes_in, strict=True)])
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    sizes = dedup.cluster_sizes(vectors.astype(np.float32), seed=0, clusters=3)
    assert sum(sizes) == 60 and sizes == sorted(sizes, reverse=True) and len(sizes) == 3
    assert dedup.cluster_sizes(vectors[:6].astype(np.float32), seed=0) == [6]  # fewer than 10 rows: one cluster
    assert dedup.cluster_sizes(np.zeros((0, 8), np.float32), seed=0) == []


def test_jsonable_turns_numpy_scalars_and_tuples_into_json_values():
    out = dedup.jsonable({1: np.int64(3), "g": [(np.int32(4), np.float32(0.5))]})
    assert out == {"1": 3, "g": [[4, 0.5]]} and type(out["1"]) is int


def test_corpus_table_counts_words_over_shards_and_round_trips():
    frames = [pd.DataFrame({"alt_norm": ["湖面 湖面"]}), pd.DataFrame({"alt_norm": ["湖面"]})]
    table = refine.corpus_table(frames)
    counts = dict(zip(table["word"], table["count"], strict=True))
    assert counts["湖面"] == 3 and table["word"].tolist() == sorted(table["word"])
    corpus = refine.corpus_from_table(table, "run")
    assert corpus.freq["湖面"] == 3 and corpus.total == int(table["count"].sum()) and corpus.name == "run"


def test_merge_indexes_keeps_the_first_capture_of_each_url():
    a = pd.DataFrame({"url": ["u1", "u2"], "warc_file": ["a", "a"], "offset": [0, 10], "status": [200, 200]})
    b = pd.DataFrame({"url": ["u2", "u3"], "warc_file": ["b", "b"], "offset": [5, 6], "status": [404, 200]})
    merged = replay.merge_indexes([a, b])
    assert merged["url"].tolist() == ["u1", "u2", "u3"] and merged["warc_file"].tolist() == ["a", "a", "b"]
    assert replay.merge_indexes([]).columns.tolist() == ["url", "warc_file", "offset", "status"]


def test_stack_vectors_in_file_order_with_an_optional_key_filter(tmp_path):
    paths = []
    for i, (keys, rows) in enumerate([(["a", "b"], [[1.0, 0.0], [0.0, 1.0]]), ([], []), (["c"], [[0.6, 0.8]])]):
        path = tmp_path / f"{i}.parquet"
        pq.write_table(pa.table({"key": pa.array(keys, pa.string()),
                                 "vector": pa.array(rows, pa.list_(pa.float32(), 2))}), path)
        paths.append((f"{i:05d}", str(path)))
    keys, shard_of, matrix = embed.stack_vectors(paths)
    assert keys == ["a", "b", "c"] and shard_of == ["00000", "00000", "00002"]
    assert matrix.dtype == np.float32 and matrix.tolist() == [[1.0, 0.0], [0.0, 1.0], [0.6000000238418579,
                                                                                      0.800000011920929]]
    keys, shard_of, matrix = embed.stack_vectors(paths, {"b", "c"})
    assert keys == ["b", "c"] and matrix.shape == (2, 2)


def test_ledger_stats_count_this_attempts_requests_and_the_transient_failures_left():
    ledger = pd.DataFrame({"attempts": [1, 3, 1], "transient": [False, True, True],
                           "reason": [pd.NA, "fetch.http_error", pd.NA]})
    assert fetch.ledger_stats(ledger) == {"requests": 5, "transient_failures": 1}
    earlier = fetch.Previous(ledger.assign(attempts=[1, 2, 1]), lambda url: None)
    assert fetch.ledger_stats(ledger, earlier)["requests"] == 1


def test_match_frame_names_each_matched_query_by_key():
    found = (np.array([1]), np.array(["old"], object), np.array(["run-a"], object), np.array([0.05], np.float32))
    frame = crossbatch.match_frame(["q0", "q1"], found)
    assert frame.to_dict("records") == [{"key": "q1", "match_key": "old", "match_run": "run-a",
                                         "match_distance": float(np.float32(0.05))}]
    assert crossbatch.match_frame([], (np.zeros(0, int), np.zeros(0, object), np.zeros(0, object),
                                       np.zeros(0))).empty

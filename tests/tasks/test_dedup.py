"""Tests for tasks.dedup: pairs at known cosine distances, union-find groups, keepers, exact against IVF."""

from __future__ import annotations

import time
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest

from tasks.dedup import (
    REASON,
    DedupConfig,
    _buckets,
    _links,
    _union,
    dedup,
    dedup_batch,
    find_cross_pairs,
    find_pairs,
    first_copies,
    group_frame,
    keepers,
    kmeans,
    pair_recall,
    union_find,
)
from tasks.io.shards import write_parquet

DIM = 32


def _basis(k: int, dim: int = DIM, seed: int = 0) -> np.ndarray:
    """k orthonormal rows: mutually at cosine distance exactly 1, so only what a test builds can link."""
    q, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((dim, k)))
    return q.T.copy()


def _at(base: np.ndarray, away: np.ndarray, distance: float) -> np.ndarray:
    """The unit vector at cosine distance `distance` from unit `base`, turned towards the orthogonal unit `away`."""
    cos = 1.0 - distance
    return cos * base + np.sqrt(1.0 - cos**2) * away


def _f32(rows) -> np.ndarray:
    return np.asarray(rows, dtype=np.float32)


def _pairs(i, j) -> set[tuple[int, int]]:
    return set(zip(i.tolist(), j.tolist(), strict=True))


def _cone(n: int, dim: int = 128, seed: int = 0) -> tuple[np.ndarray, list[np.ndarray]]:
    """CLIP-like rows (an axis plus isotropic noise: random pairs at cosine ~0.5) with planted groups of 2-4.

    Members sit at distances 0.02-0.08 or 0.12-0.2 from their group's first row, clear of the 0.1 cut.
    """
    rng = np.random.default_rng(seed)
    axis = rng.standard_normal(dim)
    x = axis / np.linalg.norm(axis) + rng.standard_normal((n, dim)) / np.sqrt(dim)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    rows = rng.permutation(n)
    groups, at = [], 0
    while at < n // 5:
        g = rows[at : at + rng.integers(2, 5)]
        at += len(g)
        groups.append(g)
        for m in g[1:]:
            h = rng.standard_normal(dim)
            h -= (h @ x[g[0]]) * x[g[0]]
            d = rng.uniform(0.02, 0.08) if rng.random() < 0.6 else rng.uniform(0.12, 0.2)
            x[m] = _at(x[g[0]], h / np.linalg.norm(h), d)
    return _f32(x), groups


def test_exact_duplicates_form_one_group_that_keeps_its_first_row():
    e = _basis(3)
    v = _f32([e[0], e[1], e[0], e[2], e[0]])
    i, j, d = find_pairs(v)
    assert _pairs(i, j) == {(0, 2), (0, 4), (2, 4)}
    assert np.allclose(d, 0.0, atol=1e-6)
    r = dedup(v)
    assert r.group.tolist() == [0, 1, 0, 3, 0] and r.group_size.tolist() == [3, 1, 3, 1, 3]
    assert r.keep.tolist() == [True, True, False, True, False]  # all tie: the lowest row wins
    assert r.pairs == 3 and r.method == "exact"
    assert r.stats["duplicates_dropped"] == 2 and r.stats["group_size_hist"] == {3: 1}
    assert REASON == "image.duplicate"


def test_the_cut_is_strict_and_the_distances_are_the_built_ones():
    built = [0.0, 0.02, 0.05, 0.0995, 0.1005, 0.15, 0.5]  # each against its own base, far from the rest
    e = _basis(2 * len(built))
    rows = []
    for k, d in enumerate(built):
        rows += [e[k], _at(e[k], e[len(built) + k], d)]
    v = _f32(rows)
    i, j, d = find_pairs(v)
    linked = {k for k, dist in enumerate(built) if dist < 0.1}
    assert _pairs(i, j) == {(2 * k, 2 * k + 1) for k in linked}
    assert np.allclose(d, [built[k] for k in sorted(linked)], atol=1e-6)
    assert dedup(v).stats["groups"] == len(linked)
    wider = find_pairs(v, DedupConfig(threshold=0.2))
    assert _pairs(*wider[:2]) == {(2 * k, 2 * k + 1) for k, dist in enumerate(built) if dist < 0.2}


def test_a_chain_is_one_group_and_keeps_its_middle():
    e = _basis(3)
    theta = np.arccos(0.94)  # a-b and b-c at distance 0.06; a-c at 1 - cos(2 theta) = 0.233, not linked
    a, b, c = e[0], np.cos(theta) * e[0] + np.sin(theta) * e[1], np.cos(2 * theta) * e[0] + np.sin(2 * theta) * e[1]
    v = _f32([a, c, e[2], b])  # the middle one last: it must win on distance, not on index
    i, j, d = find_pairs(v)
    assert _pairs(i, j) == {(0, 3), (1, 3)} and np.allclose(d, 0.06, atol=1e-6)
    r = dedup(v)
    assert r.group.tolist() == [0, 0, 2, 0] and r.group_size.tolist() == [3, 3, 1, 3]
    assert r.keep.tolist() == [False, False, True, True]
    assert r.distance_to_mean[3] == pytest.approx(0.0, abs=1e-6)
    assert r.distance_to_mean[0] == pytest.approx(r.distance_to_mean[1], abs=1e-6)
    assert r.distance_to_mean[0] > 0.01


def test_a_two_member_group_keeps_its_lower_row_whichever_side_is_built_from_which():
    rng = np.random.default_rng(1)
    n = 40
    e = _basis(2 * n, dim=2 * n)
    rows = np.empty((2 * n, 2 * n))
    for k in range(n):  # pairs placed at (k, 2n-1-k), the base at the low row for half of them
        lo, hi = k, 2 * n - 1 - k
        base, other = (lo, hi) if k % 2 else (hi, lo)
        rows[base] = e[k]
        rows[other] = _at(e[k], e[n + k], rng.uniform(0.0, 0.099))
    r = dedup(_f32(rows))
    assert r.stats["group_size_hist"] == {2: n}
    assert r.keep.tolist() == [True] * n + [False] * n  # both equally far from the mean: the earlier row
    assert np.allclose(r.distance_to_mean[:n], r.distance_to_mean[::-1][:n], atol=1e-6)


def test_singletons_are_kept_at_distance_zero():
    v = _f32(_basis(5))
    r = dedup(v)
    assert r.keep.all() and r.group.tolist() == list(range(5)) and (r.group_size == 1).all()
    assert (r.distance_to_mean == 0).all() and r.pairs == 0
    assert r.stats == {
        "group_size_hist": {},
        "groups": 0,
        "rows_in_groups": 0,
        "duplicates_dropped": 0,
        "largest_group": 1,
        "giant_groups": [],
    }


def test_keepers_take_any_labels_and_any_window_size():
    rng = np.random.default_rng(2)
    v = _f32(rng.standard_normal((300, 16)))
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    labels = rng.integers(0, 40, 300) * 7 - 50  # negative, sparse labels; one group larger than a window
    labels[:60] = 999
    want_keep, want_dist = keepers(v, labels, block_rows=100_000)
    for block in (1, 3, 17, 64):
        keep, dist = keepers(v, labels, block_rows=block)
        assert (keep == want_keep).all() and np.allclose(dist, want_dist, atol=1e-6)
    for g in np.unique(labels):  # against a direct computation, group by group
        rows = np.flatnonzero(labels == g)
        mean = v[rows].astype(np.float64).sum(0)
        d = 1 - v[rows] @ (mean / np.linalg.norm(mean))
        assert np.allclose(want_dist[rows], d, atol=1e-5)
        assert want_keep[rows].sum() == 1 and want_keep[rows[np.argmin(d)]]


def test_ivf_finds_the_same_pairs_and_groups_as_exact_search():
    v, planted = _cone(3000)
    exact = dedup(v, DedupConfig(), keep_links=True)
    ivf = dedup(v, DedupConfig(exact_max_rows=0), keep_links=True)
    assert exact.method == "exact" and ivf.method == "ivf"
    assert ivf.partitions == 164 and ivf.nprobes == 24  # 3 sqrt(n) lists, 15% of them searched
    assert exact.pairs == ivf.pairs > 250
    assert all(np.array_equal(a, b) for a, b in zip(exact.links[:2], ivf.links[:2], strict=True))
    assert np.allclose(exact.links[2], ivf.links[2], atol=1e-6)
    assert (exact.group == ivf.group).all() and (exact.keep == ivf.keep).all()
    assert exact.stats == ivf.stats
    assert 0 < exact.stats["groups"] <= len(planted)
    assert pair_recall(v, DedupConfig(), sample_rows=1000) == 1.0


def test_ivf_reads_a_memmap_and_buckets_rows_by_list_in_blocks(tmp_path):
    v, _ = _cone(2500, seed=7)
    path = tmp_path / "vectors.f32"
    v.tofile(path)
    config = DedupConfig(exact_max_rows=0, block_rows=300)
    mapped = dedup(np.memmap(path, np.float32, "r", shape=v.shape), config)
    in_memory = dedup(v, config)
    assert mapped.method == "ivf" and mapped.pairs == in_memory.pairs > 0
    assert (mapped.group == in_memory.group).all() and (mapped.keep == in_memory.keep).all()
    labels = np.random.default_rng(0).integers(0, 50, (1000, 3))
    rows, bounds = _buckets(labels, 53, block_rows=7)
    want = np.argsort(labels.ravel(), kind="stable") // 3
    assert rows.dtype == np.int32 and (rows == want).all()
    assert (np.diff(bounds) == np.bincount(labels.ravel(), minlength=53)).all()


def test_pair_recall_is_the_share_of_exact_pairs_the_ivf_search_finds():
    v, _ = _cone(3000, seed=5)
    weak = DedupConfig(exact_max_rows=0, partitions=100, nprobes=1, train_iters=1)
    i, j, _ = find_pairs(v, weak)
    ei, ej, _ = find_pairs(v)
    found = len(_pairs(i, j) & _pairs(ei, ej)) / len(ei)
    assert _pairs(i, j) <= _pairs(ei, ej)  # the IVF verifies every candidate: it may miss, never invent
    assert 0.3 < found < 1.0
    assert pair_recall(v, weak, sample_rows=len(v)) == pytest.approx(found)
    assert pair_recall(v, replace(weak, nprobes=100), sample_rows=500) == 1.0


def test_cross_pairs_are_queries_against_a_base():
    e = _basis(6)
    base = _f32([e[0], e[1], e[2], e[0]])
    queries = _f32([_at(e[2], e[3], 0.05), e[4], _at(e[0], e[5], 0.12), e[0]])
    qi, bj, d = find_cross_pairs(queries, base)
    assert list(zip(qi.tolist(), bj.tolist(), strict=True)) == [(0, 2), (3, 0), (3, 3)]
    assert np.allclose(d, [0.05, 0.0, 0.0], atol=1e-6)
    qi, bj, _ = find_cross_pairs(queries, base, DedupConfig(threshold=0.2, block_rows=1))
    assert len(qi) == 5
    with pytest.raises(ValueError, match="dimensions"):
        find_cross_pairs(queries, _f32(_basis(2, dim=8)))


NOT_UNIT = [
    ("nan", "2 with non-finite"),
    ("inf", "2 with non-finite"),
    ("zero", "2 with zero norm"),
    ("long", r"2 with \|norm"),
]


@pytest.mark.parametrize(("bad", "what"), NOT_UNIT)
def test_rows_that_are_not_unit_vectors_raise_naming_how_many(bad, what):
    v = _f32(_basis(6))
    if bad == "nan":
        v[1, 3] = v[4, 0] = np.nan
    elif bad == "inf":
        v[1, 0], v[4, 2] = np.inf, -np.inf
    elif bad == "zero":
        v[[1, 4]] = 0.0
    else:
        v[[1, 4]] *= 1.5
    for call in (
        lambda: dedup(v),
        lambda: find_pairs(v),
        lambda: find_cross_pairs(v[:1], v),
        lambda: kmeans(v, 2),
        lambda: pair_recall(v),
    ):
        with pytest.raises(ValueError, match="2 of 6 rows .*" + what):
            call()
    with pytest.raises(ValueError, match="1 of 1 rows"):
        dedup(v[4:5].astype(np.float64))


@pytest.mark.parametrize("rows", [0, 1])
def test_empty_and_single_row_input(rows):
    v = _f32(_basis(1)[:rows])
    r = dedup(v)
    assert len(r.group) == len(r.keep) == len(r.distance_to_mean) == rows and r.keep.all() and r.pairs == 0
    assert r.stats["groups"] == 0 and r.stats["largest_group"] == rows
    assert all(len(a) == 0 for a in find_pairs(v))
    assert len(dedup(np.empty((0,), np.float32)).keep) == 0
    assert pair_recall(v) == 1.0


def test_giant_groups_are_reported_largest_first(caplog):
    e = _basis(4)
    v = _f32([e[1]] * 3 + [e[0]] * 4 + [e[2]] + [e[3]] * 2)
    stats = dedup(v, DedupConfig(giant_group=3)).stats
    assert "2 groups of 3 rows or more, the largest 4 rows (group 3)" in caplog.text
    assert stats["giant_groups"] == [(3, 4), (0, 3)]
    assert stats["group_size_hist"] == {2: 1, 3: 1, 4: 1} and stats["largest_group"] == 4


def _reference_groups(n: int, i, j) -> list[int]:
    parent = list(range(n))

    def find(x):
        while parent[x] != x:
            x = parent[x]
        return x

    for a, b in zip(i, j, strict=True):
        ra, rb = find(a), find(b)
        parent[max(ra, rb)] = min(ra, rb)
    return [find(x) for x in range(n)]


@pytest.mark.parametrize("seed", range(8))
def test_union_find_labels_each_row_with_its_groups_smallest_row(seed):
    rng = np.random.default_rng(seed)
    n = 300
    i, j = rng.integers(0, n, (2, rng.integers(0, 400)))
    want = _reference_groups(n, i.tolist(), j.tolist())
    assert union_find(n, i, j).tolist() == want
    parent = np.arange(n, dtype=np.int64)  # the same edges merged in two batches, as dedup streams them
    half = len(i) // 2
    _union(parent, i[:half], j[:half])
    _union(parent, j[half:], i[half:])
    assert parent.tolist() == want


def test_union_find_takes_a_million_rows_and_edges_in_seconds():
    n = 1_000_000
    rng = np.random.default_rng(0)
    chain = np.arange(n - 1)[::-1]  # the deepest tree union by index can build
    i = np.concatenate([chain + 1, rng.integers(0, n, n // 2)])
    j = np.concatenate([chain, rng.integers(0, n, n // 2)])
    t0 = time.perf_counter()
    groups = union_find(n, i, j)
    assert time.perf_counter() - t0 < 20
    assert (groups == 0).all()
    order = rng.permutation(n)
    groups = union_find(n, order[1 : n // 2], order[: n // 2 - 1])  # a random path over half the rows
    assert (groups[order[: n // 2]] == order[: n // 2].min()).all()
    assert (groups[order[n // 2 :]] == order[n // 2 :]).all()


def test_kmeans_finds_separated_clusters():
    e = _basis(3)
    rng = np.random.default_rng(3)
    truth = rng.integers(0, 3, 600)
    v = e[truth] + 0.05 * rng.standard_normal((600, DIM))
    v = _f32(v / np.linalg.norm(v, axis=1, keepdims=True))
    centroids, assignment = kmeans(v, 3, sample=200, seed=1)
    assert centroids.shape == (3, DIM) and np.allclose(np.linalg.norm(centroids, axis=1), 1, atol=1e-5)
    assert assignment.shape == (600,) and len(np.unique(assignment)) == 3
    for k in range(3):  # each found cluster is exactly one true cluster
        assert len(np.unique(truth[assignment == k])) == 1
    assert kmeans(v[:2], 5)[0].shape == (2, DIM)  # k is capped at the rows


# ---- dedup_batch: the same rule over shard files, as partition tasks -------------------------------------------


def _shard_files(v: np.ndarray, folder, sizes: list[int]) -> list[tuple[str, str]]:
    """The rows as the embed step's vectors files, `sizes` rows each in order (0: an empty shard), keys k<row>."""
    files, at = [], 0
    for k, size in enumerate(sizes):
        rows = range(at, at + size)
        frame = pd.DataFrame({"key": pd.Series([f"k{i}" for i in rows], dtype="str"),
                              "vector": pd.Series(list(v[at:at + size]), dtype="object"),
                              "sha256": pd.Series(["0" * 64] * size, dtype="str")})
        path = folder / f"{k:05d}.vectors.parquet"
        write_parquet(frame, path)
        files.append((f"{k:05d}", str(path)))
        at += size
    assert at == len(v)
    return files


def _batch_groups(files, config, tmp_path) -> tuple[dict, pd.DataFrame]:
    out = tmp_path / "groups"
    stats = dedup_batch(files, config, tmp_path / "work", out)
    assert sorted(p.name for p in out.iterdir()) == [f"{s}.parquet" for s, _ in files]  # one file a shard
    assert not (tmp_path / "work").exists()
    frames = [pd.read_parquet(out / f"{s}.parquet") for s, _ in files]
    for (shard, _), f in zip(files, frames, strict=True):
        assert (f["shard"] == shard).all()
    return stats, pd.concat(frames, ignore_index=True)


def _same_groups(got: pd.DataFrame, want: pd.DataFrame) -> None:
    for col in ("key", "group_key", "group_size", "keep"):
        assert got[col].tolist() == want[col].tolist(), col
    assert np.allclose(got["distance_to_mean"], want["distance_to_mean"], atol=1e-5)


@pytest.mark.parametrize("cells", [False, True])
def test_a_batch_of_shard_files_gets_the_groups_and_keepers_of_exact_search(tmp_path, cells):
    v, planted = _cone(6000, seed=3)
    v[[100, 2000, 5999]] = v[5]  # exact copies of one row, in different shards and chunks
    sizes = [700] * 8 + [0] + [400]  # an empty shard among them
    config = DedupConfig(partition_mb=1, chunk_rows=2000) if cells else DedupConfig()
    stats, got = _batch_groups(_shard_files(v, tmp_path, sizes), config, tmp_path)
    exact = dedup(v, DedupConfig(exact_max_rows=10**9))
    want = group_frame([f"k{i}" for i in range(len(v))], [""] * len(v), exact)
    assert stats["rows"] == 6000 and stats["exact_copies"] == 3  # three rows collapsed onto row 5 before the search
    assert sum(stats["cluster_sizes"]) == 6000 and stats["cluster_sizes"] == sorted(stats["cluster_sizes"])[::-1]
    if cells:  # 1 MiB of 128-d rows a cell: 2,048 rows; each row in 4 cells
        assert stats["method"] == "ivf" and stats["cells"] == 12 and stats["spill"] == 4
        assert stats["largest_cell_rows"] <= 2 * 2048
        # A pair is searched only from a row's own cell: never a false link, and at most 1 % of the links lost
        # (a pair whose rows share only cells neither owns). Here 1 of 569 pairs.
        assert (want.groupby(got["group_key"].to_numpy())["group_key"].nunique() == 1).all()
        assert exact.stats["duplicates_dropped"] >= stats["duplicates_dropped"] >= 0.99 * exact.stats[
            "duplicates_dropped"] > 0
        assert exact.pairs >= stats["pairs"] >= 0.99 * exact.pairs
        same = got["group_key"].to_numpy() == want["group_key"].to_numpy()
        assert same.mean() >= 0.99 and (got["keep"][same & (got["group_size"] == 1)]).all()
    else:
        _same_groups(got, want)
        assert stats["groups"] == exact.stats["groups"] > 0
        assert stats["group_size_hist"] == exact.stats["group_size_hist"]
        assert stats["duplicates_dropped"] == exact.stats["duplicates_dropped"]
        assert stats["method"] == "exact" and stats["cells"] == 1 and stats["pairs"] == exact.pairs - 3


def test_a_giant_exact_copy_group_over_many_shards_is_one_group_at_linear_cost(tmp_path):
    v, _ = _cone(3000, seed=4)
    copies = np.arange(3, 3000, 3)  # 999 copies of row 0, in every shard
    v[copies] = v[0]
    config = DedupConfig(giant_group=500, partition_mb=1, chunk_rows=600)
    stats, got = _batch_groups(_shard_files(v, tmp_path, [300] * 10), config, tmp_path)
    giant = got.iloc[np.concatenate(([0], copies))]
    assert (giant["group_key"] == "k0").all() and giant["keep"].tolist() == [True] + [False] * 999
    assert (giant["group_size"] >= 1000).all() and (giant["distance_to_mean"].abs() < 1e-5).all()
    assert stats["giant_groups"][0][0] == 0 and stats["giant_groups"][0][1] >= 1000
    assert stats["exact_copies"] == 999
    # each chunk sends one row of the copies to the search, not 999: the search work is what it is without them
    assert stats["largest_cell_rows"] <= 2001 + 5 and stats["pairs"] < 999 + 2000


def test_first_copies_point_each_row_at_the_lowest_identical_one():
    e = _basis(3)
    v = _f32([e[1], e[0], e[1], e[2], e[0], e[1]])
    assert first_copies(v).tolist() == [0, 1, 0, 3, 1, 0]
    near = v.copy()
    near[2, 0] = np.nextafter(near[2, 0], np.float32(2))  # one bit apart: not a copy
    assert first_copies(near).tolist() == [0, 1, 2, 3, 1, 0]
    assert first_copies(np.zeros((0, 4), np.float32)).tolist() == []


def test_an_empty_batch_writes_an_empty_file_per_shard(tmp_path):
    stats, got = _batch_groups(_shard_files(np.zeros((0, 8), np.float32), tmp_path, [0, 0]), DedupConfig(),
                               tmp_path)
    assert got.empty and stats["rows"] == 0 and stats["groups"] == 0 and stats["cluster_sizes"] == []


def test_a_batch_with_rows_that_are_not_unit_vectors_raises(tmp_path):
    v = _f32(_basis(6))
    v[4] *= 2
    with pytest.raises(ValueError, match=r"1 of 6 rows .*\(in shards 00000..00001\)"):
        dedup_batch(_shard_files(v, tmp_path, [3, 3]), DedupConfig(), tmp_path / "work", tmp_path / "out")


@pytest.mark.parametrize("exact_max_rows", [10**9, 500])  # the blocked exact search, then the IVF lists
def test_a_query_mask_searches_exactly_the_pairs_that_hold_a_query_row_each_once(exact_max_rows):
    v, _ = _cone(3000, seed=6)
    queries = np.random.default_rng(6).random(3000) < 0.3
    config = DedupConfig(exact_max_rows=exact_max_rows, block_rows=512)
    stream, method, _, _ = _links(v, config, queries)
    i, j, _ = (np.concatenate(a) for a in zip(*stream, strict=True))
    got = list(zip(i.tolist(), j.tolist(), strict=True))
    assert len(got) == len(set(got)) and (i < j).all()  # each unordered pair once
    # Oracle: every pair by one full similarity matrix, kept where either row is a query row.
    sim = v @ v.T
    a, b = np.nonzero(np.triu(1 - sim < config.threshold, k=1))
    want = {(x, y) for x, y in zip(a.tolist(), b.tolist(), strict=True) if queries[x] or queries[y]}
    assert want and set(got) <= want
    if method == "exact":
        assert set(got) == want
    else:
        assert len(got) >= 0.95 * len(want)

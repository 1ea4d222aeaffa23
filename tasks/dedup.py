"""Stage image, redundancy rule (stage 3): link images closer than a cosine distance, group, keep one per group."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from schemas.reasons import full_reason

logger = logging.getLogger(__name__)

STAGE = "image"
REASON = full_reason(STAGE, "duplicate")  # what every dropped member of a group reads
UNIT_TOLERANCE = 1e-3  # |norm - 1| above this is not a unit vector: a broken contract, not a near miss
TIE = 1e-6  # distances to the mean this close count as equal: the lower row index wins


@dataclass(frozen=True)
class DedupConfig:
    threshold: float = 0.1  # cosine distance; pairs strictly closer are linked (SPEC / paper)
    exact_max_rows: int = 20_000  # at or below: exact blocked search; above: IVF search
    partitions: int | None = None  # IVF lists; None = 3 * sqrt(n) (3,000 lists of ~330 rows at 1M rows)
    nprobes: int = 24  # lists each vector searches, its own included (pair recall 0.987 on bench/dedup.py, 1M rows)
    train_rows: int | None = None  # k-means training sample; None = 50 rows a list (fewer lose recall)
    train_iters: int = 4  # k-means rounds; more changed no recall figure on the bench
    block_rows: int = 4096  # rows a side of each matmul block: a block's similarities are at most 64 MiB
    seed: int = 0  # training sample and k-means initialisation
    giant_group: int = 1000  # groups at least this large are reported as giant (a warning)


@dataclass(frozen=True)
class DedupResult:
    group: np.ndarray  # int64 per row: the smallest row index in its group (a singleton: its own index)
    group_size: np.ndarray  # int64 per row: members in its group
    keep: np.ndarray  # bool per row: a singleton, or its group's member nearest the group's mean
    distance_to_mean: np.ndarray  # float32 per row: cosine distance to its normalised group mean (singletons 0)
    pairs: int  # linked pairs found (each unordered pair once)
    stats: dict  # group_size_hist, groups, rows_in_groups, duplicates_dropped, largest_group, giant_groups
    method: str  # "exact" or "ivf"
    partitions: int = 0  # IVF lists (0 for exact)
    nprobes: int = 0  # lists each vector searched (0 for exact)
    seconds: dict = field(default_factory=dict)  # wall time per phase: check, index, search, keepers
    links: tuple | None = None  # (i, j, distance) of every linked pair, only when dedup(..., keep_links=True)


def check_vectors(vectors: np.ndarray, block_rows: int = 16_384) -> np.ndarray:
    """The vectors as a 2-D array (a memmap stays one); ValueError naming the rows that are not finite unit vectors.

    The embed step filters such rows out before dedup; here they are a broken contract, never a silent drop.
    """
    v = np.asarray(vectors)
    if v.size == 0 and v.ndim < 2:  # no rows at all, whatever the shape it came in
        v = v.reshape(0, 0)
    if v.ndim != 2:
        raise ValueError(f"dedup: vectors must be 2-D (rows, dim), got shape {v.shape}")
    if not np.issubdtype(v.dtype, np.floating):
        raise ValueError(f"dedup: vectors must be floating point, got {v.dtype}")
    nonfinite = zero = off_unit = 0
    for start in range(0, len(v), block_rows):
        x = np.asarray(v[start : start + block_rows])
        finite = np.isfinite(x).all(axis=1)
        with np.errstate(over="ignore", invalid="ignore"):  # such rows are counted below, not warned about
            norm = np.sqrt(np.einsum("ij,ij->i", x, x))
        nonfinite += int((~finite).sum())
        zero += int((finite & (norm == 0)).sum())
        off_unit += int((finite & (norm != 0) & ~(np.abs(norm - 1) <= UNIT_TOLERANCE)).sum())
    if nonfinite or zero or off_unit:
        raise ValueError(
            f"dedup: {nonfinite + zero + off_unit} of {len(v)} rows are not unit vectors ({nonfinite} with "
            f"non-finite values, {zero} with zero norm, {off_unit} with |norm - 1| > {UNIT_TOLERANCE}); "
            "the embed step must filter and normalise them"
        )
    return v


def _rows(vectors: np.ndarray, index: np.ndarray | slice) -> np.ndarray:
    """Rows `index` as a float32 block: a view for a slice of float32 rows (indexing works on a memmap too)."""
    return np.asarray(vectors[index], dtype=np.float32)


def _chunks(n: int, size: int) -> Iterator[slice]:
    for start in range(0, n, size):
        yield slice(start, min(start + size, n))


def _linked(sim: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(row, column, distance) of the entries of a similarity block whose distance 1 - cos < threshold."""
    r, c = np.nonzero(sim > np.float32(1.0 - threshold - 1e-6))  # a cheap superset, then the exact test
    d = np.float32(1.0) - sim[r, c]
    near = d < np.float32(threshold)
    return r[near], c[near], d[near]


def _empty_links() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return np.empty(0, np.int64), np.empty(0, np.int64), np.empty(0, np.float32)


def _concat(parts: list) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    if not parts:
        return _empty_links()
    return tuple(np.concatenate(p) for p in zip(*parts, strict=True))


# ---- search --------------------------------------------------------------------------------------------------------


def _exact_links(vectors: np.ndarray, config: DedupConfig) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Every pair i < j, block against block over the upper triangle."""
    n, b = len(vectors), config.block_rows
    for qs in _chunks(n, b):
        xq = _rows(vectors, qs)
        for bs in _chunks(n, b):
            if bs.stop <= qs.start:
                continue
            r, c, d = _linked(xq @ _rows(vectors, bs).T, config.threshold)
            i, j = r + qs.start, c + bs.start
            upper = i < j
            yield i[upper], j[upper], d[upper]


def find_cross_pairs(
    queries: np.ndarray, base: np.ndarray, config: DedupConfig = DedupConfig()
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(query row, base row, distance) for every query-base pair with cosine distance < threshold; exact, blocked.

    Costs queries x base x dim: meant for small query sets (a run's survivors against a committed set, recall).
    """
    q, b = check_vectors(queries), check_vectors(base)
    if len(q) and len(b) and q.shape[1] != b.shape[1]:
        raise ValueError(f"dedup: queries have {q.shape[1]} dimensions, the base {b.shape[1]}")
    parts = []
    for qs in _chunks(len(q), config.block_rows):
        xq = _rows(q, qs)
        for bs in _chunks(len(b), config.block_rows):
            r, c, d = _linked(xq @ _rows(b, bs).T, config.threshold)
            if r.size:
                parts.append((r + qs.start, c + bs.start, d))
    i, j, d = _concat(parts)
    order = np.lexsort((j, i))
    return i[order], j[order], d[order]


def _nearest(
    vectors: np.ndarray, centroids: np.ndarray, k: int, block_rows: int, centre: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Per row, the k centroids most similar to the row less `centre`, most similar first (int32), and scores.

    Subtracting the centre is a per-centroid offset (centre . c) on the scores, so no centred copy is made.
    """
    n = len(vectors)
    idx = np.empty((n, k), np.int32)
    sim = np.empty((n, k), np.float32)
    offset = None if centre is None else (centroids @ centre).astype(np.float32)
    for s in _chunks(n, block_rows):
        scores = np.asarray(vectors[s], dtype=np.float32) @ centroids.T
        if offset is not None:
            scores -= offset
        if k == 1:
            top = scores.argmax(axis=1)[:, None]
        else:
            top = np.argpartition(scores, -k, axis=1)[:, -k:]
            top = np.take_along_axis(top, np.argsort(-np.take_along_axis(scores, top, 1), axis=1), 1)
        idx[s] = top
        sim[s] = np.take_along_axis(scores, top, 1)
    return idx, sim


def _train(
    vectors: np.ndarray, k: int, iters: int, seed: int, sample: int | None, block_rows: int, centred: bool = False
) -> tuple[np.ndarray, np.ndarray | None]:
    """Spherical k-means from a random sample of the rows: (centroids k x dim unit rows, the centre or None).

    centred: cluster the directions of the rows less their mean. CLIP embeddings fill a narrow cone; on the raw
    rows a centroid averaging many rows leans towards the cone's axis, grows more similar to every row and takes
    ever more of them, so lists end up a few huge and many tiny. Centred, the lists come out balanced.
    """
    n = len(vectors)
    rng = np.random.default_rng(seed)
    rows = np.arange(n) if sample is None or sample >= n else np.sort(rng.choice(n, sample, replace=False))
    x = _rows(vectors, rows)
    centre = x.mean(axis=0, dtype=np.float64).astype(np.float32) if centred else None
    if centre is not None:
        x -= centre
        x /= np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    k = max(1, min(k, len(x)))
    centroids = x[np.sort(rng.choice(len(x), k, replace=False))].copy()
    for _ in range(iters):
        label, sim = _nearest(x, centroids, 1, block_rows)
        label, sim = label[:, 0], sim[:, 0]
        order = np.argsort(label, kind="stable")
        counts = np.bincount(label, minlength=k)
        used = np.flatnonzero(counts)
        sums = np.add.reduceat(x[order], np.concatenate(([0], np.cumsum(counts[used])[:-1])), axis=0)
        centroids[used] = sums / np.maximum(np.linalg.norm(sums, axis=1, keepdims=True), 1e-12)
        empty = np.flatnonzero(counts == 0)
        if empty.size:  # an empty list restarts at the rows its centroids fit worst, which splits the widest lists
            centroids[empty] = x[np.argsort(sim, kind="stable")[: empty.size]]
    return centroids, centre


def kmeans(
    vectors: np.ndarray, k: int, iters: int = 10, seed: int = 0, sample: int | None = None, block_rows: int = 4096
) -> tuple[np.ndarray, np.ndarray]:
    """Spherical k-means: (centroids k x dim unit rows, each row's nearest centroid int32).

    Trained on `sample` random rows (all rows when None), then every row is assigned. Empty clusters are re-seeded
    with the worst-fitting rows, so all k stay in use (k is capped at the rows trained on).
    """
    v = check_vectors(vectors)
    if len(v) == 0:
        return np.empty((0, v.shape[1]), np.float32), np.empty(0, np.int32)
    centroids, _ = _train(v, k, iters, seed, sample, block_rows)
    return centroids, _nearest(v, centroids, 1, block_rows)[0][:, 0]


def _partitions(n: int, config: DedupConfig) -> int:
    return max(1, min(n, config.partitions or round(3 * math.sqrt(n))))


def _ivf_index(vectors: np.ndarray, config: DedupConfig) -> np.ndarray:
    """Per row, the `nprobes` lists it searches, nearest first: column 0 is the list it belongs to."""
    lists = _partitions(len(vectors), config)
    sample = config.train_rows or 50 * lists
    centroids, centre = _train(vectors, lists, config.train_iters, config.seed, sample, config.block_rows, centred=True)
    return _nearest(vectors, centroids, min(config.nprobes, len(centroids)), config.block_rows, centre)[0]


def _buckets(labels: np.ndarray, lists: int, block_rows: int = 65_536) -> tuple[np.ndarray, np.ndarray]:
    """The rows under each list of `labels` (rows x k), grouped by list, ascending within one; and the bounds.

    A counting sort a block of rows at a time into int32 (4 bytes an entry, no rows x k argsort), so the
    probe index stays small at 100M rows.
    """
    n, k = labels.shape
    counts = np.zeros(lists, np.int64)
    for s in _chunks(n, block_rows):
        counts += np.bincount(labels[s].ravel(), minlength=lists)
    bounds = np.concatenate(([0], np.cumsum(counts)))
    cursor = bounds[:-1].copy()
    out = np.empty(bounds[-1], np.int32 if n < 2**31 else np.int64)
    for s in _chunks(n, block_rows):
        flat = labels[s].ravel()
        order = np.argsort(flat, kind="stable")  # rows ascend within a list, block after block
        by_list = flat[order]
        count = np.bincount(flat, minlength=lists)
        rank = np.arange(len(flat)) - (np.cumsum(count) - count)[by_list]
        out[cursor[by_list] + rank] = s.start + order // k
        cursor += count
    return out, bounds


def _ivf_links(
    vectors: np.ndarray, probes: np.ndarray, config: DedupConfig
) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Each list's members against every row that probes the list; each unordered pair yielded once, i < j.

    A pair (q, j) is reachable from two sides: q probing j's list, and j probing q's. When both reach it, only
    the side whose query is the smaller row keeps it, so pairs need no global de-duplication.
    """
    own = probes[:, 0]
    lists = int(probes.max()) + 1
    members, m_bounds = _buckets(probes[:, :1], lists)
    probers, p_bounds = _buckets(probes, lists)
    b = config.block_rows
    for a in range(lists):
        mem = members[m_bounds[a] : m_bounds[a + 1]]
        qry = probers[p_bounds[a] : p_bounds[a + 1]]
        for ms in _chunks(len(mem), b):
            mrows = mem[ms]
            xm_t = _rows(vectors, mrows).T
            for qs in _chunks(len(qry), b):
                qrows = qry[qs]
                r, c, d = _linked(_rows(vectors, qrows) @ xm_t, config.threshold)
                if not r.size:
                    continue
                q, j = qrows[r], mrows[c]
                other = own[q]
                both = (other == a) | (probes[j] == other[:, None]).any(axis=1)
                keep = (q != j) & (~both | (q < j))
                q, j, d = q[keep], j[keep], d[keep]
                yield np.minimum(q, j).astype(np.int64), np.maximum(q, j).astype(np.int64), d


def _links(vectors: np.ndarray, config: DedupConfig) -> tuple[Iterator, str, int, int]:
    """The pair stream for these vectors, the method, the lists and the lists probed."""
    n = len(vectors)
    if n <= config.exact_max_rows or n < 2:
        return _exact_links(vectors, config), "exact", 0, 0
    probes = _ivf_index(vectors, config)
    return _ivf_links(vectors, probes, config), "ivf", _partitions(n, config), probes.shape[1]


def find_pairs(vectors: np.ndarray, config: DedupConfig = DedupConfig()) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(i, j, distance) for pairs i < j with cosine distance < threshold, sorted; exact for small n, IVF above.

    Every linked pair is returned: a group of m copies gives m(m-1)/2 of them. dedup() streams the pairs into
    the union-find instead, so its memory stays bounded whatever the groups.
    """
    v = check_vectors(vectors)
    stream, _, _, _ = _links(v, config)
    i, j, d = _concat([part for part in stream if part[0].size])
    order = np.lexsort((j, i))
    return i[order], j[order], d[order]


# ---- grouping ------------------------------------------------------------------------------------------------------


def _compress(parent: np.ndarray) -> None:
    """Pointer jumping until every row points at its root: full path compression, O(n log depth)."""
    while True:
        grand = parent[parent]
        if np.array_equal(grand, parent):
            return
        parent[:] = grand


def _union(parent: np.ndarray, i: np.ndarray, j: np.ndarray) -> None:
    """Merge the groups of each edge (i, j) into `parent`, in place, a round at a time.

    Union by index: a root is only ever hooked under a smaller root, so pointers go down in index, no cycle can
    form and each group's root is its smallest row. Several edges may hook the same root in one round; the
    smallest target wins (np.minimum.at) and the others retry on the next round, after compression.
    """
    i, j = np.asarray(i, np.int64), np.asarray(j, np.int64)
    while i.size:
        _compress(parent)
        ri, rj = parent[i], parent[j]
        apart = ri != rj
        lo, hi = np.minimum(ri[apart], rj[apart]), np.maximum(ri[apart], rj[apart])
        np.minimum.at(parent, hi, lo)
        i, j = lo, hi
    _compress(parent)


def union_find(n: int, i: np.ndarray, j: np.ndarray) -> np.ndarray:
    """Group id per row (int64): the smallest row index in its connected component of the edges (i, j)."""
    parent = np.arange(n, dtype=np.int64)
    _union(parent, i, j)
    return parent


def keepers(vectors: np.ndarray, groups: np.ndarray, block_rows: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """(keep, distance to the group mean) per row: keep, per group, the member nearest its normalised mean.

    Distances within TIE of the group's smallest count as equal and the lowest row index among them wins: in a
    2-member group both members are equally far from the mean, so the earlier row is kept. Singletons are kept
    with distance 0. Groups are any integer labels; the means are summed in float64, a window of whole groups
    (or one large group in slices) at a time, so memory stays bounded by block_rows whatever the group sizes.
    """
    vectors, groups = np.asarray(vectors), np.asarray(groups)
    n = len(groups)
    keep = np.ones(n, bool)
    distance = np.zeros(n, np.float32)
    order = np.argsort(groups, kind="stable")  # by group, then by row
    g = groups[order]
    starts = np.flatnonzero(np.concatenate(([True], g[1:] != g[:-1]))) if n else np.empty(0, np.int64)
    sizes = np.diff(np.append(starts, n))
    order = order[np.repeat(sizes > 1, sizes)]  # members of groups of 2 or more, still by group then row
    sizes = sizes[sizes > 1]
    bounds = np.concatenate(([0], np.cumsum(sizes)))
    # windows of consecutive groups with about block_rows members; a larger group is a window of its own
    window_end = np.flatnonzero(np.diff((bounds[1:] - 1) // block_rows, append=np.inf)) + 1
    first = 0
    for last in window_end:
        w_sizes = sizes[first:last]
        rows = order[bounds[first] : bounds[last]]
        first = last
        local = np.repeat(np.arange(len(w_sizes)), w_sizes)
        sums = np.zeros((len(w_sizes), vectors.shape[1]), np.float64)
        for s in _chunks(len(rows), block_rows):
            seg = local[s]
            runs = np.flatnonzero(np.concatenate(([True], seg[1:] != seg[:-1])))
            sums[seg[runs]] += np.add.reduceat(np.asarray(vectors[rows[s]], np.float64), runs, axis=0)
        means = sums / np.maximum(np.linalg.norm(sums, axis=1, keepdims=True), 1e-300)
        dist = np.empty(len(rows), np.float64)
        for s in _chunks(len(rows), block_rows):
            x = np.asarray(vectors[rows[s]], np.float64)
            dist[s] = 1.0 - np.einsum("ij,ij->i", x, means[local[s]])
        offsets = np.concatenate(([0], np.cumsum(w_sizes)[:-1]))
        best = np.minimum.reduceat(dist, offsets)
        near = np.flatnonzero(dist <= best[local] + TIE)
        chosen = near[np.concatenate(([True], local[near][1:] != local[near][:-1]))]  # rows ascend in a group
        keep[rows] = False
        keep[rows[chosen]] = True
        distance[rows] = dist
    return keep, distance


def _stats(group: np.ndarray, group_size: np.ndarray, keep: np.ndarray, config: DedupConfig) -> dict:
    roots = np.flatnonzero(group == np.arange(len(group)))  # one row per group: its smallest, the id
    sizes = group_size[roots]
    multi = sizes > 1
    size_values, size_counts = np.unique(sizes[multi], return_counts=True)
    giant = np.flatnonzero(sizes >= max(config.giant_group, 2))
    giant = giant[np.argsort(-sizes[giant], kind="stable")]
    return {
        "group_size_hist": {int(s): int(c) for s, c in zip(size_values, size_counts, strict=True)},
        "groups": int(multi.sum()),  # groups of 2 or more
        "rows_in_groups": int(sizes[multi].sum()),
        "duplicates_dropped": int((~keep).sum()),
        "largest_group": int(sizes.max()) if len(sizes) else 0,
        "giant_groups": [(int(roots[g]), int(sizes[g])) for g in giant],
    }


def dedup(vectors: np.ndarray, config: DedupConfig = DedupConfig(), keep_links: bool = False) -> DedupResult:
    """The redundancy rule over one batch of unit image vectors: link, group, keep one per group.

    Pairs stream from the search into the union-find a buffer at a time (never all of them at once unless
    keep_links asks for them), so memory is the vectors (which may be a memmap), a few int64 arrays of n and
    one similarity block. Above exact_max_rows the search is an IVF: its recall is measured by pair_recall.
    """
    seconds = {}
    t0 = time.perf_counter()
    v = check_vectors(vectors)
    n = len(v)
    seconds["check"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    stream, method, partitions, nprobes = _links(v, config)
    seconds["index"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    parent = np.arange(n, dtype=np.int64)
    buffer, buffered, pairs, kept = [], 0, 0, []
    for part in stream:
        if not part[0].size:
            continue
        pairs += part[0].size
        buffer.append(part)
        buffered += part[0].size
        if keep_links:
            kept.append(part)
        if buffered >= max(n, 1 << 20):  # a union round costs O(n): run one per n edges at most
            i, j, _ = _concat(buffer)
            _union(parent, i, j)
            buffer, buffered = [], 0
    i, j, _ = _concat(buffer)
    _union(parent, i, j)
    seconds["search"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    group_size = np.bincount(parent, minlength=n)[parent].astype(np.int64)
    keep, distance = keepers(v, parent, config.block_rows)
    seconds["keepers"] = time.perf_counter() - t0
    stats = _stats(parent, group_size, keep, config)
    if stats["giant_groups"]:  # a logo or placeholder image repeated across sites, or a threshold too loose
        logger.warning(
            "dedup: %d groups of %d rows or more, the largest %d rows (group %d)",
            len(stats["giant_groups"]),
            config.giant_group,
            *stats["giant_groups"][0][::-1],
        )
    links = None
    if keep_links:
        li, lj, ld = _concat(kept)
        order = np.lexsort((lj, li))
        links = (li[order], lj[order], ld[order])
    return DedupResult(
        group=parent,
        group_size=group_size,
        keep=keep,
        distance_to_mean=distance,
        pairs=pairs,
        stats=stats,
        method=method,
        partitions=partitions,
        nprobes=nprobes,
        seconds=seconds,
        links=links,
    )


def pair_recall(
    vectors: np.ndarray, config: DedupConfig = DedupConfig(), sample_rows: int = 20_000, seed: int = 0
) -> float:
    """Share of the exact within-threshold pairs of `sample_rows` random rows that the IVF search finds.

    The exact pairs are each sampled row against every row (find_cross_pairs), so the figure is the recall of
    the index dedup() builds for these vectors (same partitions, nprobes, training sample and seed), not of a
    small index on the sample. The IVF path is forced whatever n. Since the IVF verifies every candidate
    exactly, it finds a pair (q, j) exactly when j's list is among q's probes or q's list among j's, so the
    index is built but the search is not run. 1.0 when the sample has no pair.
    """
    v = check_vectors(vectors)
    n = len(v)
    if n < 2:
        return 1.0
    rng = np.random.default_rng(seed)
    sample = np.sort(rng.choice(n, min(sample_rows, n), replace=False))
    qi, j, _ = find_cross_pairs(_rows(v, sample), v, config)
    q = sample[qi]
    pair = q != j
    q, j = q[pair], j[pair]
    key = np.unique(np.minimum(q, j) * n + np.maximum(q, j))  # a pair of two sampled rows counts once
    if not key.size:
        return 1.0
    a, b = key // n, key % n
    probes = _ivf_index(v, config)
    found = (probes[a] == probes[b, :1]).any(axis=1) | (probes[b] == probes[a, :1]).any(axis=1)
    return float(found.mean())


def group_frame(keys: list[str], shards: list[str], result: DedupResult) -> pd.DataFrame:
    """One row per vector of the run: its shard, group (the key of the group's first row), group size, whether
    it is kept and its distance to the group's mean: what each shard's diversify step reads its rows from."""
    key_arr = np.asarray(keys, dtype=object)
    return pd.DataFrame({
        "key": pd.Series(keys, dtype="str"), "shard": pd.Series(shards, dtype="str"),
        "group_key": pd.Series(key_arr[result.group] if len(keys) else [], dtype="str"),
        "group_size": pd.Series(result.group_size, dtype="int64"),
        "keep": pd.Series(result.keep, dtype=bool),
        "distance_to_mean": pd.Series(result.distance_to_mean, dtype="float32"),
    })


CLUSTERS = 100  # k-means clusters of the report's cluster-size curve (the paper's semantic-balance analysis)


def cluster_sizes(vectors: np.ndarray, seed: int, clusters: int = CLUSTERS) -> list[int]:
    """Cluster sizes, largest first, of a k-means over the image vectors (at most `clusters`, at least 5 rows a
    cluster), trained on 50 rows a cluster: the report's view of how balanced the kept images are."""
    k = min(clusters, len(vectors) // 5)
    if k < 2:
        return [len(vectors)] if len(vectors) else []
    _, assignment = kmeans(vectors, k, seed=seed, sample=50 * k)
    return sorted((int(c) for c in np.bincount(assignment, minlength=k)), reverse=True)


def jsonable(obj):
    """`obj` with numpy scalars turned into Python numbers and tuples into lists, as a marker stores it."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [jsonable(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    return obj

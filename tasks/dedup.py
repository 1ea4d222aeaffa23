"""Stage image, redundancy rule (stage 3): link images closer than a cosine distance, group, keep one per group."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator
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
    # dedup_batch, the partitioned form over a batch's shard files (each bound holds whatever the batch's size):
    partition_mb: int = 256  # vectors one search task holds; a batch above it is split into coarse cells
    spill: int = 4  # cells each row goes to, nearest first; a pair is linked where one row's own cell holds both
    #   (planted-pair share sharing one: 0.98 at 128 cells on bench/dedup.py's cone, 0.84 with 2)
    chunk_rows: int = 100_000  # rows (whole shards) one read, assign or write task holds


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


def _exact_links(
    vectors: np.ndarray, config: DedupConfig, queries: np.ndarray | None = None
) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Every pair i < j, block against block over the upper triangle; with `queries` (a row mask), only the
    pairs with at least one query row: the query rows against every row."""
    n, b = len(vectors), config.block_rows
    if queries is not None:
        q_rows = np.flatnonzero(queries)
        for qs in _chunks(len(q_rows), b):
            qr = q_rows[qs]
            xq = _rows(vectors, qr)
            for bs in _chunks(n, b):
                r, c, d = _linked(xq @ _rows(vectors, bs).T, config.threshold)
                i, j = qr[r], c + bs.start
                once = (i != j) & (~queries[j] | (i < j))  # two query rows: from the smaller one's side
                yield np.minimum(i, j)[once], np.maximum(i, j)[once], d[once]
        return
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


def _ivf_index(vectors: np.ndarray, config: DedupConfig, queries: np.ndarray | None = None) -> np.ndarray:
    """Per row, the `nprobes` lists it searches, nearest first: column 0 is the list it belongs to. With `queries`
    (a row mask), only the query rows search: the others get their own list alone (the rest of the row is -1)."""
    lists = _partitions(len(vectors), config)
    sample = config.train_rows or 50 * lists
    centroids, centre = _train(vectors, lists, config.train_iters, config.seed, sample, config.block_rows, centred=True)
    k = min(config.nprobes, len(centroids))
    if queries is None:
        return _nearest(vectors, centroids, k, config.block_rows, centre)[0]
    probes = np.full((len(vectors), k), -1, np.int32)
    q = np.flatnonzero(queries)
    rest = np.flatnonzero(~queries)
    probes[q] = _nearest(vectors[q], centroids, k, config.block_rows, centre)[0]
    probes[rest, :1] = _nearest(vectors[rest], centroids, 1, config.block_rows, centre)[0]
    return probes


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
    queries = probes[:, -1] >= 0  # rows that search (all, unless _ivf_index was given a query mask)
    q_rows = np.flatnonzero(queries)
    probers, p_bounds = _buckets(probes[q_rows], lists)
    probers = q_rows[probers]
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
                both = queries[j] & ((other == a) | (probes[j] == other[:, None]).any(axis=1))  # j finds it too
                keep = (q != j) & (~both | (q < j))
                q, j, d = q[keep], j[keep], d[keep]
                yield np.minimum(q, j).astype(np.int64), np.maximum(q, j).astype(np.int64), d


def _links(vectors: np.ndarray, config: DedupConfig, queries: np.ndarray | None = None
           ) -> tuple[Iterator, str, int, int]:
    """The pair stream for these vectors, the method, the lists and the lists probed. With `queries` (a row
    mask), only the pairs that hold a query row."""
    n = len(vectors)
    if n <= config.exact_max_rows or n < 2:
        return _exact_links(vectors, config, queries), "exact", 0, 0
    probes = _ivf_index(vectors, config, queries)
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


def keepers(vectors: np.ndarray, groups: np.ndarray, block_rows: int = 4096,
            weights: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(keep, distance to the group mean) per row: keep, per group, the member nearest its normalised mean.

    `weights` counts each row that many times in its group's mean (a row standing for its exact copies).

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
            x = np.asarray(vectors[rows[s]], np.float64)
            if weights is not None:
                x *= np.asarray(weights, np.float64)[rows[s], None]
            sums[seg[runs]] += np.add.reduceat(x, runs, axis=0)
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


# ---- partitioned: one batch's shard files, as tasks a cluster can spread ------------------------------------------
#
# dedup_batch runs the same rule over a batch too large for one process. Every task holds a bounded share:
#   sample  (per chunk of whole shards)  the rows of one random sample of the batch;
#   train   (once)                        coarse cells (spherical k-means, centred) and the report's clusters;
#   assign  (per chunk)                   exact copies collapsed; each other row to its `spill` nearest cells;
#   search  (per cell)                    the matrix-product search (exact, or IVF above exact_max_rows) from the
#                                         rows the cell owns against all its rows; a pair is kept once, by the
#                                         first of the two rows' own cells that holds both;
#   group   (once)                        union-find over the edges alone (rows in no edge are singletons);
#   shuffle (per chunk)                   each grouped row's vector to its group's bucket (copies as a weight);
#   keepers (per bucket)                  the member nearest its group's mean, lowest row on a tie;
#   write   (per chunk)                   one groups file per shard, every row of the shard.
# Rows are numbered across the batch in file order, as dedup() would number the stacked vectors.

Mapper = Callable[[Callable, list], list]  # map(fn, items) -> results in order: a cluster's, or serial_map


def serial_map(fn: Callable, items: list) -> list:
    return [fn(x) for x in items]


@dataclass(frozen=True)
class Chunk:
    """Whole shards read together: their (shard, vectors file), rows each, and the batch row of the first."""

    index: int
    files: tuple[tuple[str, str], ...]
    rows: tuple[int, ...]
    start: int

    @property
    def stop(self) -> int:
        return self.start + sum(self.rows)


@dataclass(frozen=True)
class _Index:
    cells: int
    spill: int
    centroids: np.ndarray | None  # cells x dim, None for one cell
    centre: np.ndarray | None
    clusters: np.ndarray | None  # the report's k-means centroids, None below 10 rows
    block_rows: int


def plan_chunks(files: list[tuple[str, str]], chunk_rows: int) -> list[Chunk]:
    """Consecutive shard files in chunks of at most `chunk_rows` rows (a larger shard is a chunk of its own)."""
    import pyarrow.parquet as pq

    chunks, group, counts, start = [], [], [], 0
    for shard, path in files:
        rows = pq.ParquetFile(path).metadata.num_rows
        if group and sum(counts) + rows > chunk_rows:
            chunks.append(Chunk(len(chunks), tuple(group), tuple(counts), start))
            start += sum(counts)
            group, counts = [], []
        group.append((shard, path))
        counts.append(rows)
    if group:
        chunks.append(Chunk(len(chunks), tuple(group), tuple(counts), start))
    return chunks


def read_chunk(chunk: Chunk) -> tuple[list, list, np.ndarray]:
    """(keys, shard ids, float32 vectors) of a chunk's rows, in order."""
    from tasks.embed import stack_vectors

    return stack_vectors(list(chunk.files))


def first_copies(vectors: np.ndarray, block_rows: int = 16_384) -> np.ndarray:
    """Per row, the lowest row holding the bit-identical vector (itself when it has none before it).

    Rows are hashed on their bytes (a random multiply-add mod 2**64), then confirmed equal, so a hash collision
    only leaves two rows apart, never joins different vectors.
    """
    v = np.ascontiguousarray(vectors, np.float32)
    n = len(v)
    if n == 0:
        return np.zeros(0, np.int64)
    words = v.view(np.uint32)
    mult = np.random.default_rng(0x5EED).integers(1, 2**63, v.shape[1], dtype=np.uint64) | np.uint64(1)
    h = np.empty(n, np.uint64)
    for s in _chunks(n, block_rows):
        h[s] = (words[s].astype(np.uint64) * mult).sum(axis=1)
    order = np.argsort(h, kind="stable")  # a run of equal hashes starts at its lowest row
    hs = h[order]
    run_start = np.concatenate(([True], hs[1:] != hs[:-1]))
    rep = np.empty(n, np.int64)
    rep[order] = order[np.maximum.accumulate(np.where(run_start, np.arange(n), 0))]
    for s in _chunks(n, block_rows):
        differ = ~(v[rep[s]] == v[s]).all(axis=1)
        rep[s][differ] = np.arange(s.start, s.stop)[differ]
    return rep


def _save(path, **arrays) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        np.savez(f, **arrays)
    tmp.replace(path)


def _load(paths, *names) -> list[np.ndarray]:
    """The arrays `names` of npz files, each concatenated over the files in order."""
    parts = {k: [] for k in names}
    for p in paths:
        with np.load(p) as z:
            for k in names:
                parts[k].append(z[k])
    return [np.concatenate(parts[k]) if parts[k] else np.zeros(0) for k in names]


def _sample_chunk(chunk: Chunk, batch_rows: np.ndarray) -> np.ndarray:
    """The vectors of the sampled batch rows that fall in this chunk."""
    mine = batch_rows[(batch_rows >= chunk.start) & (batch_rows < chunk.stop)] - chunk.start
    return read_chunk(chunk)[2][mine] if len(mine) else np.zeros((0, 0), np.float32)


def _assign_chunk(chunk: Chunk, index: _Index, work) -> dict:
    """Collapse the chunk's exact copies (copy -> lowest row, an edge), spill the other rows into their cells."""
    try:
        v = check_vectors(read_chunk(chunk)[2])
    except ValueError as error:  # which shards: the chunk is the unit the message can name
        raise ValueError(f"{error} (in shards {chunk.files[0][0]}..{chunk.files[-1][0]})") from None
    n = len(v)
    rep = first_copies(v)
    copy = np.flatnonzero(rep != np.arange(n))
    _save(work / "copies" / f"{chunk.index:05d}.npz", i=rep[copy] + chunk.start, j=copy + chunk.start)
    own = np.flatnonzero(rep == np.arange(n))
    if not len(own):
        return {"rows": n, "copies": int(len(copy)), "clusters": None}
    if index.cells > 1:
        cells = _nearest(v[own], index.centroids, index.spill, index.block_rows, index.centre)[0]
    else:
        cells = np.zeros((len(own), 1), np.int32)
    order = np.argsort(cells.ravel(), kind="stable")  # (row, cell) entries by cell, rows ascending within one
    by_cell = cells.ravel()[order]
    bounds = np.flatnonzero(np.concatenate(([True], by_cell[1:] != by_cell[:-1], [True])))
    for a, b in zip(bounds[:-1], bounds[1:], strict=True):
        rows = own[order[a:b] // cells.shape[1]]
        _save(work / "cells" / f"{by_cell[a]:05d}" / f"{chunk.index:05d}.npz", rows=rows + chunk.start,
              cells=cells[order[a:b] // cells.shape[1]], vectors=v[rows])
    clusters = None
    if index.clusters is not None and n:
        label = _nearest(v, index.clusters, 1, index.block_rows)[0][:, 0]
        clusters = np.bincount(label, minlength=len(index.clusters))
    return {"rows": n, "copies": int(len(copy)), "clusters": clusters}


def _search_cell(cell: int, index: _Index, config: DedupConfig, work) -> dict:
    """The links inside one cell: copies across chunks, then the matrix-product search over distinct vectors.
    Only the rows the cell owns (their nearest cell) search, against every row in it, so each row is searched
    once however far it spills; a pair found in two cells is kept in the first."""
    files = sorted((work / "cells" / f"{cell:05d}").glob("*.npz"))
    rows, cells, v = _load(files, "rows", "cells", "vectors")
    if not len(rows):
        return {"rows": 0, "pairs": 0, "copies": 0, "method": "none"}
    total = int(len(rows))
    rep = first_copies(v)  # files come in chunk order, rows ascending: the first copy is the lowest row
    own = rep == np.arange(len(v))
    copy = np.flatnonzero(~own & (cells.min(axis=1) == cell))  # identical vectors share their cells: once
    ci, cj = [rows[rep[copy]]], [rows[copy]]
    keep = np.flatnonzero(own)
    rows, cells, v = rows[keep], cells[keep], v[keep]
    split = index.cells > 1
    stream, method, _, _ = _links(v, config, cells[:, 0] == cell if split else None)  # the rows it owns search
    pairs, dist = 0, [np.zeros(len(copy), np.float32)]
    none = np.iinfo(np.int32).max
    for i, j, d in stream:
        if split and i.size:  # a pair is searched in the own cell of either row that the other spilled into
            oi, oj = cells[i, 0], cells[j, 0]
            at_i = np.where((cells[j] == oi[:, None]).any(axis=1), oi, none)
            at_j = np.where((cells[i] == oj[:, None]).any(axis=1), oj, none)
            first = np.minimum(at_i, at_j) == cell  # kept in the first of them
            i, j, d = i[first], j[first], d[first]
        if i.size:
            ci.append(np.minimum(rows[i], rows[j]))
            cj.append(np.maximum(rows[i], rows[j]))
            dist.append(d)
            pairs += int(i.size)
    _save(work / "edges" / f"{cell:05d}.npz", i=np.concatenate(ci), j=np.concatenate(cj), d=np.concatenate(dist))
    return {"rows": total, "pairs": pairs, "copies": int(len(copy)), "method": method}


def _group(work, chunks: list[Chunk], n: int, dim: int, config: DedupConfig) -> tuple[dict, int]:
    """Union-find over every edge: groups, sizes and the report's stats; the grouped rows of each chunk are
    written for the passes that follow. Returns (stats, buckets for the keepers)."""
    paths = sorted((work / "edges").glob("*.npz")) + sorted((work / "copies").glob("*.npz"))
    i, j = (np.asarray(a, np.int64) for a in _load(paths, "i", "j"))
    nodes = np.unique(np.concatenate([i, j]))
    parent = np.arange(len(nodes), dtype=np.int64)
    _union(parent, np.searchsorted(nodes, i), np.searchsorted(nodes, j))  # roots are the smallest batch rows
    del i, j
    size = np.bincount(parent, minlength=len(nodes))
    roots = np.flatnonzero(parent == np.arange(len(nodes)))
    sizes = size[roots]
    values, counts = np.unique(sizes, return_counts=True)
    giant = np.flatnonzero(sizes >= max(config.giant_group, 2))
    giant = giant[np.argsort(-sizes[giant], kind="stable")]
    stats = {
        "group_size_hist": {int(s): int(c) for s, c in zip(values, counts, strict=True)},
        "groups": int(len(roots)),
        "rows_in_groups": int(len(nodes)),
        "duplicates_dropped": int(len(nodes) - len(roots)),
        "largest_group": int(sizes.max()) if len(sizes) else min(n, 1),
        "giant_groups": [(int(nodes[roots[g]]), int(sizes[g])) for g in giant],
    }
    for c in chunks:
        a, b = np.searchsorted(nodes, [c.start, c.stop])
        _save(work / "nodes" / f"{c.index:05d}.npz", row=nodes[a:b], root=nodes[parent[a:b]], size=size[parent[a:b]])
    buckets = max(1, math.ceil(len(nodes) / _partition_rows(config, 4 * dim)))
    return stats, buckets


def _partition_rows(config: DedupConfig, bytes_per_row: int) -> int:
    return max(1, (config.partition_mb << 20) // max(bytes_per_row, 1))


def _copy_map(chunk: Chunk, work) -> tuple[np.ndarray, np.ndarray]:
    """(copy row, the lowest row of its copies) within the chunk, by copy row."""
    rep, copy = (np.asarray(a, np.int64) for a in _load([work / "copies" / f"{chunk.index:05d}.npz"], "i", "j"))
    return copy, rep


def _shuffle_chunk(chunk: Chunk, buckets: int, work) -> int:
    """Each grouped row of the chunk (an exact copy only as a weight on its lowest row) to its group's bucket."""
    row, root = (np.asarray(a, np.int64) for a in _load([work / "nodes" / f"{chunk.index:05d}.npz"], "row", "root"))
    if not len(row):
        return 0
    keys, _, v = read_chunk(chunk)
    copy, rep = _copy_map(chunk, work)
    weight = np.ones(len(row), np.int64)
    np.add.at(weight, np.searchsorted(row, rep), 1)
    sent = ~np.isin(row, copy)
    row, root, weight = row[sent], root[sent], weight[sent]
    key = np.asarray(keys, dtype=object)[row - chunk.start].astype(str)
    bucket = root % buckets
    for b in np.unique(bucket):
        mine = bucket == b
        _save(work / "keep" / f"{b:05d}" / f"{chunk.index:05d}.npz", row=row[mine], root=root[mine],
              weight=weight[mine], key=key[mine], vectors=v[row[mine] - chunk.start])
    return int(sent.sum())


def _keep_bucket(bucket: int, starts: np.ndarray, config: DedupConfig, work) -> int:
    """Keepers of the bucket's groups, written per chunk: keep, distance to the mean, the group's key."""
    files = sorted((work / "keep" / f"{bucket:05d}").glob("*.npz"))
    row, root, weight, key, v = _load(files, "row", "root", "weight", "key", "vectors")
    if not len(row):
        return 0
    order = np.argsort(row, kind="stable")  # the lowest batch row wins a tie, as in dedup()
    row, root, weight, key, v = row[order], root[order], weight[order], key[order], v[order]
    keep, distance = keepers(v, root, config.block_rows, weights=weight)
    is_root = row == root
    group_key = key[is_root][np.searchsorted(row[is_root], root)]
    chunk_of = np.searchsorted(starts, row, side="right") - 1
    for c in np.unique(chunk_of):
        mine = chunk_of == c
        _save(work / "kept" / f"{c:05d}" / f"{bucket:05d}.npz", row=row[mine], keep=keep[mine],
              distance=distance[mine], group_key=group_key[mine])
    return int(len(row))


def _write_chunk(chunk: Chunk, work, out) -> int:
    """One groups file per shard of the chunk: every row, its group's key and size, kept or not."""
    import pyarrow.parquet as pq

    from tasks.io.shards import write_parquet

    n = chunk.stop - chunk.start
    keys = np.empty(n, object)
    at = 0
    for (_, path), rows in zip(chunk.files, chunk.rows, strict=True):
        keys[at:at + rows] = pq.read_table(path, columns=["key"]).column("key").to_pylist()
        at += rows
    group_key, size = keys.copy(), np.ones(n, np.int64)
    keep, distance = np.ones(n, bool), np.zeros(n, np.float32)
    row, gsize = _load([work / "nodes" / f"{chunk.index:05d}.npz"], "row", "size")
    size[np.asarray(row, np.int64) - chunk.start] = gsize
    kept = sorted((work / "kept" / f"{chunk.index:05d}").glob("*.npz"))
    row, k, d, g = _load(kept, "row", "keep", "distance", "group_key")
    local = np.asarray(row, np.int64) - chunk.start
    keep[local], distance[local], group_key[local] = k.astype(bool), d, g
    copy, rep = (a - chunk.start for a in _copy_map(chunk, work))
    keep[copy], distance[copy], group_key[copy] = False, distance[rep], group_key[rep]
    at = 0
    for (shard, _), rows in zip(chunk.files, chunk.rows, strict=True):
        s = slice(at, at + rows)
        at += rows
        write_parquet(pd.DataFrame({
            "key": pd.Series(keys[s], dtype="str"), "shard": pd.Series([shard] * rows, dtype="str"),
            "group_key": pd.Series(group_key[s], dtype="str"), "group_size": pd.Series(size[s], dtype="int64"),
            "keep": pd.Series(keep[s], dtype=bool), "distance_to_mean": pd.Series(distance[s], dtype="float32"),
        }), out / f"{shard}.parquet")
    return n


SAMPLE_PER_CELL = 256  # training rows per coarse cell


def _dim(chunks: list[Chunk]) -> int:
    """The vectors' dimension, from the first shard that has rows (0 for a batch without any)."""
    for c in chunks:
        for f, rows in zip(c.files, c.rows, strict=True):
            if rows:
                return int(read_chunk(Chunk(0, (f,), (rows,), 0))[2].shape[1])
    return 0


def _train_index(sample: np.ndarray, n: int, cells: int, config: DedupConfig) -> _Index:
    cells = min(cells, max(1, len(sample)))
    centroids = centre = clusters = None
    rng = np.random.default_rng(config.seed)
    if cells > 1:
        centroids, centre = _train(sample, cells, config.train_iters, config.seed, None, config.block_rows,
                                   centred=True)
    k = min(CLUSTERS, n // 5)
    if k >= 2:
        rows = np.sort(rng.choice(len(sample), min(len(sample), 50 * k), replace=False))
        clusters, _ = _train(sample[rows], k, 10, config.seed, None, config.block_rows)
    return _Index(len(centroids) if centroids is not None else 1, min(config.spill, cells), centroids, centre,
                  clusters, config.block_rows)


def dedup_batch(files: list[tuple[str, str]], config: DedupConfig, work, out, map_fn: Mapper = serial_map) -> dict:
    """The redundancy rule over a batch's vectors files `(shard, path)`: one groups file per shard under `out`
    (`<shard>.parquet`: key, shard, group_key, group_size, keep, distance_to_mean, as group_frame), and the
    report's figures. `work` holds the tasks' hand-offs and is removed after. `map_fn` spreads the tasks."""
    import shutil
    from functools import partial
    from pathlib import Path

    work, out = Path(work), Path(out)
    shutil.rmtree(work, ignore_errors=True)  # a killed build's leftovers
    seconds = {}
    t0 = time.perf_counter()
    chunks = plan_chunks(files, config.chunk_rows)
    n = sum(c.stop - c.start for c in chunks)
    dim = _dim(chunks)
    per_cell = _partition_rows(config, 4 * dim)
    cells = 1 if n <= per_cell else math.ceil(n * config.spill / per_cell)
    estimate = min(n, max(50 * CLUSTERS, SAMPLE_PER_CELL * cells))  # the report's clusters and the cells
    batch_rows = np.sort(np.random.default_rng(config.seed).choice(n, estimate, replace=False)) if n else np.zeros(0)
    parts = [p for p in map_fn(partial(_sample_chunk, batch_rows=batch_rows), chunks) if len(p)]
    sample = np.concatenate(parts) if parts else np.zeros((0, 0), np.float32)
    index = _train_index(sample, n, cells, config)
    seconds["index"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    assigned = map_fn(partial(_assign_chunk, index=index, work=work), chunks)
    searched = map_fn(partial(_search_cell, index=index, config=config, work=work), list(range(index.cells)))
    seconds["search"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    stats, buckets = _group(work, chunks, n, dim, config)
    map_fn(partial(_shuffle_chunk, buckets=buckets, work=work), chunks)
    starts = np.array([c.start for c in chunks], np.int64)
    map_fn(partial(_keep_bucket, starts=starts, config=config, work=work), list(range(buckets)))
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    map_fn(partial(_write_chunk, work=work, out=tmp), chunks)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    shutil.rmtree(work, ignore_errors=True)
    seconds["keepers"] = time.perf_counter() - t0
    if stats["giant_groups"]:  # a logo or placeholder image repeated across sites, or a threshold too loose
        logger.warning("dedup: %d groups of %d rows or more, the largest %d rows (group %d)",
                       len(stats["giant_groups"]), config.giant_group, *stats["giant_groups"][0][::-1])
    counts = [a["clusters"] for a in assigned if a["clusters"] is not None]
    methods = {s["method"] for s in searched} - {"none"}
    return {
        "rows": n, "pairs": sum(s["pairs"] + s["copies"] for s in searched) + sum(a["copies"] for a in assigned),
        "method": "ivf" if index.cells > 1 or "ivf" in methods else "exact", "threshold": config.threshold,
        **stats, "cells": index.cells, "spill": index.spill,
        "exact_copies": sum(a["copies"] for a in assigned) + sum(s["copies"] for s in searched),
        "largest_cell_rows": max((s["rows"] for s in searched), default=0),
        "cluster_sizes": sorted((int(c) for c in np.sum(counts, axis=0)), reverse=True) if counts else
        ([n] if n else []),
        "seconds": {k: round(v, 2) for k, v in seconds.items()},
    }

"""Benchmark: the stage-3 redundancy rule (tasks/dedup.py) on 1M generated CLIP-like image vectors, two threads.

Figures:
- dedup_seconds_1m (dedup_seconds with --quick or --rows): wall time of dedup() over all rows: the input check,
  the IVF index (spherical k-means on a sample, every row's nearest lists), the search, the union-find and the
  keepers. BLAS is limited to 2 threads (OMP/OpenBLAS/MKL_NUM_THREADS, set before numpy is imported): the
  target is 900 s for 1M rows on 2 cores.
- dedup_recall: pair_recall, the share of the exact within-threshold pairs of 20k random rows (each against
  every row, found by exact blocked search) that the IVF index reaches. The target is 0.95.
- planted_within_linked / planted_within: planted pairs closer than the cut that dedup linked; and
  planted_beyond_linked, planted pairs at or beyond the cut that it linked (wrongly: it should be 0).
- rows, pairs, groups, duplicates_dropped, partitions, nprobe; random_pair_cos, the mean cosine of random pairs.

The vectors follow real CLIP image embeddings, which fill a narrow cone rather than the sphere: each is a shared
unit axis plus isotropic Gaussian noise of the same norm, normalised, so two random rows have cosine 0.5 (a
worst case for an IVF: no cluster structure beyond the cone, so lists split an isotropic cloud). 15% of the rows
are planted in duplicate groups of 2-5: a random base row and members at a cosine distance to it drawn uniformly
from [0.02, 0.18] along a random direction, both sides of the 0.1 cut; member-member pairs fall where they
fall, and the planted pairs are judged on their exact float64 distance. Seeded, so the input is the same every
run. Last stdout line: one JSON object of figures.
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):  # before numpy loads its BLAS
    os.environ[_var] = "2"

import argparse  # noqa: E402 - the thread limits above must come first
import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DIM = 768
GROUPED = 0.15  # share of rows in planted groups
SPREAD = (0.02, 0.18)  # cosine distance of a planted member to its group's base row


def cone(
    n: int, dim: int = DIM, seed: int = 0, grouped: float = GROUPED, spread: tuple = SPREAD, block: int = 65_536
) -> tuple[np.ndarray, list[np.ndarray]]:
    """(n x dim unit float32 rows in a cone around one axis, the planted groups as arrays of rows, base first)."""
    rng = np.random.default_rng(seed)
    axis = rng.standard_normal(dim)
    axis /= np.linalg.norm(axis)
    out = np.empty((n, dim), np.float32)
    for start in range(0, n, block):
        x = rng.standard_normal((min(block, n - start), dim), dtype=np.float32)
        x *= np.float32(1 / np.sqrt(dim))  # noise of norm ~1 against a unit axis: random pairs at cosine ~0.5
        x += axis.astype(np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        out[start : start + len(x)] = x
    sizes = rng.integers(2, 6, size=int(grouped * n / 2) + 1)
    sizes = sizes[: np.searchsorted(np.cumsum(sizes), grouped * n, side="right")]
    rows = rng.permutation(n)[: sizes.sum()]
    groups = np.split(rows, np.cumsum(sizes)[:-1])
    base = np.concatenate([np.full(len(g) - 1, g[0]) for g in groups]) if groups else np.empty(0, np.int64)
    members = np.concatenate([g[1:] for g in groups]) if groups else np.empty(0, np.int64)
    for start in range(0, len(members), block):
        b = out[base[start : start + block]].astype(np.float64)
        h = rng.standard_normal(b.shape)
        h -= np.einsum("ij,ij->i", h, b)[:, None] * b
        h /= np.linalg.norm(h, axis=1, keepdims=True)
        cos = 1.0 - rng.uniform(*spread, size=len(b))
        out[members[start : start + block]] = cos[:, None] * b + np.sqrt(1 - cos**2)[:, None] * h
    return out, groups


def planted_pairs(vectors: np.ndarray, groups: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(i, j, exact float64 distance) of every pair i < j inside a planted group."""
    pi, pj = [], []
    for g in groups:
        a, b = np.triu_indices(len(g), 1)
        pi.append(np.minimum(g[a], g[b]))
        pj.append(np.maximum(g[a], g[b]))
    if not pi:
        return np.empty(0, np.int64), np.empty(0, np.int64), np.empty(0)
    i, j = np.concatenate(pi), np.concatenate(pj)
    d = np.empty(len(i))
    for start in range(0, len(i), 65_536):  # in float64, a block at a time: the bench's memory is the vectors'
        a, b = i[start : start + 65_536], j[start : start + 65_536]
        d[start : start + len(a)] = 1.0 - np.einsum("ij,ij->i", vectors[a].astype(np.float64), vectors[b])
    return i, j, d


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, help="rows to generate (default 1,000,000)")
    ap.add_argument("--quick", action="store_true", help="100,000 rows: a few minutes")
    ap.add_argument("--recall-rows", type=int, default=20_000, help="rows sampled for pair_recall (default 20k)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    n = args.rows or (100_000 if args.quick else 1_000_000)

    from tasks.dedup import DedupConfig, dedup, pair_recall

    try:  # torch, when present, would otherwise spread its own pools over every core
        import torch

        torch.set_num_threads(2)
    except ImportError:
        pass
    print(f"threads: OMP/OPENBLAS/MKL_NUM_THREADS={os.environ['OMP_NUM_THREADS']}, {os.cpu_count()} CPUs seen")
    t0 = time.perf_counter()
    vectors, groups = cone(n, seed=args.seed)
    print(
        f"generated {n:,} x {DIM} vectors, {sum(map(len, groups)):,} rows in {len(groups):,} planted groups "
        f"({time.perf_counter() - t0:.1f} s)"
    )
    rng = np.random.default_rng(args.seed + 1)
    a, b = rng.integers(0, n, size=(2, 10_000))
    random_cos = float(np.einsum("ij,ij->i", vectors[a], vectors[b])[a != b].mean())
    print(f"random pairs: mean cosine {random_cos:.3f}")

    config = DedupConfig()
    t0 = time.perf_counter()
    result = dedup(vectors, config, keep_links=True)
    seconds = time.perf_counter() - t0
    phases = ", ".join(f"{k} {v:.1f} s" for k, v in result.seconds.items())
    print(
        f"dedup: {seconds:.1f} s ({phases}); method {result.method}, {result.partitions} lists, nprobe {result.nprobes}"
    )
    stats = result.stats
    print(
        f"dedup: {result.pairs:,} pairs, {stats['groups']:,} groups, {stats['rows_in_groups']:,} rows in groups, "
        f"{stats['duplicates_dropped']:,} dropped, largest group {stats['largest_group']}, sizes "
        f"{stats['group_size_hist']}"
    )

    pi, pj, pd = planted_pairs(vectors, groups)
    li, lj, _ = result.links
    linked = np.isin(pi * n + pj, li * n + lj)
    within = pd < config.threshold
    print(
        f"planted pairs: {int((linked & within).sum()):,} of {int(within.sum()):,} within the cut linked, "
        f"{int((linked & ~within).sum()):,} of {int((~within).sum()):,} beyond it linked"
    )

    t0 = time.perf_counter()
    recall = pair_recall(vectors, config, sample_rows=min(args.recall_rows, n), seed=args.seed)
    print(
        f"pair recall on {min(args.recall_rows, n):,} sampled rows against all: {recall:.4f} "
        f"({time.perf_counter() - t0:.1f} s)"
    )

    figures = {
        ("dedup_seconds_1m" if n == 1_000_000 else "dedup_seconds"): round(seconds, 1),
        "dedup_recall": round(recall, 4),
        "rows": n,
        "threads": 2,
        "pairs": result.pairs,
        "groups": stats["groups"],
        "duplicates_dropped": stats["duplicates_dropped"],
        "partitions": result.partitions,
        "nprobe": result.nprobes,  # the old spelling: these figures are compared across sessions
        "planted_within": int(within.sum()),
        "planted_within_linked": int((linked & within).sum()),
        "planted_beyond_linked": int((linked & ~within).sum()),
        "random_pair_cos": round(random_cos, 3),
    }
    print(json.dumps(figures))
    return figures


if __name__ == "__main__":
    main()

"""Benchmark: the batch reduces at two batch sizes, M and 4M rows: how their memory and time grow with the rows.

For each size, in a process of its own with a 2-worker local Dask cluster (1 thread each):
- dedup: tasks.dedup.dedup_batch over generated vectors laid out as the embed step's per-shard vectors files
  (256-d, SHARD_ROWS rows a shard; the code path is the one 768-d takes). The vectors are bench/dedup.py's cone
  with its planted groups, generated a block at a time, each block reflected onto one shared axis so that the
  batch is one cone. dedup_recall: of the exact within-threshold pairs of RECALL_ROWS sampled rows (each against
  every row, by blocked matrix products over the files), the share whose two rows dedup put in one group.
- crossbatch: a table of as many committed rows (M, then 4M) in LanceDB with its IVF-PQ index (built before the
  clock starts, in a process of its own: setup, reported apart), then tasks.crossbatch.search_batch of a batch
  of QUERY_ROWS survivors (a third of them near copies of committed rows) in query tasks on the cluster, and
  tasks.io.lance.commit_run of the survivors it did not match. crossbatch_recall: the search's own check, ANN
  against exact search on its recall sample (pair_recall).
Figures: max_process_rss_mb, the largest peak RSS of any one process (the size's process, the scheduler and the
workers) over both sizes; rss_growth_ratio and seconds_growth_ratio, 4M over M (seconds: dedup, search and commit);
the recalls (the lower of the two sizes). Full: M = 2.5M; --quick: M = 250k. Last stdout line: one JSON object.
The size's process holds only the reduces' driver: generating the files, the committed table and the survivors
(setup) and the dedup_recall check each run in a process of their own, so that its peak RSS is the reduces' own.
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):  # one BLAS thread a worker process
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402 - the thread limits above come before numpy loads
import json  # noqa: E402
import resource  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DIM = 256
SHARD_ROWS = 25_000  # rows a vectors file (a real shard holds a few hundred: chunks gather whole shards alike)
BLOCK_ROWS = 250_000  # rows generated at once (the bench process's own memory)
QUERY_ROWS = 2_000  # survivors searched (LanceDB's ANN took ~50 ms a query here: 60k rows, 2 busy cores)
QUERY_SHARD = 250  # survivors a shard
RECALL_ROWS = 1_000
IDENTITY = {"name": "bench-scale-reduces", "revision": "v1", "dim": DIM}
COMMITTED_SEED = 1  # the committed rows' blocks; the batch's are seed 0


def _blocks(n: int, seed: int):
    """(first row, vectors, planted groups as batch rows) a block at a time: one cone, whatever the block."""
    from bench.dedup import cone

    axis = np.random.default_rng(0).standard_normal(DIM)  # one cone for every seed: the batch, committed, queries
    axis /= np.linalg.norm(axis)
    for b, start in enumerate(range(0, n, BLOCK_ROWS)):
        rows = min(BLOCK_ROWS, n - start)
        s = seed * 100_003 + b
        v, groups = cone(rows, dim=DIM, seed=s)
        own = np.random.default_rng(s).standard_normal(DIM)  # cone()'s axis: its generator's first draw
        own /= np.linalg.norm(own)
        u = own - axis
        if np.linalg.norm(u) > 0:  # the reflection taking this block's axis onto the shared one
            u = (u / np.linalg.norm(u)).astype(np.float32)
            v -= 2 * (v @ u)[:, None] * u
        yield start, v, [g + start for g in groups]


def write_shards(n: int, folder: Path, seed: int) -> list[tuple[str, str]]:
    """The embed step's vectors files of an n-row batch: key, vector, sha256, SHARD_ROWS rows each."""
    import pandas as pd

    from tasks.io.shards import write_parquet

    folder.mkdir(parents=True, exist_ok=True)
    files = []
    for start, v, _ in _blocks(n, seed):
        for at in range(0, len(v), SHARD_ROWS):
            shard = f"{len(files):05d}"
            rows = v[at:at + SHARD_ROWS]
            keys = [f"s{seed}-{start + at + i}" for i in range(len(rows))]
            path = folder / f"{shard}.vectors.parquet"
            write_parquet(pd.DataFrame({"key": keys, "vector": list(rows), "sha256": ["0" * 64] * len(rows)}), path)
            files.append((shard, str(path)))
    return files


def dedup_recall(files: list[tuple[str, str]], groups: Path, threshold: float, seed: int = 1) -> float:
    """Share of the exact within-threshold pairs of RECALL_ROWS random rows that dedup put in one group."""
    import pandas as pd

    from tasks.dedup import DedupConfig, find_cross_pairs
    from tasks.embed import stack_vectors

    frames = [pd.read_parquet(groups / f"{s}.parquet", columns=["key", "group_key"]) for s, _ in files]
    group_of = pd.concat(frames, ignore_index=True)
    n = len(group_of)
    sample = np.sort(np.random.default_rng(seed).choice(n, min(RECALL_ROWS, n), replace=False))
    picked, at = [], 0
    for s, path in files:
        _, _, v = stack_vectors([(s, path)])
        mine = sample[(sample >= at) & (sample < at + len(v))] - at
        picked.append(v[mine])
        at += len(v)
    queries = np.concatenate(picked)
    pairs, at = [], 0
    for s, path in files:  # each sampled row against every row, a file at a time
        _, _, v = stack_vectors([(s, path)])
        qi, j, _ = find_cross_pairs(queries, v, DedupConfig(threshold=threshold))
        pairs.append((sample[qi], j + at))
        at += len(v)
    q = np.concatenate([p[0] for p in pairs])
    j = np.concatenate([p[1] for p in pairs])
    q, j = q[q != j], j[q != j]
    if not len(q):
        return 1.0
    g = group_of["group_key"].to_numpy()
    return float((g[q] == g[j]).mean())


def _committed_table(n: int, uri: str, seed: int) -> dict:
    """Setup: n committed rows of an earlier run in LanceDB, and the IVF-PQ index."""
    import pyarrow as pa

    from tasks.io import lance

    t0 = time.perf_counter()
    table = lance.open_embeddings(uri, IDENTITY)
    for start, v, _ in _blocks(n, seed):
        keys = [f"c-{start + i}" for i in range(len(v))]
        table.add(pa.table({
            "row_id": [f"earlier/{k}" for k in keys], "key": keys, "run_id": ["earlier"] * len(v),
            "snapshot": ["S"] * len(v), "sha256": ["0" * 64] * len(v), "model": [IDENTITY["name"]] * len(v),
            "model_revision": ["v1"] * len(v), "committed": [True] * len(v),
            "vector": pa.FixedSizeListArray.from_arrays(pa.array(v.ravel()), DIM),
        }).cast(table.schema))
    lance.commit_run(uri, table.name, "earlier", "S", [])  # registered: its rows are committed already
    written = time.perf_counter() - t0
    t0 = time.perf_counter()
    lance.ensure_index(lance.open_embeddings(uri, IDENTITY), 0)  # a fresh handle: commit_run indexed row_id
    return {"write_s": round(written, 1), "index_s": round(time.perf_counter() - t0, 1),
            "rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}


def _queries(folder: Path, uri: str, committed: int, seed: int) -> list:
    """The batch's survivors as shards (survivors files and vectors files), their vectors in LanceDB uncommitted
    as load_lancedb leaves them: a third at cosine distance 0.01-0.08 from a committed row, the rest new rows."""
    import pandas as pd

    from tasks.crossbatch import Query
    from tasks.io import lance
    from tasks.io.shards import write_parquet

    rng = np.random.default_rng(seed)
    _, fresh, _ = next(_blocks(QUERY_ROWS, seed + 7))
    near = rng.choice(QUERY_ROWS, QUERY_ROWS // 3, replace=False)
    targets = np.sort(rng.choice(min(committed, BLOCK_ROWS), len(near), replace=False))
    _, base, _ = next(_blocks(min(committed, BLOCK_ROWS), COMMITTED_SEED))  # the first committed block, again
    h = rng.standard_normal((len(near), DIM)).astype(np.float32)
    b = base[targets]
    h -= np.einsum("ij,ij->i", h, b)[:, None] * b
    h /= np.linalg.norm(h, axis=1, keepdims=True)
    cos = 1 - rng.uniform(0.01, 0.08, len(near)).astype(np.float32)
    fresh[near] = cos[:, None] * b + np.sqrt(1 - cos**2)[:, None] * h
    fresh /= np.linalg.norm(fresh, axis=1, keepdims=True)
    shards = []
    for at in range(0, QUERY_ROWS, QUERY_SHARD):
        shard = f"{len(shards):05d}"
        keys = [f"q-{at + i}" for i in range(QUERY_SHARD)]
        frame = pd.DataFrame({"key": keys, "vector": list(fresh[at:at + QUERY_SHARD]),
                              "sha256": ["0" * 64] * QUERY_SHARD})
        write_parquet(frame, folder / f"{shard}.vectors.parquet")
        write_parquet(frame[["key"]], folder / f"{shard}.parquet")
        lance.upsert_embeddings(uri, IDENTITY, "batch", "S", frame)
        shards.append(Query(shard, str(folder / f"{shard}.parquet"), str(folder / f"{shard}.vectors.parquet"),
                            QUERY_SHARD))
    return shards


def prepare(n: int, work: Path, seed: int = 0) -> dict:
    """Setup, in a process of its own: the batch's vectors files, the committed table and its index, and the
    survivors to search, as JSON (the measured process then holds only the reduces)."""
    from dataclasses import asdict

    shutil.rmtree(work, ignore_errors=True)
    files = write_shards(n, work / "vectors", seed)
    uri = str(work / "lancedb")
    setup = _committed_table(n, uri, seed=COMMITTED_SEED)
    shards = _queries(work / "queries", uri, n, seed)
    setup["rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    return {"files": files, "uri": uri, "queries": [asdict(q) for q in shards], "setup": setup}


def _own_process(flag: str, *args) -> dict:
    """This script's `flag` step in a process of its own: its last stdout line, as JSON."""
    done = subprocess.run([sys.executable, __file__, flag, *map(str, args)], check=True, text=True,
                          capture_output=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    return json.loads(done.stdout.strip().splitlines()[-1])


def measure(n: int, work: Path) -> dict:
    """One size: setup and the recall check each in a process of their own; in this process only dedup, search
    and commit on a fresh 2-worker cluster, and every peak RSS."""
    import pandas as pd
    from dask.distributed import Client, LocalCluster

    from tasks.crossbatch import CrossbatchConfig, Query, search_batch
    from tasks.dedup import DedupConfig, dedup_batch
    from tasks.io import lance

    ready = _own_process("--prepare", n, work)
    files = [tuple(f) for f in ready["files"]]
    uri, shards = ready["uri"], [Query(**q) for q in ready["queries"]]
    with LocalCluster(n_workers=2, threads_per_worker=1, memory_limit="8GiB", processes=True,
                      local_directory=str(work / "dask"), dashboard_address=None) as cluster, Client(cluster) as client:
        def on_cluster(fn, items):
            return client.gather(client.map(fn, items, pure=False))

        config = DedupConfig()
        t0 = time.perf_counter()
        stats = dedup_batch(files, config, work / "dedup.work", work / "groups", on_cluster)
        dedup_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        search = CrossbatchConfig(chunk_rows=500)  # a batch's worth of tasks for the few survivors searched
        info = search_batch(uri, IDENTITY, shards, ["earlier"], config.threshold, search, work / "matches",
                            on_cluster)
        search_s = time.perf_counter() - t0
        matched = set(pd.concat([pd.read_parquet(work / "matches" / f"{q.shard}.parquet") for q in shards])["key"])
        kept = (f"q-{i}" for i in range(QUERY_ROWS) if f"q-{i}" not in matched)
        t0 = time.perf_counter()
        lance.commit_run(uri, lance.table_name(IDENTITY["name"], DIM), "batch", "S", kept)
        commit_s = time.perf_counter() - t0
        workers = client.run(lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
        scheduler = client.run_on_scheduler(lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    rss = {"this": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "scheduler": scheduler,
           **{f"worker{k}": v for k, v in enumerate(workers.values())}}
    recall = _own_process("--recall", work, config.threshold)["dedup_recall"]
    shutil.rmtree(work, ignore_errors=True)
    return {
        "rows": n, "dedup_s": round(dedup_s, 1), "search_s": round(search_s, 1), "commit_s": round(commit_s, 2),
        "dedup_recall": round(recall, 4), "crossbatch_recall": info.get("pair_recall"),
        "matches": info["matches"], "near_copies_planted": QUERY_ROWS // 3, "search_tasks": info["tasks"],
        "cells": stats["cells"], "largest_cell_rows": stats["largest_cell_rows"], "groups": stats["groups"],
        "dedup_phase_s": stats["seconds"], "setup": ready["setup"],
        "rss_mb": {k: round(v, 1) for k, v in rss.items()}, "max_process_rss_mb": round(max(rss.values()), 1),
    }


def run(quick: bool) -> dict:
    """Both sizes, each in a process of its own (so its peak RSS is its own); the figures."""
    m = 250_000 if quick else 2_500_000
    work = Path(tempfile.gettempdir()) / "danqing-bench-scale-reduces"
    sizes = []
    for n in (m, 4 * m):
        sizes.append(_own_process("--size", n, work / f"n{n}"))
        print(json.dumps(sizes[-1]), flush=True)
    small, large = sizes

    def total(s):
        return s["dedup_s"] + s["search_s"] + s["commit_s"]

    recalls = [s["crossbatch_recall"] for s in sizes if s["crossbatch_recall"] is not None]
    return {
        "sizes": [s["rows"] for s in sizes],
        "dedup_recall": min(s["dedup_recall"] for s in sizes),
        "crossbatch_recall": min(recalls) if recalls else None,
        "max_process_rss_mb": max(s["max_process_rss_mb"] for s in sizes),
        "rss_growth_ratio": round(large["max_process_rss_mb"] / small["max_process_rss_mb"], 3),
        "seconds_growth_ratio": round(total(large) / total(small), 3),
        "seconds": [round(total(s), 1) for s in sizes],
        "setup_rss_mb": [s["setup"]["rss_mb"] for s in sizes],
    }


def main(argv: list[str] | None = None) -> dict | None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="M = 250k rows (full: 2.5M)")
    ap.add_argument("--size", nargs=2, metavar=("ROWS", "WORK"), help=argparse.SUPPRESS)  # one size, internal
    ap.add_argument("--prepare", nargs=2, metavar=("ROWS", "WORK"), help=argparse.SUPPRESS)  # one size's setup
    ap.add_argument("--recall", nargs=2, metavar=("WORK", "THRESHOLD"), help=argparse.SUPPRESS)  # its recall check
    args = ap.parse_args(argv)
    if args.prepare:
        print(json.dumps(prepare(int(args.prepare[0]), Path(args.prepare[1]))))
        return None
    if args.recall:
        work = Path(args.recall[0])
        files = [(p.name.split(".")[0], str(p)) for p in sorted((work / "vectors").glob("*.vectors.parquet"))]
        print(json.dumps({"dedup_recall": dedup_recall(files, work / "groups", float(args.recall[1]))}))
        return None
    if args.size:
        print(json.dumps(measure(int(args.size[0]), Path(args.size[1]))))
        return None
    figures = run(args.quick)
    print(json.dumps(figures))
    return figures


if __name__ == "__main__":
    main()

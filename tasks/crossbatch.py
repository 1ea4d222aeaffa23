"""Stage crossbatch (stage 4): the redundancy rule again, across runs: a run's survivors against the committed
output of every run committed before it in the same output root. Earlier committed rows always win."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from schemas.reasons import REASONS
from tasks.io import lance
from tasks.io.lance import Nearest

STAGE = "crossbatch"
RULES = REASONS[STAGE]


@dataclass(frozen=True)
class CrossbatchConfig:
    """How a run's survivors are searched against the committed rows of earlier runs; the radius is stage 3's
    (`dedup.threshold`), so one setting says what a duplicate is within a batch and across batches."""

    index_min_rows: int = 100_000  # an ANN index is built once the table has this many rows; exact search below
    nprobes: int = 64  # IVF lists searched per query (STACK.md: recall needs many, with a refine step)
    refine_factor: int = 50  # candidates re-ranked on full vectors per result
    query_batch: int = 16  # query vectors per search call: LanceDB's peak memory grows with it (60k committed
    #   rows, 256-d, nprobes 64, refine 50: 0.65 GB at 16, 2.9 GB at 128; 1,024 killed a worker), not its speed
    recall_sample: int = 200  # survivors whose ANN result is checked against exact search (the report's recall)
    exact_block: int = 65_536  # committed rows per block in the exact search
    chunk_rows: int = 100_000  # survivors (whole shards) one search task holds: search_batch's unit of work


def search_committed(table, queries: np.ndarray, run_ids: list[str], threshold: float,
                     config: CrossbatchConfig = CrossbatchConfig()) -> tuple[Nearest, dict]:
    """The nearest committed row of the runs `run_ids` for each query vector, kept where it lies strictly within
    `threshold` (cosine distance): (query index, key, run id, distance) arrays, and how the search ran
    ({"method": "none" | "exact" | "ann", "committed_rows", and for "ann" "nprobes", "refine_factor",
    "recall_sample", "pair_recall", "nearest_recall"}). `table` None (no embeddings table yet) finds nothing."""
    info = {"method": "none", "committed_rows": 0}
    if table is None or not run_ids or len(queries) == 0:
        return lance.no_nearest(), info
    where = lance.committed_filter(run_ids)
    info["committed_rows"] = table.count_rows(where)
    if not info["committed_rows"]:
        return lance.no_nearest(), info
    indexed = lance.is_indexed(table)
    found = _nearest(table, queries, where, indexed, config)
    if indexed:
        rng = np.random.default_rng(0)  # the same sample on a re-run, so the report's recall figure repeats
        sample = np.sort(rng.choice(len(queries), size=min(config.recall_sample, len(queries)), replace=False))
        exact = lance.nearest_scan(table, queries[sample], where, config.exact_block)
        info.update(method="ann", nprobes=config.nprobes, refine_factor=config.refine_factor,
                    **ann_recall(sample, exact, found, threshold))
    else:
        info.update(method="exact")
    return _within(found, threshold), info


def _nearest(table, queries: np.ndarray, where: str, indexed: bool, config: CrossbatchConfig) -> Nearest:
    if indexed:
        return lance.nearest_indexed(table, queries, where, config.nprobes, config.refine_factor, config.query_batch)
    return lance.nearest_scan(table, queries, where, config.exact_block)


def _within(found: Nearest, threshold: float) -> Nearest:
    close = found[3] < threshold
    return tuple(a[close] for a in found)


def ann_recall(sample: np.ndarray, exact: Nearest, found: Nearest, threshold: float) -> dict:
    """Recall of an ANN search (`found`, over all queries) against exact search (`exact`, over the queries
    `sample`, indexed into it): of the sampled queries whose exact nearest row lies within `threshold`, the
    share the ANN search also found within it (the same row): pair_recall; and the share whose nearest row the
    ANN search got right at all: nearest_recall. None where there is nothing to count."""
    ann = {int(q): (k, r, d) for q, k, r, d in zip(*found, strict=True)}
    eq, ekeys, eruns, edist = exact
    got = [ann.get(int(sample[q]), (None, None, np.inf)) for q in eq]
    same = np.array([g[:2] == (k, r) for g, k, r in zip(got, ekeys, eruns, strict=True)], bool)
    within = np.array([g[2] < threshold for g in got], bool)
    close = np.asarray(edist) < threshold
    hits = (same & within)[close]
    return {"recall_sample": int(len(sample)),
            "pair_recall": float(hits.mean()) if hits.size else None,
            "nearest_recall": float(same.mean()) if same.size else None}


def match_frame(keys: list[str] | np.ndarray, found: Nearest) -> pd.DataFrame:
    """The matches as `mark_crossbatch` reads them (key, match_key, match_run: str; match_distance: float64),
    from the run's query keys (in query order) and what `search_committed` found."""
    qi, match_key, match_run, dist = found
    key_arr = pd.Series(keys, dtype="str").to_numpy()
    return pd.DataFrame({"key": pd.Series(key_arr[qi], dtype="str"),
                         "match_key": pd.Series(list(match_key), dtype="str"),
                         "match_run": pd.Series(list(match_run), dtype="str"),
                         "match_distance": pd.Series(dist, dtype="float64")})


def mark_crossbatch(frame: pd.DataFrame, matches: pd.DataFrame) -> pd.DataFrame:
    """Rows with a committed earlier row within the radius (`matches`: key, match_key, match_run,
    match_distance) are `crossbatch.duplicate`; the match is kept beside them so a reject says what it repeats."""
    out = frame.copy()
    m = matches.drop_duplicates("key").set_index("key")
    for col in ("match_key", "match_run"):
        out[f"crossbatch_{col}"] = out["key"].map(m[col]).astype("str")
    out["crossbatch_distance"] = out["key"].map(m["match_distance"]).astype("float64")
    reason = pd.Series(pd.NA, index=out.index, dtype="str")
    reason[out["key"].isin(m.index).to_numpy()] = f"{STAGE}.duplicate"
    out["drop_reason"] = reason
    return out


# ---- a batch's survivors in several tasks -----------------------------------------------------------------------


@dataclass(frozen=True)
class Query:
    """Where one shard's survivors are: its shard id, a file whose `key` column lists them, its vectors file,
    and how many there are."""

    shard: str
    keys_file: str
    vectors_file: str
    rows: int


def plan_queries(shards: list[Query], chunk_rows: int) -> list[list[Query]]:
    """Consecutive shards in chunks of at most `chunk_rows` survivors (a larger shard is a chunk of its own)."""
    chunks, rows = [[]], 0
    for q in shards:
        if chunks[-1] and rows + q.rows > chunk_rows:
            chunks.append([])
            rows = 0
        chunks[-1].append(q)
        rows += q.rows
    return [c for c in chunks if c]


def _search_chunk(chunk: list[tuple[int, Query]], uri: str, identity: dict | None, run_ids: list[str],
                  threshold: float, config: CrossbatchConfig, sample: np.ndarray, out) -> dict:
    """One task: the chunk's survivors against the committed rows, one matches file per shard under `out`;
    and, for the recall check, the vectors and ANN results of its survivors among the batch's `sample` rows."""
    import pyarrow.parquet as pq

    from tasks.embed import stack_vectors
    from tasks.io.shards import write_parquet

    table = lance.open_embeddings(uri, identity, create=False) if identity and run_ids else None
    indexed = table is not None and lance.is_indexed(table)
    where = lance.committed_filter(run_ids) if run_ids else ""
    picked, found_sample, matches = [], [], 0
    for first, q in chunk:
        keys, vectors = [], np.zeros((0, 0), np.float32)
        if table is not None and q.rows:
            wanted = set(pq.read_table(q.keys_file, columns=["key"]).column("key").to_pylist())
            keys, _, vectors = stack_vectors([(q.shard, q.vectors_file)], wanted)
        found = _nearest(table, vectors, where, indexed, config) if len(keys) else lance.no_nearest()
        mine = sample[(sample >= first) & (sample < first + len(keys))] - first
        if indexed and len(mine):
            hit = np.isin(found[0], mine)
            picked.append(vectors[mine])
            found_sample.append((np.searchsorted(mine, found[0][hit]), *(a[hit] for a in found[1:])))
        frame = match_frame(keys, _within(found, threshold))
        matches += len(frame)
        write_parquet(frame, out / f"{q.shard}.parquet")
    return {"matches": matches, "sample": picked, "found": found_sample}


def search_batch(uri: str, identity: dict | None, shards: list[Query], run_ids: list[str], threshold: float,
                 config: CrossbatchConfig, out, map_fn=None) -> dict:
    """search_committed over a batch's survivors, `config.chunk_rows` of them a task spread by `map_fn` (map(fn,
    items); serial when None): one matches file per shard under `out` (what mark_crossbatch reads), and the
    report's figures, the ANN recall against exact search on `recall_sample` survivors among them."""
    import shutil
    from functools import partial
    from pathlib import Path

    out = Path(out)
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    queries = sum(q.rows for q in shards)
    table = lance.open_embeddings(uri, identity, create=False) if identity and run_ids else None
    info = {"method": "none", "committed_rows": 0}
    if table is not None:
        info["committed_rows"] = table.count_rows(lance.committed_filter(run_ids))
        if not info["committed_rows"]:
            table = None
    indexed = table is not None and lance.is_indexed(table)
    rng = np.random.default_rng(0)  # the same sample on a re-run, so the report's recall figure repeats
    sample = np.sort(rng.choice(queries, size=min(config.recall_sample, queries), replace=False)) if indexed \
        else np.zeros(0, np.int64)
    chunks, first = [], 0
    for chunk in plan_queries(shards, config.chunk_rows):
        chunks.append([])
        for q in chunk:
            chunks[-1].append((first, q))
            first += q.rows
    done = (map_fn or (lambda fn, items: [fn(x) for x in items]))(
        partial(_search_chunk, uri=uri, identity=identity if table is not None else None, run_ids=run_ids,
                threshold=threshold, config=config, sample=sample, out=tmp), chunks)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    if table is not None:
        info["method"] = "ann" if indexed else "exact"
    if indexed:
        vectors = [v for d in done for v in d["sample"]]
        found = [f for d in done for f in d["found"]]
        offsets = np.cumsum([0] + [len(v) for v in vectors])
        picked = np.concatenate(vectors) if vectors else np.zeros((0, 0), np.float32)
        ann = lance.no_nearest()
        if found:  # each chunk's sample indices, shifted to where its vectors sit in `picked`
            ann = (np.concatenate([f[0] + off for f, off in zip(found, offsets, strict=False)]),
                   *(np.concatenate([f[k] for f in found]) for k in (1, 2, 3)))
        exact = lance.nearest_scan(table, picked, lance.committed_filter(run_ids), config.exact_block) \
            if len(picked) else lance.no_nearest()
        info.update(nprobes=config.nprobes, refine_factor=config.refine_factor,
                    **ann_recall(np.arange(len(picked)), exact, ann, threshold))
    return {"queries": queries, "matches": sum(d["matches"] for d in done), "tasks": len(chunks), **info}

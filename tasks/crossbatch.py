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
    query_batch: int = 1024  # query vectors per search call
    recall_sample: int = 200  # survivors whose ANN result is checked against exact search (the report's recall)
    exact_block: int = 65_536  # committed rows per block in the exact search


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
    if lance.is_indexed(table):
        found = lance.nearest_indexed(table, queries, where, config.nprobes, config.refine_factor, config.query_batch)
        rng = np.random.default_rng(0)  # the same sample on a re-run, so the report's recall figure repeats
        sample = np.sort(rng.choice(len(queries), size=min(config.recall_sample, len(queries)), replace=False))
        exact = lance.nearest_indexed(table, queries[sample], where, config.nprobes, config.refine_factor,
                                      config.query_batch, exact=True)
        info.update(method="ann", nprobes=config.nprobes, refine_factor=config.refine_factor,
                    **ann_recall(sample, exact, found, threshold))
    else:
        found = lance.nearest_scan(table, queries, where, config.exact_block)
        info.update(method="exact")
    close = found[3] < threshold
    return tuple(a[close] for a in found), info


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

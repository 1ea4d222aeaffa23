"""The release flow: the committed output of one or more runs merged into one published dataset, with takedowns.

A run is read through its units: a single run's directory, or each batch directory of a batched run
(`<run>/batches/<k>/`, see flows/batches.py); every unit holds a whole run's layout. A unit's `dataset/` holds
exactly its committed rows (the dataset is written after the cross-batch search), so the release is those rows
less what the exclude lists and the opt-out re-check leave out, streamed one dataset shard at a time.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel, Field

from flows import batches
from flows.report import figure, merge_reports
from flows.settings import build_config, check_config
from tasks.io.http import HttpFetcher
from tasks.io.lance import committed_blocks
from tasks.io.polite import OPT_OUT, ROBOTS
from tasks.release import (
    CardInput,
    ExcludeList,
    ParquetShards,
    ReleaseStats,
    TarShards,
    caption_histogram,
    cluster_sizes,
    read_samples,
    release_rows,
    release_sample,
    render_card,
)

log = logging.getLogger("danqing.release")
RECHECK_CHUNK = 512  # URLs asked in one fetcher call: the bodies of one call are held until it returns


class ReleaseParams(BaseModel):
    """The release's parameters (the deployment's form in the UI)."""

    runs: list[str] = Field(description="run directories, or output roots (every committed run under each)")
    to: str = Field(description="the release directory; refused when it holds anything, unless overwrite")
    exclude: list[str] = Field(default_factory=list, description="exclude lists: sha256, image URL or domain a line")
    recheck_opt_out: bool = False  # ask each image host's robots.txt and X-Robots-Tag again; leave out what opts out
    overwrite: bool = False  # replace a release already at `to` (the new one is written aside, then swapped in)
    merge_models: bool = False  # release runs of different embed models together (the card says so)
    config: dict = Field(default_factory=dict, description="sections `release` and `http` (settings file form)")


class NotCommittedError(ValueError):
    """A run (or one of its batches) named for release that never committed."""


@dataclass(frozen=True)
class Unit:
    """One directory in the single-run layout: a run's own, or one batch's."""

    run_id: str  # the run it belongs to
    dir: Path
    report: dict


def run_units(run_dir: Path) -> list[Unit]:
    """A run's units, in order; a run (or any batch of it) that did not commit is refused, named."""
    plan = json.loads((run_dir / "run.json").read_text())
    run_id = plan.get("run_id") or run_dir.name
    dirs = [run_dir / b["dir"] for b in plan["batches"]] if plan.get("batches") else [run_dir]
    for d in dirs:
        if not batches.committed(d):
            what = f"batch {d.name} of run {run_id}" if d != run_dir else f"run {run_id}"
            raise NotCommittedError(f"{what} ({d}) never committed: finish it (re-run the same command) first")
    if plan.get("batches") and not (run_dir / "report.json").is_file():
        raise NotCommittedError(f"run {run_id} ({run_dir}) has no merged report: not every batch has committed")
    return [Unit(run_id, d, json.loads((d / "report.json").read_text())) for d in dirs]


def find_units(paths: list[str]) -> list[Unit]:
    """The units of every run named, or of every committed run under an output root, each once, in order."""
    units, seen = [], set()
    for given in paths:
        path = Path(given).resolve()
        if (path / "run.json").is_file():
            found = run_units(path)
        elif path.is_dir():
            found = []
            for run_dir in sorted(p for p in path.iterdir() if (p / "run.json").is_file()):
                try:
                    found += run_units(run_dir)
                except NotCommittedError as err:  # a root's unfinished run is not part of it yet
                    log.warning("left out: %s", err)
            if not found:
                raise NotCommittedError(f"{path} holds no committed run (no <run>/run.json with its commit)")
        else:
            raise FileNotFoundError(f"{given} is neither a run directory nor an output root")
        for u in found:
            if u.dir not in seen:
                seen.add(u.dir)
                units.append(u)
    return units


def embed_models(units: list[Unit]) -> list[str]:
    """The distinct embed models (name@revision) the units were curated with."""
    names = []
    for u in units:
        m = (u.report.get("models") or {}).get("embed") or {}
        name = f"{m.get('name')}@{m.get('revision') or '-'}"
        if name not in names:
            names.append(name)
    return names


def check_destination(dest: Path, overwrite: bool) -> None:
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())) and not overwrite:
        what = "holds a release" if (dest / "README.md").exists() or (dest / "data").exists() else "is not empty"
        raise FileExistsError(f"{dest} {what}: choose another --to, or pass --overwrite")


@task(name="recheck-opt-out", retries=1, cache_policy=NO_CACHE)
def recheck_opt_out(urls: list[str], fetcher: HttpFetcher) -> list[str | None]:
    """Per URL: "robots" or "opt_out" when its host's robots.txt or its X-Robots-Tag now opts it out, else None.

    The release's one fetcher: its own robots.txt cache (read afresh, once per host), per-host rate and SSRF
    guard. A URL that fails otherwise (gone, timed out) stays: only an opt-out takes a row out of a release."""
    kinds: list[str | None] = []
    for i in range(0, len(urls), RECHECK_CHUNK):
        for r in fetcher.fetch_many(urls[i:i + RECHECK_CHUNK]):
            kinds.append({ROBOTS: "robots", OPT_OUT: "opt_out"}.get(r.reason))
    return kinds


def _release_shard(unit: Unit, meta: Path, excludes: ExcludeList, fetcher: HttpFetcher | None,
                   parquet: ParquetShards, tars: TarShards, stats: ReleaseStats, left_out: set) -> list[str]:
    """One dataset shard of a unit into the release: its rows less the excluded ones (added to `left_out` as
    (LanceDB run id, key)), parquet and images. Returns the shard's snapshots (of every row, left out or not)."""
    frame = pd.read_parquet(meta)
    kinds = excludes.kinds(frame)
    if fetcher is not None:
        left = kinds.isna()
        if left.any():
            kinds[left] = recheck_opt_out(frame.loc[left, "url"].tolist(), fetcher)
    stats.excluded.update(kinds.dropna())
    left_out.update((unit.report["run_id"], k) for k in frame.loc[kinds.notna(), "key"])
    kept = frame[kinds.isna()].reset_index(drop=True)
    recap_path = unit.dir / "recaption" / meta.name
    recaps = pd.read_parquet(recap_path, columns=["key", "recaption"]) if recap_path.is_file() else None
    table = release_rows(kept, recaps)
    parquet.write(table)
    recaption = dict(zip(table.column("key").to_pylist(), table.column("recaption").to_pylist(), strict=True))
    written = 0
    for key, members in read_samples(meta.with_suffix(".tar")):
        if key in recaption:
            tars.write(release_sample(key, members, recaption[key]))
            written += 1
    if written != len(kept):
        raise RuntimeError(f"{meta.with_suffix('.tar')}: {written} of its {len(kept)} released rows have a sample")
    stats.add(kept.assign(recaption=list(recaption.values())))
    return [str(x) for x in frame["snapshot"].dropna().unique()]


def release_clusters(units: list[Unit], left_out: set, rows: int) -> dict[str, list[int]]:
    """Per embeddings table, the k-means cluster sizes over the released rows' vectors (streamed from LanceDB,
    twice: a sample to train on, then every row), as the run report draws them for one run."""
    tables: dict[tuple[str, str], list[str]] = {}
    for u in units:
        db = u.report.get("lancedb") or {}
        if db.get("uri") and db.get("table"):
            tables.setdefault((db["uri"], db["table"]), []).append(u.report["run_id"])
    sizes = {}
    for (uri, table), run_ids in tables.items():
        def blocks(uri=uri, table=table, run_ids=run_ids):
            for keys, runs, vectors in committed_blocks(uri, table, run_ids):
                keep = [(r, k) not in left_out for r, k in zip(runs, keys, strict=True)]
                yield vectors[np.asarray(keep, bool)]
        sizes[table] = cluster_sizes(blocks, rows)
    return sizes


def _plots(stats: ReleaseStats, clusters: dict[str, list[int]], folder: Path) -> tuple[str, ...]:
    xs, ys = caption_histogram(stats.caption_chars)
    with figure(folder / "caption_length.png", (8, 3.5)) as ax:
        ax.bar(xs, ys, width=1.0, label="released captions")
        ax.set_xlabel("caption length, characters (last bin: longer)")
        ax.set_ylabel("pairs")
    with figure(folder / "cluster_sizes.png", (8, 3.5)) as ax:
        for table, sizes in clusters.items():
            ax.plot(range(1, len(sizes) + 1), sizes, marker=".", label=f"{len(sizes)} k-means clusters ({table})")
        ax.set_xlabel("cluster rank")
        ax.set_ylabel("released images in cluster")
    return "caption_length.png", "cluster_sizes.png"


@flow(name="release", log_prints=True)
def release(params: ReleaseParams) -> dict:
    """Runs (or output roots) -> one release: URL parquet with recaptions, webdataset image shards and a dataset
    card, less the rows the exclude lists and the opt-out re-check leave out. Written aside, then renamed."""
    config = check_config(params.config)
    cfg = build_config("release", config.get("release"))
    http = build_config("http", config.get("http"))  # a bad setting fails before any work
    dest = Path(params.to).resolve()
    check_destination(dest, params.overwrite)
    excludes = ExcludeList.load(params.exclude)
    units = find_units(params.runs)
    models = embed_models(units)
    if len(models) > 1 and not params.merge_models:
        raise ValueError(f"the runs were curated with different embed models ({', '.join(models)}), so cross-batch "
                         "dedup never compared them; pass --merge-models to release them together anyway")
    tmp = dest.with_name(f".{dest.name}.release-tmp")
    shutil.rmtree(tmp, ignore_errors=True)  # what a killed release left
    (tmp / "data").mkdir(parents=True)
    (tmp / "images").mkdir()
    parquet = ParquetShards(tmp / "data", cfg.parquet_max_bytes, cfg.row_group_rows)
    tars = TarShards(tmp / "images", cfg.tar_max_bytes)
    fetcher = HttpFetcher(http, shared_caches=False) if params.recheck_opt_out else None
    stats, left_out = ReleaseStats(), set()
    snapshots: dict[str, list[str]] = {}  # run id -> its snapshots, in the order its rows come
    for unit in units:
        for meta in sorted((unit.dir / "dataset").glob("*.parquet")):
            seen = snapshots.setdefault(unit.run_id, [])
            seen += [x for x in _release_shard(unit, meta, excludes, fetcher, parquet, tars, stats, left_out)
                     if x not in seen]
    files = {"data": [p.name for p in parquet.finish()], "images": [p.name for p in tars.finish()]}
    clusters = release_clusters(units, left_out, stats.rows)
    funnel = merge_reports(dest.name, [(i, str(u.dir), u.report) for i, u in enumerate(units)])
    card = CardInput(funnel=funnel, runs=_runs(units, snapshots), reports=[u.report for u in units], stats=stats,
                     excludes=excludes, recheck=params.recheck_opt_out,
                     mixed_models=models if len(models) > 1 else [], plots=_plots(stats, clusters, tmp))
    (tmp / "README.md").write_text(render_card(card, cfg))
    summary = {"rows": stats.rows, "excluded": dict(stats.excluded), "runs": [r["run_id"] for r in card.runs],
               "units": [str(u.dir) for u in units], "funnel": funnel["stages"], "files": files,
               "embed_models": models, "cluster_sizes": clusters}
    (tmp / "release.json").write_text(json.dumps(summary, indent=1, ensure_ascii=False))
    _publish(tmp, dest)
    print(f"release: {stats.rows} pairs in {dest} ({sum(stats.excluded.values())} left out)")
    return {**summary, "dir": str(dest)}


def _runs(units: list[Unit], snapshots: dict[str, list[str]]) -> list[dict]:
    runs: dict[str, dict] = {}
    for u in units:
        r = runs.setdefault(u.run_id, {"run_id": u.run_id, "snapshots": snapshots.get(u.run_id, []), "units": 0,
                                       "samples": 0})
        r["units"] += 1
        r["samples"] += u.report["samples"]
    return list(runs.values())


def _publish(tmp: Path, dest: Path) -> None:
    """The written release in place of `dest`: a rename, so a reader sees the old release or the new, never half."""
    old = dest.with_name(f".{dest.name}.release-old")
    shutil.rmtree(old, ignore_errors=True)
    if dest.exists():
        os.replace(dest, old)
    os.replace(tmp, dest)
    shutil.rmtree(old, ignore_errors=True)

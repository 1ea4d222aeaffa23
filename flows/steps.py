"""Prefect tasks: one per stage per shard (over shard paths), run by the flow as chains (one task run per shard
over the steps no reduce separates), plus the reduce barriers. Each is a thin wrapper: the data work is in
tasks/, the resume engine in flows/engine.py."""

from __future__ import annotations

import functools
import shutil
from pathlib import Path

import pandas as pd
from prefect import task
from prefect.cache_policies import NO_CACHE

from flows import models, pipeline
from flows.engine import Computed, Marker, RunContext, resume, retry_transient, run_reduce
from flows.pipeline import GROUPS, IMAGES, LEDGER, MATCHES, VECTORS
from flows.runtime import cluster_map, worker_name
from flows.settings import config_dict
from schemas import contracts as C
from tasks import align as align_stage
from tasks import crossbatch as crossbatch_stage
from tasks import dedup as dedup_stage
from tasks import embed as embed_stage
from tasks import extract as extract_stage
from tasks import fetch as fetch_stage
from tasks import image as image_stage
from tasks import refine as refine_stage
from tasks import source as source_stage
from tasks import write as write_stage
from tasks.io import cc as cc_source
from tasks.io import ccindex, lance, replay, shards
from tasks.io.http import HttpFetcher
from tasks.io.replay import ReplayFetcher


@task(name="extract", task_run_name="extract-{shard}", cache_policy=NO_CACHE, retries=2,
      retry_delay_seconds=5, retry_condition_fn=retry_transient)
def extract(ctx: RunContext, shard: str, warc: str, cc_index: Marker | None = None) -> Marker:
    """A full scan of the WARC file, or (given the cc_index reduce) only the records the index selected."""
    cfg = ctx.cfg("extract")
    cc = ctx.cfg("cc")  # where and how to read remote files: not part of the hash, results do not depend on it
    replay_records = ctx.fetcher == "replay"  # the response records by URL are listed only for the replay fetcher

    def compute():
        if cc_index is None:
            res = extract_stage.extract_warc(warc, cfg, ctx.snapshot, cc, replay=replay_records)
        else:
            mine = [("warc_filename", "==", ccindex.warc_key(warc))]
            rows = pd.read_parquet(cc_index.output(".parquet"), filters=mine)
            res = extract_stage.extract_selected(warc, rows.sort_values("warc_record_offset"), cfg, ctx.snapshot, cc)
        return Computed(res.candidates, res.stats, {".replay.parquet": res.replay})

    inputs = [shards.file_identity(warc), ctx.snapshot, cc_index.hash if cc_index else None, replay_records]
    return pipeline.shard_step(ctx, "extract", shard, inputs, compute, config_dict(cfg))


@task(name="cc-index", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=10, retry_condition_fn=retry_transient)
def cc_index(ctx: RunContext, snapshot: str, warcs: list[str], part: str | None = None) -> Marker:
    """Reduce: the columnar index rows of the Chinese HTML pages in this run's WARC files (--select index). A
    batch of a batched run reads its `part` of the run's one pass over the index (cc_index_split) instead."""
    cc = ctx.cfg("cc")

    def build(out: Path) -> dict:
        if part is not None:
            selected, stats = ccindex.read_part(part, warcs)
        else:
            selected, stats = ccindex.select_run(_index_files(snapshot, cc), warcs, cc)
        shards.write_parquet(selected, out)
        return stats

    return run_reduce(ctx, "cc_index", ".parquet", [snapshot, sorted(warcs)], build)


@task(name="cc-index-split", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=10,
      retry_condition_fn=retry_transient)
def cc_index_split(ctx: RunContext, snapshot: str, batches: list[list[str]]) -> Marker:
    """Reduce of a batched run (--select index): the index read once for all its batches, each batch's rows in
    a part of their own (`<k>.parquet`), so a snapshot's index is not read again by each of its batches."""
    cc = ctx.cfg("cc")

    def build(out: Path) -> dict:
        tmp = out.with_name(f".{out.name}.tmp-split")
        shutil.rmtree(tmp, ignore_errors=True)  # a killed attempt's parts
        stats = ccindex.split_run(_index_files(snapshot, cc), batches, tmp, cc)
        shutil.rmtree(out, ignore_errors=True)
        tmp.rename(out)
        return stats

    return run_reduce(ctx, "cc_index_split", "", [snapshot, [sorted(b) for b in batches]], build)


def _index_files(snapshot: str, cc) -> list[str]:
    files = cc_source.index_paths(snapshot, cc)
    if not files:
        raise ValueError(f"snapshot {snapshot} lists no columnar index files (subset=warc)")
    return files


@task(name="source", task_run_name="source-{shard}", cache_policy=NO_CACHE)
def source(ctx: RunContext, shard: str, upstream: Marker) -> Marker:
    cfg = ctx.cfg("source")
    lists = source_stage.load_lists(cfg)

    def compute():
        frame = source_stage.select_sources(ctx.read("extract", shard), cfg, lists, models.text_classifier(ctx))
        return Computed(frame, {"word_count_hist": source_stage.word_count_hist(frame)})

    # The lists' contents, not only their names, and the classifier: editing either recomputes the stage.
    config = {**config_dict(cfg), "lists": lists.fingerprint, "nsfw_text": models.ref(ctx, "nsfw_text")}
    return pipeline.shard_step(ctx, "source", shard, [upstream.hash], compute, config)


@task(name="fetch", task_run_name="fetch-{shard}", cache_policy=NO_CACHE, retries=2,
      retry_delay_seconds=10, retry_condition_fn=retry_transient)
def fetch(ctx: RunContext, shard: str, upstream: Marker, replay_index: Marker | None = None) -> Marker:
    """Fetch a shard's images. A finished shard is reused, unless `ctx.retry_failed` and its ledger holds
    transient failures: then only those URLs are fetched again and the shard (and all after it) recomputed."""
    cfg = ctx.cfg("fetch")
    transport = ctx.cfg("replay") if ctx.fetcher == "replay" else ctx.cfg("http")

    def compute(prior: tuple[str, fetch_stage.Previous] | None = None):
        retry_of, previous = prior or (None, None)
        if ctx.fetcher == "replay":
            fetcher = ReplayFetcher(shards.read_parquet(replay_index.output(".parquet")), transport)
        else:
            fetcher = HttpFetcher(transport)
        frame, ledger = fetch_stage.fetch_shard(ctx.read("source", shard), fetcher, cfg, previous)
        extra = {**fetch_stage.ledger_stats(ledger, previous), "retry_of": retry_of}
        return Computed(frame, extra, {LEDGER: ledger})

    inputs = [upstream.hash, ctx.fetcher, replay_index.hash if replay_index else None]
    config = {"fetch": config_dict(cfg), "transport": config_dict(transport)}
    return pipeline.shard_step(ctx, "fetch", shard, inputs, compute, config, blobs={IMAGES: "image"},
                      policy=lambda marker: _retry_failed(ctx, marker))


def _retry_failed(ctx: RunContext, marker: Marker):
    """The fetch step's reuse policy: with --retry-failed, a shard whose ledger holds transient failures is
    fetched again (only those URLs), from its ledger and the images it stored; else the shard is reused."""
    if not ctx.retry_failed:
        return None
    ledger = shards.read_parquet(marker.output(LEDGER))
    if not fetch_stage.transient_failures(ledger):
        return None
    kept = ctx.read("fetch", marker.shard)  # read now: the shard's files are rewritten after
    with pipeline.images_of(ctx, marker.shard) as blobs:
        by_url = {url: blobs[key] for url, key in zip(kept["url"], kept["key"], strict=True)}
    return marker.hash, fetch_stage.Previous(ledger, by_url.get)


@task(name="replay-index", cache_policy=NO_CACHE)
def replay_index(ctx: RunContext, extracts: list[Marker], warcs: list[str] | None = None,
                 run_warcs: list[str] | None = None) -> Marker:
    """Reduce: every response record of every input WARC, by URL (first capture wins). A batch of a batched run
    replays from all the run's WARC files (`run_warcs`, in listing order), as the run unbatched would."""
    extracts = of_step(extracts, "extract")
    own = dict(zip(warcs or [m.shard for m in extracts], extracts, strict=True))
    run_warcs = run_warcs or []

    def build(out: Path) -> dict:
        index = replay.merge_indexes([shards.read_parquet(own[w].output(".replay.parquet")) if w in own
                                      else extract_stage.response_index(w) for w in run_warcs or own])
        shards.write_parquet(index, out)
        return {"urls": int(len(index))}

    others = [shards.file_identity(w) for w in run_warcs if w not in own]
    return run_reduce(ctx, "replay_index", ".parquet", [m.hash for m in extracts] + others, build)


@task(name="word-counts", cache_policy=NO_CACHE)
def word_counts(ctx: RunContext, fetches: list[Marker]) -> Marker:
    """Reduce: every word of every caption entering refine, counted over the run (refine.entropy_corpus=run)."""
    fetches = of_step(fetches, "fetch")
    cfg = ctx.cfg("refine")

    def build(out: Path) -> dict:
        table = refine_stage.corpus_table((ctx.read("fetch", m.shard) for m in fetches), cfg)
        shards.write_parquet(table, out)
        return {"words": len(table), "tokens": int(table["count"].sum())}

    identity = {k: v for k, v in config_dict(cfg).items() if k in refine_stage.CORPUS_SETTINGS}
    return run_reduce(ctx, "word_counts", ".parquet", [identity, *[m.hash for m in fetches]], build)


@task(name="refine", task_run_name="refine-{shard}", cache_policy=NO_CACHE)
def refine(ctx: RunContext, shard: str, upstream: Marker, corpus: Marker | None = None) -> Marker:
    """Stage 2 on one shard; `corpus` is the run's word table (the word-counts reduce) when the config asks."""
    cfg = ctx.cfg("refine")
    resources = models.refine_resources(ctx, cfg, corpus)

    def compute():
        resources.classifier = models.text_classifier(ctx)
        return Computed(refine_stage.refine_text(ctx.read("fetch", shard), cfg, resources))

    config = {**config_dict(cfg), **resources.fingerprint, "tokenizer": models.ref(ctx, "tokenizer"),
              "nsfw_text": models.ref(ctx, "nsfw_text")}
    return pipeline.shard_step(ctx, "refine", shard, [upstream.hash, corpus.hash if corpus else None], compute, config)


@task(name="image", task_run_name="image-{shard}", cache_policy=NO_CACHE)
def image(ctx: RunContext, shard: str, upstream: Marker) -> Marker:
    cfg = ctx.cfg("image")
    return pipeline.shard_step(ctx, "image", shard, [upstream.hash],
                      lambda: Computed(image_stage.filter_images(ctx.read("refine", shard), cfg)), config_dict(cfg))


@task(name="embed", task_run_name="embed-{shard}", cache_policy=NO_CACHE, tags=["gpu"])
def embed(ctx: RunContext, shard: str, upstream: Marker) -> Marker:
    """Model work on one shard, each image decoded once: its vector (embed role), its image-text cosine (align
    role) and, with an `nsfw_image` model (open_nsfw by default), its probability on the unsafe labels. Runs where
    the `gpu` tag and resource allow."""
    cfg = ctx.cfg("embed")
    labels = ctx.cfg("image").nsfw_labels

    def compute():
        embed_model, align_model = models.embedders(ctx)
        nsfw = models.image_classifier(ctx)
        with pipeline.images_of(ctx, shard) as images:
            scored, vectors = embed_stage.embed_pairs(ctx.read("image", shard), embed_model, align_model, cfg,
                                                      image_of=images.__getitem__, nsfw_model=nsfw,
                                                      nsfw_labels=labels if nsfw else ())
        vectors, _ = C.validate(C.EmbeddingSchema, vectors, "image", 0.0)
        extra = {"identity": dict(embed_model.identity), "worker": worker_name(),
                 "captions_truncated": int(scored["caption_truncated"].sum())}
        return Computed(scored, extra, {VECTORS: vectors})

    inputs = [upstream.hash, *(ctx.model_key(role) for role in ("embed", "align", "nsfw_image"))]
    return pipeline.shard_step(ctx, "embed", shard, inputs, compute, {**config_dict(cfg), "nsfw_labels": labels})


@task(name="load-lancedb", cache_policy=NO_CACHE)
def load_lancedb(ctx: RunContext, embeds: list[Marker]) -> Marker:
    """Reduce, one writer: every shard's vectors into the model's LanceDB table; the ANN index once it is large."""
    embeds = of_step(embeds, "embed")
    identity = next((m.extra["identity"] for m in embeds if m.extra.get("identity")), None)
    search = ctx.cfg("crossbatch")

    def build(out: Path) -> dict:
        table, rows = "", 0
        for m in embeds:
            vectors = shards.read_parquet(m.output(VECTORS))
            table = lance.upsert_embeddings(ctx.lancedb, identity, ctx.run_id, ctx.snapshot or "unknown",
                                            vectors) or table
            rows += len(vectors)
        index = lance.ensure_index(lance.open_embeddings(ctx.lancedb, identity), search.index_min_rows) if table else {}
        result = {"table": table, "rows": rows, "uri": ctx.lancedb, "identity": identity, "index": index}
        shards.write_json(result, out)
        return result

    return run_reduce(ctx, "lancedb", ".json", [ctx.lancedb, search.index_min_rows, *[m.hash for m in embeds]], build)


@task(name="dedup", cache_policy=NO_CACHE)
def dedup(ctx: RunContext, embeds: list[Marker]) -> Marker:
    """Reduce over the batch (stage 3 redundancy), as partition tasks on the cluster: one groups file per shard
    (each row's group and whether it is kept), and the k-means cluster sizes for the report."""
    embeds = of_step(embeds, "embed")
    cfg = ctx.cfg("dedup")

    def build(out: Path) -> dict:
        files = [(m.shard, str(m.output(VECTORS))) for m in embeds]
        result = dedup_stage.dedup_batch(files, cfg, out.with_name(f"{out.name}.work"), out, cluster_map())
        stats = dedup_stage.jsonable(result)
        if stats.get("giant_groups"):
            from prefect import get_run_logger

            get_run_logger().warning("dedup: %d giant group(s) of >= %d images: %s", len(stats["giant_groups"]),
                                     cfg.giant_group, stats["giant_groups"][:5])
        return stats

    return run_reduce(ctx, "dedup", GROUPS, [config_dict(cfg), *[m.hash for m in embeds]], build)


@task(name="diversify", task_run_name="diversify-{shard}", cache_policy=NO_CACHE)
def diversify(ctx: RunContext, shard: str, upstream: Marker, groups: Marker) -> Marker:
    """Stage 3 on one shard after the embed step: `image.duplicate` from the dedup reduce, then `image.nsfw`."""
    nsfw = "nsfw_image" in ctx.models
    cfg = ctx.cfg("image")

    def compute():
        frame = ctx.read("embed", shard)
        frame["drop_reason"] = pd.Series(pd.NA, index=frame.index, dtype="str")
        mine = shards.read_parquet(groups.output(GROUPS) / f"{shard}.parquet")
        frame = image_stage.mark_duplicates(frame, mine)
        return Computed(image_stage.mark_nsfw(frame, cfg) if nsfw else frame)

    rule = [cfg.nsfw_rule, cfg.nsfw_threshold] if nsfw else None  # a new cut-off recomputes this step only
    return pipeline.shard_step(ctx, "diversify", shard, [upstream.hash, groups.hash, nsfw, rule], compute)


@task(name="fit-align-band", cache_policy=NO_CACHE)
def fit_align_band(ctx: RunContext, diversified: list[Marker]) -> Marker:
    """Reduce: the band over all shards' scores entering align (fitted to the paper's rate unless fixed)."""
    diversified = of_step(diversified, "diversify")
    import numpy as np

    cfg = ctx.cfg("align")
    model = ctx.models["align"]

    def build(out: Path) -> dict:
        parts = [ctx.column("diversify", m.shard, "align_cosine") for m in diversified]
        scores = pd.concat(parts).to_numpy(np.float64) if parts else np.zeros(0)
        band = align_stage.choose_band(scores, cfg, model.name, model.placeholder)
        result = {**config_dict(band), "target_removal": cfg.target_removal, "low_share": cfg.low_share}
        shards.write_json(result, out)
        return {**result, "histogram": align_stage.score_histogram(scores, band)}

    return run_reduce(ctx, "align_band", ".json", [config_dict(cfg), [model.name, model.placeholder],
                                                    *[m.hash for m in diversified]], build)


@task(name="align", task_run_name="align-{shard}", cache_policy=NO_CACHE)
def align(ctx: RunContext, shard: str, upstream: Marker, band: Marker) -> Marker:
    fitted = align_stage.Band(**{k: band.extra[k] for k in ("low", "high", "fitted", "n")})
    return pipeline.shard_step(ctx, "align", shard, [upstream.hash, band.hash],
                      lambda: Computed(align_stage.apply_band(ctx.read("diversify", shard), fitted)))


@task(name="crossbatch-search", cache_policy=NO_CACHE)
def crossbatch_search(ctx: RunContext, aligns: list[Marker], embeds: list[Marker], loaded: Marker) -> Marker:
    """Reduce (under the output root's commit lock): this run's survivors against the committed rows of every
    run committed before it, in the model's LanceDB table, as query partitions on the cluster; one matches
    file per shard. Re-computed when that set of runs changes."""
    aligns, embeds = of_step(aligns, "align"), of_step(embeds, "embed")
    cfg = ctx.cfg("crossbatch")
    radius = ctx.cfg("dedup").threshold  # one redundancy radius, in the batch and across batches
    table_name = loaded.extra["table"]
    earlier = [r for r in lance.earlier_runs(ctx.lancedb, ctx.run_id) if r["table"] == table_name and table_name]

    def build(out: Path) -> dict:
        vectors = {m.shard: str(m.output(VECTORS)) for m in embeds}
        queries = [crossbatch_stage.Query(m.shard, str(ctx.step_path("align", m.shard)), vectors[m.shard], m.kept)
                   for m in aligns]
        runs = [r["run_id"] for r in earlier]
        info = crossbatch_stage.search_batch(ctx.lancedb, loaded.extra["identity"] if table_name else None, queries,
                                             runs, radius, cfg, out, cluster_map())
        return {"earlier_runs": runs, "threshold": radius, **info}

    identity = [{**config_dict(cfg), "threshold": radius}, loaded.hash, [(r["run_id"], r["seq"]) for r in earlier],
                *[m.hash for m in aligns]]
    return run_reduce(ctx, "crossbatch", MATCHES, identity, build)


@task(name="crossbatch", task_run_name="crossbatch-{shard}", cache_policy=NO_CACHE)
def crossbatch(ctx: RunContext, shard: str, upstream: Marker, search: Marker) -> Marker:
    """`crossbatch.duplicate` on one shard, from its own file of the crossbatch search reduce."""

    def compute():
        matches = shards.read_parquet(search.output(MATCHES) / f"{shard}.parquet")
        return Computed(crossbatch_stage.mark_crossbatch(ctx.read("align", shard), matches))

    return pipeline.shard_step(ctx, "crossbatch", shard, [upstream.hash, search.hash], compute)


@task(name="write", task_run_name="write-{shard}", cache_policy=NO_CACHE)
def write(ctx: RunContext, shard: str, upstream: Marker) -> Marker:
    """The dataset shard: <run>/dataset/<shard>.tar (webdataset) and <shard>.parquet (metadata)."""

    def produce(_prior) -> dict:
        frame = ctx.read("crossbatch", shard)
        tar = ctx.root / "dataset" / f"{shard}.tar"
        meta = ctx.root / "dataset" / f"{shard}.parquet"
        with pipeline.images_of(ctx, shard) as images:
            shards.write_with(tar, lambda p: write_stage.write_webdataset(frame, p, image_of=images.__getitem__))
        shards.write_parquet(write_stage.metadata(frame), meta)
        return {"step": "write", "shard": shard, "samples": int(len(frame)), "outputs": (ctx.rel(tar), ctx.rel(meta))}

    return resume(ctx, ctx.marker_path("write", shard), {"step": "write", "inputs": [upstream.hash]}, produce)


@task(name="commit", cache_policy=NO_CACHE)
def commit(ctx: RunContext, writes: list[Marker], loaded: Marker) -> Marker:
    """Reduce, last, under the commit lock: the written rows become committed in LanceDB and the run takes the
    next place in the commit order. Exactly once: the register is checked before anything is marked."""
    writes = of_step(writes, "write")

    def build(out: Path) -> dict:
        kept = (k for m in writes for k in ctx.column("crossbatch", m.shard, "key"))  # a shard at a time
        result = lance.commit_run(ctx.lancedb, loaded.extra["table"], ctx.run_id, ctx.snapshot, kept)
        shards.write_json(result, out)
        return result

    return run_reduce(ctx, "commit", ".json", [loaded.hash, *[m.hash for m in writes]], build)


# The shard steps by name, in pipeline order.
SHARD_STEPS = {"extract": extract, "source": source, "fetch": fetch, "refine": refine, "image": image,
               "embed": embed, "diversify": diversify, "align": align, "crossbatch": crossbatch, "write": write}


def _run_chain(ctx: RunContext, shard: str, upstream, steps: tuple[str, ...], extras: dict) -> list[Marker]:
    """Several shard steps back to back on one shard: each takes the previous one's marker (the first takes
    `upstream`, or the last marker of the chain before it) and `extras[step]` after it."""
    markers = []
    for step in steps:
        upstream = SHARD_STEPS[step].fn(ctx, shard, upstream[-1] if isinstance(upstream, list) else upstream,
                                        *extras.get(step, ()))
        markers.append(upstream)
    return markers


@functools.cache
def chain(steps: tuple[str, ...]):
    """One Prefect task run per shard over `steps`, which no reduce separates. Prefect's cost is per task run
    (bench/scale.py: ~0.1 s of a worker's time each on small shards, against ~0.01-0.1 s of work per step), and
    each step still writes its own marker and files, so a retried or resumed chain redoes only its unfinished
    steps. It takes its steps' tags (the `gpu` limit), the most retries and the longest delay among them."""
    parts = [SHARD_STEPS[step] for step in steps]
    name = "+".join(steps)
    transient = any(t.retry_condition_fn is retry_transient for t in parts)
    return task(_run_chain, name=name, task_run_name=name + "-{shard}", cache_policy=NO_CACHE,
                tags=sorted(set().union(*(t.tags for t in parts))), retries=max(t.retries for t in parts),
                retry_delay_seconds=max(t.retry_delay_seconds or 0 for t in parts),
                retry_condition_fn=retry_transient if transient else None)


def of_step(results: list, step: str) -> list[Marker]:
    """Each shard's marker of `step`, from what its chain returned (or the marker itself, a step run alone)."""
    return [next(m for m in r if m.step == step) if isinstance(r, list) else r for r in results]

"""Prefect tasks: one per stage per shard (over shard paths), plus the reduce barriers."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path

import pandas as pd
from prefect import task
from prefect.cache_policies import NO_CACHE

from flows.settings import build_config, config_dict
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
from tasks.io import ccindex, lance, shards
from tasks.io.http import HttpFetcher
from tasks.io.replay import ReplayFetcher

CODE_VERSION = version("danqing")  # part of every step hash: a release that changes behaviour recomputes
HIST_MAX = 100  # caption word-count histogram: the last bin holds this many words or more


@dataclass(frozen=True)
class RunContext:
    """What every task needs, small and picklable: paths, configs, resolved model names."""

    run_dir: str
    run_id: str
    lancedb: str
    config: dict = field(default_factory=dict)  # section -> overrides
    models: dict = field(default_factory=dict)  # role -> (name, placeholder, source)
    revisions: dict = field(default_factory=dict)  # role -> the model's revision, read once when the run starts
    fetcher: str = "http"
    retry_failed: bool = False  # fetch again the transient failures recorded in finished fetch shards
    max_failure_fraction: float = 0.01
    snapshot: str | None = None

    def cfg(self, section: str):
        return build_config(section, self.config.get(section))

    @property
    def root(self) -> Path:
        return Path(self.run_dir)


# The reported stage each shard step counts toward, and the schema its kept rows must satisfy.
STEPS: dict[str, tuple[str, type]] = {
    "extract": ("extract", C.CandidateSchema),
    "source": ("source", C.SourcedSchema),
    "fetch": ("fetch", C.FetchedSchema),
    "refine": ("refine", C.RefinedSchema),
    "image": ("image", C.FilteredImageSchema),
    "embed": ("image", C.ScoredSchema),
    "diversify": ("image", C.DiversifiedSchema),
    "align": ("align", C.SelectedSchema),
    "crossbatch": ("crossbatch", C.SelectedSchema),
}

# Rules each stage has built so far; the report lists the others as not_run.
BUILT_RULES: dict[str, tuple[str, ...]] = {
    "extract": extract_stage.RULES,
    "source": source_stage.RULES,
    "fetch": fetch_stage.RULES,
    "refine": refine_stage.RULES,
    "image": image_stage.RULES,
    "align": align_stage.RULES,
    "crossbatch": crossbatch_stage.RULES,
}


def built_rules(ctx: RunContext) -> dict[str, tuple[str, ...]]:
    """The rules this run ran: image safety only with an `nsfw_image` model (no default exists)."""
    if "nsfw_image" in ctx.models:
        return BUILT_RULES
    return {**BUILT_RULES, "image": tuple(r for r in BUILT_RULES["image"] if r != "nsfw")}

_TRANSIENT = (ConnectionError, TimeoutError)


def retry_transient(task, task_run, state) -> bool:
    """Retry only what may succeed next time: connection drops and time-outs, not bugs or bad data."""
    try:
        state.result()
    except _TRANSIENT:
        return True
    except Exception:
        return False
    return False


def step_path(ctx: RunContext, step: str, shard: str, suffix: str = ".parquet") -> Path:
    return ctx.root / "steps" / step / f"{shard}{suffix}"


def marker_path(ctx: RunContext, step: str, shard: str) -> Path:
    return step_path(ctx, step, shard, ".done.json")


def _fresh(ctx: RunContext, marker: dict | None, digest: str) -> bool:
    return bool(marker) and marker.get("hash") == digest and all((ctx.root / p).exists() for p in marker["outputs"])


def _rel(ctx: RunContext, path: Path) -> str:
    """Marker paths are relative to the run directory, so a run can be moved or copied whole."""
    return str(path.relative_to(ctx.root))


def _resumable(ctx: RunContext, mpath: Path, identity: dict, produce: Callable[[], dict]) -> dict:
    """The one resume mechanism: the marker at `mpath` is reused when its hash of `identity` (plus the
    code version) matches and its outputs exist; else `produce()` writes the outputs and returns the
    marker body, which is written last."""
    digest = shards.stable_hash({**identity, "version": CODE_VERSION})
    marker = shards.read_json(mpath)
    if _fresh(ctx, marker, digest):
        return marker
    marker = {"hash": digest, **produce()}
    shards.write_json(marker, mpath)
    return marker


def run_shard_step(
    ctx: RunContext,
    step: str,
    shard: str,
    inputs: list,
    compute: Callable[[], tuple[pd.DataFrame, dict, dict[str, pd.DataFrame]]],
    config: dict | None = None,
    blobs: dict[str, str] | None = None,
) -> dict:
    """Skip when the marker matches; else compute, validate, write kept rows and rejects, then mark.

    `compute` returns (frame with drop_reason, extra stats, extra frames to store: suffix -> frame).
    `blobs` moves a bytes column of the kept rows into its own key -> bytes file (suffix -> column),
    so bulky image bytes are written once and not copied through every later stage.
    """
    identity = {"step": step, "config": config or {}, "inputs": inputs}
    return _resumable(ctx, marker_path(ctx, step, shard), identity,
                      lambda: _produce_shard(ctx, step, shard, compute, blobs))


def _produce_shard(ctx: RunContext, step: str, shard: str, compute, blobs: dict[str, str] | None) -> dict:
    stage, schema = STEPS[step]
    started = time.perf_counter()
    frame, extra, extra_frames = compute()
    dropped_rows = frame[frame["drop_reason"].notna()]
    kept = frame[frame["drop_reason"].isna()].drop(columns=["drop_reason"])
    kept, quarantined = C.validate(schema, kept, stage, ctx.max_failure_fraction)
    dropped_rows = pd.concat([dropped_rows, quarantined]) if len(quarantined) else dropped_rows
    out = step_path(ctx, step, shard)
    rejects = ctx.root / "rejects" / f"{step}-{shard}.parquet"
    outputs = [_rel(ctx, out), _rel(ctx, rejects)]
    for suffix, col in (blobs or {}).items():
        path = step_path(ctx, step, shard, suffix)
        index = shards.write_blobs(kept["key"].tolist(), kept[col].tolist(), path)
        kept = kept.drop(columns=[col])
        outputs += [_rel(ctx, path), _rel(ctx, index)]
    shards.write_parquet(kept, out)
    shards.write_parquet(write_stage.rejects(dropped_rows), rejects)
    for suffix, extra_frame in extra_frames.items():
        path = step_path(ctx, step, shard, suffix)
        shards.write_parquet(extra_frame, path)
        outputs.append(_rel(ctx, path))
    counts = dropped_rows["drop_reason"].value_counts().to_dict()
    return {
        "step": step, "stage": stage, "shard": shard,
        "in": int(len(frame)), "kept": int(len(kept)),
        "dropped": {str(k): int(v) for k, v in sorted(counts.items())},
        "extra": extra, "outputs": outputs, "seconds": round(time.perf_counter() - started, 3),
    }


def output(ctx: RunContext, marker: dict, suffix: str) -> Path:
    """The marker's output file whose name ends with `suffix`."""
    return ctx.root / next(p for p in marker["outputs"] if p.endswith(suffix))


def _read(ctx: RunContext, step: str, shard: str) -> pd.DataFrame:
    return shards.read_parquet(step_path(ctx, step, shard))


def _column(ctx: RunContext, step: str, shard: str, column: str) -> pd.Series:
    """One column of a step's kept rows: the reduces need keys or scores, not every caption and score."""
    return shards.read_parquet(step_path(ctx, step, shard), columns=[column])[column]


@task(name="extract", task_run_name="extract-{shard}", cache_policy=NO_CACHE, retries=2,
      retry_delay_seconds=5, retry_condition_fn=retry_transient)
def extract(ctx: RunContext, shard: str, warc: str, cc_index: dict | None = None) -> dict:
    """A full scan of the WARC file, or (given the cc_index reduce) only the records the index selected."""
    cfg = ctx.cfg("extract")
    cc = ctx.cfg("cc")  # where and how to read remote files: not part of the hash, results do not depend on it
    replay = ctx.fetcher == "replay"  # the response records by URL are listed only for the replay fetcher

    def compute():
        if cc_index is None:
            res = extract_stage.extract_warc(warc, cfg, ctx.snapshot, cc, replay=replay)
        else:
            rows = pd.read_parquet(output(ctx, cc_index, ".parquet"),
                                   filters=[("warc_filename", "==", ccindex.warc_key(warc))])
            res = extract_stage.extract_selected(warc, rows.sort_values("warc_record_offset"), cfg, ctx.snapshot, cc)
        return res.candidates, res.stats, {".replay.parquet": res.replay}

    inputs = [shards.file_identity(warc), ctx.snapshot, cc_index["hash"] if cc_index else None, replay]
    return run_shard_step(ctx, "extract", shard, inputs, compute, config_dict(cfg))


@task(name="cc-index", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=10, retry_condition_fn=retry_transient)
def cc_index(ctx: RunContext, snapshot: str, warcs: list[str]) -> dict:
    """Reduce: the columnar index rows of the Chinese HTML pages in this run's WARC files (--select index)."""
    cc = ctx.cfg("cc")

    def compute(out: Path) -> dict:
        files = cc_source.index_paths(snapshot, cc)
        if not files:
            raise ValueError(f"snapshot {snapshot} lists no columnar index files (subset=warc)")
        # one index file at a time: the whole index of a snapshot is far larger than memory
        frames = [ccindex.select_chinese([f], warcs, cc) for f in files]
        selected = pd.concat(frames, ignore_index=True).sort_values(["warc_filename", "warc_record_offset"])
        shards.write_parquet(selected.reset_index(drop=True), out)
        per_warc = selected["warc_filename"].value_counts()
        return {"index_files": len(files), "selected": int(len(selected)),
                "warcs_without_pages": int(sum(ccindex.warc_key(w) not in per_warc for w in warcs))}

    return run_reduce(ctx, "cc_index", ".parquet", [snapshot, sorted(warcs)], compute)


def _simple(step: str, module, fn_name: str):
    """A shard step that reads the previous step's kept rows and annotates them with `module.fn_name(frame, cfg)`."""

    def body(ctx: RunContext, shard: str, upstream: dict) -> dict:
        cfg = ctx.cfg(step)
        fn = getattr(module, fn_name)  # looked up per call, so a test can substitute a failing stage
        return run_shard_step(ctx, step, shard, [upstream["hash"]],
                              lambda: (fn(_read(ctx, upstream["step"], shard), cfg), {}, {}), config_dict(cfg))

    return body


@task(name="source", task_run_name="source-{shard}", cache_policy=NO_CACHE)
def source(ctx: RunContext, shard: str, upstream: dict) -> dict:
    cfg = ctx.cfg("source")
    lists = source_stage.load_lists(cfg)

    def compute():
        classifier = _text_classifier(ctx)
        frame = source_stage.select_sources(_read(ctx, "extract", shard), cfg, lists, classifier)
        chinese = frame["drop_reason"].ne("source.caption_not_chinese").fillna(True)
        hist = frame.loc[chinese, "word_count"].clip(upper=HIST_MAX).value_counts().sort_index()
        counts = [int(hist.get(i, 0)) for i in range(HIST_MAX + 1)]
        return frame, {"word_count_hist": counts}, {}

    # The lists' contents, not only their names, and the classifier: editing either recomputes the stage.
    config = {**config_dict(cfg), "lists": lists.fingerprint, "nsfw_text": ctx.models.get("nsfw_text")}
    return run_shard_step(ctx, "source", shard, [upstream["hash"]], compute, config)


def _text_classifier(ctx: RunContext):
    """The nsfw_text model when the run names one (loaded once per worker process), else None."""
    if "nsfw_text" not in ctx.models:
        return None
    from tasks.models import load_text_classifier

    return load_text_classifier(_resolved(ctx, "nsfw_text"))


@task(name="refine", task_run_name="refine-{shard}", cache_policy=NO_CACHE)
def refine(ctx: RunContext, shard: str, upstream: dict, corpus: dict | None = None) -> dict:
    """Stage 2 on one shard; `corpus` is the run's word table (the word-counts reduce) when the config asks."""
    cfg = ctx.cfg("refine")
    resources = refine_resources(ctx, cfg, corpus)

    def compute():
        resources.classifier = _text_classifier(ctx)
        return refine_stage.refine_text(_read(ctx, "fetch", shard), cfg, resources), {}, {}

    config = {**config_dict(cfg), **resources.fingerprint, "tokenizer": ctx.models.get("tokenizer"),
              "nsfw_text": ctx.models.get("nsfw_text")}
    return run_shard_step(ctx, "refine", shard, [upstream["hash"], corpus["hash"] if corpus else None], compute,
                          config)


def refine_resources(ctx: RunContext, cfg, corpus: dict | None = None) -> refine_stage.RefineResources:
    """The lists, corpus and [UNK] counter of the run's refine config; models load only when a shard computes."""
    table = None
    if corpus is not None:
        counts = shards.read_parquet(output(ctx, corpus, ".parquet"))
        table = refine_stage.Corpus.from_counts(dict(zip(counts["word"], counts["count"], strict=True)),
                                                corpus["hash"])
    count_unknown = None
    if "tokenizer" in ctx.models and not ctx.models["tokenizer"][1]:
        from tasks.models import count_unknown_tokens

        resolved = _resolved(ctx, "tokenizer")
        count_unknown = lambda texts: count_unknown_tokens(resolved, texts)  # noqa: E731
    return refine_stage.load_resources(cfg, count_unknown, corpus=table)


@task(name="word-counts", cache_policy=NO_CACHE)
def word_counts(ctx: RunContext, fetches: list[dict]) -> dict:
    """Reduce: every word of every caption entering refine, counted over the run (refine.entropy_corpus=run)."""
    cfg = ctx.cfg("refine")

    def compute(out: Path) -> dict:
        from collections import Counter

        total: Counter = Counter()
        for m in fetches:
            total.update(refine_stage.count_corpus(_read(ctx, "fetch", m["shard"]), cfg))
        words = sorted(total)
        shards.write_parquet(pd.DataFrame({"word": pd.Series(words, dtype="str"),
                                           "count": pd.Series([total[w] for w in words], dtype="int64")}), out)
        return {"words": len(words), "tokens": int(sum(total.values()))}

    identity = {k: v for k, v in config_dict(cfg).items() if k in ("convert", "strip_urls", "hmm")}
    return run_reduce(ctx, "word_counts", ".parquet", [identity, *[m["hash"] for m in fetches]], compute)


image = task(name="image", task_run_name="image-{shard}", cache_policy=NO_CACHE)(
    _simple("image", image_stage, "filter_images"))


@task(name="fetch", task_run_name="fetch-{shard}", cache_policy=NO_CACHE, retries=2,
      retry_delay_seconds=10, retry_condition_fn=retry_transient)
def fetch(ctx: RunContext, shard: str, upstream: dict, replay_index: dict | None = None) -> dict:
    """Fetch a shard's images. A finished shard is reused, unless `ctx.retry_failed` and its ledger holds
    transient failures: then only those URLs are fetched again and the shard (and all after it) recomputed.

    The marker keeps `base`, the hash of the inputs alone, so a plain re-run after a retry is still a no-op.
    """
    cfg = ctx.cfg("fetch")
    transport = ctx.cfg("replay") if ctx.fetcher == "replay" else ctx.cfg("http")
    inputs = [upstream["hash"], ctx.fetcher, replay_index["hash"] if replay_index else None]
    identity = {"step": "fetch", "config": {"fetch": config_dict(cfg), "transport": config_dict(transport)},
                "inputs": inputs}
    base = shards.stable_hash({**identity, "version": CODE_VERSION})
    mpath = marker_path(ctx, "fetch", shard)
    marker = shards.read_json(mpath)
    previous = None
    if marker and marker.get("base", marker.get("hash")) == base and _fresh(ctx, marker, marker["hash"]):
        ledger = shards.read_parquet(output(ctx, marker, LEDGER))
        if not (ctx.retry_failed and (ledger["transient"] & ledger["reason"].notna()).any()):
            return marker
        previous = fetch_stage.Previous(ledger, _stored_images(ctx, shard))
        identity["retry_of"] = marker["hash"]

    def compute():
        if ctx.fetcher == "replay":
            fetcher = ReplayFetcher(shards.read_parquet(output(ctx, replay_index, ".parquet")), transport)
        else:
            fetcher = HttpFetcher(transport)
        frame, ledger = fetch_stage.fetch_shard(_read(ctx, "source", shard), fetcher, cfg, previous)
        asked = ledger["attempts"].sum() - (previous.ledger["attempts"].sum() if previous else 0)
        transient = int((ledger["transient"] & ledger["reason"].notna()).sum())  # what --retry-failed would ask
        extra = {"requests": int(asked), "transient_failures": transient, "retry_of": identity.get("retry_of")}
        return frame, extra, {LEDGER: ledger}

    digest = shards.stable_hash({**identity, "version": CODE_VERSION})
    body = {"hash": digest, "base": base, **_produce_shard(ctx, "fetch", shard, compute, {IMAGES: "image"})}
    shards.write_json(body, mpath)
    return body


def _stored_images(ctx: RunContext, shard: str):
    """URL -> stored JPEG of the shard's kept rows, read now: the shard's files are rewritten after."""
    kept = _read(ctx, "fetch", shard)
    with images_of(ctx, shard) as blobs:
        by_url = {url: blobs[key] for url, key in zip(kept["url"], kept["key"], strict=True)}
    return by_url.get


LEDGER = ".ledger.parquet"  # the fetch step's per-URL outcomes: status, reason, attempts, last error, transient
IMAGES = ".images.bin"  # the fetch step's blob file: key -> JPEG bytes of the kept rows


def images_of(ctx: RunContext, shard: str) -> shards.BlobReader:
    """The image bytes the fetch step stored for a shard, looked up by key."""
    return shards.BlobReader(step_path(ctx, "fetch", shard, IMAGES))


@task(name="replay-index", cache_policy=NO_CACHE)
def replay_index(ctx: RunContext, extracts: list[dict]) -> dict:
    """Reduce: every response record of every input WARC, by URL (first capture wins)."""

    def compute(out: Path) -> dict:
        frames = [shards.read_parquet(output(ctx, m, ".replay.parquet")) for m in extracts]
        index = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(
            columns=["url", "warc_file", "offset", "status"])
        index = index.drop_duplicates("url", keep="first")
        shards.write_parquet(index, out)
        return {"urls": int(len(index))}

    return run_reduce(ctx, "replay_index", ".parquet", [m["hash"] for m in extracts], compute)


def run_reduce(ctx: RunContext, name: str, suffix: str, inputs: list, compute: Callable[[Path], dict]) -> dict:
    """A resumable barrier over all shards of a step: one artifact, one marker with its input hash."""
    out = ctx.root / "reduce" / f"{name}{suffix}"

    def produce() -> dict:
        extra = compute(out)
        return {"reduce": name, "outputs": [_rel(ctx, out)] if out.exists() else [], "extra": extra}

    return _resumable(ctx, ctx.root / "reduce" / f"{name}.done.json", {"reduce": name, "inputs": inputs}, produce)


@task(name="embed", task_run_name="embed-{shard}", cache_policy=NO_CACHE, tags=["gpu"])
def embed(ctx: RunContext, shard: str, upstream: dict) -> dict:
    """Model work on one shard, each image decoded once: its vector (embed role), its image-text cosine (align
    role) and, with an `nsfw_image` model, its safety class. Runs where the `gpu` tag and resource allow."""
    from tasks.models import load_model

    cfg = ctx.cfg("embed")
    labels = ctx.cfg("image").nsfw_labels

    def compute():
        embed_model = load_model(_resolved(ctx, "embed"))
        align_model = embed_model if ctx.models["align"] == ctx.models["embed"] else load_model(
            _resolved(ctx, "align"))
        nsfw = _image_classifier(ctx)
        with images_of(ctx, shard) as images:
            scored, vectors = embed_stage.embed_pairs(_read(ctx, "image", shard), embed_model, align_model, cfg,
                                                      image_of=images.__getitem__, nsfw_model=nsfw,
                                                      nsfw_labels=labels if nsfw else ())
        vectors, _ = C.validate(C.EmbeddingSchema, vectors, "image", 0.0)
        extra = {"identity": dict(embed_model.identity), "worker": _worker_name(),
                 "captions_truncated": int(scored["caption_truncated"].sum())}
        return scored, extra, {VECTORS: vectors}

    inputs = [upstream["hash"], *(_model_key(ctx, role) for role in ("embed", "align", "nsfw_image"))]
    return run_shard_step(ctx, "embed", shard, inputs, compute, {**config_dict(cfg), "nsfw_labels": labels})


def _model_key(ctx: RunContext, role: str):
    """What identifies a role's model in a resume hash: its name and, for real models, its revision, so new
    weights under the same name recompute the model steps."""
    if role not in ctx.models:
        return None
    return [*ctx.models[role], ctx.revisions.get(role)]


VECTORS = ".vectors.parquet"  # the embed step's key -> image vector file of its kept rows


def _image_classifier(ctx: RunContext):
    """The nsfw_image model when the run names one (loaded once per worker process), else None."""
    if "nsfw_image" not in ctx.models:
        return None
    from tasks.models import load_image_classifier

    return load_image_classifier(_resolved(ctx, "nsfw_image"))


def _worker_name() -> str | None:
    """The Dask worker running this task (where model tasks were placed), or None outside Dask."""
    try:
        from distributed import get_worker

        return str(get_worker().name)
    except ValueError:
        return None


def _resolved(ctx: RunContext, role: str):
    from tasks.models import ResolvedModel

    name, placeholder, source = ctx.models[role]
    return ResolvedModel(role=role, name=name, placeholder=placeholder, source=source, warning=None)


def _identity(embeds: list[dict]) -> dict | None:
    return next((m["extra"]["identity"] for m in embeds if m.get("extra", {}).get("identity")), None)


@task(name="load-lancedb", cache_policy=NO_CACHE)
def load_lancedb(ctx: RunContext, embeds: list[dict]) -> dict:
    """Reduce, one writer: every shard's vectors into the model's LanceDB table; the ANN index once it is large."""
    identity = _identity(embeds)
    search = ctx.cfg("crossbatch")

    def compute(out: Path) -> dict:
        table, rows = "", 0
        for m in embeds:
            vectors = shards.read_parquet(output(ctx, m, VECTORS))
            table = lance.upsert_embeddings(ctx.lancedb, identity, ctx.run_id, ctx.snapshot or "unknown",
                                            vectors) or table
            rows += len(vectors)
        index = lance.ensure_index(lance.open_embeddings(ctx.lancedb, identity), search) if table else {}
        result = {"table": table, "rows": rows, "uri": ctx.lancedb, "identity": identity, "index": index}
        shards.write_json(result, out)
        return result

    return run_reduce(ctx, "lancedb", ".json", [ctx.lancedb, search.index_min_rows, *[m["hash"] for m in embeds]],
                      compute)


def _run_vectors(ctx: RunContext, embeds: list[dict], keys: set[str] | None = None):
    """(keys, shard ids, float32 matrix) of the run's vectors in shard order, optionally only `keys`."""
    import numpy as np
    import pyarrow.parquet as pq

    all_keys, all_shards, parts = [], [], []
    for m in embeds:
        t = pq.read_table(output(ctx, m, VECTORS), columns=["key", "vector"])
        k = t.column("key").to_pylist()
        if not k:
            continue
        v = t.column("vector").combine_chunks().values.to_numpy(zero_copy_only=False).reshape(len(k), -1)
        if keys is not None:
            mask = np.fromiter((x in keys for x in k), bool, len(k))
            k, v = [x for x, keep in zip(k, mask, strict=True) if keep], v[mask]
        all_keys += k
        all_shards += [m["shard"]] * len(k)
        parts.append(np.asarray(v, np.float32))
    dim = parts[0].shape[1] if parts else 0
    return all_keys, all_shards, np.concatenate(parts) if parts else np.zeros((0, dim), np.float32)


@task(name="dedup", cache_policy=NO_CACHE)
def dedup(ctx: RunContext, embeds: list[dict]) -> dict:
    """Reduce over the whole run (stage 3 redundancy): neighbours within the radius, union-find groups, the member
    nearest each group's mean kept. One row per vector: its shard, group (the key of the group's first row),
    group size and whether it is kept. Also the cluster sizes of a k-means over the vectors, for the report."""
    import numpy as np

    cfg = ctx.cfg("dedup")

    def compute(out: Path) -> dict:
        keys, shard_of, vectors = _run_vectors(ctx, embeds)
        result = dedup_stage.dedup(vectors, cfg)
        key_arr = np.asarray(keys, dtype=object)
        frame = pd.DataFrame({
            "key": pd.Series(keys, dtype="str"), "shard": pd.Series(shard_of, dtype="str"),
            "group_key": pd.Series(key_arr[result.group] if len(keys) else [], dtype="str"),
            "group_size": pd.Series(result.group_size, dtype="int64"),
            "keep": pd.Series(result.keep, dtype=bool),
            "distance_to_mean": pd.Series(result.distance_to_mean, dtype="float32"),
        })
        shards.write_parquet(frame, out)
        stats = _jsonable(result.stats)
        if stats.get("giant_groups"):
            from prefect import get_run_logger

            get_run_logger().warning("dedup: %d giant group(s) of >= %d images: %s", len(stats["giant_groups"]),
                                     cfg.giant_group, stats["giant_groups"][:5])
        return {"rows": len(keys), "pairs": int(result.pairs), "method": result.method, "threshold": cfg.threshold,
                **stats, "cluster_sizes": _cluster_sizes(vectors, cfg.seed)}

    return run_reduce(ctx, "dedup", ".parquet", [config_dict(cfg), *[m["hash"] for m in embeds]], compute)


CLUSTERS = 100  # k-means clusters of the report's cluster-size curve (the paper's semantic-balance analysis)


def _cluster_sizes(vectors, seed: int) -> list[int]:
    """Cluster sizes, largest first, of a k-means over the run's image vectors (at most CLUSTERS clusters)."""
    import numpy as np

    k = min(CLUSTERS, len(vectors) // 5)
    if k < 2:
        return [len(vectors)] if len(vectors) else []
    _, assignment = dedup_stage.kmeans(vectors, k, seed=seed, sample=50 * k)  # trained on 50 rows a cluster
    return sorted((int(c) for c in np.bincount(assignment, minlength=k)), reverse=True)


def _jsonable(obj):
    import numpy as np

    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


@task(name="diversify", task_run_name="diversify-{shard}", cache_policy=NO_CACHE)
def diversify(ctx: RunContext, shard: str, upstream: dict, groups: dict) -> dict:
    """Stage 3 on one shard after the embed step: `image.duplicate` from the dedup reduce, then `image.nsfw`."""
    nsfw = "nsfw_image" in ctx.models

    def compute():
        frame = _read(ctx, "embed", shard)
        frame["drop_reason"] = pd.Series(pd.NA, index=frame.index, dtype="str")
        mine = pd.read_parquet(output(ctx, groups, ".parquet"), filters=[("shard", "==", shard)])
        frame = image_stage.mark_duplicates(frame, mine)
        return (image_stage.mark_nsfw(frame) if nsfw else frame), {}, {}

    return run_shard_step(ctx, "diversify", shard, [upstream["hash"], groups["hash"], nsfw], compute)


SIMILARITY_BINS = 100  # the report's histogram of image-text similarity


@task(name="fit-align-band", cache_policy=NO_CACHE)
def fit_align_band(ctx: RunContext, diversified: list[dict]) -> dict:
    """Reduce: the band over all shards' scores entering align (fitted to the paper's rate unless fixed)."""
    import numpy as np

    cfg = ctx.cfg("align")
    name, placeholder, _ = ctx.models["align"]

    def compute(out: Path) -> dict:
        parts = [_column(ctx, "diversify", m["shard"], "align_cosine") for m in diversified]
        scores = pd.concat(parts).to_numpy(np.float64) if parts else np.zeros(0)
        band = align_stage.choose_band(scores, cfg, name, placeholder)
        result = {**config_dict(band), "target_removal": cfg.target_removal, "low_share": cfg.low_share}
        shards.write_json(result, out)
        lo, hi = (float(scores.min()), float(scores.max())) if scores.size else (-1.0, 1.0)
        counts, edges = np.histogram(scores, bins=SIMILARITY_BINS, range=(min(lo, band.low), max(hi, band.high)))
        return {**result, "histogram": {"counts": counts.tolist(), "edges": edges.round(6).tolist()}}

    return run_reduce(ctx, "align_band", ".json", [config_dict(cfg), [name, placeholder],
                                                    *[m["hash"] for m in diversified]], compute)


@task(name="align", task_run_name="align-{shard}", cache_policy=NO_CACHE)
def align(ctx: RunContext, shard: str, upstream: dict, band: dict) -> dict:
    b = align_stage.Band(band["extra"]["low"], band["extra"]["high"], band["extra"]["fitted"], band["extra"]["n"])
    return run_shard_step(ctx, "align", shard, [upstream["hash"], band["hash"]],
                          lambda: (align_stage.apply_band(_read(ctx, "diversify", shard), b), {}, {}))


@task(name="crossbatch-search", cache_policy=NO_CACHE)
def crossbatch_search(ctx: RunContext, aligns: list[dict], embeds: list[dict], loaded: dict) -> dict:
    """Reduce (under the output root's commit lock): this run's survivors against the committed rows of every
    run committed before it, in the model's LanceDB table. Re-computed when that set of runs changes."""
    cfg = ctx.cfg("crossbatch")
    table_name = loaded["extra"]["table"]
    earlier = [r for r in lance.earlier_runs(ctx.lancedb, ctx.run_id) if r["table"] == table_name and table_name]

    def compute(out: Path) -> dict:
        survivors = set()
        for m in aligns:
            survivors.update(_column(ctx, "align", m["shard"], "key"))
        keys, _, vectors = _run_vectors(ctx, embeds, survivors)
        table = lance.open_embeddings(ctx.lancedb, loaded["extra"]["identity"], create=False) if table_name else None
        runs = [r["run_id"] for r in earlier]
        if table is None:
            found, info = lance.no_matches(), {"method": "none", "committed_rows": 0}
        else:
            found, info = lance.search_committed(table, vectors, runs, cfg)
        qi, match_key, match_run, dist = found
        key_arr = pd.Series(keys, dtype="str").to_numpy()
        matches = pd.DataFrame({"key": pd.Series(key_arr[qi], dtype="str"),
                                "match_key": pd.Series(list(match_key), dtype="str"),
                                "match_run": pd.Series(list(match_run), dtype="str"),
                                "match_distance": pd.Series(dist, dtype="float64")})
        shards.write_parquet(matches, out)
        return {"earlier_runs": runs, "queries": len(keys), "matches": int(len(matches)),
                "threshold": cfg.threshold, **info}

    identity = [config_dict(cfg), loaded["hash"], [(r["run_id"], r["seq"]) for r in earlier],
                *[m["hash"] for m in aligns]]
    return run_reduce(ctx, "crossbatch", ".parquet", identity, compute)


@task(name="crossbatch", task_run_name="crossbatch-{shard}", cache_policy=NO_CACHE)
def crossbatch(ctx: RunContext, shard: str, upstream: dict, search: dict) -> dict:
    """`crossbatch.duplicate` on one shard, from the crossbatch search reduce."""

    def compute():
        frame = _read(ctx, "align", shard)
        matches = shards.read_parquet(output(ctx, search, ".parquet"))
        return crossbatch_stage.mark_crossbatch(frame, matches[matches["key"].isin(frame["key"])]), {}, {}

    return run_shard_step(ctx, "crossbatch", shard, [upstream["hash"], search["hash"]], compute)


@task(name="commit", cache_policy=NO_CACHE)
def commit(ctx: RunContext, writes: list[dict], loaded: dict) -> dict:
    """Reduce, last, under the commit lock: the written rows become committed in LanceDB and the run takes the
    next place in the commit order. Exactly once: the register is checked before anything is marked."""

    def compute(out: Path) -> dict:
        kept = [k for m in writes for k in _column(ctx, "crossbatch", m["shard"], "key")]
        result = lance.commit_run(ctx.lancedb, loaded["extra"]["table"], ctx.run_id, ctx.snapshot, kept)
        shards.write_json(result, out)
        return result

    return run_reduce(ctx, "commit", ".json", [loaded["hash"], *[m["hash"] for m in writes]], compute)


@task(name="write", task_run_name="write-{shard}", cache_policy=NO_CACHE)
def write(ctx: RunContext, shard: str, upstream: dict) -> dict:
    """The dataset shard: <run>/dataset/<shard>.tar (webdataset) and <shard>.parquet (metadata)."""

    def produce() -> dict:
        frame = _read(ctx, "crossbatch", shard)
        tar = ctx.root / "dataset" / f"{shard}.tar"
        meta = ctx.root / "dataset" / f"{shard}.parquet"
        with images_of(ctx, shard) as images:
            shards.write_with(tar, lambda p: write_stage.write_webdataset(frame, p, image_of=images.__getitem__))
        shards.write_parquet(write_stage.metadata(frame), meta)
        return {"step": "write", "shard": shard, "samples": int(len(frame)),
                "outputs": [_rel(ctx, tar), _rel(ctx, meta)]}

    return _resumable(ctx, marker_path(ctx, "write", shard), {"step": "write", "inputs": [upstream["hash"]]},
                      produce)


def shard_ids(warcs: list[str]) -> list[str]:
    return [f"{i:05d}" for i in range(len(warcs))]


def clean_temp(run_dir: Path) -> None:
    """Remove temp files a killed task left behind (they never replace a finished file)."""
    for p in run_dir.rglob(".*.tmp-*"):
        try:
            p.unlink()
        except OSError:
            pass


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
from tasks import embed as embed_stage
from tasks import extract as extract_stage
from tasks import fetch as fetch_stage
from tasks import image as image_stage
from tasks import refine as refine_stage
from tasks import source as source_stage
from tasks import write as write_stage
from tasks.io import cc as cc_source
from tasks.io import ccindex, shards
from tasks.io.http import HttpFetcher
from tasks.io.lance import upsert_embeddings
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
    models: dict = field(default_factory=dict)  # role -> (name, placeholder)
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
    "crossbatch": (),
}

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
    from tasks.models import load_model

    cfg = ctx.cfg("embed")

    def compute():
        embed_model = load_model(_resolved(ctx, "embed"))
        align_model = embed_model if ctx.models["align"] == ctx.models["embed"] else load_model(
            _resolved(ctx, "align"))
        with images_of(ctx, shard) as images:
            scored, vectors = embed_stage.embed_pairs(_read(ctx, "image", shard), embed_model, align_model, cfg,
                                                      image_of=images.__getitem__)
        vectors, _ = C.validate(C.EmbeddingSchema, vectors, "image", 0.0)
        extra = {"dim": int(embed_model.dim), "worker": _worker_name()}
        return scored, extra, {".vectors.parquet": vectors}

    inputs = [upstream["hash"], ctx.models["embed"], ctx.models["align"]]
    return run_shard_step(ctx, "embed", shard, inputs, compute, config_dict(cfg))


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


@task(name="load-lancedb", cache_policy=NO_CACHE)
def load_lancedb(ctx: RunContext, embeds: list[dict]) -> dict:
    """Reduce, one writer: every shard's vectors into the model's LanceDB table."""
    name = ctx.models["embed"][0]

    def compute(out: Path) -> dict:
        table, rows = "", 0
        for m in embeds:
            vectors = shards.read_parquet(output(ctx, m, ".vectors.parquet"))
            table = upsert_embeddings(ctx.lancedb, name, ctx.run_id, ctx.snapshot or "unknown", vectors) or table
            rows += len(vectors)
        shards.write_json({"table": table, "rows": rows, "uri": ctx.lancedb}, out)
        return {"table": table, "rows": rows}

    return run_reduce(ctx, "lancedb", ".json", [ctx.lancedb, *[m["hash"] for m in embeds]], compute)


@task(name="fit-align-band", cache_policy=NO_CACHE)
def fit_align_band(ctx: RunContext, embeds: list[dict]) -> dict:
    """Reduce: the band over all shards' scores (fitted to the paper's rate unless fixed)."""
    cfg = ctx.cfg("align")
    name, placeholder, _ = ctx.models["align"]

    def compute(out: Path) -> dict:
        scores = pd.concat([_read(ctx, "embed", m["shard"])["align_cosine"] for m in embeds]) if embeds else []
        band = align_stage.choose_band(pd.Series(scores, dtype="float64").to_numpy(), cfg, name, placeholder)
        result = {**config_dict(band), "target_removal": cfg.target_removal, "low_share": cfg.low_share}
        shards.write_json(result, out)
        return result

    return run_reduce(ctx, "align_band", ".json", [config_dict(cfg), [name, placeholder],
                                                    *[m["hash"] for m in embeds]], compute)


@task(name="align", task_run_name="align-{shard}", cache_policy=NO_CACHE)
def align(ctx: RunContext, shard: str, upstream: dict, band: dict) -> dict:
    b = align_stage.Band(band["extra"]["low"], band["extra"]["high"], band["extra"]["fitted"], band["extra"]["n"])
    return run_shard_step(ctx, "align", shard, [upstream["hash"], band["hash"]],
                          lambda: (align_stage.apply_band(_read(ctx, "embed", shard), b), {}, {}))


@task(name="crossbatch", task_run_name="crossbatch-{shard}", cache_policy=NO_CACHE)
def crossbatch(ctx: RunContext, shard: str, upstream: dict) -> dict:
    """No rule built yet (the diversification issue): passes every row through, reported as not_run."""

    def compute():
        frame = _read(ctx, "align", shard)
        frame["drop_reason"] = pd.Series(pd.NA, index=frame.index, dtype="str")
        return frame, {}, {}

    return run_shard_step(ctx, "crossbatch", shard, [upstream["hash"]], compute)


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


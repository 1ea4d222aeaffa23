"""The curate_snapshot flow: per-shard stage tasks over Dask, reduce barriers, the funnel report."""

from __future__ import annotations

import contextlib
import hashlib
import re
from pathlib import Path

from prefect import flow, get_run_logger

from flows import steps
from flows.report import prepare_report
from flows.runtime import commit_lock, ensure_gpu_limit, task_runner, wait_for_runs
from flows.settings import CurateParams, LocalClusterSpec, build_config, check_config, config_dict
from tasks.io import shards
from tasks.lexicon import Lexicon
from tasks.refine import load_stop_words
from tasks.source import load_lists

STEP_ORDER = (*steps.STEPS, "write")  # the shard steps in pipeline order, then the dataset writer


def derive_run_id(warcs: list[str], snapshot: str | None) -> str:
    """Stable for the same inputs, so re-running the same command resumes the same run."""
    ids = sorted(str(Path(w).resolve()) if "://" not in w else w for w in warcs)
    digest = hashlib.sha256("\n".join(ids).encode()).hexdigest()[:10]
    stem = snapshot or (Path(ids[0]).name.split(".")[0] if ids else "empty")
    return f"{re.sub(r'[^A-Za-z0-9_.-]+', '-', stem)[:40]}-{digest}"


def cc_config(params: CurateParams):
    """How Common Crawl is reached: the `cc` settings, with --cc-base-url as both of its hosts."""
    values = dict(params.config.get("cc") or {})
    if params.cc_base_url:
        base = params.cc_base_url.rstrip("/")
        values.update(index_base=base, data_base=base)
    return build_config("cc", values)


def _local_or_url(warcs: list[str]) -> bool:
    return bool(warcs) and all("://" in w or Path(w).is_file() for w in warcs)


def resolve_warcs(params: CurateParams) -> list[str]:
    """The WARC files of the run. With a snapshot (and no local files) they come from its listing, picked by
    explicit names or limit/offset; the snapshot id is checked against Common Crawl's list first."""
    from tasks.io import cc as cc_source

    if params.select == "index" and not params.snapshot:
        raise ValueError("--select index needs --snapshot: the columnar index is per crawl snapshot")
    if params.snapshot and not _local_or_url(params.warcs):
        cc = cc_config(params)
        cc_source.check_snapshot(params.snapshot, cc)
        listing = cc_source.warc_paths(params.snapshot, cc)
        return cc_source.pick(listing, params.warc_limit, params.warc_offset, params.warcs or None)
    if not params.warcs:
        raise ValueError("no WARC input given (WARC files, or --snapshot)")
    missing = [w for w in params.warcs if "://" not in w and not Path(w).is_file()]
    if missing:
        raise FileNotFoundError(f"WARC input not found: {', '.join(missing)}")
    unsupported = [w for w in params.warcs if "://" in w and not w.startswith(("http://", "https://", "s3://"))]
    if unsupported:
        raise ValueError(f"WARC URLs must be http(s):// or s3://: {', '.join(unsupported[:3])}")
    start = params.warc_offset
    return params.warcs[start:] if params.warc_limit is None else params.warcs[start:start + params.warc_limit]


def check_inputs(params: CurateParams) -> list[str]:
    """The cheap checks that can fail before anything starts: settings, role names, then the inputs."""
    check_config(params.config)
    load_lists(build_config("source", params.config.get("source")))  # a missing or empty list file fails now
    refine = build_config("refine", params.config.get("refine"))
    Lexicon.load(refine.keyword_lists + refine.extra_keyword_lists)
    load_stop_words(refine.stop_word_lists + refine.extra_stop_word_lists)
    unknown = sorted(set(params.models) - {"embed", "align", "tokenizer", "nsfw_image", "nsfw_text"})
    if unknown:
        raise ValueError(f"unknown model role(s) {unknown}")
    warcs = resolve_warcs(params)
    if not warcs:
        raise ValueError("no WARC file selected: the offset/limit leave none")
    return warcs


def resolve_models(params: CurateParams) -> dict:
    """role -> (name, placeholder, source); a user-named model that cannot load raises here, before any task."""
    from tasks.models import DEFAULT_MODELS, check_text_classifier, resolve_model

    resolved, checked = {}, {}
    for role in ("embed", "align", "tokenizer"):
        name = params.models.get(role)
        # The three roles share one default: check each model once (offline, each check waits on the hub probe).
        key = (name or DEFAULT_MODELS[role], name is not None)
        if key not in checked:
            checked[key] = resolve_model(role, name)  # logs its own fallback warning
        r = checked[key]
        resolved[role] = (r.name, r.placeholder, r.source)
    if params.models.get("nsfw_text"):  # optional: only a named classifier joins the source stage
        r = resolve_model("nsfw_text", params.models["nsfw_text"])
        if not r.placeholder:
            check_text_classifier(r, build_config("source", params.config.get("source")).text_nsfw_labels)
            resolved["nsfw_text"] = (r.name, r.placeholder, r.source)
    if params.models.get("nsfw_image"):  # image safety runs only with a model the user names (no default)
        from tasks.models import check_image_classifier

        r = resolve_model("nsfw_image", params.models["nsfw_image"])
        if not r.placeholder:
            check_image_classifier(r, build_config("image", params.config.get("image")).nsfw_labels)
            resolved["nsfw_image"] = (r.name, r.placeholder, r.source)
    for role, name in params.models.items():  # any other role named: a bad name still fails now
        if role not in resolved and name:
            resolve_model(role, name)
    return resolved


def model_revisions(models: dict) -> dict:
    """role -> the revision of its model (hub commit, or a local directory's fingerprint), read once per run."""
    from tasks.models import ResolvedModel, model_revision

    return {role: model_revision(ResolvedModel(role, name, placeholder, source, None))
            for role, (name, placeholder, source) in models.items()}


def _progress(enabled: bool):
    if not enabled:
        return contextlib.nullcontext(None)
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(TextColumn("{task.description:>10}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())


def _flow_run_name() -> str:
    """The snapshot id (or first WARC name) in the run's name, so runs read well in the UI."""
    from prefect.runtime import flow_run

    from flows.ops import run_name

    params = flow_run.parameters.get("params")
    try:
        return run_name(params if isinstance(params, CurateParams) else CurateParams.model_validate(params or {}))
    except ValueError:
        return "curate"


# A local Dask cluster by default (or DANQING_DASK_ADDRESS's scheduler)
@flow(name="curate-snapshot", log_prints=True, task_runner=task_runner(None), flow_run_name=_flow_run_name)
def curate_snapshot(params: CurateParams, progress: bool = False) -> dict:
    """WARC files or a Common Crawl snapshot -> Chinese image-text pairs: webdataset shards, parquet metadata,
    rejects and a funnel report. At most one run per snapshot is active at a time."""
    warcs = check_inputs(params)  # an unknown snapshot fails here, before waiting for its slot
    if not params.snapshot:
        return _curate(params, warcs, progress)
    from prefect.concurrency.sync import concurrency

    from flows.runtime import ensure_snapshot_limit

    with concurrency(ensure_snapshot_limit(params.snapshot), occupy=1, strict=True):
        return _curate(params, warcs, progress)


def _curate(params: CurateParams, warcs: list[str], progress: bool) -> dict:
    log = get_run_logger()
    models = resolve_models(params)
    ensure_gpu_limit(params.gpu_slots)
    run_id = params.run_id or derive_run_id(warcs, params.snapshot)
    out = Path(params.out).resolve()
    run_dir = out / run_id
    run_dir.mkdir(parents=True, exist_ok=True)
    steps.clean_temp(run_dir)
    ctx = steps.RunContext(
        run_dir=str(run_dir), run_id=run_id, lancedb=params.lancedb or str(out / "lancedb"),
        config={**params.config, "cc": config_dict(cc_config(params))}, models=models, fetcher=params.fetcher,
        retry_failed=params.retry_failed, max_failure_fraction=params.max_failure_fraction, snapshot=params.snapshot,
        revisions=model_revisions(models),
    )
    _write_if_changed(run_dir / "run.json", {"params": params.model_dump(), "models": models, "run_id": run_id})
    log.info("run %s: %d WARC file(s) -> %s", run_id, len(warcs), run_dir)

    ids = steps.shard_ids(warcs)
    futures: dict[str, list] = {}
    selection = steps.cc_index.submit(ctx, params.snapshot, warcs) if params.select == "index" else None
    futures["extract"] = [steps.extract.submit(ctx, s, w, selection) for s, w in zip(ids, warcs, strict=True)]
    rindex = steps.replay_index.submit(ctx, futures["extract"]) if params.fetcher == "replay" else None
    futures["source"] = [steps.source.submit(ctx, s, e) for s, e in zip(ids, futures["extract"], strict=True)]
    futures["fetch"] = [steps.fetch.submit(ctx, s, u, rindex) for s, u in zip(ids, futures["source"], strict=True)]
    corpus = None
    if ctx.cfg("refine").entropy_corpus == "run":  # the entropy rule's p(w) counted over this run's captions
        corpus = steps.word_counts.submit(ctx, futures["fetch"])
    futures["refine"] = [steps.refine.submit(ctx, s, u, corpus) for s, u in zip(ids, futures["fetch"], strict=True)]
    futures["image"] = [steps.image.submit(ctx, s, u) for s, u in zip(ids, futures["refine"], strict=True)]
    with _gpu_placement(params.gpu_resource):
        futures["embed"] = [steps.embed.submit(ctx, s, u) for s, u in zip(ids, futures["image"], strict=True)]
    lance = steps.load_lancedb.submit(ctx, futures["embed"])
    groups = steps.dedup.submit(ctx, futures["embed"])
    futures["diversify"] = [steps.diversify.submit(ctx, s, u, groups)
                            for s, u in zip(ids, futures["embed"], strict=True)]
    band = steps.fit_align_band.submit(ctx, futures["diversify"])
    futures["align"] = [steps.align.submit(ctx, s, u, band) for s, u in zip(ids, futures["diversify"], strict=True)]

    results: dict[str, list[dict]] = {}
    reduces: dict[str, dict] = {}
    with _progress(progress) as bar, contextlib.ExitStack() as locked:
        for step in STEP_ORDER:
            if step == "crossbatch":
                # Cross-batch dedup, the dataset and the commit run one output root at a time, in commit order.
                reduces.update(align_band=band.result(), lancedb=lance.result(), dedup=groups.result())
                wait_for_runs(params.commit_after)
                locked.enter_context(commit_lock(ctx.lancedb))
                search = steps.crossbatch_search.submit(ctx, futures["align"], futures["embed"], reduces["lancedb"])
                futures["crossbatch"] = [steps.crossbatch.submit(ctx, s, u, search)
                                         for s, u in zip(ids, futures["align"], strict=True)]
                futures["write"] = [steps.write.submit(ctx, s, u)
                                    for s, u in zip(ids, futures["crossbatch"], strict=True)]
                done = steps.commit.submit(ctx, futures["write"], reduces["lancedb"])
            if step == "write":  # render the report while the dataset shards are written
                reduces["crossbatch"] = search.result()
                for name, fut in (("replay_index", rindex), ("cc_index", selection), ("word_counts", corpus)):
                    if fut is not None:
                        reduces[name] = fut.result()
                commit_report = prepare_report(ctx, results, reduces)
            bar_id = bar.add_task(step, total=len(ids)) if bar else None
            results[step] = []
            for fut in futures[step]:
                results[step].append(fut.result())  # raises the task's own error (e.g. a ContractError)
                if bar:
                    bar.advance(bar_id)
        done.result()
    report = commit_report()
    log.info("dataset: %s  report: %s", run_dir / "dataset", run_dir / "report.json")
    return {"run_id": run_id, "run_dir": str(run_dir), "report": report}


def _gpu_placement(enabled: bool):
    """Dask resource GPU=1 on model tasks, so a cluster with GPU workers runs them only there."""
    if not enabled:
        return contextlib.nullcontext()
    import dask

    return dask.annotate(resources={"GPU": 1})


def _write_if_changed(path: Path, obj) -> None:
    import json

    text = json.dumps(obj, sort_keys=True, indent=1, default=str)
    if not path.exists() or path.read_text() != text:
        shards.write_with(path, lambda p: p.write_text(text))


def curate(
    params: CurateParams,
    dask_address: str | None = None,
    cluster: LocalClusterSpec | None = None,
    progress: bool = False,
) -> dict:
    """Run the flow the way the CLI does: inputs checked first, then a Prefect API and a Dask cluster."""
    from flows import runtime

    check_inputs(params)  # bad paths, snapshots and settings fail here, before any server or cluster starts
    if dask_address:
        params = params.model_copy(update={"gpu_resource": runtime.check_scheduler(dask_address)})
    out = Path(params.out)
    runner = runtime.task_runner(dask_address, cluster, out / ".dask")
    with runtime.prefect_api(out / ".logs", out / ".prefect"):
        return curate_snapshot.with_options(task_runner=runner)(params, progress=progress)

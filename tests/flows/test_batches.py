"""A run in batches: the plan, the commit order, the merged report, and the sample crawl in batches of one WARC
against the same crawl in one batch, killed mid-batch and resumed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pydantic
import pytest
from test_curate import IN_PROCESS, check_report, run_sample, tree_digest

from flows import batches
from flows.curate import curate, derive_run_id
from flows.report import merge_reports
from flows.settings import CurateParams
from schemas.reasons import STAGES, stage_reasons

FIXED_BAND = {"align": {"low": -1.0, "high": 1.0}}  # keeps every pair: the band is fitted per batch otherwise


def test_the_plan_splits_the_listing_in_order():
    plan = batches.plan([f"w{i}" for i in range(7)], 3)
    assert [b.warcs for b in plan] == [("w0", "w1", "w2"), ("w3", "w4", "w5"), ("w6",)]
    assert [b.index for b in plan] == [0, 1, 2]
    assert batches.batch_dir(Path("/r"), 12) == Path("/r/batches/0012")


@pytest.mark.parametrize("size", [0, -3])
def test_a_batch_size_below_one_is_refused(size, tmp_path):
    with pytest.raises(pydantic.ValidationError, match="batch_size"):
        CurateParams(warcs=["x.warc.gz"], batch_size=size)
    res = subprocess.run([sys.executable, "-m", "flows.cli", "run", "--batch-size", str(size), "--out",
                          str(tmp_path / "out")], capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "--batch-size" in res.stderr
    assert not (tmp_path / "out").exists()  # refused before the sample crawl is written


def test_a_failed_batch_stops_only_the_commits_after_it():
    plan = batches.plan(["a", "b", "c", "d"], 1)
    commits = []

    def run_batch(b: batches.Batch) -> dict:
        if b.index == 1:
            raise OSError("disk full")
        batches.wait_turn(batches.batch_run_id("r", b.index))  # what _curate does before its commit phase
        commits.append(b.index)
        return {"batch": b.index}

    outcome = batches.run_in_process(plan, {3}, "r", 2, run_batch)  # batch 3 committed before
    assert commits == [0]
    assert outcome[0] == {"batch": 0} and isinstance(outcome[1], OSError)
    assert isinstance(outcome[2], batches.BatchOrderError) and 3 not in outcome
    line = batches.failures(outcome)
    assert "batch 1: OSError: disk full" in line and "[2] not committed after it" in line


def _report(run_id: str, counts: dict[str, tuple[int, int, dict]], samples: int) -> dict:
    stages = []
    for stage in STAGES:
        n_in, kept, dropped = counts[stage]
        stages.append({"stage": stage, "in": n_in, "kept": kept, "dropped": dropped,
                       "not_run": [r for r in stage_reasons(stage) if r not in dropped]})
    stages[0]["pages_total"] = counts["extract"][0] * 2
    return {"run_id": run_id, "stages": stages, "models": {}, "lancedb": {}, "shards": 1, "samples": samples,
            "paper": {}}


def test_merged_report_sums_the_batches_in_the_contract(tmp_path):
    chain = ["extract", "source", "fetch", "refine", "image", "align", "crossbatch"]
    one = _report("r-b0", {s: (10, 10, {}) for s in chain}, 10)
    two = _report("r-b1", {s: (10, 10, {}) for s in chain}, 10)
    two["stages"][1] = {**two["stages"][1], "kept": 8, "dropped": {"source.word_count": 2},
                        "not_run": [r for r in stage_reasons("source") if r != "source.word_count"]}
    for later in two["stages"][2:]:
        later["in"] = later["kept"] = 8
    two["samples"] = 8
    merged = merge_reports("r", [(0, "batches/0000", one), (1, "batches/0001", two)])
    by = {s["stage"]: s for s in merged["stages"]}
    assert by["source"]["in"] == 20 and by["source"]["kept"] == 18 and by["source"]["dropped"]["source.word_count"] == 2
    assert by["crossbatch"]["kept"] == merged["samples"] == 18 and by["extract"]["pages_total"] == 40
    assert [b["samples"] for b in merged["batches"]] == [10, 8]
    path = tmp_path / "report.json"
    path.write_text(json.dumps(merged))
    check_report(path)


def _fates(run_dir: Path) -> tuple[dict[str, str], pd.DataFrame]:
    """key -> kept or its drop reason, over a run directory or a batched run's batches."""
    roots = sorted((run_dir / "batches").glob("*")) or [run_dir]
    rejects = pd.concat([pd.read_parquet(p) for r in roots for p in sorted((r / "rejects").glob("*.parquet"))])
    dataset = pd.concat([pd.read_parquet(p) for r in roots for p in sorted((r / "dataset").glob("*.parquet"))])
    fate = dict(zip(rejects["key"], rejects["drop_reason"], strict=True))
    assert not set(fate) & set(dataset["key"])
    fate.update({k: "kept" for k in dataset["key"]})
    return fate, dataset


def _cli(out: Path, crawl, *extra: str) -> list[str]:
    band = out.parent / "band.json"
    band.write_text(json.dumps(FIXED_BAND))
    return [sys.executable, "-m", "flows.cli", "run", "--warc", *map(str, crawl.warcs), "--fetcher", "replay",
            "--out", str(out), "--thresholds", str(band), "--no-progress", "--workers", "1", *extra]


def _kill_mid_batch(cmd: list[str], run_dir: Path, timeout_s: float = 600) -> None:
    """Start the run (one batch at a time) and SIGKILL its process group once batch 0 has committed and batch 1
    has fetched a shard: mid-batch, before it takes the commit lock."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + timeout_s
    second = run_dir / "batches/0001"
    try:
        while not (batches.committed(run_dir / "batches/0000") and any(second.glob("steps/fetch/*.done.json"))):
            assert proc.poll() is None, "the run ended before it could be killed mid-batch"
            assert time.monotonic() < deadline, "batch 0 never committed"
            time.sleep(0.05)
        assert not (second / "reduce" / "crossbatch.done.json").exists()
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)


@pytest.fixture(scope="module")
def runs(prefect_server, sample_crawl, tmp_path_factory):
    """The sample crawl in one batch, and in batches of one WARC file: killed mid-batch, then re-run."""
    whole = run_sample(tmp_path_factory.mktemp("whole") / "out", sample_crawl, config=FIXED_BAND)
    out = tmp_path_factory.mktemp("batched") / "out"
    cmd = _cli(out, sample_crawl, "--batch-size", "1", "--batch-parallel", "1")
    params = CurateParams(warcs=[str(p) for p in sample_crawl.warcs], out=str(out), fetcher="replay",
                          config=FIXED_BAND, batch_size=1)
    run_dir = out / derive_run_id(params.warcs, None)
    _kill_mid_batch(cmd, run_dir)
    first = tree_digest(run_dir / "batches/0000")
    batched = curate(params, cluster=IN_PROCESS)
    return {"whole": whole, "batched": batched, "params": params, "first_batch": first, "run_dir": run_dir}


def test_batches_keep_what_one_batch_keeps_and_name_the_cross_batch_drops(runs):
    whole, _ = _fates(Path(runs["whole"]["run_dir"]))
    fate, dataset = _fates(runs["run_dir"])
    assert sorted(p.name for p in (runs["run_dir"] / "batches").iterdir()) == ["0000", "0001", "0002"]
    assert not dataset["sha256"].duplicated().any()  # no image kept twice
    moved = {k: (whole[k], fate.get(k)) for k in whole if whole[k] != fate.get(k)}
    # the only change: a duplicate pair split across batches is dropped across batches, not inside one
    assert moved and all(v == ("image.duplicate", "crossbatch.duplicate") for v in moved.values()), moved
    assert set(fate) == set(whole)
    report = json.loads((runs["run_dir"] / "report.json").read_text())
    check_report(runs["run_dir"] / "report.json")
    assert report["samples"] == len(dataset) == runs["batched"]["report"]["samples"]
    assert [b["dir"] for b in report["batches"]] == ["batches/0000", "batches/0001", "batches/0002"]
    xb = {s["stage"]: s for s in report["stages"]}["crossbatch"]["dropped"]["crossbatch.duplicate"]
    assert xb == len(moved)


def test_a_batch_killed_mid_run_resumes_and_the_committed_batch_is_untouched(runs):
    assert tree_digest(runs["run_dir"] / "batches/0000") == runs["first_batch"]
    import lancedb

    db = lancedb.connect(str(runs["run_dir"].parent / "lancedb"))
    table = next(t for t in db.list_tables().tables if t != "runs")
    committed = db.open_table(table).count_rows("committed = true")
    assert committed == runs["batched"]["report"]["samples"]  # nothing committed twice, nothing lost
    register = db.open_table("runs").to_arrow().to_pylist()
    rid = runs["run_dir"].name
    assert [r["run_id"] for r in sorted(register, key=lambda r: r["seq"])] == [f"{rid}-b0", f"{rid}-b1", f"{rid}-b2"]


def test_a_rerun_skips_committed_batches_and_other_settings_are_refused(runs):
    before = tree_digest(runs["run_dir"])
    again = curate(runs["params"], cluster=IN_PROCESS)
    assert again["report"] == runs["batched"]["report"]
    assert tree_digest(runs["run_dir"]) == before  # every batch skipped: nothing rewritten
    other = runs["params"].model_copy(update={"config": {"align": {"low": -0.5, "high": 1.0}}})
    with pytest.raises(ValueError, match="batch 0 .* committed with other settings"):
        curate(other, cluster=IN_PROCESS)
    assert tree_digest(runs["run_dir"]) == before

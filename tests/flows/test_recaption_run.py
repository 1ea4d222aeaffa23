"""The recaption step through the flow: two WARCs of the sample crawl in batches of one (each batch a whole run of
its own, so the single layout is covered too) with a tiny random-weight LLaVA built here (placeholder weights,
garbage text: the plumbing is under test, not the captions)."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
from test_curate import check_report, run_sample

from flows import recaption as recaption_flow
from flows.engine import RunContext, read_marker


@pytest.fixture(scope="module")
def recaptioned(prefect_server, sample_crawl, tmp_path_factory):
    from tiny_models import build_tiny_llava

    root = tmp_path_factory.mktemp("recaption")
    model = build_tiny_llava(root / "llava")
    crawl = SimpleNamespace(warcs=sample_crawl.warcs[:2])
    overrides = {"models": {"recaption": str(model)}, "config": {"recaption": {"max_new_tokens": 6, "batch_size": 3}},
                 "batch_size": 1}
    result = run_sample(root / "out", crawl, **overrides)
    run_dir = Path(result["run_dir"])
    return SimpleNamespace(result=result, run_dir=run_dir, model=model, crawl=crawl, out=root / "out",
                           overrides=overrides, units=sorted((run_dir / "batches").iterdir()))


def test_every_kept_row_has_a_recaption_beside_the_dataset(recaptioned):
    assert len(recaptioned.units) == 2
    rows_total = 0
    for unit in recaptioned.units:
        metas = sorted((unit / "dataset").glob("*.parquet"))
        assert metas and [p.name for p in metas] == sorted(p.name for p in (unit / "recaption").glob("*.parquet"))
        for meta in metas:
            rows = pd.read_parquet(unit / "recaption" / meta.name)
            assert list(rows.columns) == ["key", "recaption", "recaption_error"]
            assert rows["key"].tolist() == pd.read_parquet(meta, columns=["key"])["key"].tolist()
            assert rows["recaption"].str.len().gt(0).all() and rows["recaption_error"].isna().all()
            rows_total += len(rows)
        report = json.loads((unit / "report.json").read_text())
        entry = report["recaption"]
        assert entry["ran"] is True and entry["model"] == str(recaptioned.model) and entry["max_new_tokens"] == 6
        assert entry["revision"].startswith("sha256:") and entry["rows"] == report["samples"] > 3  # > 1 call of 3
        assert "Recaption: `" in (unit / "report.md").read_text()
        check_report(unit / "report.json")
    merged = json.loads((recaptioned.run_dir / "report.json").read_text())
    assert merged["recaption"]["rows"] == rows_total == merged["samples"] and merged["recaption"]["errors"] == 0
    check_report(recaptioned.run_dir / "report.json")


def test_a_rerun_regenerates_nothing_and_a_new_setting_recomputes(recaptioned, monkeypatch):
    unit = recaptioned.units[0]
    files = sorted((unit / "recaption").glob("*")) + sorted((unit / "steps" / "recaption").glob("*.done.json"))
    before = {p: p.stat().st_mtime_ns for p in files}
    import tasks.recaption

    def refuse(*args, **kwargs):
        raise AssertionError("a finished shard was recaptioned again")

    monkeypatch.setattr(tasks.recaption, "recaption_rows", refuse)
    again = run_sample(recaptioned.out, recaptioned.crawl, **recaptioned.overrides)
    assert {p: p.stat().st_mtime_ns for p in files} == before
    assert again["report"]["recaption"]["rows"] == recaptioned.result["report"]["recaption"]["rows"]

    # The task alone (no flow), on the finished batch: the same settings reuse its marker (the batch size is not
    # in the hash), another max_new_tokens recomputes the shard.
    run = json.loads((unit / "run.json").read_text())
    from flows.curate import resolve_models, with_revisions
    from flows.settings import CurateParams

    models = with_revisions(resolve_models(CurateParams(models=run["params"]["models"])))
    shard = files[0].stem
    written = read_marker(unit, unit / "steps" / "write" / f"{shard}.done.json")

    def task(**cfg):
        ctx = RunContext(run_dir=str(unit), run_id=run["run_id"], lancedb="", config={"recaption": cfg},
                         models=models)
        return recaption_flow.recaption.fn(ctx, shard, written)

    out = unit / "recaption" / f"{shard}.parquet"
    task(max_new_tokens=6, batch_size=1)
    assert out.stat().st_mtime_ns == before[out]
    monkeypatch.undo()
    longer = task(max_new_tokens=9)
    assert out.stat().st_mtime_ns != before[out] and longer.extra["rows"] == len(pd.read_parquet(out))


def test_off_by_default_the_report_says_so(tmp_path):
    """Checked on the report alone, from a hand-made context: no flow run needed."""
    from flows.report import RECAPTION_OFF

    ctx = RunContext(run_dir=str(tmp_path), run_id="r", lancedb="")
    assert recaption_flow.summary(ctx, []) == RECAPTION_OFF == {"ran": False, "model": None, "revision": None,
                                                                "rows": 0, "errors": 0}


def test_recaption_settings_leave_the_batch_key_alone_and_say_when_a_batch_needs_it(tmp_path):
    from flows import batches
    from flows.settings import CurateParams

    plain = CurateParams(warcs=["a.warc.gz"], models={"embed": "placeholder"})
    asked = plain.model_copy(update={"models": {"embed": "placeholder", "recaption": "/m"},
                                     "config": {"recaption": {"max_new_tokens": 9}}})
    models = {"embed": ["placeholder", True, "placeholder", None]}
    assert batches.settings_key(plain, models) == batches.settings_key(asked, {**models, "recaption": ["/m"]})
    assert batches.settings_key(plain, models) != batches.settings_key(
        plain.model_copy(update={"config": {"image": {"min_side": 300}}}), models)
    want = {"model": "/m", "revision": "sha256:1", "prompt": "p", "max_new_tokens": 9}
    (tmp_path / "report.json").write_text(json.dumps({"recaption": {"ran": True, **want, "rows": 3}}))
    assert batches.recaption_current(tmp_path, want) and batches.recaption_current(tmp_path, None)
    assert not batches.recaption_current(tmp_path, {**want, "max_new_tokens": 10})
    (tmp_path / "report.json").write_text(json.dumps({"recaption": {"ran": False, "model": None}}))
    assert not batches.recaption_current(tmp_path, want)


def test_the_next_batch_commits_while_one_recaptions_and_a_late_failure_blocks_nothing():
    import threading

    from flows import batches

    plan = batches.plan(["a", "b"], 1)
    second_committed = threading.Event()
    order = []

    def run_batch(b):
        rid = batches.batch_run_id("r", b.index)
        batches.wait_turn(rid)
        order.append(f"commit {b.index}")
        batches.has_committed(rid)  # what _curate says after its commit, before recaptioning
        if b.index == 0:
            assert second_committed.wait(30), "batch 1 waited for batch 0's recaption"
            raise RuntimeError("recaption failed after the commit")
        second_committed.set()
        return {}

    outcome = batches.run_in_process(plan, set(), "r", 2, run_batch)
    assert order == ["commit 0", "commit 1"] and outcome[1] == {} and isinstance(outcome[0], RuntimeError)


def test_a_batched_report_merges_the_batches_recaption():
    from flows.report import RECAPTION_OFF, merge_recaptions

    one = {"ran": True, "model": "/m", "revision": "r", "rows": 4, "errors": 1, "error_kinds": {"empty": 1},
           "shards": 2, "oom_retries": 0, "prompt": "p", "max_new_tokens": 8}
    two = {**one, "rows": 6, "errors": 2, "error_kinds": {"empty": 1, "decode_error": 1}, "shards": 1}
    merged = merge_recaptions([one, two])
    assert (merged["rows"], merged["errors"], merged["shards"], merged["model"]) == (10, 3, 3, "/m")
    assert merged["error_kinds"] == {"empty": 2, "decode_error": 1} and merged["batches_recaptioned"] == 2
    assert merge_recaptions([dict(RECAPTION_OFF)] * 2) == RECAPTION_OFF


def test_recaption_flags_need_a_model_and_fail_before_any_work(tmp_path, capsys):
    from flows.cli import main

    assert main(["run", "--out", str(tmp_path / "out"), "--recaption-max-new-tokens", "8"]) == 2
    assert "need --recaption-model" in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_a_recaption_model_that_cannot_caption_fails_before_any_work(tmp_path):
    from tiny_models import build_tiny_image_classifier

    from flows.curate import resolve_models
    from flows.settings import CurateParams
    from tasks.models import ModelLoadError

    vit = build_tiny_image_classifier(tmp_path / "vit")
    with pytest.raises(ModelLoadError, match="not an image-text-to-text model"):
        resolve_models(CurateParams(models={"recaption": str(vit), "embed": "placeholder"}))
    assert "recaption" not in resolve_models(CurateParams(models={"embed": "placeholder"}))  # off by default

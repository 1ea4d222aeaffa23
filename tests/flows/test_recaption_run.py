"""The recaption step through the flow: on one WARC of the sample crawl with a tiny random-weight LLaVA (built
here; placeholder weights, garbage text: the plumbing is under test, not the captions)."""

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
    crawl = SimpleNamespace(warcs=sample_crawl.warcs[:1])
    overrides = {"models": {"recaption": str(model)}, "config": {"recaption": {"max_new_tokens": 6, "batch_size": 3}}}
    result = run_sample(root / "out", crawl, **overrides)
    return SimpleNamespace(result=result, run_dir=Path(result["run_dir"]), model=model, crawl=crawl,
                           out=root / "out", overrides=overrides)


def _dataset(run_dir: Path) -> pd.DataFrame:
    return pd.concat([pd.read_parquet(p) for p in sorted((run_dir / "dataset").glob("*.parquet"))])


def test_every_kept_row_has_a_recaption_beside_the_dataset(recaptioned):
    run_dir = recaptioned.run_dir
    dataset = _dataset(run_dir)
    assert len(dataset) > 3  # more than one batch of 3
    for meta in sorted((run_dir / "dataset").glob("*.parquet")):
        rows = pd.read_parquet(run_dir / "recaption" / meta.name)
        assert list(rows.columns) == ["key", "recaption", "recaption_error"]
        assert rows["key"].tolist() == pd.read_parquet(meta, columns=["key"])["key"].tolist()
        assert rows["recaption"].str.len().gt(0).all() and rows["recaption_error"].isna().all()
    report = json.loads((run_dir / "report.json").read_text())
    entry = report["recaption"]
    assert entry["ran"] is True and entry["model"] == str(recaptioned.model)
    assert entry["revision"].startswith("sha256:") and entry["rows"] == len(dataset) == report["samples"]
    assert entry["errors"] == 0 and entry["max_new_tokens"] == 6
    assert "Recaption: `" in (run_dir / "report.md").read_text()
    check_report(run_dir / "report.json")


def test_a_rerun_regenerates_nothing_and_a_new_setting_recomputes(recaptioned, monkeypatch):
    run_dir = recaptioned.run_dir
    files = sorted((run_dir / "recaption").glob("*")) + sorted((run_dir / "steps" / "recaption").glob("*.done.json"))
    before = {p: p.stat().st_mtime_ns for p in files}
    import tasks.recaption

    def refuse(*args, **kwargs):
        raise AssertionError("a finished shard was recaptioned again")

    monkeypatch.setattr(tasks.recaption, "recaption_rows", refuse)
    again = run_sample(recaptioned.out, recaptioned.crawl, **recaptioned.overrides)
    assert {p: p.stat().st_mtime_ns for p in files} == before
    assert again["report"]["recaption"]["rows"] == recaptioned.result["report"]["recaption"]["rows"]
    monkeypatch.undo()

    # The task alone (no flow): another max_new_tokens recomputes the shard; the batch size alone does not.
    run = json.loads((run_dir / "run.json").read_text())
    from flows.curate import resolve_models, with_revisions
    from flows.settings import CurateParams

    models = with_revisions(resolve_models(CurateParams(models=run["params"]["models"])))
    shard = files[0].stem
    written = read_marker(run_dir, run_dir / "steps" / "write" / f"{shard}.done.json")

    def task(**cfg):
        ctx = RunContext(run_dir=str(run_dir), run_id=run["run_id"], lancedb="", config={"recaption": cfg},
                         models=models)
        return recaption_flow.recaption.fn(ctx, shard, written)

    out = run_dir / "recaption" / f"{shard}.parquet"
    task(max_new_tokens=6, batch_size=1)
    assert out.stat().st_mtime_ns == before[out]
    longer = task(max_new_tokens=9)
    assert out.stat().st_mtime_ns != before[out] and longer.extra["rows"] == len(pd.read_parquet(out))


def test_off_by_default_the_report_says_so(tmp_path):
    """Checked on the report alone, from a hand-made context: no flow run needed."""
    from flows.report import RECAPTION_OFF

    ctx = RunContext(run_dir=str(tmp_path), run_id="r", lancedb="")
    assert recaption_flow.summary(ctx, []) == RECAPTION_OFF == {"ran": False, "model": None, "revision": None,
                                                                "rows": 0, "errors": 0}

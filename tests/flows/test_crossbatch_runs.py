"""Cross-batch dedup end to end: runs into one output root compare against what earlier runs committed."""

from __future__ import annotations

from pathlib import Path

import lancedb
import pandas as pd
import pytest
from test_curate import IN_PROCESS, tree_digest

from flows.curate import curate
from flows.settings import CurateParams


def _run(out: Path, warcs: list[Path], run_id: str) -> dict:
    params = CurateParams(warcs=[str(w) for w in warcs], out=str(out), fetcher="replay", run_id=run_id)
    return curate(params, cluster=IN_PROCESS)


def _stages(result: dict) -> dict:
    return {s["stage"]: s for s in result["report"]["stages"]}


def _frames(run_dir: Path, folder: str) -> pd.DataFrame:
    return pd.concat([pd.read_parquet(p) for p in sorted((run_dir / folder).glob("*.parquet"))])


def test_a_second_run_of_the_same_pages_repeats_everything_the_first_kept(prefect_server, sample_crawl, tmp_path):
    warcs = sample_crawl.warcs[:1]
    first = _run(tmp_path, warcs, "run-a")
    kept_a = _frames(Path(first["run_dir"]), "dataset")
    assert len(kept_a) > 0 and _stages(first)["crossbatch"]["dropped"]["crossbatch.duplicate"] == 0
    run_a_files = tree_digest(Path(first["run_dir"]))

    second = _run(tmp_path, warcs, "run-b")
    stages = _stages(second)
    # Same pages, same images, same band: every survivor of run B is one run A committed.
    assert stages["crossbatch"]["in"] == len(kept_a)
    assert stages["crossbatch"]["dropped"]["crossbatch.duplicate"] == len(kept_a) and stages["crossbatch"]["kept"] == 0
    assert stages["crossbatch"]["search"]["earlier_runs"] == ["run-a"]
    rejects = _frames(Path(second["run_dir"]), "rejects")
    dups = rejects[rejects["drop_reason"] == "crossbatch.duplicate"]
    assert sorted(dups["crossbatch_match_key"]) == sorted(kept_a["key"])  # each matches itself in run A
    assert set(dups["crossbatch_match_run"]) == {"run-a"}
    assert tree_digest(Path(first["run_dir"])) == run_a_files  # run B changed nothing of run A

    # Re-running A after B committed: A still compares only with runs committed before it (none).
    again = _run(tmp_path, warcs, "run-a")
    assert _stages(again)["crossbatch"]["dropped"]["crossbatch.duplicate"] == 0
    assert {k: v for k, v in tree_digest(Path(first["run_dir"])).items() if not k.startswith("report.")} == {
        k: v for k, v in run_a_files.items() if not k.startswith("report.")}
    runs = lancedb.connect(str(tmp_path / "lancedb")).open_table("runs").to_pandas().sort_values("seq")
    assert runs["run_id"].tolist() == ["run-a", "run-b"] and runs["rows"].tolist() == [len(kept_a), 0]


def test_a_run_killed_between_crossbatch_and_commit_commits_exactly_once(prefect_server, sample_crawl, tmp_path,
                                                                         monkeypatch):
    import tasks.io.lance

    real = tasks.io.lance.commit_run

    def killed(*args, **kwargs):
        raise RuntimeError("killed before the commit")

    monkeypatch.setattr(tasks.io.lance, "commit_run", killed)
    with pytest.raises(RuntimeError, match="killed before the commit"):
        _run(tmp_path, sample_crawl.warcs[:1], "run-k")
    run_dir = tmp_path / "run-k"
    assert (run_dir / "reduce" / "crossbatch.done.json").exists() and not (run_dir / "report.json").exists()
    db = lancedb.connect(str(tmp_path / "lancedb"))
    assert "runs" not in db.list_tables().tables

    monkeypatch.setattr(tasks.io.lance, "commit_run", real)
    # Another run of the same pages meanwhile: the unfinished run's rows are in LanceDB but never compared against.
    other = _run(tmp_path, sample_crawl.warcs[:1], "run-other")
    assert _stages(other)["crossbatch"]["dropped"]["crossbatch.duplicate"] == 0
    assert _stages(other)["crossbatch"]["search"]["earlier_runs"] == []
    result = _run(tmp_path, sample_crawl.warcs[:1], "run-k")
    # run-k commits after run-other: its survivors now repeat what run-other committed
    assert _stages(result)["crossbatch"]["search"]["earlier_runs"] == ["run-other"]
    samples = result["report"]["samples"]
    assert samples == 0 and _stages(result)["crossbatch"]["kept"] == 0
    again = _run(tmp_path, sample_crawl.warcs[:1], "run-k")  # and a third time: still one commit
    assert again["report"]["samples"] == samples
    runs = db.open_table("runs").to_pandas().sort_values("seq")
    assert runs["run_id"].tolist() == ["run-other", "run-k"]
    assert runs["rows"].tolist() == [other["report"]["samples"], samples]
    table = db.open_table(result["report"]["lancedb"]["table"])
    assert table.count_rows("committed = true") == other["report"]["samples"] + samples
    assert table.count_rows() == table.to_pandas()["row_id"].nunique()


def test_variant_2_after_variant_1_drops_exactly_the_repeats_of_what_run_a_kept(prefect_server, tmp_path_factory):
    """The issue's check: run A on variant 1, then run B on variant 2 into the same root (offline placeholder)."""
    import json

    from schemas.contracts import row_key
    from tasks.sample import write_sample_variant

    crawl_dir = tmp_path_factory.mktemp("variants")
    out = tmp_path_factory.mktemp("variants-out")
    v1, v2 = write_sample_variant(1, crawl_dir), write_sample_variant(2, crawl_dir)
    params = {"out": str(out), "fetcher": "replay"}
    a = curate(CurateParams(warcs=[str(w) for w in v1.warcs], **params), cluster=IN_PROCESS)
    run_a = Path(a["run_dir"])
    before = tree_digest(run_a)

    b = curate(CurateParams(warcs=[str(w) for w in v2.warcs], **params), cluster=IN_PROCESS)
    run_b = Path(b["run_dir"])
    assert run_b != run_a
    fate = dict(zip(*[_frames(run_b, "rejects")[c] for c in ("key", "drop_reason")], strict=True))
    fate.update({k: "kept" for k in _frames(run_b, "dataset")["key"]})
    manifest = json.loads(v2.manifest.read_text())
    expected = {row_key(m["url"], m["alt_text"], m["page_url"]): m["expected"] for m in manifest}
    assert sum(e == "crossbatch.duplicate" for e in expected.values()) >= 5
    assert sum(e == "kept" for e in expected.values()) >= 8
    for key, want in expected.items():
        if want in ("crossbatch.duplicate", "kept"):
            assert fate.get(key) == want, (key, want, fate.get(key))
    assert fate == expected  # every other fate the manifest predicts holds as well
    assert tree_digest(run_a) == before  # no file of run A changed, none appeared or went

    # Variant 1's own manifest held in run A, in-batch duplicate included.
    fate_a = dict(zip(*[_frames(run_a, "rejects")[c] for c in ("key", "drop_reason")], strict=True))
    fate_a.update({k: "kept" for k in _frames(run_a, "dataset")["key"]})
    manifest_a = json.loads(v1.manifest.read_text())
    assert fate_a == {row_key(m["url"], m["alt_text"], m["page_url"]): m["expected"] for m in manifest_a}
    assert _stages(a)["image"]["dropped"]["image.duplicate"] == 1

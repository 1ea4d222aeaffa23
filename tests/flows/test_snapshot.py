"""Runs against a local server in Common Crawl's layout: --snapshot, --warc-limit, --cc-base-url, --select index."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from _fixtures import fixture_path
from cc_server import CRAWL, build_layout, serve
from test_curate import IN_PROCESS, check_report

from flows.curate import check_inputs, curate
from flows.settings import CurateParams

# No image host resolves (a machine with no network); min_words 1 lets the excerpt's short alts reach fetch.
OFFLINE = {"http": {"resolve": []}, "source": {"min_words": 1}}


@pytest.fixture(scope="module")
def common_crawl(tmp_path_factory):
    """The real excerpt as the only WARC of CC-MAIN-2020-34 (plus one listed, absent file), served locally."""
    root = tmp_path_factory.mktemp("cc")
    layout = build_layout(root, [fixture_path("warc/warcfile.warc.gz")], extra_listed=("absent-00001.warc.gz",))
    with serve(root) as server:
        yield server, layout


def _params(server, tmp_path: Path, **kw) -> CurateParams:
    return CurateParams(snapshot=CRAWL, warc_limit=1, cc_base_url=server.url, out=str(tmp_path), config=OFFLINE,
                        **kw)


def _extract_rows(run_dir: Path, shard: str = "00000", key: str = "key") -> pd.DataFrame:
    """Every candidate of the extract step, kept or rejected, in a stable order (by `key`, one of the columns)."""
    kept = pd.read_parquet(run_dir / "steps" / "extract" / f"{shard}.parquet")
    rejected = pd.read_parquet(run_dir / "rejects" / f"extract-{shard}.parquet")
    cols = ["key", "url", "alt_text", "page_url", "warc_offset"]
    both = pd.concat([kept.assign(drop_reason=None)[[*cols, "drop_reason"]],
                      rejected[[c for c in [*cols, "drop_reason"] if c in rejected]]], ignore_index=True)
    return both.sort_values([key, "url", "alt_text"]).reset_index(drop=True)


def test_snapshot_scan_and_index_select_the_same_candidates(prefect_server, common_crawl, tmp_path):
    server, layout = common_crawl
    listings = len(server.requests_for("warc.paths.gz"))
    scan = curate(_params(server, tmp_path / "scan"), cluster=IN_PROCESS)
    # the listing is read once: checked before the servers start, and not again in the flow
    assert len(server.requests_for("warc.paths.gz")) == listings + 1
    seen_before = len(server.seen)
    index = curate(_params(server, tmp_path / "index", select="index"), cluster=IN_PROCESS)

    for result in (scan, index):
        ex = {s["stage"]: s for s in result["report"]["stages"]}["extract"]
        assert ex["pages_selected"] == 11
        assert ex["in"] == 96
        assert result["report"]["stages"][2]["dropped"].get("fetch.http_error", 0) > 0  # no network: no crash
        check_report(Path(result["run_dir"]) / "report.json")
    scan_ex = {s["stage"]: s for s in scan["report"]["stages"]}["extract"]
    index_ex = {s["stage"]: s for s in index["report"]["stages"]}["extract"]
    assert (scan_ex["selection"], index_ex["selection"]) == ("scan", "index")
    assert scan_ex["pages_total"] == 16
    pd.testing.assert_frame_equal(_extract_rows(Path(scan["run_dir"])), _extract_rows(Path(index["run_dir"])))

    # the index run read the WARC only by byte ranges of the 11 Chinese records, not as a whole
    warc_path = "/" + layout["warcs"][0]
    warc_reads = [s for s in server.seen[seen_before:] if s.path == warc_path]
    assert warc_reads and all(s.range is not None and s.status == 206 for s in warc_reads)
    assert 0 < index_ex["bytes_read"] <= 1.2 * index_ex["bytes_selected"]
    assert index_ex["index"]["selected"] == 11


def test_unknown_snapshot_and_bad_selections_fail_before_any_work(common_crawl, tmp_path):
    server, _ = common_crawl
    with pytest.raises(ValueError, match="unknown Common Crawl snapshot 'CC-MAIN-1999-01'.*CC-MAIN-2020-34"):
        check_inputs(CurateParams(snapshot="CC-MAIN-1999-01", cc_base_url=server.url, out=str(tmp_path)))
    with pytest.raises(ValueError, match="not in the crawl's listing"):
        check_inputs(CurateParams(snapshot=CRAWL, warcs=["nope.warc.gz"], cc_base_url=server.url))
    with pytest.raises(ValueError, match="past the end"):
        check_inputs(CurateParams(snapshot=CRAWL, warc_offset=5, cc_base_url=server.url))
    with pytest.raises(ValueError, match="needs --snapshot"):
        check_inputs(CurateParams(warcs=[str(fixture_path("warc/warcfile.warc.gz"))], select="index"))
    assert not any(tmp_path.iterdir())  # nothing was written
    # limit/offset pick from the listing in its order (the second listed file is absent on the server)
    names = check_inputs(CurateParams(snapshot=CRAWL, warc_offset=1, cc_base_url=server.url))
    assert [n.rsplit("/", 1)[1] for n in names] == ["absent-00001.warc.gz"]


def test_cli_snapshot_run_with_index_selection(prefect_server, common_crawl, tmp_path, capsys):
    from flows.cli import main

    server, _ = common_crawl
    thresholds = tmp_path / "offline.json"
    thresholds.write_text(json.dumps(OFFLINE))
    rc = main(["run", "--snapshot", CRAWL, "--warc-limit", "1", "--cc-base-url", server.url, "--select", "index",
               "--out", str(tmp_path / "out"), "--thresholds", str(thresholds), "--no-progress", "--workers", "1"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "report:" in out
    report = json.loads(next((tmp_path / "out").glob("CC-MAIN-2020-34-*/report.json")).read_text())
    assert report["stages"][0]["pages_selected"] == 11


def test_a_batched_run_reads_the_index_once_for_all_its_batches(prefect_server, tmp_path):
    """--select index in batches: the snapshot's index is read in one pass for the run, not once per batch, and
    each batch extracts what the same WARC file gives in a run of one batch."""
    names = [f"excerpt-{i}.warc.gz" for i in range(3)]
    for name in names:  # three WARC files with Chinese pages (copies of the excerpt, in the test's directory)
        (tmp_path / name).write_bytes(fixture_path("warc/warcfile.warc.gz").read_bytes())
    (tmp_path / "cc").mkdir()
    layout = build_layout(tmp_path / "cc", [tmp_path / n for n in names])
    with serve(tmp_path / "cc") as server:
        index_file = "/" + layout["index"][0]

        def run(out: str, **kw) -> tuple[dict, int]:
            before = len(server.requests_for(index_file))
            result = curate(CurateParams(snapshot=CRAWL, warc_limit=3, cc_base_url=server.url, out=str(tmp_path / out),
                                         config=OFFLINE, select="index", **kw), cluster=IN_PROCESS)
            return result, len(server.requests_for(index_file)) - before

        whole, whole_reads = run("whole")
        batched, batched_reads = run("batched", batch_size=1, batch_parallel=1)
    assert whole_reads > 0
    assert batched_reads == whole_reads  # one pass, where each of the 3 batches used to read it again
    run_dir = Path(batched["run_dir"])
    assert len(list((run_dir / "batches").iterdir())) == 3
    for k in range(3):
        mine = _extract_rows(run_dir / "batches" / f"{k:04d}", key="warc_offset").drop(columns="key")
        same = _extract_rows(Path(whole["run_dir"]), f"{k:05d}", key="warc_offset").drop(columns="key")
        assert len(mine) == 96
        pd.testing.assert_frame_equal(mine, same)
    report = json.loads((run_dir / "report.json").read_text())
    check_report(run_dir / "report.json")
    extract = {s["stage"]: s for s in report["stages"]}["extract"]
    assert extract["pages_selected"] == 33 == {s["stage"]: s for s in whole["report"]["stages"]}["extract"][
        "pages_selected"]

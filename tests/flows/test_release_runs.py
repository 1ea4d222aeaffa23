"""`danqing release` end to end: the sample crawl run, then released; variants 1 and 2 released together;
exclude lists, the opt-out re-check against a local server, recaptions, and the refusals."""

from __future__ import annotations

import json
import re
import shutil
import tarfile
from pathlib import Path
from urllib.parse import urlsplit

import pandas as pd
import pyarrow.parquet as pq
import pytest
from aiohttp import web
from local_http import serve
from test_curate import IN_PROCESS, check_report, run_sample

from flows.cli import main
from flows.curate import curate
from flows.release import NotCommittedError, ReleaseParams, find_units, release
from flows.settings import CurateParams


def _dataset(run_dir: Path) -> pd.DataFrame:
    return pd.concat([pd.read_parquet(p) for p in sorted((run_dir / "dataset").glob("*.parquet"))],
                     ignore_index=True)


def _released(dest: Path) -> pd.DataFrame:
    return pd.concat([pd.read_parquet(p) for p in sorted((dest / "data").glob("*.parquet"))], ignore_index=True)


def _release(runs, dest: Path, **kw) -> dict:
    return release(ReleaseParams(runs=[str(r) for r in runs], to=str(dest), **kw))


@pytest.fixture(scope="module")
def sample(prefect_server, sample_crawl, tmp_path_factory):
    """The sample crawl run once, and released once."""
    out = tmp_path_factory.mktemp("release-run")
    run_dir = Path(run_sample(out, sample_crawl)["run_dir"])
    dest = out.parent / f"{out.name}-release"
    return run_dir, dest, _release([out], dest)


def test_the_release_loads_with_datasets_and_webdataset_and_holds_exactly_the_committed_rows(sample):
    import datasets
    import webdataset as wds

    run_dir, dest, _ = sample
    committed = _dataset(run_dir)
    report = json.loads((run_dir / "report.json").read_text())
    assert len(committed) == report["samples"] > 0  # the dataset is the committed rows, crossbatch's survivors
    ds = datasets.load_dataset("parquet", data_dir=str(dest / "data"), split="train")
    assert ds.num_rows == report["samples"]
    assert sorted(ds["key"]) == sorted(committed["key"])
    assert ds.column_names == ["url", "alt_text", "caption", "recaption", "width", "height", "sha256",
                               "page_url", "snapshot", "key"]
    by_key = committed.set_index("key")
    samples = list(wds.WebDataset(sorted(str(p) for p in (dest / "images").glob("*.tar")), shardshuffle=False))
    assert sorted(s["__key__"] for s in samples) == sorted(committed["key"])
    for s in samples:
        assert s["txt"].decode() == by_key.loc[s["__key__"], "caption"]
        assert json.loads(s["json"])["sha256"] == by_key.loc[s["__key__"], "sha256"]
        assert s["jpg"][:3] == b"\xff\xd8\xff"
    # img2dataset's parquet reader: pq.read_table of url_col, caption_col and the additional columns, as strings
    for path in sorted((dest / "data").glob("*.parquet")):
        table = pq.read_table(path, columns=["url", "alt_text", "recaption"])
        assert [str(f.type) for f in table.schema] == ["string", "string", "string"]


def test_the_cards_numbers_equal_the_reports(sample):
    import yaml

    run_dir, dest, result = sample
    report = json.loads((run_dir / "report.json").read_text())
    check_report(run_dir / "report.json", "--complete", "source,refine")
    card = (dest / "README.md").read_text()
    front = yaml.safe_load(card.split("---\n")[1])
    assert front["license"] == "cc-by-nc-4.0" and front["language"] == ["zh"]
    assert front["configs"][0]["data_files"][0]["path"] == "data/train-*"
    for s in report["stages"]:
        assert f"| {s['stage']} | {s['in']} | {s['kept']} |" in card, s["stage"]
    dropped = {r: n for s in report["stages"] for r, n in s["dropped"].items()}
    for step, reason in (("alignment band", "align.out_of_band"), ("geometry", "image.geometry"),
                         ("Chinese LID", "refine.lid")):
        assert f"| {step} | `{reason}` | {dropped[reason]} |" in card
    assert f"| release | {report['samples']} | {report['samples']} |" in card
    # what the card needs from the report: every role's revision, and each threshold calibrated or not
    assert set(report["models"]) >= {"embed", "align", "tokenizer"}
    assert all("revision" in m for m in report["models"].values())
    lid = report["thresholds"]["refine.lid_threshold"]
    assert lid["fittable"] and not lid["calibrated"] and not report["thresholds"]["image.min_side"]["fittable"]
    assert f"| `refine.lid_threshold` | {lid['value']} | {lid['default']} | no (default) |" in card
    assert "**Placeholder model**" in card and "CC-BY-NC-4.0" in card
    top = _dataset(run_dir)["image_host"].value_counts()
    assert f"| {top.index[0]} | {top.iloc[0]} |" in card
    assert (dest / "caption_length.png").stat().st_size > 0 and result["rows"] == report["samples"]
    (sizes,) = result["cluster_sizes"].values()  # k-means over the released rows' vectors in LanceDB
    assert sum(sizes) == result["rows"] and len(sizes) == min(100, result["rows"] // 5)
    assert (dest / "cluster_sizes.png").stat().st_size > 0 and "![cluster_sizes.png]" in card


def test_an_exclude_list_of_one_host_and_one_sha256_removes_exactly_those_rows(sample, tmp_path):
    run_dir, _, _ = sample
    committed = _dataset(run_dir)
    on_host = committed["image_host"].str.endswith("sample-gbk.test") | \
        committed["page_host"].str.endswith("sample-gbk.test")
    assert on_host.any() and (~on_host).any()
    victim = committed[~on_host].iloc[0]
    listing = tmp_path / "takedown.txt"
    listing.write_text(f"# removal requests\nsample-gbk.test\n{victim['sha256'].upper()}\n")
    dest = tmp_path / "rel"
    result = _release([run_dir], dest, exclude=[str(listing)])
    gone = on_host | (committed["sha256"] == victim["sha256"])
    assert sorted(_released(dest)["key"]) == sorted(committed.loc[~gone, "key"])
    assert result["rows"] == len(committed) - int(gone.sum())
    assert sum(*result["cluster_sizes"].values()) == result["rows"]  # the left-out rows' vectors are not counted
    card = (dest / "README.md").read_text()
    assert f"| domain | {int(on_host.sum())} |" in card and "| sha256 | 1 |" in card
    assert sum(1 for p in (dest / "images").glob("*.tar") for m in tarfile.open(p) if m.name.endswith(".jpg")) == \
        result["rows"]


def test_a_bad_exclude_line_and_an_occupied_destination_are_refused(sample, tmp_path, capsys):
    run_dir, dest, _ = sample
    bad = tmp_path / "bad.txt"
    bad.write_text("good.test\nnot a domain\n")
    assert main(["release", str(run_dir), "--to", str(tmp_path / "x"), "--exclude", str(bad)]) == 2
    assert f"{bad}:2: 'not a domain'" in capsys.readouterr().err and not (tmp_path / "x").exists()
    before = sorted(p.name for p in dest.rglob("*"))
    assert main(["release", str(run_dir), "--to", str(dest)]) == 2
    assert "holds a release" in capsys.readouterr().err and sorted(p.name for p in dest.rglob("*")) == before
    again = tmp_path / "again"
    shutil.copytree(dest, again)
    (again / "stale.txt").write_text("from an older release")
    assert main(["release", str(run_dir), "--to", str(again), "--overwrite"]) == 0
    assert not (again / "stale.txt").exists() and len(_released(again)) == len(_dataset(run_dir))
    assert not list(tmp_path.glob(".again.release-*"))  # no temporary or old copy left beside it


def _copy_run(run_dir: Path, root: Path, name: str) -> Path:
    copy = root / name
    shutil.copytree(run_dir, copy, ignore=shutil.ignore_patterns("steps", "rejects"))
    return copy


def test_the_reader_understands_batches_and_refuses_what_never_committed(sample, tmp_path):
    run_dir, _, _ = sample
    batched = tmp_path / "root" / "batched"
    for k in ("0000", "0001"):
        _copy_run(run_dir, batched / "batches", k)
    (batched / "run.json").write_text(json.dumps({"run_id": "batched", "batches": [
        {"batch": 0, "dir": "batches/0000"}, {"batch": 1, "dir": "batches/0001"}]}))
    shutil.copy(run_dir / "report.json", batched / "report.json")
    units = find_units([str(batched)])
    assert [u.dir.name for u in units] == ["0000", "0001"] and {u.run_id for u in units} == {"batched"}
    (batched / "batches" / "0001" / "reduce" / "commit.done.json").unlink()
    with pytest.raises(NotCommittedError, match=r"batch 0001 of run batched"):
        find_units([str(batched)])
    single = _copy_run(run_dir, tmp_path / "root", "single")
    (single / "reduce" / "commit.done.json").unlink()
    with pytest.raises(NotCommittedError, match=r"run .*single.* never committed"):
        find_units([str(single)])
    # an output root means its committed runs: here none is left
    with pytest.raises(NotCommittedError, match="holds no committed run"):
        find_units([str(tmp_path / "root")])


def test_runs_of_different_embed_models_are_refused_unless_merged_on_purpose(sample, tmp_path):
    run_dir, _, _ = sample
    other = _copy_run(run_dir, tmp_path, "other-model")
    report = json.loads((other / "report.json").read_text())
    report["models"]["embed"] = {**report["models"]["embed"], "name": "OFA-Sys/chinese-clip-vit-large-patch14"}
    (other / "report.json").write_text(json.dumps(report))
    with pytest.raises(ValueError, match="different embed models.*chinese-clip"):
        _release([run_dir, other], tmp_path / "refused")
    assert not (tmp_path / "refused").exists()
    result = _release([run_dir, other], tmp_path / "merged", merge_models=True)
    assert result["rows"] == 2 * report["samples"]
    assert "Runs of different embed models were merged on request" in (tmp_path / "merged" / "README.md").read_text()


def test_recheck_opt_out_leaves_out_what_a_changed_robots_txt_or_header_now_refuses(sample, tmp_path):
    """A copy of the run whose image URLs point at a local server: its robots.txt now disallows one folder and
    one image answers X-Robots-Tag: noai. Recaptions written for one shard are merged on the way."""
    run_dir, _, _ = sample
    copy = _copy_run(run_dir, tmp_path, "local")
    shards = sorted((copy / "dataset").glob("*.parquet"))
    rows = pd.concat([pd.read_parquet(p) for p in shards], ignore_index=True)
    paths = rows["url"].map(lambda u: urlsplit(u).path)
    folder = "/" + "/".join(paths.iloc[0].split("/")[1:-1]) + "/"
    noai = paths[~paths.str.startswith(folder)].iloc[0]
    hits: list[str] = []

    async def handle(request: web.Request) -> web.Response:
        hits.append(request.path)
        if request.path == "/robots.txt":
            return web.Response(text=f"User-agent: *\nDisallow: {folder}\n")
        headers = {"X-Robots-Tag": "noai"} if request.path == noai else {}
        return web.Response(body=b"\xff\xd8\xff", content_type="image/jpeg", headers=headers)

    app = web.Application()
    app.router.add_get("/{tail:.*}", handle)
    first = pd.read_parquet(shards[0])
    recaps = pd.DataFrame({"key": first["key"], "recaption": [f"重新描述{i}" for i in range(len(first))],
                           "recaption_error": [None] * len(first)})
    (copy / "recaption").mkdir()
    recaps.to_parquet(copy / "recaption" / shards[0].name)
    report = json.loads((copy / "report.json").read_text())
    report["recaption"] = {"ran": True, "model": "Qwen/Qwen2-VL-2B-Instruct", "revision": "abc123"}
    (copy / "report.json").write_text(json.dumps(report))
    with serve(app) as port:
        for p in shards:
            frame = pd.read_parquet(p)
            frame["url"] = frame["url"].map(lambda u: f"http://127.0.0.1:{port}{urlsplit(u).path}")
            frame.to_parquet(p)
        dest = tmp_path / "rechecked"
        result = _release([copy], dest, recheck_opt_out=True,
                          config={"http": {"allow_networks": ["127.0.0.0/8"], "retries": 0}})
    assert hits.count("/robots.txt") == 1  # asked again, once for the host
    robots = paths.str.startswith(folder)
    opted = paths == noai
    assert robots.any() and opted.sum() == 1
    released = _released(dest)
    assert sorted(released["key"]) == sorted(rows.loc[~robots & ~opted, "key"])
    assert result["excluded"] == {"robots": int(robots.sum()), "opt_out": 1}
    card = (dest / "README.md").read_text()
    assert f"| robots | {int(robots.sum())} |" in card and "| opt_out | 1 |" in card
    assert "| recaption | `Qwen/Qwen2-VL-2B-Instruct` | abc123 | no |" in card
    want = dict(zip(recaps["key"], recaps["recaption"], strict=True))
    got = released.set_index("key")["recaption"]
    assert all(got[k] == want[k] for k in got.index if k in want) and got[~got.index.isin(want)].isna().all()
    tars = [m for p in sorted((dest / "images").glob("*.tar")) for m in tarfile.open(p).getnames()]
    assert sum(n.endswith(".recaption.txt") for n in tars) == int(released["key"].isin(want).sum()) > 0


def test_variants_1_and_2_released_together_hold_each_image_once(prefect_server, tmp_path_factory):
    from tasks.sample import write_sample_variant

    crawl_dir = tmp_path_factory.mktemp("release-variants")
    out = tmp_path_factory.mktemp("release-variants-out")
    manifests = []
    for n in (1, 2):
        crawl = write_sample_variant(n, crawl_dir)
        curate(CurateParams(warcs=[str(w) for w in crawl.warcs], out=str(out), fetcher="replay", run_id=f"v{n}"),
               cluster=IN_PROCESS)
        manifests += json.loads(crawl.manifest.read_text())
    dest = tmp_path_factory.mktemp("release-variants-rel") / "release"
    result = _release([out], dest)
    released = _released(dest)
    kept = {m["url"] for m in manifests if m["expected"] == "kept"}
    assert set(released["url"]) == kept and len(released) == len(kept) == result["rows"]
    assert released["sha256"].is_unique and released["key"].is_unique
    repeats = {m["url"] for m in manifests if m["repeats"] and m["expected"] == "crossbatch.duplicate"}
    assert repeats and not repeats & set(released["url"])
    assert result["runs"] == ["v1", "v2"] and re.search(r"\| `v2` \| .* \| 1 \| \d+ \|",
                                                        (dest / "README.md").read_text())


def test_the_report_says_which_thresholds_were_calibrated():
    from flows.report import threshold_provenance

    got = threshold_provenance({"refine": {"lid_threshold": 0.62}, "crossbatch": {"threshold": 0.05}},
                               {"low": 0.2, "high": 0.4, "fitted": True})
    assert got["refine.lid_threshold"] == {"value": 0.62, "default": 0.5, "set": True, "fittable": True,
                                           "calibrated": True}
    assert got["refine.entropy_threshold"]["fittable"] and not got["refine.entropy_threshold"]["calibrated"]
    assert got["dedup.threshold"] == {"value": 0.05, "default": 0.1, "set": True, "fittable": False,
                                      "calibrated": False}  # the old spelling read as the one radius
    assert got["align.low"]["value"] == 0.2 and got["align.low"]["calibrated"]
    fixed = threshold_provenance({}, {"low": 0.23, "high": 0.44, "fitted": False})  # the paper's band, unfitted
    assert not fixed["align.high"]["calibrated"] and fixed["align.high"]["value"] == 0.44

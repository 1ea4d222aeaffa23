"""The sample variants: two small crawls, curated one after the other, whose manifests predict cross-batch dedup."""

from __future__ import annotations

import collections
import io
import json
import shutil
from pathlib import Path

import lxml.html
import numpy as np
import pandas as pd
import pytest
from PIL import Image
from warcio.archiveiterator import ArchiveIterator

import tasks.sample
from schemas.reasons import REASONS
from tasks.fetch import decode_image, sniff_mime
from tasks.models.placeholder import PlaceholderModel
from tasks.sample import BAND_MARGIN, SAMPLE_SNAPSHOT, predict_fates, write_sample_crawl, write_sample_variant

SPEC_REASONS = {f"{stage}.{r}" for stage, reasons in REASONS.items() for r in reasons}
REPEAT_CASES = {"crossbatch_repeat", "crossbatch_repeat_of_pair", "repeat_of_out_of_band"}


@pytest.fixture(scope="module")
def crawl_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("variants")
    for n in (1, 2):
        write_sample_variant(n, out)
    return out


@pytest.fixture(scope="module")
def manifests(crawl_dir) -> dict[int, list[dict]]:
    return {n: json.loads((crawl_dir / f"manifest-v{n}.json").read_text(encoding="utf-8")) for n in (1, 2)}


@pytest.fixture(scope="module")
def warcs(crawl_dir) -> dict[int, list[tuple[str, str, object, bytes]]]:
    """Per variant, its records in file order: (type, target URI, HTTP headers, payload)."""
    out = {}
    for n in (1, 2):
        with (crawl_dir / f"sample-v{n}.warc.gz").open("rb") as fh:
            out[n] = [(rec.rec_type, rec.rec_headers.get_header("WARC-Target-URI"), rec.http_headers,
                       rec.content_stream().read()) for rec in ArchiveIterator(fh)]
    return out


@pytest.fixture(scope="module")
def bodies(warcs) -> dict[str, bytes]:
    return {uri: body for recs in warcs.values() for kind, uri, _, body in recs if kind == "response"}


@pytest.fixture(scope="module")
def vectors(manifests, bodies) -> dict[str, np.ndarray]:
    """The placeholder's vector of each candidate's stored image (what fetch keeps), by URL."""
    urls = [m["url"] for rows in manifests.values() for m in rows]
    images = [Image.open(io.BytesIO(decode_image(bodies[u], sniff_mime(bodies[u])).jpeg)) for u in urls]
    return dict(zip(urls, PlaceholderModel().embed_images(images).astype(np.float64), strict=True))


def _files(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


def test_byte_identical_and_rerun_rewrites_nothing(crawl_dir, tmp_path):
    tasks.sample.variants._variants.cache_clear()  # build again from scratch, not from this process's cached build
    for n in (1, 2):
        write_sample_variant(n, tmp_path)
    assert _files(tmp_path) == _files(crawl_dir)
    assert sorted(_files(tmp_path)) == ["_SAMPLE_V1_COMPLETE.json", "_SAMPLE_V2_COMPLETE.json", "manifest-v1.json",
                                        "manifest-v2.json", "sample-v1.warc.gz", "sample-v2.warc.gz"]
    before = {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()}
    again = write_sample_variant(2, tmp_path)
    assert again.warcs == [tmp_path / "sample-v2.warc.gz"] and again.manifest == tmp_path / "manifest-v2.json"
    assert {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()} == before


def test_variants_share_a_directory_with_the_default_crawl(crawl_dir, tmp_path):
    shutil.copytree(crawl_dir, tmp_path, dirs_exist_ok=True)
    default = write_sample_crawl(tmp_path)
    before = {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()}
    (tmp_path / "sample-v1.warc.gz").write_bytes(b"damaged")  # only variant 1's marker stops matching
    write_sample_variant(1, tmp_path)
    assert write_sample_crawl(tmp_path) == default
    after = {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()}
    assert {n for n in after if after[n] != before[n]} == {"sample-v1.warc.gz", "manifest-v1.json",
                                                           "_SAMPLE_V1_COMPLETE.json"}
    assert (tmp_path / "sample-v1.warc.gz").read_bytes() == (crawl_dir / "sample-v1.warc.gz").read_bytes()


def test_unknown_variant_is_refused(tmp_path):
    for n in (0, 3):
        with pytest.raises(ValueError, match="unknown sample variant"):
            write_sample_variant(n, tmp_path)
    assert not list(tmp_path.iterdir())


def test_manifest_lists_every_img_of_the_warc_in_run_order(manifests, warcs):
    for n, recs in warcs.items():
        assert recs[0][0] == "warcinfo" and f"isPartOf: {SAMPLE_SNAPSHOT}-V{n}" in recs[0][3].decode()
        labels = {uri: json.loads(body.decode().split("languages-cld2: ")[1])["languages"][0]["code"]
                  for kind, uri, _, body in recs if kind == "metadata"}
        pages = [(uri, body) for kind, uri, http, body in recs
                 if kind == "response" and http.get_header("Content-Type").startswith("text/html")]
        served = {uri for kind, uri, http, _ in recs if kind == "response" and http.get_statuscode() == "200"}
        found = []
        for uri, body in pages:
            assert labels[uri] == "zh"  # every page is selected
            for e in lxml.html.document_fromstring(body.decode()).iter("img"):
                found.append({"page_url": uri, "url": e.get("src"), "alt_text": e.get("alt")})
        assert [{k: m[k] for k in ("page_url", "url", "alt_text")} for m in manifests[n]] == found
        assert {m["url"] for m in manifests[n]} <= served
        assert len({m["url"] for m in manifests[n]}) == len(manifests[n]) == 18
        assert all(set(m) == {"url", "expected", "repeats", "page_url", "alt_text", "case"} for m in manifests[n])


def test_urls_are_no_other_crawls(manifests, sample_crawl):
    default = [json.loads(line) for line in sample_crawl.manifest.read_text(encoding="utf-8").splitlines()]
    default_urls = {m.get("url") for m in default} | {m["page_url"] for m in default}
    v1, v2 = ({m["url"] for m in rows} | {m["page_url"] for m in rows} for rows in manifests.values())
    assert not v1 & v2 and not v1 & default_urls and not v2 & default_urls


def test_expected_fates_are_spec_names_in_the_intended_mix(manifests):
    for rows in manifests.values():
        assert {m["expected"] for m in rows} <= SPEC_REASONS | {"kept"}
        assert not any(m["expected"] == "image.nsfw" for m in rows)  # no offline model: the rule does not run
    v1 = collections.Counter(m["expected"] for m in manifests[1])
    # 17 rows reach align: its fitted band drops 2 below and 1 above (13.6% of them, split 3:1, by quantiles)
    assert v1 == {"kept": 14, "image.duplicate": 1, "align.out_of_band": 3}
    assert all(m["repeats"] is None for m in manifests[1])
    v2 = collections.Counter((m["case"], m["expected"]) for m in manifests[2])
    assert sum(k for (_, fate), k in v2.items() if fate == "align.out_of_band") == 3
    assert v2["crossbatch_repeat", "crossbatch.duplicate"] >= 5
    assert v2["crossbatch_repeat_of_pair", "crossbatch.duplicate"] == 1
    assert v2["new", "kept"] >= 8
    assert v2["repeat_of_out_of_band", "kept"] == 1
    assert sum(v2.values()) == 18 and not any(fate == "image.duplicate" for _, fate in v2)


def _distance(a: np.ndarray, b: np.ndarray) -> float:
    return 1.0 - float(a @ b)


def test_repeats_are_near_duplicates_of_what_variant_1_kept_or_dropped(manifests, vectors):
    v1 = {m["url"]: m for m in manifests[1]}
    repeats = [m for m in manifests[2] if m["repeats"] is not None]
    assert {m["case"] for m in repeats} == REPEAT_CASES
    assert all(m["case"] in REPEAT_CASES for m in repeats) and len(repeats) == 8
    for m in repeats:
        original = v1[m["repeats"]]
        # a duplicate in variant 2 only when its photo is in variant 1's dataset; its band's drop it keeps anyway
        assert original["expected"] == ("align.out_of_band" if m["case"] == "repeat_of_out_of_band" else "kept")
        assert m["expected"] in (("kept", "align.out_of_band") if m["case"] == "repeat_of_out_of_band"
                                 else ("crossbatch.duplicate", "align.out_of_band"))
        assert _distance(vectors[m["url"]], vectors[original["url"]]) < 0.05
    pair = [m for m in manifests[1] if m["case"].startswith("in_batch_")]
    assert [(m["case"], m["expected"]) for m in pair] == [("in_batch_first", "kept"),
                                                          ("in_batch_reencoded", "image.duplicate")]
    assert pair[0]["page_url"] != pair[1]["page_url"]
    assert _distance(vectors[pair[0]["url"]], vectors[pair[1]["url"]]) < 0.05


def test_every_other_photo_is_far_from_everything(manifests, vectors):
    rows = [*manifests[1], *manifests[2]]
    # each photo once: the in-batch duplicate and variant 2's repeats are checked as near duplicates above
    distinct = [m["url"] for m in rows if m["repeats"] is None and m["case"] != "in_batch_reencoded"]
    assert len(distinct) == 17 + 10
    vs = np.stack([vectors[u] for u in distinct])
    sims = vs @ vs.T
    np.fill_diagonal(sims, -1.0)
    assert 1.0 - sims.max() > 0.3


def test_fates_are_the_library_prediction_clear_of_the_band_edges(manifests, bodies, vectors):
    """Each variant fits its own band on the rows reaching align; variant 2 is compared with variant 1's dataset."""
    committed = np.stack([vectors[m["url"]] for m in manifests[1] if m["expected"] == "kept"])
    model = PlaceholderModel()
    for n, rows in manifests.items():
        fates = predict_fates([bodies[m["url"]] for m in rows], [m["alt_text"] for m in rows],
                              committed if n == 2 else None)
        assert fates.expected == [m["expected"] for m in rows]
        assert fates.band_margin > BAND_MARGIN
        assert fates.band.fitted and fates.band.n == sum(m["expected"] != "image.duplicate" for m in rows)
        # the score is the cosine of the stored image's vector and the caption's, both under the placeholder
        texts = model.embed_texts([m["alt_text"] for m in rows]).astype(np.float64)
        images = np.stack([vectors[m["url"]] for m in rows])
        np.testing.assert_allclose(fates.scores, (images * texts).sum(axis=1), atol=1e-6)
        reached = [s for s, m in zip(fates.scores, rows, strict=True) if m["expected"] != "image.duplicate"]
        assert sum(not fates.band.low <= s <= fates.band.high for s in reached) == 3


def test_every_pair_passes_stages_1_2_and_the_quality_rules(manifests, bodies):
    """So that their fates are decided after the quality rules, and the caption align scores is the alt text."""
    from tasks.image import filter_images
    from tasks.refine import refine_text
    from tasks.source import select_sources

    rows = [*manifests[1], *manifests[2]]
    frame = pd.DataFrame({"key": [f"{i:020x}" for i in range(len(rows))], "alt_text": [m["alt_text"] for m in rows],
                          "url": [m["url"] for m in rows], "page_url": [m["page_url"] for m in rows]})
    sourced = select_sources(frame)
    assert sourced["drop_reason"].isna().all()
    assert sourced["word_count"].between(8, 25).all()
    refined = refine_text(sourced)
    assert refined["drop_reason"].isna().all()
    assert refined["caption"].tolist() == frame["alt_text"].tolist()
    decoded = [decode_image(bodies[m["url"]], sniff_mime(bodies[m["url"]])) for m in rows]
    assert all(d.jpeg == bodies[m["url"]] for d, m in zip(decoded, rows, strict=True))  # stored as served
    metrics = pd.DataFrame([{"original_width": d.original_width, "original_height": d.original_height,
                             "gray_std": d.gray_std, "laplacian_var": d.laplacian_var, "gray_entropy": d.gray_entropy}
                            for d in decoded])
    assert filter_images(metrics)["drop_reason"].isna().all()
    assert (metrics["laplacian_var"] > 1500).all() and (metrics["gray_entropy"] > 5).all()


def test_cli_writes_a_variant_and_refuses_an_unknown_one(tmp_path, crawl_dir, capsys):
    from flows.cli import main

    assert main(["sample", "--variant", "2", "--out", str(tmp_path / "s")]) == 0
    assert _files(tmp_path / "s") == {k: v for k, v in _files(crawl_dir).items() if "v2" in k.lower()}
    assert "sample-v2.warc.gz" in capsys.readouterr().out
    assert main(["sample", "--variant", "3", "--out", str(tmp_path / "bad")]) == 2
    assert "unknown sample variant 3" in capsys.readouterr().err
    assert main(["run", "--sample-variant", "3", "--out", str(tmp_path / "run")]) == 2
    assert "unknown sample variant 3" in capsys.readouterr().err
    assert main(["run", "--sample-variant", "1", "--warc", "x.warc.gz", "--out", str(tmp_path / "run")]) == 2
    assert "--sample-variant" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists() and not (tmp_path / "run").exists()


def test_fates_predict_image_safety_before_the_band(manifests, bodies, monkeypatch):
    """The real open_nsfw scores every stored photo (none reaches the default cut: no fate says image.nsfw); under a
    cut of 0 every row that is not an in-batch duplicate is predicted image.nsfw and none reaches align."""
    from tasks.image import ImageConfig
    from tasks.sample import fates as fates_module

    rows = manifests[1]
    fates = predict_fates([bodies[m["url"]] for m in rows], [m["alt_text"] for m in rows])
    assert fates.nsfw.shape == (len(rows),) and ((fates.nsfw >= 0) & (fates.nsfw < ImageConfig().nsfw_threshold)).all()
    assert "image.nsfw" not in fates.expected
    monkeypatch.setattr(fates_module, "ImageConfig", lambda: ImageConfig(nsfw_threshold=0.0))
    strict = predict_fates([bodies[m["url"]] for m in rows], [m["alt_text"] for m in rows])
    assert strict.expected == ["image.duplicate" if m["expected"] == "image.duplicate" else "image.nsfw" for m in rows]
    assert not strict.entered.any()

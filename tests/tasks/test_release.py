"""The release's pure parts: exclude lists, release rows, the resharding writers, the dataset card."""

from __future__ import annotations

import io
import json
import tarfile
from collections import Counter

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import yaml

from tasks.release import (
    CardInput,
    ExcludeFileError,
    ExcludeList,
    ParquetShards,
    ReleaseConfig,
    ReleaseStats,
    TarShards,
    cluster_sizes,
    read_samples,
    release_rows,
    release_sample,
    render_card,
    size_category,
)
from tasks.write import sample_bytes

SHA = "ab" * 32


def _frame(n: int = 4) -> pd.DataFrame:
    hosts = ["img.a.test", "cdn.img.a.test", "b.test", "www.c.test"]
    pages = ["www.p.test", "www.p.test", "blog.a.test", "c.test"]
    return pd.DataFrame({
        "key": [f"k{i}" for i in range(n)], "url": [f"https://{hosts[i % 4]}/{i}.jpg" for i in range(n)],
        "alt_text": [f"原文{i}" for i in range(n)], "caption": [f"标题{i}" for i in range(n)],
        "page_url": [f"https://{pages[i % 4]}/p{i}.html" for i in range(n)], "snapshot": ["S"] * n,
        "width": [200] * n, "height": [150] * n, "sha256": [f"{i:064x}" for i in range(n)],
        "image_host": [hosts[i % 4] for i in range(n)], "page_host": [pages[i % 4] for i in range(n)],
        "group_size": [1] * n,
    })


def test_exclude_lines_are_sorted_into_their_three_kinds():
    ex = ExcludeList.parse(["\ufeff# takedowns", "", SHA.upper(), "https://b.test/2.jpg#frag", "img.a.test  # host",
                            "WWW.C.test", "例子.test"])
    assert ex.sha256 == {SHA} and ex.urls == {"https://b.test/2.jpg#frag"}
    assert ex.domains == {"img.a.test", "www.c.test", "xn--fsqu00a.test"}


@pytest.mark.parametrize("line", ["not a domain", "localhost", "ab" * 31, "https://", "a..b.test", "-a.test"])
def test_a_bad_exclude_line_is_an_error_naming_its_line(line):
    with pytest.raises(ExcludeFileError, match=r"takedown\.txt:3: "):
        ExcludeList.parse(["a.test", "# ok", line], "takedown.txt")


def test_a_domain_covers_its_subdomains_on_the_image_or_the_page_host_and_www_is_not_stripped():
    frame = _frame()
    kinds = ExcludeList.parse(["img.a.test"]).kinds(frame)
    assert kinds.tolist() == ["domain", "domain", None, None]  # img.a.test and cdn.img.a.test
    assert ExcludeList.parse(["a.test"]).kinds(frame).tolist() == ["domain", "domain", "domain", None]  # page blog.
    # www.c.test is listed: the image host www.c.test goes, the bare page host c.test does not bring more
    assert ExcludeList.parse(["www.c.test"]).kinds(frame).tolist() == [None, None, None, "domain"]
    assert ExcludeList.parse(["c.test"]).kinds(frame).tolist() == [None, None, None, "domain"]
    assert ExcludeList.parse(["www.p.test"]).kinds(frame).tolist() == ["domain", "domain", None, None]
    assert ExcludeList.parse(["p.test"]).kinds(frame.drop(columns=["page_host"])).tolist() == [
        "domain", "domain", None, None]  # hosts parsed from the URLs when the columns are missing


def test_each_row_is_counted_under_one_kind_sha256_first():
    frame = _frame()
    ex = ExcludeList.parse([f"{2:064x}", "https://b.test/2.jpg", "https://img.a.test/0.jpg", "b.test"])
    assert ex.kinds(frame).tolist() == ["url", None, "sha256", None]
    assert ExcludeList().kinds(frame).isna().all()


def test_release_rows_join_recaptions_and_keep_the_column_when_there_are_none():
    frame = _frame(3)
    table = release_rows(frame, pd.DataFrame({"key": ["k2", "k0"], "recaption": ["一只猫", ""]}))
    assert table.column_names == ["url", "alt_text", "caption", "recaption", "width", "height", "sha256",
                                  "page_url", "snapshot", "key"]
    assert table.column("recaption").to_pylist() == ["", None, "一只猫"]
    bare = release_rows(frame, None)
    assert str(bare.schema.field("recaption").type) == "string" and bare.column("recaption").null_count == 3
    with pytest.raises(ValueError, match="sha256"):
        release_rows(frame.drop(columns=["sha256"]), None)


def test_parquet_shards_stay_under_their_size_and_keep_every_row_in_order(tmp_path):
    frame = pd.concat([_frame(4)] * 50, ignore_index=True)
    frame["key"] = [f"k{i:04d}" for i in range(len(frame))]
    table = release_rows(frame, None)
    shards = ParquetShards(tmp_path, max_bytes=12_000, group_rows=15)
    for start in range(0, table.num_rows, 20):
        shards.write(table.slice(start, 20))
    paths = shards.finish()
    assert len(paths) > 1 and [p.name for p in paths][-1] == f"train-{len(paths) - 1:05d}-of-{len(paths):05d}.parquet"
    assert all(p.stat().st_size <= 12_000 for p in paths)
    keys = [k for p in paths for k in pq.read_table(p).column("key").to_pylist()]
    assert keys == frame["key"].tolist()


def test_an_empty_release_still_has_one_parquet_file_with_the_schema(tmp_path):
    (path,) = ParquetShards(tmp_path, 1000).finish()
    assert pq.read_schema(path).names[:4] == ["url", "alt_text", "caption", "recaption"]


def _sample(key: str, size: int = 3000) -> tuple[str, dict[str, bytes]]:
    return key, {"jpg": bytes([7]) * size, "txt": "标题".encode(), "json": json.dumps({"key": key}).encode()}


def test_tar_shards_roll_over_below_their_size_and_read_back_sample_by_sample(tmp_path):
    shards = TarShards(tmp_path, max_bytes=20_000)
    for i in range(10):
        key, members = _sample(f"k{i}")
        shards.write(release_sample(key, members, "重新描述" if i % 2 else None))
    paths = shards.finish()
    assert len(paths) > 1 and all(p.stat().st_size <= 20_000 for p in paths)
    got = [s for p in paths for s in read_samples(p)]
    assert [k for k, _ in got] == [f"k{i}" for i in range(10)]
    assert got[1][1]["recaption.txt"].decode() == "重新描述" and "recaption.txt" not in got[0][1]
    with tarfile.open(paths[0]) as tar:  # a plain tar reader agrees
        assert tar.getnames()[:3] == ["k0.jpg", "k0.txt", "k0.json"]
        assert tar.extractfile("k0.txt").read().decode() == "标题"


def test_a_sample_larger_than_the_shard_size_gets_a_shard_of_its_own(tmp_path):
    shards = TarShards(tmp_path, max_bytes=5_000)
    for key, size in (("a", 100), ("b", 9000), ("c", 100)):
        shards.write(release_sample(*_sample(key, size), None))
    assert [[k for k, _ in read_samples(p)] for p in shards.finish()] == [["a"], ["b"], ["c"]]


def test_sample_bytes_are_the_tar_members_webdataset_expects():
    data = sample_bytes("k", b"jpg", "cap", {"key": "k"}, {"recaption.txt": b"re"})
    with tarfile.open(fileobj=io.BytesIO(data + b"\0" * 1024)) as tar:
        assert tar.getnames() == ["k.jpg", "k.txt", "k.json", "k.recaption.txt"]


def _report(kept: list[int], placeholder: bool = False) -> dict:
    names = ["extract", "source", "fetch", "refine", "image", "align", "crossbatch"]
    stages = []
    for i, name in enumerate(names):
        before = kept[i - 1] if i else kept[0] + 2
        stages.append({"stage": name, "in": before, "kept": kept[i], "dropped": {f"{name}.x": before - kept[i]},
                       "not_run": [], **({"placeholder_model": True} if placeholder and name == "image" else {})})
    return {"stages": stages, "samples": kept[-1],
            "models": {"embed": {"name": "m", "revision": "r1", "placeholder": placeholder}}}


def test_the_card_has_hub_front_matter_and_numbers_from_its_inputs():
    report = _report([10, 9, 8, 7, 6, 5, 4], placeholder=True)
    stats = ReleaseStats(rows=3, excluded=Counter({"domain": 1}), image_hosts=Counter({"img.a.test": 2, "b.test": 1}))
    report["thresholds"] = {"refine.lid_threshold": {"value": 0.7, "default": 0.5, "fittable": True,
                                                     "calibrated": True}}
    card = render_card(CardInput(
        funnel=report,
        runs=[{"run_id": "r", "snapshots": ["CC-MAIN-2024-33"], "units": 1, "samples": 4}], reports=[report],
        stats=stats, excludes=ExcludeList.parse(["a.test"]), recheck=False, mixed_models=[]), ReleaseConfig())
    front = yaml.safe_load(card.split("---\n")[1])
    assert front["license"] == "cc-by-nc-4.0" and front["language"] == ["zh"]
    assert front["size_categories"] == ["n<1K"]
    assert front["configs"][0]["data_files"][0]["path"] == "data/train-*"
    assert "| crossbatch | 5 | 4 |" in card and "| release | 4 | 3 |" in card and "| domain | 1 |" in card
    assert "| img.a.test | 2 | 66.67 |" in card and "`refine.lid_threshold` | 0.7 | 0.5 | yes" in card
    assert "**Placeholder model** in image" in card and "| embed | `m` | r1 | yes |" in card
    assert "CC-BY-NC-4.0" in card and "CC-MAIN-2024-33" in card


def test_size_categories_follow_the_hubs_bounds():
    assert [size_category(n) for n in (0, 999, 1000, 99_892_381, 100_000_000)] == [
        "n<1K", "n<1K", "1K<n<10K", "10M<n<100M", "100M<n<1B"]


def test_cluster_sizes_stream_the_vectors_and_count_every_row_once():
    rng = np.random.default_rng(3)
    centres = np.eye(8, dtype=np.float32)[:3]
    vectors = np.concatenate([c + 0.01 * rng.standard_normal((n, 8)) for c, n in
                              zip(centres, (60, 30, 10), strict=True)])
    vectors = (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float32)
    order = rng.permutation(len(vectors))
    passes = []

    def blocks():
        passes.append(1)
        for start in range(0, len(vectors), 16):
            yield vectors[order[start:start + 16]]

    assert cluster_sizes(blocks, len(vectors), clusters=3, per_cluster=5) == [60, 30, 10]
    assert len(passes) == 2  # a sample pass and a counting pass, never the whole set at once
    assert sum(cluster_sizes(blocks, len(vectors))) == 100
    assert cluster_sizes(blocks, 4) == [4]


def test_the_card_shows_every_value_a_threshold_had_across_the_runs():
    a, b = _report([10, 9, 8, 7, 6, 5, 4]), _report([10, 9, 8, 7, 6, 5, 4])
    a["thresholds"] = {"refine.lid_threshold": {"value": 0.5, "default": 0.5, "fittable": True, "calibrated": False}}
    b["thresholds"] = {"refine.lid_threshold": {"value": 0.62, "default": 0.5, "fittable": True, "calibrated": True}}
    card = render_card(CardInput(funnel=a, runs=[], reports=[a, b], stats=ReleaseStats(rows=8),
                                 excludes=ExcludeList(), recheck=False, mixed_models=[]), ReleaseConfig())
    assert "| `refine.lid_threshold` | 0.5 / 0.62 | 0.5 | in some runs |" in card

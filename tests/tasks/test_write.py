"""Tests for tasks.write: webdataset shards and parquet metadata load unchanged in the usual tools."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from tasks.io.shards import write_parquet
from tasks.write import METADATA_COLUMNS, REJECT_COLUMNS, metadata, rejects, write_webdataset

SPEC_COLUMNS = ["key", "url", "caption", "alt_text", "page_url", "snapshot", "width", "height", "sha256"]


def _jpeg(seed: int, size=(48, 32)) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _frame(n: int = 3) -> pd.DataFrame:
    images = [_jpeg(i, (48 + i, 32)) for i in range(n)]
    return pd.DataFrame({
        "key": [hashlib.sha256(str(i).encode()).hexdigest()[:20] for i in range(n)],
        "url": [f"http://img.example.cn/{i}.jpg" for i in range(n)],
        "caption": [f"第{i}张 可爱的 小猫 图片" for i in range(n)],
        "alt_text": pd.Series([f"第{i}张&nbsp;可爱的小猫图片" if i else None for i in range(n)], dtype="str"),
        "page_url": [f"http://www.example.cn/p/{i}.html" for i in range(n)],
        "snapshot": ["CC-MAIN-2099-01"] * n,
        "width": pd.Series([48 + i for i in range(n)], dtype="int64"),
        "height": pd.Series([32] * n, dtype="int64"),
        "sha256": [hashlib.sha256(b).hexdigest() for b in images],
        "align_cosine": np.linspace(0.25, 0.4, n),
        "word_count": pd.Series([4] * n, dtype="int64"),
        "image": pd.Series(images, dtype="object"),
        "drop_reason": pd.Series([pd.NA] * n, dtype="str"),  # working columns stay out of the metadata
    }).set_axis([10 + i for i in range(n)])  # a shard's rows keep the index of the frame they came from


def test_webdataset_loads_every_sample_unchanged(tmp_path):
    import webdataset as wds

    frame = _frame(4)
    tar = tmp_path / "shard-00000.tar"
    assert write_webdataset(frame, tar) == 4
    samples = list(wds.WebDataset(str(tar), shardshuffle=False, empty_check=False).decode("pil"))
    assert [s["__key__"] for s in samples] == frame["key"].tolist()
    for sample, (_, row) in zip(samples, frame.iterrows(), strict=True):
        assert {"jpg", "txt", "json"} <= set(sample)
        assert sample["txt"] == row["caption"]
        assert sample["jpg"].size == (row["width"], row["height"])
        meta = sample["json"]
        assert meta["key"] == sample["__key__"]
        assert meta["caption"] == sample["txt"]
        assert meta["url"] == row["url"] and meta["sha256"] == row["sha256"]
        assert meta["alt_text"] == (None if pd.isna(row["alt_text"]) else row["alt_text"])
        assert isinstance(meta["width"], int) and meta["align_cosine"] == pytest.approx(row["align_cosine"])
        assert "image" not in meta and "drop_reason" not in meta
    with tarfile.open(tar) as tf:  # the image is stored byte for byte
        member = tf.extractfile(f"{frame['key'].iloc[1]}.jpg")
        assert member.read() == frame["image"].iloc[1]


def test_shard_is_byte_identical_when_written_again(tmp_path):
    frame = _frame(3)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    write_webdataset(frame, tmp_path / "a" / "s.tar")
    write_webdataset(frame.copy(), tmp_path / "b" / "s.tar")
    assert (tmp_path / "a" / "s.tar").read_bytes() == (tmp_path / "b" / "s.tar").read_bytes()


def _tarfile_reference(frame: pd.DataFrame, path) -> None:
    """The same archive written by Python's tarfile (ustar, fixed metadata): what the direct writer must equal."""
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tf:
        for _, row in metadata(frame).iterrows():
            record = json.loads(json.dumps({k: (None if v is pd.NA or v != v else v.item() if hasattr(v, "item")
                                                else v) for k, v in row.items()}))
            image = frame.set_index("key").loc[row["key"], "image"]
            for name, data in ((f"{row['key']}.jpg", image), (f"{row['key']}.txt", row["caption"].encode()),
                               (f"{row['key']}.json", json.dumps(record, ensure_ascii=False, sort_keys=True).encode())):
                info = tarfile.TarInfo(name)
                info.size, info.mtime, info.mode, info.uname, info.gname = len(data), 0, 0o444, "", ""
                tf.addfile(info, io.BytesIO(data))


def test_images_from_the_column_or_a_blob_file_give_the_archive_tarfile_writes(tmp_path):
    from tasks.io.shards import BlobReader, write_blobs

    for n in (1, 3, 7):
        frame = _frame(n)
        write_blobs(frame["key"].tolist(), frame["image"].tolist(), tmp_path / f"images-{n}.bin")
        with BlobReader(tmp_path / f"images-{n}.bin") as blobs:
            write_webdataset(frame.drop(columns=["image"]), tmp_path / "blobs.tar", image_of=blobs.__getitem__)
        write_webdataset(frame, tmp_path / "column.tar")
        _tarfile_reference(frame, tmp_path / "tarfile.tar")
        reference = (tmp_path / "tarfile.tar").read_bytes()
        assert (tmp_path / "blobs.tar").read_bytes() == reference
        assert (tmp_path / "column.tar").read_bytes() == reference


def test_a_truncated_blob_file_is_an_error_not_a_short_image(tmp_path):
    from tasks.io.shards import BlobReader, write_blobs

    frame = _frame(2)
    write_blobs(frame["key"].tolist(), frame["image"].tolist(), tmp_path / "images.bin")
    with open(tmp_path / "images.bin", "r+b") as fh:
        fh.truncate(len(frame["image"].iloc[0]) + 10)
    with BlobReader(tmp_path / "images.bin") as blobs, pytest.raises(OSError, match="truncated"):
        write_webdataset(frame.drop(columns=["image"]), tmp_path / "s.tar", image_of=blobs.__getitem__)


def test_metadata_parquet_loads_with_datasets(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import datasets

    frame = _frame(3)
    path = tmp_path / "dataset" / "shard-00000.parquet"
    write_parquet(metadata(frame), path)
    ds = datasets.load_dataset("parquet", data_files=str(path), split="train", cache_dir=str(tmp_path / "cache"))
    assert set(SPEC_COLUMNS) <= set(ds.column_names)
    assert ds.column_names == [c for c in METADATA_COLUMNS if c in frame.columns]
    assert ds.num_rows == 3
    assert ds["key"] == frame["key"].tolist()
    assert ds["caption"] == frame["caption"].tolist()
    assert ds["alt_text"] == [None, "第1张&nbsp;可爱的小猫图片", "第2张&nbsp;可爱的小猫图片"]
    assert ds["width"] == [48, 49, 50]


def test_metadata_keeps_only_its_columns_in_order():
    meta = metadata(_frame(2))
    assert list(meta.columns) == [c for c in METADATA_COLUMNS if c in _frame(2).columns]
    assert list(meta.index) == [0, 1]


def test_rejects_have_every_reject_column_even_when_the_input_lacks_some():
    frame = pd.DataFrame({"url": ["http://a.cn/1.jpg", "http://a.cn/2.jpg"],
                          "drop_reason": ["fetch.http_error", "image.geometry"],
                          "alt_text": ["一", None], "extra": [1, 2]}, index=[7, 9])
    out = rejects(frame)
    assert list(out.columns) == REJECT_COLUMNS
    assert {"key", "url", "page_url", "alt_text", "drop_reason"} <= set(out.columns)  # SPEC's minimum
    assert out["url"].tolist() == frame["url"].tolist()
    assert out["drop_reason"].tolist() == frame["drop_reason"].tolist()
    assert out["key"].isna().all() and out["page_url"].isna().all()
    assert list(out.index) == [0, 1]
    assert len(rejects(frame.iloc[0:0])) == 0


def test_write_webdataset_json_handles_missing_values(tmp_path):
    frame = _frame(2)
    frame["align_cosine"] = [np.nan, 0.3]
    tar = tmp_path / "s.tar"
    write_webdataset(frame, tar)
    with tarfile.open(tar) as tf:
        first = json.loads(tf.extractfile(f"{frame['key'].iloc[0]}.json").read())
    assert first["align_cosine"] is None and first["alt_text"] is None

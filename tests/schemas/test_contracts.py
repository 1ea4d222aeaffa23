"""Tests for schemas.contracts: the row key, and validate()'s quarantine-or-raise gate."""

from __future__ import annotations

import hashlib

import numpy as np
import pandas as pd
import pytest

from schemas.contracts import KEY_HEX, CandidateSchema, ContractError, EmbeddingSchema, row_key, validate

STR_COLUMNS = ["key", "url", "alt_text", "page_url", "page_host", "image_host", "snapshot", "warc_file", "warc_date"]


def _candidates(n: int = 200) -> pd.DataFrame:
    urls = [f"http://img.example.cn/{i}.jpg" for i in range(n)]
    pages = [f"http://www.example.cn/p/{i}.html" for i in range(n)]
    alts = ["图片说明"] * (n - 1) + [None]
    frame = pd.DataFrame({
        "key": [row_key(u, a, p) for u, a, p in zip(urls, alts, pages, strict=True)],
        "url": urls, "alt_text": alts, "page_url": pages,
        "page_host": "www.example.cn", "image_host": "img.example.cn", "snapshot": "CC-MAIN-2099-01",
        "warc_file": "/data/a.warc.gz", "warc_offset": np.arange(n, dtype="int64") * 1000,
        "warc_date": "2099-01-01T00:00:00Z",
    })
    return frame.astype({c: "str" for c in STR_COLUMNS})


def test_row_key_is_the_documented_recipe():
    url, alt, page = "http://img.example.cn/a.jpg", "一只猫", "http://www.example.cn/"
    expected = hashlib.sha256(f"{url}\x00{alt}\x00{page}".encode()).hexdigest()[:KEY_HEX]
    assert row_key(url, alt, page) == expected
    assert row_key(url, alt, page) == row_key(url, alt, page)  # no salt, no state
    assert KEY_HEX == 20 and len(expected) == KEY_HEX
    doc = row_key.__doc__ or ""
    assert "sha256" in doc and "20" in doc and "alt" in doc  # the recipe is written down where it lives


def test_row_key_depends_on_each_part_and_treats_missing_alt_as_empty():
    base = ("http://img.example.cn/a.jpg", "一只猫", "http://www.example.cn/")
    keys = {row_key(*base), row_key("http://img.example.cn/b.jpg", *base[1:]),
            row_key(base[0], "两只猫", base[2]), row_key(*base[:2], "http://www.example.cn/2")}
    assert len(keys) == 4
    assert row_key(base[0], None, base[2]) == row_key(base[0], "", base[2])
    assert len(row_key(base[0], "bad \ud800 surrogate", base[2])) == KEY_HEX  # never raises on odd text


def test_good_frame_passes_whole():
    frame = _candidates()
    valid, quarantined = validate(CandidateSchema, frame, "extract")
    assert len(valid) == 200 and len(quarantined) == 0
    pd.testing.assert_frame_equal(valid, frame)


def test_one_bad_row_in_200_is_quarantined_with_the_stage_reason():
    frame = _candidates()
    frame.loc[57, "url"] = "not a url"
    valid, quarantined = validate(CandidateSchema, frame, "extract")
    assert quarantined.index.tolist() == [57]
    assert quarantined["drop_reason"].tolist() == ["extract.schema_violation"]
    assert quarantined["url"].tolist() == ["not a url"]
    assert len(valid) == 199 and 57 not in valid.index


def test_the_failure_fraction_is_a_limit_not_a_target():
    frame = _candidates()
    frame.loc[[3, 4], "url"] = "ftp://files.example.cn/a.jpg"  # 2 of 200 = 1%: still quarantined
    _, quarantined = validate(CandidateSchema, frame, "source")
    assert quarantined.index.tolist() == [3, 4]
    assert set(quarantined["drop_reason"]) == {"source.schema_violation"}
    frame.loc[5, "warc_offset"] = -1  # 3 of 200 = 1.5%: over the default 1%
    with pytest.raises(ContractError) as err:
        validate(CandidateSchema, frame, "source")
    msg = str(err.value)
    assert "'source'" in msg and "'url'" in msg and "'warc_offset'" in msg and "str_matches" in msg
    assert "3 of 200" in msg
    _, quarantined = validate(CandidateSchema, frame, "source", max_failure_fraction=0.02)
    assert quarantined.index.tolist() == [3, 4, 5]
    with pytest.raises(ContractError):
        validate(CandidateSchema, _candidates().assign(url=lambda f: f["url"].where(f.index != 0, "x")),
                 "source", max_failure_fraction=0.0)


def test_a_missing_column_raises_naming_stage_column_and_check():
    frame = _candidates(10).drop(columns=["page_host"])
    with pytest.raises(ContractError) as err:
        validate(CandidateSchema, frame, "extract")
    msg = str(err.value)
    assert "stage 'extract'" in msg
    assert "column 'page_host'" in msg
    assert "column_in_dataframe" in msg


def test_a_wrong_dtype_raises_even_for_one_row():
    frame = _candidates(10).astype({"warc_offset": "float64"})
    with pytest.raises(ContractError) as err:
        validate(CandidateSchema, frame, "extract", max_failure_fraction=1.0)
    msg = str(err.value)
    assert "stage 'extract'" in msg and "column 'warc_offset'" in msg and "dtype('int64')" in msg


def test_nulls_where_not_allowed_are_row_failures():
    frame = _candidates()
    frame.loc[9, "url"] = None
    valid, quarantined = validate(CandidateSchema, frame, "extract")
    assert quarantined.index.tolist() == [9] and len(valid) == 199


def test_embedding_schema_wants_unit_vectors_and_unique_keys():
    vec = np.zeros(4, dtype=np.float32)
    vec[0] = 1.0
    good = pd.DataFrame({"key": [f"{i:020x}" for i in range(3)], "vector": [vec, vec, vec],
                         "sha256": ["0" * 64] * 3}).astype({"key": "str", "sha256": "str"})
    assert len(validate(EmbeddingSchema, good, "image")[0]) == 3
    bad = good.copy()
    bad.at[1, "vector"] = vec * 2
    with pytest.raises(ContractError, match="finite_unit_vector"):
        validate(EmbeddingSchema, bad, "image")  # 1 of 3 is over the limit
    dup = good.assign(key=[good["key"][0]] * 3)
    with pytest.raises(ContractError, match="unique"):
        validate(EmbeddingSchema, dup, "image", max_failure_fraction=1.0)

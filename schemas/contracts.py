"""Pandera models for every stage boundary, the row key, and the quarantine-or-raise gate."""

from __future__ import annotations

import hashlib

import numpy as np
import pandas as pd
import pandera.pandas as pa
from pandera.typing import Series

from schemas.reasons import SCHEMA_VIOLATION

KEY_HEX = 20  # 80 bits: collision odds ~1e-5 at 1e9 rows


def row_key(url: str, alt_text: str | None, page_url: str) -> str:
    """Stable row key: first 20 hex digits of sha256(image URL, NUL, raw alt text, NUL, page URL).

    Raw alt text (not the refined caption) so the key never changes when text rules change.
    """
    h = hashlib.sha256(f"{url}\x00{alt_text or ''}\x00{page_url}".encode("utf-8", "surrogatepass"))
    return h.hexdigest()[:KEY_HEX]


class _Strict(pa.DataFrameModel):
    class Config:
        strict = False  # later stages may carry extra score columns
        coerce = False  # a wrong dtype is a broken contract, never silently converted


class CandidateSchema(_Strict):
    """extract and source output: one <img> candidate with its provenance."""

    key: Series[str] = pa.Field(str_matches=rf"^[0-9a-f]{{{KEY_HEX}}}$")
    url: Series[str] = pa.Field(str_matches=r"^https?://[^\s/]+")
    alt_text: Series[str] = pa.Field(nullable=True)  # the raw alt attribute (DanQing's column name)
    page_url: Series[str]
    page_host: Series[str]
    image_host: Series[str]
    snapshot: Series[str]
    warc_file: Series[str]
    warc_offset: Series[np.int64] = pa.Field(ge=0)
    warc_date: Series[str] = pa.Field(nullable=True)


class SourcedSchema(CandidateSchema):
    """source output: the candidate plus its normalised alt text and word count."""

    alt_norm: Series[str]
    word_count: Series[np.int64] = pa.Field(ge=0)


class FetchedMetaSchema(SourcedSchema):
    """fetch output as later stages read it: the image's measurements (its bytes live in a side file)."""

    width: Series[np.int64] = pa.Field(gt=0)
    height: Series[np.int64] = pa.Field(gt=0)
    original_width: Series[np.int64] = pa.Field(gt=0)
    original_height: Series[np.int64] = pa.Field(gt=0)
    sha256: Series[str] = pa.Field(str_matches=r"^[0-9a-f]{64}$")  # of the bytes as fetched
    mime: Series[str]
    # what the image stage's quality rules judge, measured at one resolution (tasks.fetch.image_metrics)
    gray_std: Series[np.float64] = pa.Field(ge=0)
    laplacian_var: Series[np.float64] = pa.Field(ge=0)
    gray_entropy: Series[np.float64] = pa.Field(ge=0, le=8)


class FetchedSchema(FetchedMetaSchema):
    """fetch output as the stage produces it: with the decoded image bytes (JPEG)."""

    image: Series[object]  # JPEG bytes, moved to <shard>.images.parquet once validated

    @pa.check("image", name="non_empty_bytes")
    def _bytes(cls, s: pd.Series) -> pd.Series:
        return s.map(lambda b: isinstance(b, bytes | bytearray) and len(b) > 0)


class RefinedSchema(FetchedMetaSchema):
    """refine output: the refined caption (what `<key>.txt` holds) and every text rule's score."""

    caption: Series[str] = pa.Field(str_length={"min_value": 1})
    lid_score: Series[np.float64] = pa.Field(ge=0.0, le=1.0)  # fastText's Chinese probability
    stop_only: Series[bool]
    has_noun: Series[bool]
    unk_tokens: Series[np.int64] = pa.Field(ge=0)
    word_entropy: Series[np.float64] = pa.Field(ge=0.0)
    safety_keyword: Series[str] = pa.Field(nullable=True)  # "<list>:<keyword>" of the first hit
    text_nsfw_score: Series[np.float64] = pa.Field(nullable=True, ge=0.0, le=1.0)  # NaN: no classifier asked


class FilteredImageSchema(RefinedSchema):
    """image output: pairs whose image passed the quality rules."""


class ScoredSchema(FilteredImageSchema):
    """embed output: image-text cosine similarity under the align model."""

    align_cosine: Series[np.float64] = pa.Field(ge=-1.0001, le=1.0001)
    caption_truncated: Series[bool]  # the caption was longer than the align model's text context
    # the nsfw_image model's probability on the unsafe labels (image.nsfw_threshold judges it); NaN: no model
    nsfw_score: Series[np.float64] = pa.Field(nullable=True, ge=0.0, le=1.0)
    nsfw_unsafe: Series[bool]  # the model's top label is an unsafe one (the `nsfw_rule: top_class` setting)


class DiversifiedSchema(ScoredSchema):
    """image output after redundancy and safety: each row with its duplicate group (itself when alone)."""

    group_key: Series[str] = pa.Field(str_matches=rf"^[0-9a-f]{{{KEY_HEX}}}$")
    group_size: Series[np.int64] = pa.Field(ge=1)


class SelectedSchema(DiversifiedSchema):
    """align and crossbatch output: what goes into the dataset."""


class EmbeddingSchema(pa.DataFrameModel):
    """per-shard image embeddings under the embed model, loaded into LanceDB."""

    key: Series[str] = pa.Field(str_matches=rf"^[0-9a-f]{{{KEY_HEX}}}$", unique=True)
    vector: Series[object]
    sha256: Series[str]

    @pa.check("vector", name="finite_unit_vector")
    def _unit(cls, s: pd.Series) -> pd.Series:
        def ok(v) -> bool:
            a = np.asarray(v, dtype=np.float64)
            return a.ndim == 1 and a.size > 0 and bool(np.isfinite(a).all()) and abs(np.linalg.norm(a) - 1) < 1e-3

        try:  # one matrix when all vectors have one length: a shard is checked at numpy speed, not per row
            mat = np.stack(s.to_numpy())
        except (ValueError, TypeError):
            return s.map(ok)
        if mat.ndim != 2 or mat.shape[1] == 0 or not np.issubdtype(mat.dtype, np.number):
            return s.map(ok)
        squared = np.einsum("ij,ij->i", mat, mat, dtype=np.float64)  # NaN or inf anywhere: not finite here
        with np.errstate(invalid="ignore"):
            unit = np.abs(np.sqrt(squared) - 1) < 1e-3
        return pd.Series(np.isfinite(squared) & unit, index=s.index)

    class Config:
        strict = False
        coerce = False


class RecaptionSchema(pa.DataFrameModel):
    """per dataset shard, after the commit: one generated caption per committed row (`danqing release` reads it)."""

    key: Series[str] = pa.Field(str_matches=rf"^[0-9a-f]{{{KEY_HEX}}}$", unique=True)
    recaption: Series[str]  # "" when generation failed
    recaption_error: Series[str] = pa.Field(nullable=True)  # null when fine

    @pa.dataframe_check(name="failed_rows_have_no_caption")
    def _failed_empty(cls, df: pd.DataFrame) -> pd.Series:
        return df["recaption_error"].isna() | (df["recaption"] == "")

    class Config:
        strict = True  # exactly the three pinned columns
        coerce = False


class ContractError(RuntimeError):
    """A broken contract between stages: raised at once, naming stage, column, check and rows."""


# Checks that describe the frame's structure rather than a row: these always raise (pandera's check names).
# A duplicated key is one of them: quarantining it would drop every copy, the first one included.
_STRUCTURAL = ("column_in_dataframe", "column_in_schema", "dtype(", "field_uniqueness", "multiple_fields_uniqueness")


def _is_structural(check: str) -> bool:
    return any(check.startswith(s) for s in _STRUCTURAL)


def _describe(stage: str, fc: pd.DataFrame, what: str) -> str:
    lines = [f"stage {stage!r}: {what}"]
    # pandera files a missing column under the schema's name, with the column as the failure case
    missing = fc["check"].astype(str) == "column_in_dataframe"
    fc = fc.assign(column=fc["column"].where(~missing, fc["failure_case"]))
    for (col, check), grp in fc.groupby(["column", "check"], dropna=False, sort=False):
        rows = [str(i) for i in grp["index"].head(5).tolist() if i is not None and i == i]
        cases = [repr(c)[:60] for c in grp["failure_case"].head(3).tolist()]
        lines.append(
            f"  column {col!r} failed check {check!r}: first rows {rows or '-'}, values {cases}"
        )
    return "\n".join(lines)


def validate(
    schema: type[pa.DataFrameModel], frame: pd.DataFrame, stage: str, max_failure_fraction: float = 0.01
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Validate one shard: returns (valid rows, quarantined rows with drop_reason set).

    A structural failure (missing column, wrong dtype) raises ContractError at once; row-level
    failures are quarantined as `<stage>.schema_violation` unless they exceed `max_failure_fraction`.
    """
    try:
        schema.validate(frame, lazy=True)
        return frame, frame.iloc[0:0]
    except pa.errors.SchemaErrors as err:
        fc = err.failure_cases
    structural = fc[fc["check"].astype(str).map(_is_structural) | fc["index"].isna()]
    if len(structural):
        raise ContractError(_describe(stage, structural, f"structural contract failure ({schema.__name__})"))
    bad_index = pd.Index(fc["index"].unique())
    fraction = len(bad_index) / max(len(frame), 1)
    if fraction > max_failure_fraction:
        raise ContractError(
            _describe(
                stage, fc,
                f"{len(bad_index)} of {len(frame)} rows ({fraction:.1%}) violate {schema.__name__}, "
                f"over the {max_failure_fraction:.1%} quarantine limit",
            )
        )
    bad = frame.index.isin(bad_index)
    quarantined = frame[bad].copy()
    quarantined["drop_reason"] = f"{stage}.{SCHEMA_VIOLATION}"
    return frame[~bad], quarantined

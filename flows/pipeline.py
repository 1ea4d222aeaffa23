"""The pipeline's shape: the shard steps in order, the stage and contract of each, the rules each stage runs,
and the names of the files steps hand each other."""

from __future__ import annotations

from flows.engine import Marker, RunContext, run_shard_step
from schemas import contracts as C
from tasks import align as align_stage
from tasks import crossbatch as crossbatch_stage
from tasks import extract as extract_stage
from tasks import fetch as fetch_stage
from tasks import image as image_stage
from tasks import refine as refine_stage
from tasks import source as source_stage
from tasks.io import shards

# The reported stage each shard step counts toward, and the schema its kept rows must satisfy.
STEPS: dict[str, tuple[str, type]] = {
    "extract": ("extract", C.CandidateSchema),
    "source": ("source", C.SourcedSchema),
    "fetch": ("fetch", C.FetchedSchema),
    "refine": ("refine", C.RefinedSchema),
    "image": ("image", C.FilteredImageSchema),
    "embed": ("image", C.ScoredSchema),
    "diversify": ("image", C.DiversifiedSchema),
    "align": ("align", C.SelectedSchema),
    "crossbatch": ("crossbatch", C.SelectedSchema),
}

# Rules each stage has built so far; the report lists the others as not_run.
BUILT_RULES: dict[str, tuple[str, ...]] = {
    "extract": extract_stage.RULES,
    "source": source_stage.RULES,
    "fetch": fetch_stage.RULES,
    "refine": refine_stage.RULES,
    "image": image_stage.RULES,
    "align": align_stage.RULES,
    "crossbatch": crossbatch_stage.RULES,
}

LEDGER = ".ledger.parquet"  # the fetch step's per-URL outcomes: status, reason, attempts, last error, transient
IMAGES = ".images.bin"  # the fetch step's blob file: key -> JPEG bytes of the kept rows
VECTORS = ".vectors.parquet"  # the embed step's key -> image vector file of its kept rows
GROUPS = ".groups"  # the dedup reduce's output: a folder of one <shard>.parquet per shard
MATCHES = ".matches"  # the crossbatch search's: likewise


def built_rules(ctx: RunContext) -> dict[str, tuple[str, ...]]:
    """The rules this run ran: image safety only with an `nsfw_image` model (open_nsfw by default; not run when
    the default cannot be opened or the role is set to the placeholder)."""
    if "nsfw_image" in ctx.models:
        return BUILT_RULES
    return {**BUILT_RULES, "image": tuple(r for r in BUILT_RULES["image"] if r != "nsfw")}


def images_of(ctx: RunContext, shard: str) -> shards.BlobReader:
    """The image bytes the fetch step stored for a shard, looked up by key."""
    return shards.BlobReader(ctx.step_path("fetch", shard, IMAGES))


def shard_step(ctx: RunContext, step: str, shard: str, inputs: list, compute, config: dict | None = None,
               **kwargs) -> Marker:
    """`run_shard_step` for one of STEPS, under its stage and contract."""
    stage, schema = STEPS[step]
    return run_shard_step(ctx, step, stage, schema, shard, inputs, compute, config, **kwargs)

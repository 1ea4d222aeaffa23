"""The optional recaption step: one task per committed dataset shard, after the commit and outside the commit lock
(cross-batch dedup has already dropped what it drops), on the GPU-tagged pool; and its entry in the report."""

from __future__ import annotations

from collections import Counter

from prefect import task
from prefect.cache_policies import NO_CACHE

from flows import pipeline
from flows.engine import Marker, RunContext, resume
from flows.report import RECAPTION_OFF
from flows.runtime import worker_name
from flows.settings import build_config
from schemas import contracts as C
from tasks import recaption as recaption_stage
from tasks.io import shards

FOLDER = "recaption"  # <unit>/recaption/<shard>.parquet: key, recaption, recaption_error (danqing release reads it)


def output_path(ctx: RunContext, shard: str):
    return ctx.root / FOLDER / f"{shard}.parquet"


@task(name="recaption", task_run_name="recaption-{shard}", cache_policy=NO_CACHE, tags=["gpu"])
def recaption(ctx: RunContext, shard: str, written: Marker) -> Marker:
    """A generated caption for every row of the dataset shard `written`, from the images the fetch step stored.
    Reused while the shard, the model (its revision included), the prompt and max_new_tokens are unchanged; the
    batch size is left out of the hash (it changes how fast, not what is asked)."""
    cfg = ctx.cfg("recaption")
    model = ctx.models["recaption"]
    out = output_path(ctx, shard)

    def produce(_prior) -> dict:
        from tasks.models import load_captioner
        from tasks.models.caption import free_device_memory

        keys = shards.read_parquet(written.output(".parquet"), columns=["key"])["key"].tolist()
        captioner = load_captioner(model) if keys else None

        def generate(images):
            return captioner.generate(images, cfg.prompt, cfg.max_new_tokens)

        with pipeline.images_of(ctx, shard) as images:
            frame, stats = recaption_stage.recaption_rows(
                keys, images.__getitem__, generate, cfg,
                on_oom=lambda: free_device_memory(captioner.device))
        frame, _ = C.validate(C.RecaptionSchema, frame, "recaption", 0.0)  # any bad row raises: nothing is dropped
        shards.write_parquet(frame, out)
        return {"step": "recaption", "shard": shard, "samples": len(frame), "outputs": (ctx.rel(out),),
                "extra": {**stats, "worker": worker_name()}}

    identity = {"step": "recaption", "inputs": [written.hash], "model": ctx.model_key("recaption"),
                "config": {"prompt": cfg.prompt, "max_new_tokens": cfg.max_new_tokens}}
    return resume(ctx, ctx.marker_path("recaption", shard), identity, produce)


def wanted(models: dict, params) -> dict | None:
    """What a batch's report must show for its recaption to be current (None when the run asks for none)."""
    model = models.get("recaption")
    return None if model is None else _asked(model, build_config("recaption", params.config.get("recaption")))


def _asked(model, cfg) -> dict:
    return {"model": model.name, "revision": model.revision, "prompt": cfg.prompt, "max_new_tokens": cfg.max_new_tokens}


def summary(ctx: RunContext, markers: list[Marker]) -> dict:
    """The report's `recaption` entry: whether the step ran, with which model, and what it counted."""
    model = ctx.models.get("recaption")
    if model is None:
        return dict(RECAPTION_OFF)
    kinds = dict(sum((Counter(m.extra.get("error_kinds") or {}) for m in markers), Counter()))
    return {"ran": True, **_asked(model, ctx.cfg("recaption")), "rows": sum(m.extra.get("rows", 0) for m in markers),
            "errors": sum(kinds.values()), "error_kinds": kinds, "shards": len(markers),
            "oom_retries": sum(m.extra.get("oom_retries", 0) for m in markers), "folder": FOLDER}

"""The run's models as the steps use them: loaded on the worker that runs a step (once per process), and named
in the steps' resume hashes."""

from __future__ import annotations

from flows.engine import Marker, RunContext, model_ref
from tasks import refine as refine_stage
from tasks.io import shards


def ref(ctx: RunContext, role: str):
    """How a role's model enters a step's config hash (None when the run has none)."""
    return model_ref(ctx.models[role]) if role in ctx.models else None


def text_classifier(ctx: RunContext):
    """The nsfw_text model when the run names one, else None."""
    if "nsfw_text" not in ctx.models:
        return None
    from tasks.models import load_text_classifier

    return load_text_classifier(ctx.models["nsfw_text"])


def image_classifier(ctx: RunContext):
    """The run's nsfw_image model (open_nsfw by default), loaded once per worker process; None when the run has
    none (the default could not be opened, or the role is set to the placeholder)."""
    if "nsfw_image" not in ctx.models:
        return None
    from tasks.models import load_image_classifier

    return load_image_classifier(ctx.models["nsfw_image"])


def embedders(ctx: RunContext):
    """(embed model, align model): one object when both roles name the same model, so images embed once."""
    from tasks.models import load_model

    embed = load_model(ctx.models["embed"])
    if model_ref(ctx.models["align"]) == model_ref(ctx.models["embed"]):
        return embed, embed
    return embed, load_model(ctx.models["align"])


def refine_resources(ctx: RunContext, cfg, corpus: Marker | None = None) -> refine_stage.RefineResources:
    """The lists, corpus and [UNK] counter of the run's refine config; models load only when a shard computes."""
    table = None
    if corpus is not None:
        table = refine_stage.corpus_from_table(shards.read_parquet(corpus.output(".parquet")), corpus.hash)
    count_unknown = None
    tokenizer = ctx.models.get("tokenizer")
    if tokenizer is not None and not tokenizer.placeholder:
        from tasks.models import count_unknown_tokens

        count_unknown = lambda texts: count_unknown_tokens(tokenizer, texts)  # noqa: E731
    return refine_stage.load_resources(cfg, count_unknown, corpus=table)

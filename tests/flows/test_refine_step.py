"""The refine task over shard paths, called directly (no Prefect server): the run-corpus reduce and the scores."""

from __future__ import annotations

import pandas as pd

from flows import steps
from flows.engine import RunContext
from tasks.models import ResolvedModel


def _fetched(ctx, sample_crawl):
    extracted = steps.extract.fn(ctx, "00002", str(sample_crawl.warcs[2]))
    replay = steps.replay_index.fn(ctx, [steps.extract.fn(ctx, f"{i:05d}", str(w))
                                         for i, w in enumerate(sample_crawl.warcs)])
    sourced = steps.source.fn(ctx, "00002", extracted)
    return steps.fetch.fn(ctx, "00002", sourced, replay)


def test_refine_with_a_corpus_counted_over_the_run(sample_crawl, tmp_path):
    ctx = RunContext(run_dir=str(tmp_path / "run"), run_id="corpus", lancedb=str(tmp_path / "lancedb"),
                     config={"refine": {"entropy_corpus": "run"}}, fetcher="replay",
                     models={"tokenizer": ResolvedModel("tokenizer", "placeholder", True, "placeholder", None)})
    fetched = _fetched(ctx, sample_crawl)
    corpus = steps.word_counts.fn(ctx, [fetched])
    table = pd.read_parquet(corpus.output(".parquet"))
    assert corpus.extra["words"] == len(table) > 0 and (table["count"] > 0).all()
    assert steps.word_counts.fn(ctx, [fetched]) == corpus  # a re-run reuses the reduce
    marker = steps.refine.fn(ctx, "00002", fetched, corpus)
    kept = pd.read_parquet(ctx.step_path("refine", "00002"))
    rejects = pd.read_parquet(ctx.root / "rejects" / "refine-00002.parquet")
    for frame in (kept, rejects):
        assert {"lid_score", "word_entropy", "unk_tokens", "stop_only", "has_noun"} <= set(frame.columns)
    assert rejects["drop_reason"].str.startswith("refine.").all() and len(kept) == marker.kept
    jieba = steps.refine.fn(ctx.__class__(**{**ctx.__dict__, "config": {}}), "00002", fetched)
    assert marker.hash != jieba.hash  # the corpus is part of the step's identity
    # Under the run's own counts the list of rare words is no rarer than anything else in it.
    assert marker.dropped.get("refine.low_entropy", 0) < jieba.dropped["refine.low_entropy"]

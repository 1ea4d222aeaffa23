"""The resume engine on its own: markers round-trip, finished work is reused, a reuse policy asks for more."""

from __future__ import annotations

import json

import pandas as pd
import pandera.pandas as pa

from flows.engine import Computed, Marker, RunContext, resume, run_reduce, run_shard_step


class _Any(pa.DataFrameModel):
    key: str


def _ctx(tmp_path) -> RunContext:
    return RunContext(run_dir=str(tmp_path / "run"), run_id="r", lancedb=str(tmp_path / "db"))


def test_a_shard_step_is_computed_once_and_its_marker_reads_back_equal(tmp_path):
    ctx = _ctx(tmp_path)
    calls = []

    def compute():
        calls.append(1)
        return Computed(pd.DataFrame({"key": ["a", "b"], "drop_reason": [pd.NA, "source.word_count"]}), {"n": 2})

    first = run_shard_step(ctx, "source", "source", _Any, "00000", ["in"], compute)
    again = run_shard_step(ctx, "source", "source", _Any, "00000", ["in"], compute)
    assert calls == [1] and again == first
    assert (first.rows_in, first.kept, first.dropped, first.extra) == (2, 1, {"source.word_count": 1}, {"n": 2})
    body = json.loads(ctx.marker_path("source", "00000").read_text())
    assert body["in"] == 2 and body["outputs"] == ["steps/source/00000.parquet", "rejects/source-00000.parquet"]
    assert Marker.from_json(ctx.root, body) == first
    assert first.output(".parquet") == ctx.step_path("source", "00000")
    run_shard_step(ctx, "source", "source", _Any, "00000", ["other input"], compute)
    assert calls == [1, 1]  # new inputs: computed again


def test_a_missing_output_makes_a_reduce_run_again(tmp_path):
    ctx = _ctx(tmp_path)

    def build(out):
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text("x")
        return {"rows": 1}

    first = run_reduce(ctx, "r", ".txt", [1], build)
    assert first.reduce == "r" and first.extra == {"rows": 1} and first.shard is None
    first.output(".txt").unlink()
    assert run_reduce(ctx, "r", ".txt", [1], build).output(".txt").exists()


def test_a_policy_that_objects_recomputes_under_a_new_hash_and_keeps_the_base(tmp_path):
    ctx = _ctx(tmp_path)
    seen = []

    def produce(prior):
        seen.append(prior)
        return {"step": "write", "shard": "00000", "samples": len(seen)}

    first = resume(ctx, ctx.marker_path("write", "00000"), {"inputs": [1]}, produce)
    retried = resume(ctx, ctx.marker_path("write", "00000"), {"inputs": [1]}, produce,
                     policy=lambda m: ("again", m.hash))
    assert seen == [None, ("again", first.hash)]
    assert retried.hash != first.hash and retried.base == first.hash and retried.inputs_hash == first.hash
    # reused as it is once the policy has no objection, though its hash names the retry
    assert resume(ctx, ctx.marker_path("write", "00000"), {"inputs": [1]}, produce) == retried and len(seen) == 2

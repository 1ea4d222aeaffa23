"""build_report's arithmetic on hand-made markers: stages summed over shards and steps, chained, checked."""

from __future__ import annotations

import pytest

from flows.engine import Marker, RunContext
from flows.pipeline import BUILT_RULES, STEPS
from flows.report import build_report
from tasks.models import ResolvedModel

# (step, shard) -> (in, kept, dropped); two shards through every shard step, counted by hand.
COUNTS = {
    ("extract", "a"): (10, 8, {"extract.no_src": 2}), ("extract", "b"): (5, 5, {}),
    ("source", "a"): (8, 6, {"source.word_count": 2}), ("source", "b"): (5, 5, {}),
    ("fetch", "a"): (6, 6, {}), ("fetch", "b"): (5, 4, {"fetch.http_error": 1}),
    ("refine", "a"): (6, 6, {}), ("refine", "b"): (4, 4, {}),
    ("image", "a"): (6, 5, {"image.blur": 1}), ("image", "b"): (4, 4, {}),
    ("embed", "a"): (5, 5, {}), ("embed", "b"): (4, 4, {}),
    ("diversify", "a"): (5, 4, {"image.duplicate": 1}), ("diversify", "b"): (4, 4, {}),
    ("align", "a"): (4, 4, {}), ("align", "b"): (4, 3, {"align.out_of_band": 1}),
    ("crossbatch", "a"): (4, 4, {}), ("crossbatch", "b"): (3, 3, {}),
}


def _ctx(tmp_path) -> RunContext:
    placeholder = {role: ResolvedModel(role, "placeholder", True, "placeholder", None) for role in ("embed", "align")}
    return RunContext(run_dir=str(tmp_path), run_id="r", lancedb=str(tmp_path / "db"), models=placeholder)


def _results(counts: dict) -> dict[str, list[Marker]]:
    extra = {"fetch": {"requests": 7, "transient_failures": 1},
             "extract": {"pages_total": 4, "pages_selected": 3, "pages_not_chinese": 1}}
    return {step: [Marker(hash=f"{step}-{shard}", root="/", step=step, shard=shard, stage=STEPS[step][0],
                          rows_in=n_in, kept=kept, dropped=dropped, extra=extra.get(step, {}))
                   for (s, shard), (n_in, kept, dropped) in counts.items() if s == step]
            for step in STEPS}


def test_stages_sum_over_shards_and_steps_and_chain(tmp_path):
    built = {**BUILT_RULES, "image": tuple(r for r in BUILT_RULES["image"] if r != "nsfw")}
    report = build_report(_ctx(tmp_path), _results(COUNTS), {}, built)
    stages = {s["stage"]: s for s in report["stages"]}
    assert [(s["stage"], s["in"], s["kept"]) for s in report["stages"]] == [
        ("extract", 15, 13), ("source", 13, 11), ("fetch", 11, 10), ("refine", 10, 10), ("image", 10, 8),
        ("align", 8, 7), ("crossbatch", 7, 7)]
    assert stages["image"]["dropped"] == {"image.geometry": 0, "image.low_texture": 0, "image.blur": 1,
                                          "image.low_entropy": 0, "image.embed_error": 0, "image.duplicate": 1}
    assert stages["image"]["not_run"] == ["image.nsfw"] and stages["refine"]["not_run"] == []
    assert stages["fetch"]["requests"] == 14 and stages["fetch"]["transient_failures"] == 2  # 7 and 1 a shard
    assert stages["extract"]["pages_total"] == 8 and stages["extract"]["selection"] == "scan"
    assert stages["extract"]["pages_not_chinese"] == 2 and stages["extract"]["pages_unlabelled"] == 0
    assert report["samples"] == 7 and report["shards"] == 2
    assert stages["image"]["placeholder_model"] is True and "placeholder_model" not in stages["refine"]


def test_counts_that_do_not_add_up_or_chain_are_an_error(tmp_path):
    lost = {**COUNTS, ("refine", "b"): (4, 3, {})}  # a row neither kept nor dropped
    with pytest.raises(RuntimeError, match="refine counts do not add up"):
        build_report(_ctx(tmp_path), _results(lost), {}, BUILT_RULES)
    gap = {**COUNTS, ("crossbatch", "b"): (2, 2, {})}  # align kept 7, crossbatch took in 6
    with pytest.raises(RuntimeError, match="crossbatch in=6 but the previous stage kept 7"):
        build_report(_ctx(tmp_path), _results(gap), {}, BUILT_RULES)

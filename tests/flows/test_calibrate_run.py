"""`danqing calibrate` on stored refine rows of the 4,712 COCO-CN captions: each continuous rule hits its rate."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
from _fixtures import fixture_path

from flows.cli import main
from flows.settings import load_thresholds
from tasks import write as write_stage
from tasks.paper import paper_removal
from tasks.refine import CHAIN, RefineConfig, refine_text, rule_failures


def _stored_run(tmp_path):
    """A run directory as the flow leaves it after refine: kept rows in steps/, dropped rows in rejects/."""
    path = fixture_path("images/coco_cn/coco-cn_ext.icap2020.txt")
    captions = [line.rstrip("\n").split("\t", 1)[-1] for line in path.open(encoding="utf-8")]
    frame = pd.DataFrame({"key": [f"{i:020x}" for i in range(len(captions))], "alt_norm": captions,
                          "alt_text": captions, "url": "https://img.test/a.jpg", "page_url": "https://p.test/"})
    out = refine_text(frame)
    # A classifier's probabilities stand in for the optional nsfw_text model (none is built here).
    out["text_nsfw_score"] = np.random.default_rng(0).beta(0.5, 8, len(out))
    run = tmp_path / "run"
    (run / "steps" / "refine").mkdir(parents=True)
    (run / "rejects").mkdir()
    out[out["drop_reason"].isna()].drop(columns=["drop_reason"]).to_parquet(run / "steps/refine/00000.parquet")
    write_stage.rejects(out[out["drop_reason"].notna()]).to_parquet(run / "rejects/refine-00000.parquet")
    (run / "run.json").write_text(json.dumps({"params": {"config": {"refine": {"max_unk_tokens": 5}}}}))
    return run, out


def test_calibrate_hits_each_rate_within_one_point(tmp_path, capsys):
    run, rows = _stored_run(tmp_path)
    assert len(rows) >= 4000
    assert main(["calibrate", str(run), "--out", str(tmp_path / "t.json")]) == 0
    printed = capsys.readouterr().out
    assert "refine.lid" in printed and "paper %" in printed
    settings = load_thresholds(str(tmp_path / "t.json"))  # loads as `danqing run --thresholds` reads it
    assert settings["refine"]["max_unk_tokens"] == 5  # the run's own settings are kept
    config = RefineConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in settings["refine"].items()})
    assert config.lid_threshold != RefineConfig().lid_threshold
    alive = pd.Series(True, index=rows.index)
    scored = {r.reason for r in CHAIN.scored}
    for reason, failed in rule_failures(rows, config).items():
        share = (failed & alive).sum() / alive.sum()
        if reason in scored:
            assert abs(share - paper_removal(reason)) <= 0.01, (reason, share)
        alive &= ~failed

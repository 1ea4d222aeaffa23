"""Smoke test of bench/refine.py on a few captions: it runs offline and prints its figures as JSON."""

from __future__ import annotations

import json

from _fixtures import load_bench


def test_bench_prints_its_figures(capsys, monkeypatch, tmp_path):
    bench = load_bench("refine")
    monkeypatch.setattr(bench, "N_GENERATED", 60)
    captions, source = bench.load_captions(tmp_path / "absent.txt")
    assert source == "generated" and len(captions) == 60 and all(captions)
    figures = bench.main(["--repeat", "1", "--limit", "100"])
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == figures
    assert figures["captions"] > 0 and figures["ratio_vs_posseg"] > 0
    assert {"captions_per_s", "posseg_captions_per_s", "ratio_vs_posseg"} <= set(figures)

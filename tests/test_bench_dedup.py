"""Smoke test of bench/dedup.py on a few thousand rows: the generated cone, the planted groups, the JSON line."""

from __future__ import annotations

import json

import numpy as np
import pytest
from _fixtures import load_bench


@pytest.fixture(scope="module")
def bench():
    module = load_bench("dedup")
    return module


def test_the_generator_plants_groups_in_a_narrow_cone(bench):
    v, groups = bench.cone(4000, seed=2)
    assert v.shape == (4000, bench.DIM) and v.dtype == np.float32
    assert np.allclose(np.linalg.norm(v, axis=1), 1, atol=1e-5)
    rows = np.concatenate(groups)
    free = np.setdiff1d(np.arange(4000), rows)
    cos = (v[free[:1000]] @ v[free[1000:2000]].T).ravel()
    assert 0.45 < cos.mean() < 0.55 and cos.max() < 0.7  # CLIP-like: a cone, nothing near the cut at random
    assert len(np.unique(rows)) == len(rows) and 0.13 * 4000 < len(rows) <= 0.15 * 4000
    assert {len(g) for g in groups} <= {2, 3, 4, 5}
    i, j, d = bench.planted_pairs(v, groups)
    base = np.concatenate([np.full(len(g) - 1, g[0]) for g in groups])
    to_base = 1 - np.einsum("ij,ij->i", v[base].astype(np.float64), v[np.concatenate([g[1:] for g in groups])])
    assert to_base.min() > 0.0199 and to_base.max() < 0.1801  # both sides of the 0.1 cut
    assert (d < 0.1).sum() > 100 and (d >= 0.1).sum() > 100 and (i < j).all()


def test_main_prints_its_figures_and_the_json_line_last(bench, capsys):
    figures = bench.main(["--rows", "3000", "--recall-rows", "600"])
    out = capsys.readouterr().out.strip().splitlines()
    assert json.loads(out[-1]) == figures
    assert any("OMP/OPENBLAS/MKL_NUM_THREADS=2" in line for line in out)
    assert figures["rows"] == 3000 and figures["threads"] == 2 and "dedup_seconds_1m" not in figures
    assert figures["dedup_seconds"] > 0 and 0.95 <= figures["dedup_recall"] <= 1.0
    assert figures["planted_within_linked"] == figures["planted_within"] > 0  # small n: the exact search
    assert figures["planted_beyond_linked"] == 0
    assert 0 < figures["groups"] <= figures["pairs"] and figures["duplicates_dropped"] > 0
    assert 0.45 < figures["random_pair_cos"] < 0.55

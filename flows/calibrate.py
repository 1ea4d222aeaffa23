"""`danqing calibrate`: fit a finished run's unpublished thresholds to the paper's removal rates."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from flows.settings import build_config
from tasks import align as align_stage
from tasks import image as image_stage
from tasks import refine as refine_stage
from tasks.calibrate import Chain, Fit, fit_chain
from tasks.io import shards

# The stages whose rules declare calibrated scores, with the step whose rows they judged.
CHAINS: dict[str, tuple[str, Chain]] = {"refine": ("refine", refine_stage.CHAIN),
                                        "image": ("diversify", image_stage.CHAIN)}


def stage_rows(run_dir: Path, step: str) -> pd.DataFrame:
    """Every row that entered `step`: its kept rows and its rejects, with the scores stored on both."""
    frames = [shards.read_parquet(p) for p in sorted((run_dir / "steps" / step).glob("[0-9]*.parquet"))
              if p.name.count(".") == 1]
    frames += [shards.read_parquet(p) for p in sorted((run_dir / "rejects").glob(f"{step}-*.parquet"))]
    frames = [f for f in frames if len(f)]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def calibrate_run(run_dir: Path) -> tuple[dict, dict[str, list[Fit]]]:
    """(thresholds: the run's own settings with every fitted threshold replaced, fits per stage)."""
    run = json.loads((run_dir / "run.json").read_text())
    settings = {k: dict(v) for k, v in (run.get("params", {}).get("config") or {}).items()}
    fits = {}
    for section, (step, chain) in CHAINS.items():
        rows = stage_rows(run_dir, step)
        if rows.empty:  # a later step no row reached has nothing to fit; a run with no scored rows at all is an error
            continue
        missing = [r.column for r in chain.scored if r.column not in rows.columns]
        if missing:
            raise ValueError(f"{run_dir}: step {step!r} stored no scores {missing}: re-run it with this version")
        config = build_config(section, settings.get(section))
        fitted, fits[section] = fit_chain(rows, config, chain)
        changed = {r.setting: getattr(fitted, r.setting) for r in chain.scored
                   if getattr(fitted, r.setting) != getattr(config, r.setting)}
        if changed:
            settings[section] = {**settings.get(section, {}), **changed}
    if not fits:
        steps = sorted({step for step, _ in CHAINS.values()})
        raise ValueError(f"{run_dir}: no rows of steps {steps} stored (did the run finish them?)")
    band = calibrate_band(run_dir, run, settings)
    if band:
        fits["align"] = band
    for section, values in settings.items():
        build_config(section, values)  # what we write must load back
    return settings, fits


def calibrate_band(run_dir: Path, run: dict, settings: dict) -> list[Fit]:
    """The alignment band for the run's align model: the paper's band for the paper's model, else the band that
    removes the paper's share of the pairs that entered align (split by `low_share`), written as `align.low` and
    `align.high` so later runs with this model use it as is."""
    rows = stage_rows(run_dir, "align")
    if rows.empty or "align_cosine" not in rows.columns:
        return []
    name, placeholder, _ = (run.get("models") or {}).get("align", ("", True, ""))
    values = {k: v for k, v in settings.get("align", {}).items() if k not in ("low", "high")}
    config = build_config("align", values)
    scores = rows["align_cosine"].to_numpy(dtype="float64")
    band = align_stage.choose_band(scores, config, name, placeholder)
    removed = int(((scores < band.low) | (scores > band.high)).sum())
    note = f"cosine band [{band.low:.4f}, {band.high:.4f}], low_share {config.low_share}"
    if band.fitted:
        settings["align"] = {**values, "low": band.low, "high": band.high}
        if placeholder:
            note += "; placeholder model: the band judges nothing"
    else:
        note += "; the paper's band for its model, not fitted"
    return [Fit("align.out_of_band", len(scores), removed, config.target_removal, None, note)]

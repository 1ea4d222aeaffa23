"""Fits unpublished thresholds to the paper's removal rates, from the per-row scores a run stored.

A stage declares its rule chain (``Chain``): in order, which rows each rule fails given a config, and for
the rules with a continuous score, the score column, the direction it drops in, the config field holding
its threshold and the share of the step's input the paper removed there. The fit knows nothing else.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import pandas as pd


@dataclass(frozen=True)
class ScoredRule:
    reason: str  # the rule's drop reason, e.g. "refine.lid"
    column: str  # its per-row score, stored by the stage
    drop: Literal["below", "at_or_above"]  # rows with score < threshold, or score >= threshold, fail
    setting: str  # the stage config's field that holds the threshold
    target: float  # share of the step's input to remove (the paper's, Table 6)


@dataclass(frozen=True)
class Chain:
    stage: str  # config section
    failures: Callable[[pd.DataFrame, Any], Mapping[str, pd.Series]]  # reason -> failed rows, in rule order
    scored: tuple[ScoredRule, ...]
    paper: Callable[[str], float] | None = None  # the paper's removal at a rule's step, shown beside ours


@dataclass(frozen=True)
class Fit:
    reason: str
    step_in: int  # rows that reached the rule
    removed: int  # rows it removes under the (fitted) threshold
    paper: float | None  # the paper's share at this step
    threshold: float | None  # the fitted threshold; None for a rule that is reported, not calibrated
    note: str = ""

    @property
    def share(self) -> float:
        return self.removed / self.step_in if self.step_in else 0.0


def _threshold(scores: np.ndarray, k: int, drop: str) -> float:
    """A threshold that fails the ``k`` lowest (below) or highest (at_or_above) of ``scores``."""
    s = np.sort(scores)
    m = len(s)
    k = min(max(k, 0), m)
    if drop == "below":  # fails score < t
        if k == 0:
            return float(s[0]) if m else 0.0
        return float(math.nextafter(s[-1], math.inf)) if k == m else float((s[k - 1] + s[k]) / 2)
    if k == 0:  # at_or_above: fails score >= t
        return float(math.nextafter(s[-1], math.inf)) if m else 1.0
    return float(s[0]) if k == m else float((s[m - k - 1] + s[m - k]) / 2)


def fit_chain(frame: pd.DataFrame, config: Any, chain: Chain) -> tuple[Any, list[Fit]]:
    """The config with each scored rule's threshold fitted in chain order, and every rule's removal under it.

    Each rule sees only the rows earlier rules kept, under thresholds already fitted. A scored rule whose
    reason also fails rows regardless of its score (keywords beside a classifier) gets the rest of its
    share from the score; rows without a score (NaN) never fail on it.
    """
    scored = {r.reason: r for r in chain.scored}
    alive = pd.Series(True, index=frame.index)
    fits = []
    for reason in list(chain.failures(frame, config)):
        rule = scored.get(reason)
        n = int(alive.sum())
        note = ""
        if rule is not None:
            scores = pd.to_numeric(frame[rule.column], errors="coerce") if rule.column in frame else None
            if scores is None or scores[alive].isna().all():
                note = "no scores stored: not calibrated"
            else:
                off = -math.inf if rule.drop == "below" else math.inf
                fixed = chain.failures(frame, dataclasses.replace(config, **{rule.setting: off}))[reason] & alive
                free = alive & ~fixed & scores.notna()
                k = round(rule.target * n) - int(fixed.sum())
                threshold = _threshold(scores[free].to_numpy(), k, rule.drop)
                config = dataclasses.replace(config, **{rule.setting: threshold})
        failed = chain.failures(frame, config)[reason] & alive
        paper = chain.paper(reason) if chain.paper else (rule.target if rule else None)
        fitted = rule is not None and not note
        fits.append(Fit(reason, n, int(failed.sum()), paper, getattr(config, rule.setting) if fitted else None, note))
        alive &= ~failed
    return config, fits


def render_fits(fits: list[Fit]) -> str:
    """A plain-text table: each rule's threshold, our removal and the paper's, as shares of the step's input."""
    lines = [f"{'rule':<22} {'in':>8} {'removed':>8} {'ours %':>7} {'paper %':>8}  threshold"]
    for f in fits:
        paper = f"{100 * f.paper:.2f}" if f.paper is not None else "-"
        thr = f"{f.threshold:.6g}" if f.threshold is not None else "-"
        lines.append(f"{f.reason:<22} {f.step_in:>8} {f.removed:>8} {100 * f.share:>7.2f} {paper:>8}  {thr}"
                     + (f"  ({f.note})" if f.note else ""))
    return "\n".join(lines)

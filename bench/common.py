"""What the benchmarks share: ratios against a baseline measured in the same run need the same timing rule."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path


def best_of(runs: dict, repeat: int) -> tuple[dict[str, float], dict]:
    """Fastest time of each callable over `repeat` rounds, run alternately; and each one's last result."""
    times = {name: [] for name in runs}
    results = {}
    for _ in range(repeat):
        for name, fn in runs.items():
            t0 = time.perf_counter()
            results[name] = fn()
            times[name].append(time.perf_counter() - t0)
    return {name: min(ts) for name, ts in times.items()}, results


def report(figures: dict, width: int = 26) -> dict:
    """Print each figure, then all of them as one JSON object: the last line of a bench's stdout."""
    for key, value in figures.items():
        print(f"{key:>{width}}: {value}")
    print(json.dumps(figures))
    return figures


def built_once(root: Path, build: Callable[[Path], object]) -> Path:
    """`root`, made by `build(directory)` the first time: in a scratch folder renamed into place, so a checkpoint
    is complete or absent and an interrupted build is never reused."""
    if not root.is_dir():
        root.parent.mkdir(parents=True, exist_ok=True)
        scratch = Path(tempfile.mkdtemp(dir=root.parent))
        try:
            build(scratch / "model")
            os.replace(scratch / "model", root)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    return root

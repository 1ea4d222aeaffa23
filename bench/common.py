"""What the benchmarks share: ratios against a baseline measured in the same run need the same timing rule."""

from __future__ import annotations

import json
import time


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

"""Benchmark: how a run's orchestration grows with its shards: the flow process's peak memory, the wall time per
task run, and the Prefect database, for the same small generated shards at several run sizes.

Each size is one `curate` run in a new process on a local 2-worker cluster (replay fetcher, placeholder models),
so the figures of one size do not leak into the next. Shards are `bench/overhead.py`'s generated WARCs of Chinese
pages whose images are WARC records, `--shard-mb` each (0.3 MB: the work per shard is small, so what grows with
the run's size is what this measures). The ratios compare the sizes of this run with each other: the machine is
shared and noisy, and only figures taken in the same minutes compare. Last stdout line: one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.overhead import shards  # noqa: E402 - after the path insert

# Run in the child: one curate run, then its own peak RSS (the flow process; workers are other processes).
_CHILD = """
import json, resource, sys
from flows.curate import curate
from flows.settings import CurateParams, LocalClusterSpec
warcs, out = json.loads(sys.argv[1]), sys.argv[2]
params = CurateParams(warcs=warcs, out=out, fetcher="replay", config={"source": {"min_words": 1}},
                      models={"embed": "placeholder", "align": "placeholder", "tokenizer": "placeholder"})
report = curate(params, cluster=LocalClusterSpec(n_workers=2, threads_per_worker=1))["report"]
print(json.dumps({"samples": report["samples"], "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def task_runs(db: Path) -> int:
    with sqlite3.connect(db) as con:
        return int(con.execute("SELECT COUNT(*) FROM task_run").fetchone()[0])


def measure(warcs: list[str], out: Path, code: Path) -> dict:
    start = time.perf_counter()
    env = {**os.environ, "PYTHONPATH": str(code)}
    done = subprocess.run([sys.executable, "-c", _CHILD, json.dumps(warcs), str(out)], cwd=code, env=env,
                          check=True, capture_output=True, text=True)
    wall = time.perf_counter() - start
    child = json.loads(done.stdout.strip().splitlines()[-1])
    db = out / ".prefect" / "prefect.db"
    runs = task_runs(db)
    return {"shards": len(warcs), "wall_s": round(wall, 1), "flow_rss_mb": round(child["rss_mb"], 1),
            "task_runs": runs, "db_mb": round(db.stat().st_size / 1e6, 1), "samples": child["samples"],
            "wall_per_task_run_s": round(wall / max(runs, 1), 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--sizes", default="3,30,300", help="run sizes in shards (the sample crawl has 3)")
    ap.add_argument("--shard-mb", type=float, default=0.3)
    ap.add_argument("--quick", action="store_true", help="sizes 3 and 30 only: a few minutes")
    ap.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "danqing-bench-scale"))
    ap.add_argument("--code", default=str(ROOT), help="the checkout whose flow runs (another commit, to compare)")
    args = ap.parse_args()
    sizes = [3, 30] if args.quick else [int(s) for s in args.sizes.split(",")]
    work = Path(args.work)
    rows = []
    for n in sizes:
        out = work / f"out-{n}"
        subprocess.run(["rm", "-rf", str(out)], check=True)  # a fresh root: nothing resumed, a new database
        work.mkdir(parents=True, exist_ok=True)
        rows.append(measure(shards(work, n, args.shard_mb), out, Path(args.code)))
        print(json.dumps(rows[-1]), flush=True)
    first, last = rows[0], rows[-1]
    span = max(last["shards"] - first["shards"], 1)
    print(json.dumps({
        "sizes": [r["shards"] for r in rows],
        "flow_rss_mb": [r["flow_rss_mb"] for r in rows],
        "task_runs": [r["task_runs"] for r in rows],
        "wall_s": [r["wall_s"] for r in rows],
        "db_mb": [r["db_mb"] for r in rows],
        "rss_mb_per_shard": round((last["flow_rss_mb"] - first["flow_rss_mb"]) / span, 3),
        "task_runs_per_shard": round((last["task_runs"] - first["task_runs"]) / span, 2),
        "db_kb_per_task_run": round(1000 * (last["db_mb"] - first["db_mb"])
                                    / max(last["task_runs"] - first["task_runs"], 1), 1),
        "wall_per_task_run_s": last["wall_per_task_run_s"],
        "rss_ratio_last_vs_first": round(last["flow_rss_mb"] / first["flow_rss_mb"], 2),
    }))


if __name__ == "__main__":
    main()

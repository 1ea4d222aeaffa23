"""Benchmark: what a run's orchestration costs as it grows, and what the whole-run reduces hold.

Orchestration: the same small generated shards at N, 2N and 4N WARC files (full: N = 128, `--quick`: N = 16), each
size one `danqing run`-equivalent `curate` in a new process on a local 2-worker cluster with a batch size of N
(replay fetcher, placeholder models), a fresh output root each, so nothing is resumed and each size gets its own
Prefect database. Shards are `bench/overhead.py`'s generated WARCs of Chinese pages whose images are WARC records,
`--shard-mb` each (0.3 MB: the work per shard is small, so what grows with the run is what this measures). The
process tree (the command, the Prefect server it starts, the Dask nannies and workers) is sampled for its summed
RSS while it runs. Figures:
- `marginal_s_per_shard`: (wall(4N) - wall(2N)) / 2N, which leaves start-up out;
- `marginal_growth_ratio`: that over the same for N -> 2N (1.0: the cost per shard does not grow with the run);
- `tree_rss_mb_per_1k_shards`: the growth of the tree's peak RSS from 2N to 4N, per 1,000 shards;
- `prefect_db_kb_per_task_run`, `task_runs_per_shard`;
- `marginal_cpu_s_per_shard_by_role`: the same marginal, in CPU seconds of each kind of process (dask, flow,
  prefect_server): against `marginal_s_per_shard` on 2 cores, how much of the wall is work and how much waiting.
Reduces: `bench/scale_reduces.py` (in-batch dedup and the cross-batch search and commit at M and 4M rows), when
present and not `--no-reduces`. The ratios compare sizes of this run with each other: the machine is shared and
noisy, and only figures taken in the same minutes compare. Last stdout line: one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.overhead import shards  # noqa: E402 - after the path insert

# Run in the child: one curate run over the WARC files, in batches of `batch`.
_CHILD = """
import json, sys
from flows.curate import curate
from flows.settings import CurateParams, LocalClusterSpec
warcs, out, batch = json.loads(sys.argv[1]), sys.argv[2], int(sys.argv[3])
params = CurateParams(warcs=warcs, out=out, fetcher="replay", config={"source": {"min_words": 1}}, batch_size=batch,
                      models={"embed": "placeholder", "align": "placeholder", "tokenizer": "placeholder"})
report = curate(params, cluster=LocalClusterSpec(n_workers=2, threads_per_worker=1))["report"]
print(json.dumps({"samples": report["samples"]}))
"""


class TreeRss:
    """The peak of the summed RSS of a process and all its descendants, sampled every `every_s`."""

    def __init__(self, pid: int, every_s: float = 0.25):
        import psutil  # a dependency of dask.distributed

        self.root = psutil.Process(pid)
        self.peak_mb = 0.0
        self.max_process_mb = 0.0
        self.by_role: dict[str, float] = {}  # role -> the peak of its processes' summed RSS
        self.count_by_role: dict[str, int] = {}  # role -> the most processes of it seen at once (a restart shows)
        self.peak_by_pid: dict[int, tuple[str, float]] = {}  # pid -> (role, its own peak RSS)
        self._cpu: dict[int, tuple[str, float]] = {}  # pid -> (role, its last CPU seconds read)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, args=(every_s,), daemon=True)
        self._thread.start()

    def _sample(self, every_s: float) -> None:
        import psutil

        while not self._stop.is_set():
            try:
                procs = [self.root, *self.root.children(recursive=True)]
            except psutil.Error:
                return
            total = 0.0
            roles: dict[str, float] = {}
            counts: dict[str, int] = {}
            for p in procs:
                try:
                    rss = p.memory_info().rss / 2**20
                    role = _role(p.cmdline(), p is self.root)
                    cpu = p.cpu_times()
                except psutil.Error:
                    continue
                self._cpu[p.pid] = (role, cpu.user + cpu.system)
                total += rss
                roles[role] = roles.get(role, 0.0) + rss
                counts[role] = counts.get(role, 0) + 1
                self.peak_by_pid[p.pid] = (role, max(rss, self.peak_by_pid.get(p.pid, (role, 0.0))[1]))
                self.max_process_mb = max(self.max_process_mb, rss)
            self.peak_mb = max(self.peak_mb, total)
            for role, rss in roles.items():
                self.by_role[role] = max(self.by_role.get(role, 0.0), rss)
                self.count_by_role[role] = max(self.count_by_role.get(role, 0), counts[role])
            self._stop.wait(every_s)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def cpu_s_by_role(self) -> dict[str, float]:
        """role -> its processes' CPU seconds (user + system) as last sampled: where the run's time went."""
        out: dict[str, float] = {}
        for role, seconds in self._cpu.values():
            out[role] = out.get(role, 0.0) + seconds
        return {k: round(v, 1) for k, v in sorted(out.items())}


def _role(cmdline: list[str], root: bool) -> str:
    text = " ".join(cmdline)
    if root:
        return "flow"
    if "prefect_server" in text or "uvicorn" in text:
        return "prefect_server"
    if "multiprocessing" in text:
        return "dask"
    return "other"


def task_runs(db: Path) -> int:
    with sqlite3.connect(db) as con:
        return int(con.execute("SELECT COUNT(*) FROM task_run").fetchone()[0])


def measure(warcs: list[str], out: Path, code: Path, batch: int) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}  # the run starts its own server
    env["PYTHONPATH"] = str(code)
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", _CHILD, json.dumps(warcs), str(out), str(batch)], cwd=code,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    tree = TreeRss(proc.pid)
    stdout, stderr = proc.communicate()
    wall = time.perf_counter() - start
    tree.stop()
    if proc.returncode:
        raise RuntimeError(f"run of {len(warcs)} shards failed ({proc.returncode}):\n{stderr[-3000:]}")
    child = json.loads(stdout.strip().splitlines()[-1])
    db = out / ".prefect" / "prefect.db"
    runs = task_runs(db)
    return {"shards": len(warcs), "batch_size": batch, "wall_s": round(wall, 1),
            "tree_rss_mb": round(tree.peak_mb, 1), "max_process_rss_mb": round(tree.max_process_mb, 1),
            "rss_mb_by_role": {k: round(v, 1) for k, v in sorted(tree.by_role.items())},
            "processes_by_role": dict(sorted(tree.count_by_role.items())),
            "process_peaks_mb": {role: sorted((round(mb) for r, mb in tree.peak_by_pid.values() if r == role),
                                              reverse=True) for role in sorted(tree.by_role)},
            "cpu_s_by_role": tree.cpu_s_by_role(),
            "task_runs": runs, "db_mb": round(db.stat().st_size / 1e6, 2), "samples": child["samples"]}


def orchestration(n: int, shard_mb: float, work: Path, code: Path) -> dict:
    rows = []
    for size in (n, 2 * n, 4 * n):
        out = work / f"out-{size}"
        subprocess.run(["rm", "-rf", str(out)], check=True)  # a fresh root: nothing resumed, a new database
        work.mkdir(parents=True, exist_ok=True)
        rows.append(measure(shards(work, size, shard_mb), out, code, n))
        print(json.dumps(rows[-1]), flush=True)
    one, two, four = rows
    marginal = (four["wall_s"] - two["wall_s"]) / (2 * n)
    first = (two["wall_s"] - one["wall_s"]) / n
    return {
        "n": n, "sizes": [r["shards"] for r in rows], "wall_s": [r["wall_s"] for r in rows],
        "tree_rss_mb": [r["tree_rss_mb"] for r in rows], "task_runs": [r["task_runs"] for r in rows],
        "marginal_s_per_shard": round(marginal, 3),
        "marginal_growth_ratio": round(marginal / first, 3) if first > 0 else None,
        "tree_rss_mb_per_1k_shards": round(1000 * (four["tree_rss_mb"] - two["tree_rss_mb"]) / (2 * n), 1),
        "prefect_db_kb_per_task_run": round(1000 * (four["db_mb"] - one["db_mb"])
                                            / max(four["task_runs"] - one["task_runs"], 1), 2),
        "task_runs_per_shard": round((four["task_runs"] - one["task_runs"]) / (3 * n), 2),
        # the marginal CPU seconds per shard of each kind of process: what the wall per shard is made of
        "marginal_cpu_s_per_shard_by_role": {
            role: round((four["cpu_s_by_role"].get(role, 0) - two["cpu_s_by_role"].get(role, 0)) / (2 * n), 3)
            for role in four["cpu_s_by_role"]},
    }


def client_ms(shared: bool, n: int = 20) -> float:
    """CPU milliseconds to make one Prefect API client (a task run makes several), in a fresh process."""
    code = ("import sys, time; from prefect.client.orchestration import SyncPrefectClient as C\n"
            + ("from flows import tls; tls.install()\n" if shared else "")
            + f"C('http://127.0.0.1:1/api'); s = time.process_time()\nfor _ in range({n}): C('http://127.0.0.1:1/api')\n"
            + f"print((time.process_time() - s) / {n} * 1000)")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    return float(done.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--n", type=int, help="N: the smallest run and the batch size (default 128; --quick 16)")
    ap.add_argument("--shard-mb", type=float, default=0.3)
    ap.add_argument("--quick", action="store_true", help="N = 16 and the reduces' quick sizes: a few minutes")
    ap.add_argument("--no-reduces", action="store_true", help="orchestration only")
    ap.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "danqing-bench-scale"))
    ap.add_argument("--code", default=str(ROOT), help="the checkout whose flow runs (another commit, to compare)")
    args = ap.parse_args()
    n = args.n or (16 if args.quick else 128)
    prefect_ms, shared_ms = client_ms(False), client_ms(True)  # flows/tls.py beside Prefect's own client
    figures = {**orchestration(n, args.shard_mb, Path(args.work), Path(args.code)),
               "client_ms_prefect": round(prefect_ms, 2), "client_ms_shared_tls": round(shared_ms, 2),
               "client_speedup_shared_tls": round(prefect_ms / shared_ms, 1)}
    if not args.no_reduces and (ROOT / "bench" / "scale_reduces.py").is_file():
        from bench import scale_reduces

        figures["reduces"] = scale_reduces.run(args.quick)
    print(json.dumps(figures))


if __name__ == "__main__":
    main()

"""Kill tests on the sample crawl, from outside, as a user's run meets them: `danqing run` SIGKILLed (its leader
alone, or its whole process group) at seeded moments, one of its local Dask workers SIGKILLed mid-run, and kills
during the dataset write and during the commit; each re-run resumes, and the output at the end is the output of
an undisturbed run (dataset rows, tar bytes, rejects, LanceDB rows: nothing lost, nothing twice). Nothing the
killed runs started (their Prefect server, their Dask processes) outlives them.

Moments are picked by observed state (a step's completion markers appearing), never by sleeping."""

from __future__ import annotations

import hashlib
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import psutil
import pytest

ROOT = Path(__file__).resolve().parents[2]
SEED = 17
STATE_TIMEOUT_S = 420  # a run's slowest wait for a state, on a loaded 2-core machine
GONE_TIMEOUT_S = 60  # a killed run's processes: the server's lifeline deadline (20 s) plus load
# observable moments in pipeline order: (path under the run directory, how many files matching it)
MOMENTS = [("steps/extract/*.done.json", 1), ("steps/source/*.done.json", 2), ("steps/fetch/*.done.json", 1),
           ("steps/refine/*.done.json", 2), ("steps/image/*.done.json", 1), ("steps/embed/*.done.json", 1)]


def _env() -> dict:
    """The user's environment: no API server given, so each run starts (and must end) its own."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_API", "DANQING_"))}
    return {**env, "PYTHONPATH": str(ROOT)}


def _start(warcs: list[str], out: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "flows.cli", "run", "--warc", *warcs, "--fetcher", "replay", "--out", str(out),
           "--no-progress"]
    log = open(out.parent / f"{out.name}.log", "ab")
    try:  # its own process group, as a shell gives a command: what `kill -9 -PGID` reaches
        return subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    finally:
        log.close()


def _finish(warcs: list[str], out: Path) -> None:
    proc = _start(warcs, out)
    assert proc.wait(timeout=STATE_TIMEOUT_S) == 0, (out.parent / f"{out.name}.log").read_text()[-3000:]


def _wait_for(proc: subprocess.Popen, out: Path, pattern: str, count: int = 1, fresh: bool = False,
              shards: int = 3) -> None:
    """Until `count` files match `pattern` under the run directory; `fresh`: written by this run (a resumed run
    reuses the earlier ones), or every shard's already there."""
    since = time.time() - 1 if fresh else 0  # mtime granularity
    deadline = time.monotonic() + STATE_TIMEOUT_S
    while True:
        found = list(out.glob(f"*/{pattern}"))
        if len([p for p in found if p.stat().st_mtime >= since]) >= count or (fresh and len(found) >= shards):
            return
        assert proc.poll() is None, f"the run ended ({proc.returncode}) before {count} of {pattern}"
        assert time.monotonic() < deadline, f"no {count} of {pattern} after {STATE_TIMEOUT_S} s"
        time.sleep(0.05)


def _family(proc: subprocess.Popen) -> list[psutil.Process]:
    return [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]


def _dask_workers(proc: subprocess.Popen) -> list[psutil.Process]:
    return [p for p in psutil.Process(proc.pid).children() if "multiprocessing.spawn" in " ".join(p.cmdline())]


def _assert_all_gone(family: list[psutil.Process]) -> None:
    _, alive = psutil.wait_procs(family, timeout=GONE_TIMEOUT_S)
    for p in alive:  # leave nothing behind for the rest of the suite, then fail
        p.kill()
    assert not alive, [" ".join(p.cmdline())[:120] for p in alive]


def _kill_group(proc: subprocess.Popen) -> None:
    family = _family(proc)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    _assert_all_gone(family)  # the server, in a session of its own, ends by its lifeline


def output(out: Path) -> dict:
    """Everything a run delivers, in a form two runs can be compared by: dataset rows and tar bytes, rejects and
    the LanceDB rows (embeddings with their committed flag, the commit register)."""
    import lancedb

    (run_dir,) = [p.parent for p in out.glob("*/report.json")]
    dataset = pd.concat([pd.read_parquet(p) for p in sorted((run_dir / "dataset").glob("*.parquet"))])
    rejects = pd.concat([pd.read_parquet(p) for p in sorted((run_dir / "rejects").glob("*.parquet"))])
    db = lancedb.connect(str(out / "lancedb"))
    tables = {}
    for name in sorted(db.list_tables().tables):
        frame = db.open_table(name).to_pandas().drop(columns=["committed_at"], errors="ignore")
        frame = frame.drop(columns=[c for c in frame.columns if c == "vector"])
        tables[name] = sorted(map(repr, frame.to_dict("records")))
    return {
        "run": run_dir.name,
        "dataset": sorted(map(repr, dataset.to_dict("records"))),
        "tars": {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in (run_dir / "dataset").glob("*.tar")},
        "rejects": sorted(map(repr, rejects.to_dict("records"))),
        "lancedb": tables,
    }


@pytest.fixture(scope="module")
def baseline(sample_crawl, tmp_path_factory):
    """One undisturbed run of the sample crawl, shared by the kill tests."""
    out = tmp_path_factory.mktemp("undisturbed") / "out"
    out.mkdir()
    warcs = [str(p) for p in sample_crawl.warcs]
    _finish(warcs, out)
    result = output(out)
    assert result["dataset"] and result["tars"] and result["rejects"], "the comparison needs rows"
    assert set(result["lancedb"]) >= {"runs"} and all(result["lancedb"].values())
    return warcs, result


def test_runs_killed_at_seeded_moments_resume_to_the_undisturbed_output(baseline, tmp_path):
    """Four kills in one output root, each re-run resuming from the last: the run's leader alone (its server and
    Dask processes must not outlive it), a Dask worker mid-run (the run goes on), the whole process group during
    the dataset write, and the whole group during the commit; then a run that finishes."""
    warcs, expected = baseline
    out = tmp_path / "out"
    out.mkdir()
    first, second = sorted(random.Random(SEED).sample(range(len(MOMENTS)), 2))

    run = _start(warcs, out)  # 1: SIGKILL to the leader only, as the OOM killer does
    _wait_for(run, out, *MOMENTS[first])
    family = _family(run)
    assert any("flows.prefect_server" in " ".join(p.cmdline()) for p in family), "the run has no server of its own"
    assert _dask_workers(run), "the run has no local Dask worker processes"
    run.kill()
    run.wait(timeout=30)
    _assert_all_gone(family)

    run = _start(warcs, out)  # 2: one Dask worker SIGKILLed mid-run; then the group, during the dataset write
    _wait_for(run, out, *MOMENTS[second], fresh=True, shards=len(warcs))
    deadline = time.monotonic() + STATE_TIMEOUT_S
    while not (workers := _dask_workers(run)):  # a step the first run finished is no moment: the cluster's start
        assert run.poll() is None and time.monotonic() < deadline, "the run has no local Dask worker processes"
        time.sleep(0.05)
    workers[0].kill()
    _wait_for(run, out, "steps/write/*.done.json")
    _kill_group(run)

    run = _start(warcs, out)  # 3: the group, during the commit: every shard written, the run not yet committed
    _wait_for(run, out, "steps/write/*.done.json", len(warcs))
    _kill_group(run)
    assert not list(out.glob("*/report.json"))

    _finish(warcs, out)
    got = output(out)
    assert got == expected

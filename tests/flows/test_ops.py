"""Operations against a real Prefect server: deployments, a process worker, idempotent triggers, backfills,
parameter validation, and `danqing up`."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import psutil
import pytest
from _fixtures import fixture_path
from cc_server import CRAWL, OTHER_CRAWL, build_layout, serve

from flows.ops import backfill, curate_latest, idempotency_key, snapshot_range, trigger
from flows.runtime import free_port
from flows.settings import CurateParams

ROOT = Path(__file__).resolve().parents[2]
PREFECT = [sys.executable, "-m", "prefect"]
WORKER = [sys.executable, "-m", "flows.cli", "worker"]  # `danqing worker`: prefect worker start, bounded stop
OFFLINE = {"http": {"resolve": []}, "source": {"min_words": 1}}


def _env(api_url: str, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DANQING_")}
    return {**env, "PREFECT_API_URL": api_url, "PWD": str(ROOT), **extra}


def _client():
    from prefect.client.orchestration import get_client

    return get_client(sync_client=True)


@pytest.fixture(scope="module")
def deployed(prefect_server):
    """`prefect deploy --all` from deployments/prefect.yaml, as the README tells a user to run it from the checkout:
    the work pools first (deploy refuses a deployment whose pool does not exist)."""
    res = subprocess.run([sys.executable, "-m", "flows.ops", "ensure-limits", "1"], cwd=ROOT,
                         env=_env(prefect_server, DANQING_ZOMBIE_AFTER_S="45"), capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    res = subprocess.run([*PREFECT, "--no-prompt", "deploy", "--all", "--prefect-file", "deployments/prefect.yaml"],
                         cwd=ROOT, env=_env(prefect_server), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return prefect_server


@pytest.fixture(scope="module")
def common_crawl(tmp_path_factory):
    root = tmp_path_factory.mktemp("cc-ops")
    build_layout(root, [fixture_path("warc/warcfile.warc.gz")])
    with serve(root) as server:
        yield server


def test_deploy_creates_the_four_deployments_pools_and_gpu_limit(deployed):
    with _client() as client:
        deployments = {f"{client.read_flow(d.flow_id).name}/{d.name}": d for d in client.read_deployments()}
        assert {"curate-snapshot/curate-snapshot", "curate-latest/curate-latest", "backfill/backfill",
                "release/release"} <= set(
            deployments)
        latest = deployments["curate-latest/curate-latest"]
        assert [(s.schedule.cron, s.schedule.timezone) for s in latest.schedules] == [("0 6 20 * *", "UTC")]
        assert all(d.work_pool_name == "danqing-cpu" for d in deployments.values())
        assert {p.name for p in client.read_work_pools()} >= {"danqing-cpu", "danqing-gpu"}
        assert client.read_concurrency_limit_by_tag("gpu").concurrency_limit >= 1


def test_a_cli_triggered_run_is_picked_up_by_a_worker_and_completes(deployed, tmp_path):
    params = {"params": {"warcs": [str(fixture_path("warc/warcfile.warc.gz"))], "out": str(tmp_path / "out"),
                         "config": OFFLINE}}
    worker = subprocess.Popen([*WORKER, "--pool", "danqing-cpu", "--limit", "1"], cwd=ROOT,
                              env=_env(deployed), stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
                              start_new_session=True)
    try:
        res = subprocess.run([*PREFECT, "deployment", "run", "curate-snapshot/curate-snapshot", "--params",
                              json.dumps(params)], cwd=ROOT, env=_env(deployed), capture_output=True, text=True,
                             timeout=120)
        assert res.returncode == 0, res.stdout + res.stderr
        run_id = next(line.split()[-1] for line in res.stdout.splitlines() if "UUID" in line)
        with _client() as client:
            deadline = time.monotonic() + 420
            while not (run := client.read_flow_run(run_id)).state.is_final():
                assert time.monotonic() < deadline, f"run still {run.state.type}"
                time.sleep(2)
            assert run.state.is_completed(), run.state.message
            assert run.name.startswith("warcfile-")  # named after its input
            from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

            artifacts = client.read_artifacts(
                artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[run.id])))
        keys = {a.key for a in artifacts}
        assert any(k.startswith("funnel-") and k.endswith("-output") for k in keys), keys
        reports = list((tmp_path / "out").glob("*/report.json"))
        assert len(reports) == 1 and json.loads(reports[0].read_text())["stages"][0]["pages_selected"] == 11
    finally:
        _stop_within_bound(worker)


def _final_state(client, run_id, timeout_s: float, what: str):
    """The flow run's state once it is final, polled every 2 s for at most `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while not (state := client.read_flow_run(run_id).state).is_final():
        assert time.monotonic() < deadline, f"{what} still {state.type}"
        time.sleep(2)
    return state


def _stop_within_bound(worker: subprocess.Popen) -> None:
    """SIGTERM to the worker's group, as systemd or Kubernetes sends it: the worker and everything it started
    (flow-run processes in sessions of their own, their Dask workers) are gone within the worker's stop deadline,
    which the worker enforces itself, so it holds however slowly Prefect's own shutdown goes on a busy machine."""
    from flows.lifeline import STOP_WITHIN_S

    family = [psutil.Process(worker.pid), *psutil.Process(worker.pid).children(recursive=True)]
    os.killpg(worker.pid, signal.SIGTERM)
    slack_s = 10  # the deadline thread's own wake-up and the kills, on a loaded 2-core machine
    try:
        worker.wait(timeout=STOP_WITHIN_S + slack_s)
        _, alive = psutil.wait_procs(family, timeout=slack_s)
        assert not alive, [p.cmdline()[:4] for p in alive]
    finally:
        for p in family:
            with contextlib.suppress(psutil.Error):
                p.kill()


def test_the_same_snapshot_triggered_twice_is_one_run(deployed, tmp_path):
    params = CurateParams(snapshot=CRAWL, warc_limit=1, out=str(tmp_path), cc_base_url="http://127.0.0.1:9")
    first, again = trigger(params), trigger(params)
    assert first.id == again.id and CRAWL in first.name
    other = trigger(params.model_copy(update={"warc_limit": 2}))  # a different run of the same snapshot
    assert other.id != first.id
    assert idempotency_key(params).startswith(f"curate:{CRAWL}:")


def test_backfill_fans_out_one_child_run_per_snapshot(deployed, common_crawl, tmp_path):
    template = CurateParams(out=str(tmp_path), warc_limit=1, cc_base_url=common_crawl.url)
    runs = backfill(snapshots=[CRAWL, OTHER_CRAWL, CRAWL], template=template)
    assert [r["snapshot"] for r in runs] == [OTHER_CRAWL, CRAWL]  # oldest first, whatever order was asked
    assert len({r["flow_run"] for r in runs}) == 2
    again = backfill(first=OTHER_CRAWL, last=CRAWL, template=template)  # the range: the same runs
    assert [r["flow_run"] for r in again] == [r["flow_run"] for r in runs]
    with _client() as client:
        child = client.read_flow_run(runs[0]["flow_run"])
        assert child.parent_task_run_id is not None  # linked from the backfill run in the UI
        # each snapshot's run commits only after the earlier snapshots' runs have finished
        assert child.parameters["params"]["commit_after"] == []
        later = client.read_flow_run(runs[1]["flow_run"])
        assert later.parameters["params"]["commit_after"] == [runs[0]["flow_run"]]
    with pytest.raises(ValueError, match="unknown Common Crawl snapshot"):
        backfill(snapshots=["CC-MAIN-1999-01"], template=template)


def test_curate_latest_runs_the_newest_snapshot_once(deployed, common_crawl, tmp_path):
    template = CurateParams(out=str(tmp_path), warc_limit=1, cc_base_url=common_crawl.url)
    first = curate_latest(template=template)
    assert first["snapshot"] == CRAWL  # collinfo lists the newest first
    assert curate_latest(template=template)["flow_run"] == first["flow_run"]
    done = tmp_path / f"{CRAWL}-0123456789"
    done.mkdir()
    (done / "report.json").write_text("{}")
    assert curate_latest(template=template)["snapshot"] is None  # curated already: nothing to do


def test_snapshot_range_is_oldest_first_and_checked():
    ids = ["CC-MAIN-2024-33", "CC-MAIN-2024-30", "CC-MAIN-2024-26"]
    assert snapshot_range(ids, "CC-MAIN-2024-26", "CC-MAIN-2024-33") == ids[::-1]
    assert snapshot_range(ids, "CC-MAIN-2024-30", "CC-MAIN-2024-30") == ["CC-MAIN-2024-30"]
    with pytest.raises(ValueError, match="CC-MAIN-2000-01"):
        snapshot_range(ids, "CC-MAIN-2000-01", "CC-MAIN-2024-33")


def test_parameters_that_fail_validation_are_refused_by_the_api(deployed):
    from prefect.exceptions import PrefectHTTPStatusError

    with _client() as client:
        deployment = client.read_deployment_by_name("curate-snapshot/curate-snapshot")
        for bad in ({"params": {"warc_limit": -1}}, {"params": {"select": "everything"}}, {"params": "x"}):
            with pytest.raises(PrefectHTTPStatusError):
                client.create_flow_run_from_deployment(deployment.id, parameters=bad)


def _get(url: str):
    with urllib.request.urlopen(url, timeout=5) as r:
        return json.loads(r.read() or b"null")


def test_danqing_up_brings_the_stack_up_and_sigterm_leaves_nothing(tmp_path):
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_API", "DANQING_"))}
    cmd = [sys.executable, "-m", "flows.cli", "up", "--port", str(port), "--out", str(tmp_path)]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        line = proc.stdout.readline()
        while line and "stack up" not in line:
            line = proc.stdout.readline()
        assert "stack up" in line, f"danqing up ended: {proc.poll()}"
        api = f"http://127.0.0.1:{port}/api"
        assert _get(f"{api}/health") is True
        names = {d["name"] for d in json.loads(urllib.request.urlopen(urllib.request.Request(
            f"{api}/deployments/filter", data=b"{}", headers={"Content-Type": "application/json"})).read())}
        assert names == {"curate-snapshot", "curate-latest", "backfill", "release"}
        pools = {p["name"] for p in json.loads(urllib.request.urlopen(urllib.request.Request(
            f"{api}/work_pools/filter", data=b"{}", headers={"Content-Type": "application/json"})).read())}
        assert pools >= {"danqing-cpu", "danqing-gpu"}
        assert _get(f"{api}/concurrency_limits/tag/gpu")["concurrency_limit"] == 1
        assert (tmp_path / ".stack" / "prefect").is_dir()  # the database lives under --out
        second = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
        assert second.returncode == 2 and "already running" in second.stderr
        family = psutil.Process(proc.pid).children(recursive=True)
        assert len(family) >= 5  # server, scheduler, worker, two Prefect workers
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
        _, alive = psutil.wait_procs(family, timeout=10)
        assert not alive, [p.cmdline() for p in alive]
    finally:
        if proc.poll() is None:
            proc.kill()


def test_a_deployment_pointed_at_an_unreachable_scheduler_fails_clearly(prefect_server, tmp_path, monkeypatch):
    """DANQING_DASK_ADDRESS is how deployments find the cluster: a dead address ends the run with its name."""
    from flows.curate import curate_snapshot
    from flows.runtime import task_runner

    address = f"tcp://127.0.0.1:{free_port()}"
    monkeypatch.setenv("DANQING_DASK_ADDRESS", address)
    params = CurateParams(warcs=[str(fixture_path("warc/warcfile.warc.gz"))], out=str(tmp_path))
    started = time.monotonic()
    with pytest.raises(OSError, match="127.0.0.1"):
        curate_snapshot.with_options(task_runner=task_runner(None))(params)
    assert time.monotonic() - started < 60


def test_a_worker_killed_mid_run_crashes_the_run_and_a_retry_resumes(deployed, sample_crawl, tmp_path):
    """SIGTERM to a worker (what systemd or Kubernetes sends) ends its flow run as crashed; scheduling that run
    again finishes it without redoing the shards that were complete."""
    from prefect.states import Scheduled

    params = {"params": {"warcs": [str(p) for p in sample_crawl.warcs], "out": str(tmp_path / "out"),
                         "fetcher": "replay"}}

    def start_worker():  # heartbeats every 30 s; the deploy fixture's automation crashes a run after 45 s without
        return subprocess.Popen([*WORKER, "--pool", "danqing-cpu", "--limit", "1"], cwd=ROOT,
                                env=_env(deployed, PREFECT_FLOWS_HEARTBEAT_FREQUENCY="30"), stdout=subprocess.DEVNULL,
                                stderr=subprocess.STDOUT, start_new_session=True)

    with _client() as client:
        deployment = client.read_deployment_by_name("curate-snapshot/curate-snapshot")
        run = client.create_flow_run_from_deployment(deployment.id, parameters=params)
        worker = start_worker()
        try:
            deadline = time.monotonic() + 300
            markers = tmp_path / "out"
            while not list(markers.glob("*/steps/extract/*.done.json")):  # some shards are complete
                assert time.monotonic() < deadline, "no shard completed"
                time.sleep(0.5)
        finally:
            _stop_within_bound(worker)  # mid-run: the flow-run process is stopped too
        deadline = time.monotonic() + 180
        while not (state := client.read_flow_run(run.id).state).is_final():
            assert time.monotonic() < deadline, f"run still {state.type} after its worker was killed"
            time.sleep(1)
        assert state.is_crashed() or state.is_cancelled(), state
        done = {p: p.stat().st_mtime_ns for p in markers.glob("*/steps/extract/*.done.json")}
        assert done
        client.set_flow_run_state(run.id, Scheduled(), force=True)  # the UI's "Retry"
        worker = start_worker()
        try:
            state = _final_state(client, run.id, 420, "retried run")
        finally:
            _stop_within_bound(worker)
        assert state.is_completed(), state.message
    assert {p: p.stat().st_mtime_ns for p in done} == done  # complete shards were not redone
    assert list((tmp_path / "out").glob("*/report.json"))


def test_a_run_waits_for_the_earlier_runs_to_finish_before_it_commits(prefect_server):
    import threading

    from prefect import flow
    from prefect.states import Completed, Failed

    from flows.runtime import wait_for_runs

    @flow
    def earlier():
        pass

    with _client() as client:
        first, second = client.create_flow_run(earlier), client.create_flow_run(earlier)
        waiter = threading.Thread(target=wait_for_runs, args=([str(first.id), str(second.id)], 0.1))
        waiter.start()
        time.sleep(1.0)
        assert waiter.is_alive()  # neither earlier run has finished
        client.set_flow_run_state(first.id, Completed(), force=True)
        client.set_flow_run_state(second.id, Failed(), force=True)  # a failed earlier run commits nothing: no wait
        waiter.join(10)
        assert not waiter.is_alive()
    wait_for_runs([])  # nothing to wait for


def test_a_batched_run_under_a_worker_runs_each_batch_as_a_deployment_run(deployed, sample_crawl, tmp_path):
    """Under a deployment each batch is a curate-snapshot run of its own that a worker picks up (the UI's Retry
    retries one batch), named <run>-b<k> and a child of the run; the run writes the merged report once every
    batch has committed. The flow runs share one Dask scheduler (DANQING_DASK_ADDRESS), as on a cluster."""
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId

    from flows.runtime import local_cluster

    warcs = [str(p) for p in sample_crawl.warcs[:2]]
    params = {"params": {"warcs": warcs, "out": str(tmp_path / "out"), "fetcher": "replay", "batch_size": 1,
                         "batch_parallel": 1, "config": {"align": {"low": -1.0, "high": 1.0}}}}
    with local_cluster(attempts=1, n_workers=1, threads_per_worker=2, processes=False, protocol="tcp",
                       dashboard_address=":0", memory_limit=0) as cluster, _client() as client:  # see test_runtime
        deployment = client.read_deployment_by_name("curate-snapshot/curate-snapshot")
        run = client.create_flow_run_from_deployment(deployment.id, parameters=params)
        # one slot for the run, one for its batch (--batch-parallel 1)
        worker = subprocess.Popen([*WORKER, "--pool", "danqing-cpu", "--limit", "2"], cwd=ROOT,
                                  env=_env(deployed, DANQING_DASK_ADDRESS=cluster.scheduler_address,
                                           PREFECT_FLOWS_HEARTBEAT_FREQUENCY="30"),  # within the fixture's 45 s
                                  stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            state = _final_state(client, run.id, 600, "run")
        finally:
            _stop_within_bound(worker)
        assert state.is_completed(), state.message
        parent = client.read_flow_run(run.id)
        children = client.read_flow_runs(flow_run_filter=FlowRunFilter(
            parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[run.id])))
    assert sorted(c.name for c in children) == [f"{parent.name}-b0", f"{parent.name}-b1"]
    assert all(c.deployment_id == deployment.id and c.state.is_completed() for c in children)
    assert all(c.parameters["params"]["batch"] in (0, 1) and c.parameters["params"]["warcs"] == [warcs[
        c.parameters["params"]["batch"]]] for c in children)
    run_dir = next((tmp_path / "out").glob("*/run.json")).parent
    from test_curate import check_report

    check_report(run_dir / "report.json")
    report = json.loads((run_dir / "report.json").read_text())
    per_batch = [json.loads((run_dir / "batches" / f"{k:04d}" / "report.json").read_text())["samples"]
                 for k in (0, 1)]
    assert report["samples"] == sum(per_batch) > 0

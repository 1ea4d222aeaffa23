"""The local Dask cluster: a worker process that dies while the cluster starts costs one more attempt, and a
cluster that cannot start at all is one error that says to re-run."""

from __future__ import annotations

import threading
import time

import psutil
import pytest

from flows import runtime

CLUSTER = {"n_workers": 1, "threads_per_worker": 1, "processes": True, "dashboard_address": ":0",
           "memory_limit": "2GiB"}


class WorkerKiller(threading.Thread):
    """SIGKILLs the first `limit` Dask worker processes this process spawns, each as soon as it appears (while
    its nanny waits for it to start)."""

    def __init__(self, limit: int):
        super().__init__(daemon=True)
        self.limit, self.killed, self.stop = limit, [], threading.Event()
        self.before = {p.pid for p in psutil.Process().children()}

    def run(self):
        while not self.stop.is_set() and len(self.killed) < self.limit:
            for p in psutil.Process().children():
                try:
                    spawned = "multiprocessing.spawn" in " ".join(p.cmdline())
                except psutil.Error:
                    continue
                if spawned and p.pid not in self.before and p.pid not in self.killed:
                    p.kill()
                    self.killed.append(p.pid)
            self.stop.wait(0.01)


def test_a_worker_killed_while_the_cluster_starts_costs_one_more_attempt(caplog):
    killer = WorkerKiller(limit=1)
    killer.start()
    try:
        with runtime.local_cluster(attempts=3, **CLUSTER) as cluster:
            assert killer.killed, "no worker process was killed while the cluster started"
            with cluster.get_client() as client:
                assert client.submit(sum, [1, 2]).result(timeout=60) == 3
    finally:
        killer.stop.set()
    assert "starting it again (2 of 3)" in caplog.text


def test_a_cluster_that_cannot_start_is_one_error_that_says_to_re_run():
    killer = WorkerKiller(limit=2)
    killer.start()
    try:
        with pytest.raises(runtime.ClusterStartError, match="re-run the same command to resume") as err:
            runtime.local_cluster(attempts=2, **CLUSTER)
    finally:
        killer.stop.set()
    assert len(killer.killed) == 2
    assert "\n" not in str(err.value)  # one line, whatever Dask's own message held


def test_the_dask_developer_logs_keep_only_debug_log_length_entries():
    """A compute-task message holds the task's arguments: Dask's default 1000 per log kept ~35 MB in the flow
    process, so the spec bounds the scheduler's and each worker's logs (bench/scale.py measures the run's RSS)."""
    import copy

    import dask

    from flows.settings import LocalClusterSpec

    before = copy.deepcopy(dask.config.config)
    try:
        runtime.task_runner(None, LocalClusterSpec(debug_log_length=5))
        with runtime.local_cluster(attempts=1, **CLUSTER) as cluster, cluster.get_client() as client:
            assert client.gather(client.map(lambda x: x + 1, range(40))) == list(range(1, 41))
            scheduler = client.run_on_scheduler(lambda dask_scheduler: len(dask_scheduler.transition_log))
            workers = client.run(lambda dask_worker: len(dask_worker.state.stimulus_log))
    finally:
        dask.config.config.clear()
        dask.config.config.update(before)
    assert scheduler == 5
    assert list(workers.values()) == [5]


def test_a_reduce_that_maps_on_the_cluster_leaves_its_task_run_behind_on_no_worker(prefect_server):
    """cluster_map's worker_client() starts the worker's Dask client, whose loop tasks copy the calling context:
    with the reduce's Prefect transaction in it, every later task run on that worker became its child and was
    kept for the worker's life (bench/scale.py's worker growth): the task its secede starts, and each one that task's
    end starts, ran in that context. Later task runs must find no parent transaction there."""
    from prefect import flow, task
    from prefect_dask import DaskTaskRunner

    def kept_children(dask_worker) -> int:
        import gc

        gc.collect()
        return sum(len(o.children) for o in gc.get_objects() if type(o).__qualname__ == "Transaction")

    @task
    def reduce_() -> int:
        return sum(runtime.cluster_map()(lambda x: x + 1, [1, 2, 3]))

    @task
    def step(i: int) -> int:
        return i

    with runtime.local_cluster(attempts=1, **CLUSTER) as cluster:
        @flow(task_runner=DaskTaskRunner(address=cluster.scheduler_address))
        def run() -> list[int]:
            reduced = reduce_.submit()
            queued = [step.submit(i) for i in range(6)]  # behind it on the one thread: started as it secedes
            assert reduced.result() == 9
            return [s.result() for s in queued]

        assert run() == list(range(6))
        with cluster.get_client() as client:
            kept = client.run(kept_children)
    assert list(kept.values()) == [0]


def test_tasks_submitted_without_the_flow_parameters_carry_none_of_them(prefect_server):
    """Each task submitted to Dask carries a copy of its flow run's context: inside without_flow_parameters the
    flow's parameters (a batch's WARC list) are not in it, so a task's size does not grow with the batch; the
    task still runs as a task run of that flow run, and the flow's own context keeps its parameters."""
    from prefect import flow, task
    from prefect.context import FlowRunContext
    from prefect_dask import DaskTaskRunner

    @task
    def seen() -> tuple[int, str]:
        ctx = FlowRunContext.get()  # the context the task run was handed, rebuilt on the worker
        return len(ctx.parameters.get("warcs", [])) + len(ctx.flow_run.parameters.get("warcs", [])), str(
            ctx.flow_run.id)

    warcs = [f"crawl-data/segments/{i}/warc/{i:05d}.warc.gz" for i in range(500)]
    # no memory limit: an in-process worker counts the whole test process, which pauses it past 80% of a limit
    with runtime.local_cluster(attempts=1, **{**CLUSTER, "processes": False, "memory_limit": 0}) as cluster:
        @flow(task_runner=DaskTaskRunner(address=cluster.scheduler_address))
        def run(warcs: list[str]) -> tuple:
            plain = seen.submit().result()
            with runtime.without_flow_parameters():
                lean = seen.submit().result()
            after = len(FlowRunContext.get().parameters["warcs"])
            return plain, lean, after, str(FlowRunContext.get().flow_run.id)

        plain, lean, after, flow_run_id = run(warcs)
    assert plain == (1000, flow_run_id)  # without it: the list twice in every task
    assert lean == (0, flow_run_id)
    assert after == 500


def _heap_churn(dask_worker, mb: int = 300) -> float:
    """Allocate `mb` of small objects and free them but the last (which pins the heap's top, so glibc cannot
    shrink it on free); returns this process's RSS in MB right after."""
    import gc

    blocks = [bytes(1000) for _ in range(mb * 1000)]
    dask_worker.pinned_by_test = blocks.pop()
    del blocks
    gc.collect()
    return psutil.Process().memory_info().rss / 2**20


def test_each_worker_a_restarted_one_too_hands_freed_memory_back():
    """The local cluster's workers run TrimMemory: what a task freed is handed back within a few seconds, where
    glibc would keep it for the process's life; a worker the nanny restarts trims too."""
    from distributed import Client

    def rss() -> float:
        return psutil.Process().memory_info().rss / 2**20

    with runtime.local_cluster(attempts=1, **CLUSTER, plugins={runtime.TrimMemory(0.5)}) as cluster, \
            Client(cluster) as client:
        for attempt in ("first", "restarted"):
            base = next(iter(client.run(rss).values()))
            churned = next(iter(client.run(_heap_churn).values()))
            assert churned > base + 200, (attempt, base, churned)  # the freed heap is still held: trim's to do
            deadline = time.monotonic() + 60
            while (now := next(iter(client.run(rss).values()))) > churned - 200:
                assert time.monotonic() < deadline, (attempt, churned, now)
                time.sleep(0.2)
            if attempt == "first":
                client.restart()


def test_trimming_starts_once_per_process():
    runtime.start_trimming(3600)
    runtime.start_trimming(3600)
    assert [t.name for t in threading.enumerate()].count("danqing-trim") == 1

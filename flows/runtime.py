"""Where a run executes: the Prefect API server, the Dask cluster, and the `gpu` tag limit."""

from __future__ import annotations

import contextlib
import contextvars
import functools
import logging
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

from distributed.diagnostics.plugin import WorkerPlugin

from flows.lifeline import popen as lifeline_popen
from flows.settings import LocalClusterSpec, dask_address, prefect_api_url

log = logging.getLogger("danqing")
SCHEDULER_TIMEOUT_S = 10
CLUSTER_START_ATTEMPTS = 3  # a worker process that dies while the local cluster starts fails only that attempt


class ClusterStartError(RuntimeError):
    """The local Dask cluster did not start in CLUSTER_START_ATTEMPTS attempts; a re-run resumes."""


def worker_name() -> str | None:
    """The Dask worker running the calling task (where model tasks were placed), or None outside Dask."""
    try:
        from distributed import get_worker

        return str(get_worker().name)
    except ValueError:
        return None


def cluster_map():
    """map(fn, items) as Dask tasks on the cluster the calling task runs on (its thread seceded while it waits),
    or in this process when it runs on none: how a reduce spreads its partitions."""
    try:
        from distributed import get_worker, worker_client

        get_worker()
    except (ImportError, ValueError):
        from tasks.dedup import serial_map

        return serial_map

    def gather(fn, items: list) -> list:
        with worker_client() as client:
            return client.gather(client.map(fn, items, pure=False))

    def on_cluster(fn, items: list) -> list:
        return _outside_prefect_run(gather, fn, items)

    return on_cluster


def _outside_prefect_run(fn, *args):
    """fn(*args) in a copy of this context without Prefect's flow run, task run, asset and transaction.

    The worker's Dask client, made on a task's first worker_client(), starts long-lived tasks on the worker's
    event loop that copy the calling context, and every task the worker runs after that inherits it. With the
    calling task run's Prefect transaction in it, each later task run's transaction became that one's child and
    was kept for the worker's life (bench/scale.py: ~1.4 MB a shard of worker growth)."""
    from prefect.context import AssetContext, FlowRunContext, TaskRunContext
    from prefect.transactions import Transaction

    def run():
        for var in (FlowRunContext.__var__, TaskRunContext.__var__, AssetContext.__var__, Transaction.__var__):
            var.set(None)
        return fn(*args)

    return contextvars.copy_context().run(run)


@contextlib.contextmanager
def without_flow_parameters():
    """The flow run's context without its parameters, for the tasks submitted inside.

    A task submitted to Dask carries a serialized copy of its flow run's context (prefect-dask's
    serialize_context), the flow's parameters in it twice (its own and the API model's): a batch's WARC list,
    and with the replay fetcher the run's, in every one of the batch's task runs. Each task's size, on the wire
    and in the scheduler while its future is held, grew with the batch and the run, so a batch's with its
    square. The tasks read none of it: their inputs are their arguments, and their cache policy is NO_CACHE."""
    from prefect.context import FlowRunContext

    ctx = FlowRunContext.get()
    if ctx is None:
        yield
        return
    flow_run = ctx.flow_run.model_copy(update={"parameters": {}}) if ctx.flow_run is not None else None
    with ctx.model_copy(update={"parameters": {}, "flow_run": flow_run}):
        yield


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _healthy(api_url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{api_url.rstrip('/')}/health", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


@contextlib.contextmanager
def prefect_api(log_dir: Path, home: Path | None = None, startup_timeout_s: float = 120.0):
    """Reuse PREFECT_API_URL when set; else start `prefect server` on 127.0.0.1 and stop it afterwards.

    Prefect's temporary in-process server breaks with Dask worker processes (each would start its own),
    so Dask runs need a real API URL that workers inherit through the environment. `home`: the server's
    PREFECT_HOME (its SQLite database), so each output root keeps its own run history instead of sharing
    ~/.prefect with every other Prefect use on the machine.
    """
    url = prefect_api_url()
    if url:
        yield url
        return
    port = free_port()
    url = f"http://127.0.0.1:{port}/api"
    log_dir.mkdir(parents=True, exist_ok=True)
    claim = _claim_home(home) if home is not None else None
    logfile = open(log_dir / "prefect-server.log", "ab")
    env = {**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_API_URL": url}
    if home is not None:
        home.mkdir(parents=True, exist_ok=True)
        env["PREFECT_HOME"] = str(home)
    # Its own session, so Ctrl-C in the terminal reaches only this process, which still sends its last logs to
    # the server before stopping it. On a lifeline: however this process ends, SIGKILL included, the server ends.
    proc, lifeline = lifeline_popen(
        [sys.executable, "-m", "flows.prefect_server", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        stdout=logfile, stderr=subprocess.STDOUT, env=env, start_new_session=True,
    )
    try:
        deadline = time.monotonic() + startup_timeout_s
        while not _healthy(url):
            if proc.poll() is not None:
                raise RuntimeError(f"prefect server exited ({proc.returncode}); see {log_dir}/prefect-server.log")
            if time.monotonic() > deadline:
                raise RuntimeError(f"prefect server not healthy after {startup_timeout_s:.0f} s")
            time.sleep(0.5)
        if claim is not None and claim[1]:
            _release_stale_slots(url)
        old = os.environ.get("PREFECT_API_URL")
        os.environ["PREFECT_API_URL"] = url  # Dask worker processes inherit it
        from prefect.settings import PREFECT_API_URL, temporary_settings

        try:
            with temporary_settings(updates={PREFECT_API_URL: url}):
                try:
                    yield url
                finally:
                    _drain_prefect_clients()
        finally:
            if old is None:
                os.environ.pop("PREFECT_API_URL", None)
            else:
                os.environ["PREFECT_API_URL"] = old
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        os.close(lifeline)
        logfile.close()
        if claim is not None:
            claim[0].close()


def _claim_home(home: Path):
    """(the open lock file, whether no other server danqing started on `home` is alive).

    Each such server's starter holds a shared lock on `<home>/servers.lock` while the server lives; an exclusive
    lock is granted only when there is none, and the kernel drops a lock with the process that held it, however
    that ends."""
    import fcntl

    home.mkdir(parents=True, exist_ok=True)
    f = open(home / "servers.lock", "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        sole = True
    except BlockingIOError:
        sole = False
    fcntl.flock(f, fcntl.LOCK_SH)
    return f, sole


def _release_stale_slots(url: str) -> None:
    """Free the concurrency slots (commit lock, snapshot limit, `gpu` tag) that runs of a server no longer alive
    still hold in its database.

    A slot is a lease that its holder renews and the server expires, but Prefect keeps leases in the server's
    memory: a run killed together with its server (kill -9, the OOM killer) leaves its slot occupied in the
    database for good, and the re-run that should resume would wait for that slot forever. Called only when no
    other server of this database is alive, so no live run holds a slot.
    """
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitUpdate
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: url}), get_client(sync_client=True) as client:
        offset, page = 0, 200
        while limits := client.read_global_concurrency_limits(limit=page, offset=offset):
            for held in (lim for lim in limits if lim.active_slots):
                log.info("freeing %d slot(s) of %s held by a run that ended with its server", held.active_slots,
                         held.name)
                client.update_global_concurrency_limit(held.name, GlobalConcurrencyLimitUpdate(active_slots=0))
            offset += page


def _drain_prefect_clients(timeout_s: float = 10.0) -> None:
    """Send queued logs and events while the server still runs; otherwise exit waits on retries to a dead one."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    APILogWorker.drain_all(timeout=timeout_s)
    EventsWorker.drain_all(timeout=timeout_s)


def check_scheduler(address: str, timeout_s: float = SCHEDULER_TIMEOUT_S) -> bool:
    """Connect to an existing Dask scheduler; a clear error (not a hang) when it cannot be reached.

    Returns whether any worker offers the `GPU` resource.
    """
    from distributed import Client

    try:
        with Client(address, timeout=timeout_s) as client:
            workers = client.scheduler_info(n_workers=-1).get("workers", {})
    except (OSError, TimeoutError) as err:
        raise ConnectionError(f"cannot reach the Dask scheduler at {address} within {timeout_s:.0f} s: {err}") from err
    return any("GPU" in (w.get("resources") or {}) for w in workers.values())


def task_runner(address: str | None, spec: LocalClusterSpec | None = None, work_dir: Path | None = None):
    """DaskTaskRunner on an existing scheduler (`address`, else DANQING_DASK_ADDRESS), or on a LocalCluster
    with explicit limits.

    `work_dir` is the workers' scratch space (spilled data); default: Dask's temporary directory.
    """
    from prefect_dask import DaskTaskRunner

    address = address or dask_address()
    if address:  # an unreachable scheduler is an error after 10 s, not Dask's default 30 s of retries
        return DaskTaskRunner(address=address, client_kwargs={"timeout": SCHEDULER_TIMEOUT_S})
    import dask

    spec = spec or LocalClusterSpec()
    dask.config.set({
        # read by each Nanny when it spawns its worker process (None unsets the variable)
        "distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": spec.malloc_trim_threshold,
        # the statistical profiler samples every thread's stack every 10 ms: ~5% of a CPU-bound task
        "distributed.worker.profile.enabled": spec.profile,
        # the scheduler's and the workers' (each Nanny hands its config to its worker) recent messages and logs
        "distributed.admin.low-level-log-length": spec.debug_log_length,
    })
    kwargs = {
        "n_workers": spec.n_workers, "threads_per_worker": spec.threads_per_worker,
        "processes": spec.processes, "memory_limit": spec.memory_limit, "dashboard_address": ":0",
    }
    if spec.trim_every_s:  # each worker, a restarted one too (the nanny starts it with the same arguments)
        kwargs["plugins"] = {TrimMemory(spec.trim_every_s)}
    if work_dir is not None:
        kwargs["local_directory"] = str(work_dir)
    return DaskTaskRunner(cluster_class=local_cluster, cluster_kwargs=kwargs)


def trim_memory() -> bool:
    """Hand the process's free heap pages back to the system (glibc's malloc_trim); False where there is none."""
    trim = _malloc_trim()
    return bool(trim(0)) if trim is not None else False


@functools.cache
def _malloc_trim():
    """glibc's malloc_trim, looked up once: ctypes.util.find_library runs a subprocess (ldconfig) per call, and a
    trim every 10 s that spawned one was a forked copy of a worker every 10 s."""
    import ctypes

    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to trim this way
        return None


_TRIMMING: dict[int, threading.Thread] = {}  # pid -> its trimming thread (a forked child starts its own)


def start_trimming(every_s: float) -> None:
    """trim_memory() every `every_s` seconds in this process, from a daemon thread (once per process).

    A trim of a ~1 GB fragmented heap takes ~45 ms here, outside the GIL."""
    if os.getpid() in _TRIMMING:
        return

    def loop():
        while True:
            time.sleep(every_s)
            trim_memory()

    thread = _TRIMMING[os.getpid()] = threading.Thread(target=loop, name="danqing-trim", daemon=True)
    thread.start()


class TrimMemory(WorkerPlugin):
    """A Dask worker plugin: start_trimming(every_s) in each worker process."""

    name = "danqing-trim-memory"

    def __init__(self, every_s: float):
        self.every_s = every_s

    def setup(self, worker) -> None:
        start_trimming(self.every_s)


def local_cluster(attempts: int = CLUSTER_START_ATTEMPTS, **kwargs):
    """A distributed.LocalCluster, started again when it fails to start.

    One worker process that dies while the cluster starts (killed, out of memory) fails the whole start with
    "Nanny failed to start" and the cluster closes what it had started; a fresh attempt then has fresh
    processes. Once running, Dask's nannies restart dead workers and the scheduler re-runs their tasks.
    """
    from distributed import LocalCluster

    for attempt in range(1, attempts + 1):
        try:
            return LocalCluster(**kwargs)
        except (RuntimeError, OSError, TimeoutError) as err:
            cause = _root_cause(err)
            if attempt == attempts:
                raise ClusterStartError(f"the local Dask cluster did not start in {attempts} attempts ({cause}); "
                                        "re-run the same command to resume from the finished shards") from err
            log.warning("the local Dask cluster did not start (%s); starting it again (%d of %d)", cause,
                        attempt + 1, attempts)


def _root_cause(err: BaseException) -> str:
    while err.__cause__ is not None:
        err = err.__cause__
    return f"{type(err).__name__}: {err}".splitlines()[0][:200]


def ensure_gpu_limit(slots: int) -> None:
    """The Prefect tag limit `gpu` (like `prefect concurrency-limit create gpu N`), created when missing."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            client.read_concurrency_limit_by_tag("gpu")
        except ObjectNotFound:
            client.create_concurrency_limit(tag="gpu", concurrency_limit=slots)


def ensure_snapshot_limit(snapshot: str) -> str:
    """A global concurrency limit of 1 for one snapshot (created when missing): its name.

    Slots are leases that the holder renews, so a run killed mid-way frees its snapshot when the lease ends.
    """
    return _ensure_global_limit(f"snapshot-{snapshot}")


def _ensure_global_limit(name: str) -> str:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            client.read_global_concurrency_limit_by_name(name)
        except ObjectNotFound:
            try:
                client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=1))
            except ObjectAlreadyExists:  # another run created it first
                pass
    return name


def commit_lock(lancedb_uri: str):
    """The output root's commit lock: a global concurrency limit of 1 per LanceDB URI, held from the cross-batch
    search to the commit, so runs compare against and commit to the shared memory one at a time."""
    import hashlib

    from prefect.concurrency.sync import concurrency

    uri = lancedb_uri if "://" in lancedb_uri else str(Path(lancedb_uri).resolve())
    name = _ensure_global_limit(f"commit-{hashlib.sha256(uri.encode()).hexdigest()[:16]}")
    return concurrency(name, occupy=1, strict=True)


def wait_for_runs(flow_run_ids: list[str], poll_s: float = 5.0, require_completed: bool = False) -> None:
    """Wait until each flow run is in a final state (a backfill's earlier snapshots commit first; one that
    failed or was cancelled commits nothing and is not waited for again). With `require_completed` (a batch
    waiting for the batch before it) a run that ended otherwise is an error: batches commit in order."""
    if not flow_run_ids:
        return
    from uuid import UUID

    from prefect.client.orchestration import get_client

    def final(run_id: str) -> bool:
        run = client.read_flow_run(UUID(run_id))
        state = run.state
        if state is not None and state.is_final() and require_completed and not state.is_completed():
            raise RuntimeError(f"flow run {run.name} ended {state.type.value}, so this batch does not commit "
                               "before it; re-run (or retry that batch) to resume")
        return state is not None and state.is_final()

    pending = list(flow_run_ids)
    with get_client(sync_client=True) as client:
        while pending:
            pending = [i for i in pending if not final(i)]
            if pending:
                log.info("waiting for %d earlier run(s) to commit first", len(pending))
                time.sleep(poll_s)

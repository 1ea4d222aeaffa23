"""`danqing up`: a whole local stack in one command — Prefect server, deployments, work pools, workers, Dask.

Everything runs as child processes in their own process groups, with the Prefect database under
`<out>/.stack/prefect` (not the home directory). Ctrl-C or SIGTERM stops them all; a second `danqing up` on
the same output directory or port is refused with a clear message.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil

from flows.lifeline import STOP_WITHIN_S
from flows.lifeline import popen as lifeline_popen
from flows.ops import POOLS
from flows.runtime import free_port

ROOT = Path(__file__).resolve().parents[1]  # the checkout: deployments/prefect.yaml and the flow entrypoints


class StackError(RuntimeError):
    """The stack cannot start (already running, a port taken, a part that does not come up)."""


def _port_taken(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def _wait(what: str, ready, procs: list[subprocess.Popen], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not ready():
        dead = [p for p in procs if p.poll() is not None]
        if dead:
            raise StackError(f"{what}: a process exited ({' '.join(map(str, dead[0].args))[:200]}, "
                             f"code {dead[0].returncode})")
        if time.monotonic() > deadline:
            raise StackError(f"{what} not ready after {timeout_s:.0f} s")
        time.sleep(0.5)


class Stack:
    """The child processes of one `danqing up`, started in order and stopped in reverse."""

    def __init__(self, port: int, out: Path, dask_port: int | None = None, gpu_slots: int = 1):
        self.port, self.out, self.gpu_slots = port, out.resolve(), gpu_slots
        self.home = self.out / ".stack"
        self.dask_port = dask_port or free_port()
        self.api = f"http://127.0.0.1:{port}/api"
        self.procs: list[subprocess.Popen] = []
        self._lifelines: list[int] = []  # the write ends of the children's lifelines
        self._lock = None
        bin_dir = str(Path(sys.executable).parent)  # the deploy step and workers use this environment's python
        self.env = {
            **os.environ, "PREFECT_API_URL": self.api, "PREFECT_HOME": str(self.home / "prefect"),
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_UI_URL": f"http://127.0.0.1:{port}",
            "DANQING_DASK_ADDRESS": f"tcp://127.0.0.1:{self.dask_port}",
            "PATH": bin_dir + os.pathsep + os.environ.get("PATH", ""),
            "PWD": str(ROOT),  # prefect.yaml's pull step runs flows from {{ $PWD }} at deploy time: the checkout
            # heartbeats every 30 s: a run whose worker dies is marked crashed after 90 s (flows.ops automation)
            "PREFECT_FLOWS_HEARTBEAT_FREQUENCY": os.environ.get("PREFECT_FLOWS_HEARTBEAT_FREQUENCY", "30"),
        }

    # -- lifecycle ------------------------------------------------------------------------------------------

    def lock(self) -> None:
        self.home.mkdir(parents=True, exist_ok=True)
        self._lock = open(self.home / "up.lock", "a+")
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock.seek(0)
            info = self._lock.read().strip() or "{}"
            raise StackError(f"a danqing stack is already running for {self.out} ({info}); stop it first") from None
        if _port_taken(self.port):
            raise StackError(f"port {self.port} on 127.0.0.1 is already in use (another Prefect server or "
                             "`danqing up`?): choose another with --port")
        self._lock.seek(0)
        self._lock.truncate()
        self._lock.write(json.dumps({"pid": os.getpid(), "ui": f"http://127.0.0.1:{self.port}"}))
        self._lock.flush()

    def _spawn(self, name: str, args: list[str]) -> subprocess.Popen:
        logs = self.home / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        out = open(logs / f"{name}.log", "ab")
        # its own process group, stopped with its children; on a lifeline: it ends when this process ends, even
        # killed (SIGKILL, the OOM killer), and stops within STOP_WITHIN_S of SIGTERM
        proc, lifeline = lifeline_popen(args, cwd=ROOT, env=self.env, stdout=out, stderr=subprocess.STDOUT,
                                        start_new_session=True)
        out.close()
        self.procs.append(proc)
        self._lifelines.append(lifeline)
        return proc

    def _run(self, what: str, args: list[str], timeout_s: float = 300) -> None:
        res = subprocess.run(args, cwd=ROOT, env=self.env, capture_output=True, text=True, timeout=timeout_s)
        if res.returncode != 0:
            raise StackError(f"{what} failed ({res.returncode}): {(res.stdout + res.stderr)[-2000:]}")

    def start(self, startup_timeout_s: float = 180) -> None:
        from flows.runtime import _healthy

        self.lock()
        py = sys.executable
        self._spawn("prefect-server", [py, "-m", "flows.prefect_server", "server", "start", "--host", "127.0.0.1",
                                       "--port", str(self.port)])
        _wait("the Prefect server", lambda: _healthy(self.api), self.procs, startup_timeout_s)
        self._spawn("dask-scheduler", [py, "-m", "distributed.cli.dask_scheduler", "--host", "127.0.0.1",
                                       "--port", str(self.dask_port), "--dashboard-address", ":0"])
        self._spawn("dask-worker", [py, "-m", "distributed.cli.dask_worker", f"tcp://127.0.0.1:{self.dask_port}",
                                    "--nworkers", "1", "--nthreads", "1", "--memory-limit", "6GiB",
                                    "--local-directory", str(self.home / "dask")])
        _wait("the Dask scheduler", lambda: _port_taken(self.dask_port), self.procs, startup_timeout_s)
        # the work pools exist before deploy checks them; the gpu limit with this stack's slots
        self._run("the work pools and gpu limit", [py, "-m", "flows.ops", "ensure-limits", str(self.gpu_slots)])
        self._run("prefect deploy", [py, "-m", "prefect", "--no-prompt", "deploy", "--all", "--prefect-file",
                                     str(ROOT / "deployments" / "prefect.yaml")])
        for pool in POOLS:
            self._spawn(f"worker-{pool}", [py, "-m", "prefect", "worker", "start", "--pool", pool])

    def stop(self, timeout_s: float = STOP_WITHIN_S + 5) -> None:
        """SIGTERM to every child's group; each ends within STOP_WITHIN_S by its lifeline's deadline (descendants
        in sessions of their own included, such as a Prefect worker's flow runs), and what a child that could not
        even run its deadline leaves is killed after `timeout_s`."""
        family = _descendants(self.procs)
        for proc in reversed(self.procs):
            _signal_group(proc, signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        for proc in reversed(self.procs):
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            _signal_group(proc, signal.SIGKILL)  # whatever of its group is left
        for p in family + _descendants(self.procs):
            with contextlib.suppress(psutil.Error):
                p.kill()
        for fd in self._lifelines:
            os.close(fd)
        self._lifelines.clear()
        self.procs.clear()
        if self._lock is not None:
            self._lock.close()
            self._lock = None


def _descendants(procs: list[subprocess.Popen]) -> list:
    found = []
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            found += psutil.Process(proc.pid).children(recursive=True)
    return found


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def up(port: int, out: Path, gpu_slots: int = 1) -> int:
    """Start the stack, print where it is, and keep it until Ctrl-C or SIGTERM."""
    stack = Stack(port, out, gpu_slots=gpu_slots)
    stopping = []

    def on_signal(signum, frame):
        stopping.append(signum)
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_signal)
    try:
        stack.start()
        print(f"danqing stack up: UI http://127.0.0.1:{port}  API {stack.api}\n"
              f"  deployments: curate-snapshot, curate-latest, backfill, release   work pools: {', '.join(POOLS)}\n"
              f"  Dask scheduler {stack.env['DANQING_DASK_ADDRESS']}   logs {stack.home / 'logs'}\n"
              "  Ctrl-C stops everything.", flush=True)
        while all(p.poll() is None for p in stack.procs):
            time.sleep(1)
        dead = next(p for p in stack.procs if p.poll() is not None)
        print(f"danqing: error: a stack process exited: {' '.join(map(str, dead.args))[:200]} "
              f"(see {stack.home / 'logs'})", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        stack.stop()

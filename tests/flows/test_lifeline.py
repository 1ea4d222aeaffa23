"""flows.lifeline: a child ends when its parent ends (SIGKILL included), and stops within its deadline even when
its program ignores the stop signal and leaves a descendant in a session of its own."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil

from flows import lifeline

ROOT = Path(__file__).resolve().parents[2]

# A program that will not stop: SIGTERM ignored, a grandchild in its own session (as Prefect's worker starts flow
# runs), both pids written where the test reads them.
STUBBORN = """
import os, signal, subprocess, sys, time
signal.signal(signal.SIGTERM, lambda *a: None)
grandchild = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"], start_new_session=True)
with open(sys.argv[1] + ".tmp", "w") as f:
    f.write(f"{os.getpid()} {grandchild.pid}")
os.replace(sys.argv[1] + ".tmp", sys.argv[1])
while True:
    time.sleep(1)
"""


def _env(tmp_path: Path) -> dict:
    (tmp_path / "stubborn.py").write_text(STUBBORN)
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(tmp_path)])}


def _pids(path: Path, proc: subprocess.Popen, timeout_s: float = 60) -> list[int]:
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        assert proc.poll() is None, f"the program ended ({proc.returncode}) before it started its grandchild"
        assert time.monotonic() < deadline, "the program did not start"
        time.sleep(0.1)
    return [int(p) for p in path.read_text().split()]


def _gone(pids: list[int], timeout_s: float) -> list[int]:
    """The pids still running (zombies count as gone) after waiting up to `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while True:
        alive = [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.2)


def test_a_program_that_ignores_sigterm_is_stopped_with_its_descendants_at_the_deadline(tmp_path):
    pids_file = tmp_path / "pids"
    proc = subprocess.Popen([sys.executable, "-m", "flows.lifeline", "--stop-within", "2", "stubborn",
                             str(pids_file)], env=_env(tmp_path), start_new_session=True)
    try:
        pids = _pids(pids_file, proc)
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        assert proc.poll() is None  # the program's own handler ran: no stop before the deadline
        started = time.monotonic()
        assert proc.wait(timeout=30) == lifeline.EXIT_KILLED
        assert time.monotonic() - started < 2 + 10  # the deadline, plus scheduling on a busy machine
        assert not _gone(pids[1:], 10), "the grandchild in its own session outlived the deadline"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


def test_a_child_ends_when_its_parent_is_killed(tmp_path):
    """The parent holds the pipe's write end; SIGKILL closes it, and the child (here one that even ignores the
    SIGTERM this sends) is gone within its deadline."""
    pids_file = tmp_path / "pids"
    parent_code = textwrap.dedent(f"""
        import sys, time
        from flows import lifeline
        proc, _ = lifeline.popen([sys.executable, "-m", "stubborn", {str(pids_file)!r}], stop_within_s=2)
        print(proc.pid, flush=True)
        time.sleep(600)
    """)
    parent = subprocess.Popen([sys.executable, "-c", parent_code], env=_env(tmp_path), stdout=subprocess.PIPE,
                              text=True, start_new_session=True)
    try:
        child = int(parent.stdout.readline())
        pids = _pids(pids_file, parent)
        assert pids[0] == child
        parent.kill()  # SIGKILL: no handler, no cleanup in the parent
        parent.wait(timeout=30)
        assert not _gone(pids, 2 + 15), "the child or its grandchild outlived its killed parent"
    finally:
        for p in ([parent.pid] if parent.poll() is None else []):
            os.kill(p, signal.SIGKILL)


def test_only_python_modules_go_on_a_lifeline():
    import pytest

    with pytest.raises(ValueError, match="python -m MODULE"):
        lifeline.popen(["sleep", "1"])

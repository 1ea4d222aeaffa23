"""Bounded lives for the processes danqing starts: they end when their parent ends, and stop within a deadline.

`python -m flows.lifeline [--parent-fd FD] [--stop-within S] MODULE ARGS...` runs MODULE in this process as
`python -m MODULE ARGS...` would, with two guards:

- `--parent-fd FD`: a thread reads the pipe FD whose write end only the parent holds. The kernel closes that end
  when the parent exits for any reason, SIGKILL and the OOM killer included, so the read returns end-of-file and
  this process is sent SIGTERM (its own graceful stop). A pipe, not Linux's PR_SET_PDEATHSIG: that fires when
  the parent *thread* that forked ends (a server started from a worker thread would die with the thread), it
  needs a getppid() re-check for a parent that died before the child set it, and it is Linux-only; end-of-file
  on a pipe has none of these gaps (Dask watches its worker processes the same way).
- `--stop-within S`: from the first SIGTERM or SIGINT, the program's own handler runs as before, and S seconds
  later whatever is left of it and of its descendants is killed. Prefect's process worker answers SIGTERM by
  waiting for its flow-run processes (which it starts in sessions of their own, out of reach of a signal to its
  group) and for its last API calls, which a busy server's retries can stretch past a minute.
"""

from __future__ import annotations

import argparse
import os
import runpy
import signal
import subprocess
import sys
import threading
import time

STOP_WITHIN_S = 20.0  # from a stop signal (or the parent's end) to a hard stop of the process and its descendants
EXIT_KILLED = 128 + signal.SIGTERM  # the exit status after a hard stop: ended by a stop signal


def popen(args: list[str], stop_within_s: float = STOP_WITHIN_S, **kwargs) -> tuple[subprocess.Popen, int]:
    """Start `python -m MODULE ...` (args = [sys.executable, "-m", MODULE, ...]) on a lifeline: (the process,
    the pipe's write end, to close once the process has stopped)."""
    if args[1:2] != ["-m"]:
        raise ValueError(f"a lifeline runs `python -m MODULE ...`, not {args[:3]}")
    read_end, write_end = os.pipe()  # both non-inheritable: only this child gets the read end (pass_fds)
    try:
        proc = subprocess.Popen([args[0], "-m", __name__, "--parent-fd", str(read_end), "--stop-within",
                                 str(stop_within_s), *args[2:]], pass_fds=(read_end,), **kwargs)
    except BaseException:
        os.close(write_end)
        raise
    finally:
        os.close(read_end)  # ours would keep the pipe open after this process ends
    return proc, write_end


class Deadline:
    """Arms once, at the first stop signal: after `seconds`, kill the descendants and end this process."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self._armed = threading.Event()

    def arm(self) -> None:
        if self._armed.is_set():
            return
        self._armed.set()
        threading.Thread(target=self._expire, name="stop-deadline", daemon=True).start()

    def _expire(self) -> None:
        time.sleep(self.seconds)
        kill_descendants()
        os._exit(EXIT_KILLED)

    def guard(self, handler):
        """`handler`, arming the deadline first (what `signal.signal` installs for a stop signal)."""
        if not callable(handler):
            return handler

        def guarded(signum, frame):
            self.arm()
            return handler(signum, frame)

        return guarded


def kill_descendants() -> None:
    """SIGKILL every process below this one, children in sessions of their own included (read before killing:
    an orphan is re-parented and out of sight)."""
    import psutil

    try:
        family = psutil.Process().children(recursive=True)
    except psutil.Error:
        return
    for proc in family:
        try:
            proc.kill()
        except psutil.Error:
            pass


def guard_stop_signals(deadline: Deadline) -> None:
    """Every handler the program installs for SIGTERM or SIGINT also arms `deadline`; until it installs one,
    the default behaviour stands, with the deadline armed."""
    install = signal.signal

    def guarded_signal(signum, handler):
        return install(signum, deadline.guard(handler) if signum in (signal.SIGTERM, signal.SIGINT) else handler)

    signal.signal = guarded_signal

    def default_term(signum, frame):
        deadline.arm()
        install(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)

    install(signal.SIGTERM, default_term)  # SIGINT keeps Python's KeyboardInterrupt, now also arming
    install(signal.SIGINT, deadline.guard(signal.default_int_handler))


def watch_parent(fd: int) -> threading.Thread:
    """A daemon thread that sends this process SIGTERM once every writer of pipe `fd` is gone."""

    def run() -> None:
        with os.fdopen(fd, "rb", buffering=0) as pipe:
            while pipe.read(1):  # nothing is written; only end-of-file ends the wait
                pass
        os.kill(os.getpid(), signal.SIGTERM)

    thread = threading.Thread(target=run, name="parent-watch", daemon=True)
    thread.start()
    return thread


def run_module(module: str, args: list[str], stop_within_s: float | None = STOP_WITHIN_S,
               parent_fd: int | None = None) -> None:
    """Run `python -m module args...` in this process under the guards."""
    if stop_within_s is not None:
        guard_stop_signals(Deadline(stop_within_s))
    if parent_fd is not None:
        watch_parent(parent_fd)
    sys.argv = [module, *args]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m flows.lifeline", description=__doc__.splitlines()[0])
    p.add_argument("--parent-fd", type=int, help="a pipe whose end-of-file means the parent has ended")
    p.add_argument("--stop-within", type=float, default=STOP_WITHIN_S, help="seconds from a stop signal to a "
                                                                            "hard stop (default %(default)s)")
    p.add_argument("module")
    p.add_argument("args", nargs=argparse.REMAINDER)
    ns = p.parse_args()
    run_module(ns.module, ns.args, ns.stop_within, ns.parent_fd)


if __name__ == "__main__":
    main()

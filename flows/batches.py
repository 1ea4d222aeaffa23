"""A run in batches: its WARC list split in listing order, each batch its own flow run and its own run directory.

A batch holds a whole run's layout under `<run>/batches/<k>/` (dataset/, rejects/, steps/, reduce/, report.json)
and its own id in LanceDB, `<run-id>-b<k>`. Stages 1-3 and the in-batch dedup run inside the batch; its
cross-batch search and commit run after the batch before it has committed (the output root's commit register
orders them), so a batch is compared against every batch and every run committed before it. The run directory
holds `run.json` (the plan) and the merged report, written once every batch has committed.

Run-wide values are per batch: the alignment band is fitted on each batch's scores (unless fixed), the entropy
rule's corpus (`entropy_corpus: run`) is the batch's captions, and the k-means cluster sizes are each batch's;
the merged report lists each batch's band and sums the counts.
"""

from __future__ import annotations

import contextvars
import json
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from flows.engine import reduce_marker
from flows.settings import CurateParams, idempotency_key

BATCHES = "batches"


@dataclass(frozen=True)
class Batch:
    index: int
    warcs: tuple[str, ...]


def plan(warcs: list[str], batch_size: int) -> list[Batch]:
    """The batches of a run, in listing order."""
    return [Batch(k, tuple(warcs[i:i + batch_size])) for k, i in enumerate(range(0, len(warcs), batch_size))]


def batch_dir(run_dir: Path, index: int) -> Path:
    return Path(run_dir) / BATCHES / f"{index:04d}"


def batch_run_id(run_id: str, index: int) -> str:
    """The batch's run id in LanceDB and the commit register."""
    return f"{run_id}-b{index}"


def child_params(params: CurateParams, batch: Batch, run_id: str, lancedb: str, run_warcs: list[str],
                 index_parts: Path | None = None) -> CurateParams:
    """The batch's flow-run parameters: its own WARC files (no listing to read again), the run's id and output
    root, the root's LanceDB; only the first batch waits for what the run itself waits for before committing.
    The replay fetcher replays from all the run's WARC files: a page's images may lie in another batch's.
    `index_parts`: the run's one pass over the columnar index, where the batch reads its rows (`<k>.parquet`)."""
    return params.model_copy(update={
        "warcs": list(batch.warcs), "warc_limit": None, "warc_offset": 0, "run_id": run_id, "batch": batch.index,
        "lancedb": lancedb, "commit_after": list(params.commit_after) if batch.index == 0 else [],
        "replay_from": run_warcs if params.fetcher == "replay" else [],
        "cc_index_part": None if index_parts is None else str(Path(index_parts) / f"{batch.index}.parquet"),
    })


def settings_key(params: CurateParams, models: dict) -> str:
    """What a batch's committed rows depend on, as one key: a committed batch is reused only under the same key.
    The recaption step (after the commit) is left out: it changes no committed row, and `recaption_current` says
    whether a committed batch still needs it."""
    params = params.model_copy(update={"models": {r: m for r, m in params.models.items() if r != "recaption"},
                                       "config": {s: v for s, v in params.config.items() if s != "recaption"}})
    kept = {r: m for r, m in models.items() if r != "recaption"}
    return idempotency_key(params) + ":" + json.dumps(kept, sort_keys=True, default=str)


def recaption_current(run_dir: Path, wanted: dict | None) -> bool:
    """Whether a committed batch's report shows the recaption the run asks for (`wanted`: model, revision,
    prompt and max_new_tokens; None when off); a batch without it runs again, reusing every finished step."""
    if wanted is None:
        return True
    done = json.loads((Path(run_dir) / "report.json").read_text()).get("recaption") or {}
    return bool(done.get("ran")) and all(done.get(k) == v for k, v in wanted.items())


def committed(run_dir: Path) -> bool:
    """The batch finished: its commit is recorded and its report written (the report is written last)."""
    return reduce_marker(run_dir, "commit").is_file() and (run_dir / "report.json").is_file()


def check_reuse(run_dir: Path, key: str, index: int) -> bool:
    """Whether the batch has committed. One committed under other settings or another model is refused: its rows
    are in the shared LanceDB table as committed, and recomputing it would mix two settings in one run."""
    recorded = run_dir / "run.json"
    if not committed(run_dir):
        return False
    old = json.loads(recorded.read_text()).get("settings_key") if recorded.is_file() else None
    if old is not None and old != key:
        raise ValueError(f"batch {index} ({run_dir}) was committed with other settings or another model; "
                         "curate into a new --out (or --run-id) rather than mixing two settings in one run")
    return True


class BatchOrderError(RuntimeError):
    """A batch cannot commit: the batch before it failed, and batches commit in order."""


class _Order:
    """In-process commit order: batch k commits only after batch k-1 has committed."""

    def __init__(self, n: int):
        self.done = [threading.Event() for _ in range(n)]
        self.failed: set[int] = set()

    def finish(self, k: int, ok: bool) -> None:
        if not ok and not self.done[k].is_set():  # a batch that failed after its commit (recaptioning) committed
            self.failed.add(k)
        self.done[k].set()

    def wait_turn(self, k: int) -> None:
        if k == 0:
            return
        self.done[k - 1].wait()
        if k - 1 in self.failed:
            raise BatchOrderError(f"batch {k - 1} failed, so batch {k} does not commit before it; "
                                  "re-run the same command to resume both")


# Batch run id -> its place in the commit order (the order, its index), for the batches a parent runs in this process.
_TURNS: dict[str, tuple[_Order, int]] = {}


def has_committed(run_id: str) -> None:
    """Called by a batch once its commit is done: the next batch may commit while this one recaptions."""
    if run_id in _TURNS:
        order, k = _TURNS[run_id]
        order.finish(k, True)


def wait_turn(run_id: str) -> None:
    """Called by a batch before its cross-batch search: returns once the batches before it have committed."""
    if run_id in _TURNS:
        order, k = _TURNS[run_id]
        order.wait_turn(k)


def run_in_process(plan: list[Batch], done: set[int], run_id: str, parallel: int,
                   run_batch: Callable[[Batch], dict]) -> dict[int, dict | BaseException]:
    """Each batch not in `done` (committed before) through `run_batch` (a child flow run), `parallel` at a time,
    committing in batch order. Returns batch index -> its result or the error it failed with; a failed batch
    stops only the commits after it."""
    order = _Order(len(plan))
    for k in done:
        order.finish(k, True)
    outcome: dict[int, dict | BaseException] = {}

    def one(batch: Batch):
        _TURNS[batch_run_id(run_id, batch.index)] = (order, batch.index)
        try:
            outcome[batch.index] = run_batch(batch)
            order.finish(batch.index, True)
        except BaseException as err:  # noqa: BLE001 - recorded, and raised by the parent naming the batch
            outcome[batch.index] = err
            order.finish(batch.index, False)
        finally:
            _TURNS.pop(batch_run_id(run_id, batch.index), None)

    with ThreadPoolExecutor(max_workers=parallel, thread_name_prefix="batch") as pool:
        # each thread runs its flow in a copy of this context: the batches are child runs of this flow run
        futures = [pool.submit(contextvars.copy_context().run, one, b) for b in plan if b.index not in done]
        for f in futures:
            f.result()
    return outcome


def run_deployed(plan: list[Batch], child_of: Callable[[Batch], CurateParams], done: set[int], deployment: str,
                 name: str, parallel: int, poll_s: float = 5.0,
                 stall_warn_s: float = 600.0) -> dict[int, dict | BaseException]:
    """Each batch not in `done` as a run of the deployment (a child of this flow run) that a worker picks up, so the
    UI's Retry retries one batch; at most `parallel` of them unfinished at a time (each is a flow-run process on a
    worker), created in batch order. Batch k commits after batch k-1's run completes (its `commit_after`)."""
    from uuid import UUID

    from prefect import get_run_logger
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment
    from prefect.runtime import flow_run

    log = get_run_logger()
    todo = [b for b in plan if b.index not in done]
    runs: dict[int, str] = {}
    outcome: dict[int, dict | BaseException] = {}
    last_change = time.monotonic()

    def start(b: Batch) -> None:
        child = child_of(b)
        before = runs.get(b.index - 1)
        if before is not None:
            child = child.model_copy(update={"commit_after": [before]})
        # one child per batch per attempt of this parent: retrying the parent runs its failed batches again
        key = f"{idempotency_key(child)}:{flow_run.id}:{flow_run.run_count}"
        run = run_deployment(deployment, parameters={"params": child.model_dump(mode="json")}, timeout=0,
                             idempotency_key=key, flow_run_name=f"{name}-b{b.index}", as_subflow=True)
        runs[b.index] = str(run.id)

    with get_client(sync_client=True) as client:
        while len(outcome) < len(todo):
            while todo[len(runs):] and len(runs) - len(outcome) < parallel:
                start(todo[len(runs)])
            running = 0
            for k, run_id in runs.items():
                if k in outcome:
                    continue
                state = client.read_flow_run(UUID(run_id)).state
                running += bool(state is not None and state.is_running())
                if state is not None and state.is_final():
                    last_change = time.monotonic()
                    outcome[k] = {} if state.is_completed() else RuntimeError(
                        f"flow run {name}-b{k} ended {state.type.value}: {state.message or ''}".strip())
            if running:
                last_change = time.monotonic()
            elif time.monotonic() - last_change > stall_warn_s:
                log.warning("no batch has started for %.0f s: the batches need worker slots besides the one this "
                            "run holds (a worker started with --limit 1 cannot run them)", stall_warn_s)
                last_change = time.monotonic()
            if len(outcome) < len(todo):
                time.sleep(poll_s)
    return outcome


def failures(outcome: dict[int, dict | BaseException]) -> str | None:
    """One line naming the batches that failed and why, or None."""
    bad = {k: v for k, v in sorted(outcome.items()) if isinstance(v, BaseException)}
    if not bad:
        return None
    first = [k for k, v in bad.items() if not isinstance(v, BatchOrderError)] or list(bad)
    why = "; ".join(f"batch {k}: {type(bad[k]).__name__}: {bad[k]}" for k in first[:3])
    waiting = sorted(set(bad) - set(first))
    tail = f"; batch(es) {waiting} not committed after it" if waiting else ""
    return (f"{len(bad)} of {len(outcome)} batch(es) did not commit ({why}{tail}); the committed batches stay, "
            "and re-running the same command does only what is missing")

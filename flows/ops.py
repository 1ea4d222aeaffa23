"""Operations on a Prefect server: per-snapshot runs with idempotency keys, the newest crawl, backfills."""

from __future__ import annotations

import sys
from pathlib import Path

from prefect import flow, get_run_logger

from flows.settings import CurateParams, cc_config, idempotency_key, run_name

DEPLOYMENT = "curate-snapshot/curate-snapshot"  # flow name / deployment name, as deployments/prefect.yaml has it
POOLS = ("danqing-cpu", "danqing-gpu")


def trigger(params: CurateParams, deployment: str = DEPLOYMENT, as_subflow: bool = False):
    """Create (or find, by idempotency key) the curate-snapshot run for `params`; returns without waiting."""
    from prefect.deployments import run_deployment

    return run_deployment(
        deployment, parameters={"params": params.model_dump(mode="json")}, timeout=0,
        idempotency_key=idempotency_key(params), flow_run_name=run_name(params), as_subflow=as_subflow,
        tags=[f"snapshot:{params.snapshot}"] if params.snapshot else None,
    )


def curated(out: str, snapshot: str) -> bool:
    """Whether a finished run of `snapshot` (its report written last) is under the output root."""
    return any(Path(out).glob(f"{snapshot}-*/report.json"))


def _template(template: CurateParams | None) -> CurateParams:
    return template or CurateParams()


@flow(name="curate-latest", log_prints=True)
def curate_latest(template: CurateParams | None = None, lookback: int = 1, deployment: str = DEPLOYMENT) -> dict:
    """The newest Common Crawl snapshot (of the `lookback` newest) not yet curated under the output root,
    triggered as one curate-snapshot run; its idempotency key makes a second trigger a no-op."""
    from tasks.io.cc import list_crawls

    log = get_run_logger()
    template = _template(template)
    crawls = [c["id"] for c in list_crawls(cc_config(template))][: max(1, lookback)]
    todo = [c for c in crawls if not curated(template.out, c)]
    if not todo:
        log.info("the newest snapshot(s) %s are curated under %s: nothing to do", ", ".join(crawls), template.out)
        return {"snapshot": None, "flow_run": None}
    params = template.model_copy(update={"snapshot": todo[0], "warcs": []})
    run = trigger(params, deployment, as_subflow=True)
    log.info("snapshot %s: flow run %s (%s)", todo[0], run.name, run.id)
    return {"snapshot": todo[0], "flow_run": str(run.id)}


def snapshot_range(ids: list[str], first: str, last: str) -> list[str]:
    """The crawls from `first` to `last` inclusive, oldest first, out of collinfo's newest-first list."""
    missing = [s for s in (first, last) if s not in ids]
    if missing:
        raise ValueError(f"unknown Common Crawl snapshot(s) {missing}; the newest known are: {', '.join(ids[:5])}")
    a, b = sorted((ids.index(first), ids.index(last)))
    return list(reversed(ids[a:b + 1]))


@flow(name="backfill", log_prints=True)
def backfill(snapshots: list[str] | None = None, first: str | None = None, last: str | None = None,
             template: CurateParams | None = None, deployment: str = DEPLOYMENT) -> list[dict]:
    """One curate-snapshot run per snapshot (a list, or the range first..last), each a child of this run."""
    from prefect.artifacts import create_markdown_artifact

    from tasks.io.cc import list_crawls

    template = _template(template)
    ids = [c["id"] for c in list_crawls(cc_config(template))]
    if snapshots:
        unknown = [s for s in snapshots if s not in ids]
        if unknown:
            raise ValueError(f"unknown Common Crawl snapshot(s) {unknown}; the newest known are: {', '.join(ids[:5])}")
        chosen = list(dict.fromkeys(snapshots))
    elif first or last:
        chosen = snapshot_range(ids, first or last, last or first)
    else:
        raise ValueError("give snapshots, or first and last of a range")
    chosen.sort(key=lambda s: -ids.index(s))  # oldest first: collinfo lists the newest first
    runs = []
    for snapshot in chosen:
        # each run waits for the earlier snapshots' runs before it commits: the backfill commits in snapshot order
        params = template.model_copy(update={"snapshot": snapshot, "warcs": [],
                                             "commit_after": [r["flow_run"] for r in runs]})
        run = trigger(params, deployment, as_subflow=True)
        runs.append({"snapshot": snapshot, "flow_run": str(run.id), "name": run.name})
    from prefect.settings import PREFECT_UI_URL

    ui = PREFECT_UI_URL.value()  # Prefect derives it from the API's address
    rows = "\n".join(f"| {r['snapshot']} | [{r['name']}]({ui}/runs/flow-run/{r['flow_run']}) |" if ui else
                     f"| {r['snapshot']} | {r['name']} ({r['flow_run']}) |" for r in runs)
    create_markdown_artifact(f"| snapshot | curate-snapshot run |\n|---|---|\n{rows}\n", key="backfill-runs",
                             description=f"backfill of {len(runs)} snapshot(s)")
    return runs


ZOMBIE_AUTOMATION = "danqing: crash flow runs without heartbeats"


def ensure_zombie_automation(after_s: float | None = None) -> None:
    """An automation that marks a flow run crashed when its heartbeats stop (a killed worker or machine), so
    the UI shows it and a retry resumes from its complete shards; created once per server."""
    from datetime import timedelta

    from prefect.automations import Automation
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.objects import StateType
    from prefect.events.actions import ChangeFlowRunState
    from prefect.events.schemas.automations import EventTrigger, Posture
    from prefect.events.schemas.events import ResourceSpecification

    from flows.settings import zombie_after_s

    with get_client(sync_client=True) as client:
        if client.read_automations_by_name(ZOMBIE_AUTOMATION):
            return
    ends = ("heartbeat", "Completed", "Failed", "Cancelled", "Crashed")
    Automation(
        name=ZOMBIE_AUTOMATION,
        trigger=EventTrigger(
            after={"prefect.flow-run.heartbeat"},
            expect={f"prefect.flow-run.{e}" for e in ends},
            match=ResourceSpecification({"prefect.resource.id": ["prefect.flow-run.*"]}),
            for_each={"prefect.resource.id"},
            posture=Posture.Proactive,
            threshold=1,
            within=timedelta(seconds=after_s or zombie_after_s()),
        ),
        actions=[ChangeFlowRunState(state=StateType.CRASHED,
                                    message="no heartbeat: its worker or machine stopped; retry to resume")],
    ).create()


def ensure_limits(gpu_slots: int = 1) -> None:
    """The server-side objects the deployments rely on: the work pools, the `gpu` tag limit, and the automation
    that marks runs whose heartbeats stopped as crashed."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectAlreadyExists

    from flows.runtime import ensure_gpu_limit

    ensure_gpu_limit(gpu_slots)
    ensure_zombie_automation()
    with get_client(sync_client=True) as client:
        for pool in POOLS:
            try:
                client.create_work_pool(WorkPoolCreate(name=pool, type="process"))
            except ObjectAlreadyExists:
                pass


def ensure_limits_step(gpu_slots: int = 1) -> dict:
    """deployments/prefect.yaml's build step (Prefect calls it by name at `prefect deploy`)."""
    ensure_limits(gpu_slots)
    return {"pools": list(POOLS), "gpu_limit": "gpu"}


if __name__ == "__main__":  # `python -m flows.ops ensure-limits`: the deploy step of deployments/prefect.yaml
    if sys.argv[1:2] == ["ensure-limits"]:
        ensure_limits(int(sys.argv[2]) if len(sys.argv) > 2 else 1)
    else:
        sys.exit("usage: python -m flows.ops ensure-limits [GPU_SLOTS]")

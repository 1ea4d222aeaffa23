"""The resume engine: the run context, where each step's files go, typed markers, and reuse policies."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path
from typing import Any, NamedTuple

import pandas as pd

from flows import tls
from flows.settings import build_config
from schemas import contracts as C
from tasks import write as write_stage
from tasks.io import shards
from tasks.io.retry import is_transient_error
from tasks.models import ResolvedModel

tls.install()  # every process that runs a step (the flow's, each Dask worker's): one TLS context for Prefect

CODE_VERSION = version("danqing")  # part of every step hash: a release that changes behaviour recomputes


@dataclass(frozen=True)
class RunContext:
    """What every task needs, small and picklable: paths, configs, resolved models."""

    run_dir: str
    run_id: str
    lancedb: str
    config: dict = field(default_factory=dict)  # section -> overrides
    models: dict[str, ResolvedModel] = field(default_factory=dict)  # role -> model, revision read once at the start
    fetcher: str = "http"
    retry_failed: bool = False  # fetch again the transient failures recorded in finished fetch shards
    max_failure_fraction: float = 0.01
    snapshot: str | None = None

    def cfg(self, section: str):
        return build_config(section, self.config.get(section))

    @property
    def root(self) -> Path:
        return Path(self.run_dir)

    def model_key(self, role: str) -> list | None:
        """What identifies a role's model in a resume hash (its revision included), or None when the run has none."""
        model = self.models.get(role)
        return None if model is None else [*model_ref(model), model.revision]

    def step_path(self, step: str, shard: str, suffix: str = ".parquet") -> Path:
        return self.root / "steps" / step / f"{shard}{suffix}"

    def marker_path(self, step: str, shard: str) -> Path:
        return self.step_path(step, shard, ".done.json")

    def read(self, step: str, shard: str) -> pd.DataFrame:
        """A shard step's kept rows."""
        return shards.read_parquet(self.step_path(step, shard))

    def column(self, step: str, shard: str, name: str) -> pd.Series:
        """One column of a step's kept rows: the reduces need keys or scores, not every caption and score."""
        return shards.read_parquet(self.step_path(step, shard), columns=[name])[name]

    def rel(self, path: Path) -> str:
        """Marker paths are relative to the run directory, so a run can be moved or copied whole."""
        return str(path.relative_to(self.root))


def model_ref(model: ResolvedModel) -> tuple[str, bool, str]:
    """(name, placeholder, source): how run.json and the resume hashes name a model."""
    return model.name, model.placeholder, model.source


@dataclass(frozen=True)
class Marker:
    """A finished step's completion marker: its hash, its outputs (relative to the run) and what it counted."""

    hash: str
    root: str = field(compare=False, repr=False)  # the run directory the outputs are relative to
    outputs: tuple[str, ...] = ()
    step: str | None = None  # a shard step's name ...
    reduce: str | None = None  # ... or a reduce's
    shard: str | None = None
    stage: str | None = None  # the reported stage a shard step counts toward
    rows_in: int = 0
    kept: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    samples: int | None = None  # the write step's rows
    extra: dict[str, Any] = field(default_factory=dict)
    seconds: float | None = None
    base: str | None = None  # the hash of the inputs alone, when `hash` also covers a recompute (--retry-failed)

    _KEYS = {"rows_in": "in"}  # field -> key in the marker file

    def output(self, suffix: str) -> Path:
        """The output file whose name ends with `suffix`."""
        return Path(self.root) / next(p for p in self.outputs if p.endswith(suffix))

    @property
    def inputs_hash(self) -> str:
        return self.base or self.hash

    def complete(self) -> bool:
        return all((Path(self.root) / p).exists() for p in self.outputs)

    def to_json(self) -> dict:
        body = {}
        for name in ("hash", "base", "step", "reduce", "stage", "shard", "rows_in", "kept", "dropped", "samples",
                     "extra", "outputs", "seconds"):
            value = getattr(self, name)
            if value is None or (name in ("rows_in", "kept", "dropped") and self.stage is None):
                continue
            body[self._KEYS.get(name, name)] = list(value) if name == "outputs" else value
        return body

    @classmethod
    def from_json(cls, root: Path, body: dict) -> Marker:
        names = {cls._KEYS.get(n, n): n for n in cls.__dataclass_fields__ if n != "root"}
        values = {names[k]: v for k, v in body.items() if k in names}
        values["outputs"] = tuple(values.get("outputs", ()))
        return cls(root=str(root), **values)


# A reuse policy looks at a finished, matching marker: None reuses it as it is; anything else is handed to the
# step's compute as `prior`, and the step runs again under a hash that also names the marker it revises.
ReusePolicy = Callable[[Marker], Any]


def reuse_finished(marker: Marker) -> None:
    return None


def _digest(identity: dict) -> str:
    return shards.stable_hash({**identity, "version": CODE_VERSION})


def read_marker(root: Path, path: Path) -> Marker | None:
    body = shards.read_json(path)  # anything but a marker's body (a hand edit, say) is no marker: recompute
    return Marker.from_json(root, body) if isinstance(body, dict) and "hash" in body else None


def resume(ctx: RunContext, mpath: Path, identity: dict, produce: Callable[[Any], dict],
           policy: ReusePolicy = reuse_finished) -> Marker:
    """The one resume mechanism: the marker at `mpath` is reused when its hash of `identity` (plus the code
    version) matches, its outputs exist and `policy` has no objection; else `produce(prior)` writes the outputs
    and returns the marker's fields, and the marker is written last."""
    base = _digest(identity)
    old = read_marker(ctx.root, mpath)
    prior = None
    if old is not None and old.inputs_hash == base and old.complete():
        prior = policy(old)
        if prior is None:
            return old
        identity = {**identity, "retry_of": old.hash}
    digest = _digest(identity)
    marker = Marker(hash=digest, root=str(ctx.root), base=base if digest != base else None, **produce(prior))
    shards.write_json(marker.to_json(), mpath)
    return marker


class Computed(NamedTuple):
    """What a shard step's compute returns."""

    frame: pd.DataFrame  # the step's rows, each with its drop_reason (NA: kept)
    extra: dict | None = None  # stats for the marker (None: none; not a shared {} default every marker would hold)
    frames: dict[str, pd.DataFrame] | None = None  # further files to store: suffix -> frame


def run_shard_step(ctx: RunContext, step: str, stage: str, schema: type, shard: str, inputs: list,
                   compute: Callable[..., Computed], config: dict | None = None, blobs: dict[str, str] | None = None,
                   policy: ReusePolicy = reuse_finished) -> Marker:
    """Skip when the marker matches; else compute, validate against `schema`, write kept rows and rejects, mark.

    `blobs` moves a bytes column of the kept rows into its own key -> bytes file (suffix -> column), so bulky
    image bytes are written once and not copied through every later stage. A step whose `policy` asks for a
    recompute gets what the policy returned as `compute(prior)`.
    """
    identity = {"step": step, "config": config or {}, "inputs": inputs}

    def produce(prior) -> dict:
        started = time.perf_counter()
        result = compute() if prior is None else compute(prior)
        stored = _store(ctx, step, stage, schema, shard, result, blobs)
        return {**stored, "seconds": round(time.perf_counter() - started, 3)}

    return resume(ctx, ctx.marker_path(step, shard), identity, produce, policy)


def _store(ctx: RunContext, step: str, stage: str, schema: type, shard: str, result: Computed,
           blobs: dict[str, str] | None) -> dict:
    frame = result.frame
    dropped_rows = frame[frame["drop_reason"].notna()]
    kept = frame[frame["drop_reason"].isna()].drop(columns=["drop_reason"])
    kept, quarantined = C.validate(schema, kept, stage, ctx.max_failure_fraction)
    dropped_rows = pd.concat([dropped_rows, quarantined]) if len(quarantined) else dropped_rows
    out = ctx.step_path(step, shard)
    rejects = ctx.root / "rejects" / f"{step}-{shard}.parquet"
    outputs = [ctx.rel(out), ctx.rel(rejects)]
    for suffix, col in (blobs or {}).items():
        path = ctx.step_path(step, shard, suffix)
        index = shards.write_blobs(kept["key"].tolist(), kept[col].tolist(), path)
        kept = kept.drop(columns=[col])
        outputs += [ctx.rel(path), ctx.rel(index)]
    shards.write_parquet(kept, out)
    shards.write_parquet(write_stage.rejects(dropped_rows), rejects)
    for suffix, extra_frame in (result.frames or {}).items():
        path = ctx.step_path(step, shard, suffix)
        shards.write_parquet(extra_frame, path)
        outputs.append(ctx.rel(path))
    counts = dropped_rows["drop_reason"].value_counts().to_dict()
    return {"step": step, "stage": stage, "shard": shard, "rows_in": int(len(frame)), "kept": int(len(kept)),
            "dropped": {str(k): int(v) for k, v in sorted(counts.items())}, "extra": dict(result.extra or {}),
            "outputs": tuple(outputs)}


def reduce_marker(run_dir: Path, name: str) -> Path:
    """Where a run's reduce `name` records that it finished."""
    return Path(run_dir) / "reduce" / f"{name}.done.json"


def run_reduce(ctx: RunContext, name: str, suffix: str, inputs: list, build: Callable[[Path], dict]) -> Marker:
    """A resumable barrier over all shards of a step: `build(out)` writes one artifact and returns its stats."""
    out = ctx.root / "reduce" / f"{name}{suffix}"

    def produce(_prior) -> dict:
        extra = build(out)
        return {"reduce": name, "outputs": (ctx.rel(out),) if out.exists() else (), "extra": extra}

    return resume(ctx, reduce_marker(ctx.root, name), {"reduce": name, "inputs": inputs}, produce)


def retry_transient(task, task_run, state) -> bool:
    """Prefect's retry condition: only what may succeed next time (connection drops, time-outs), not bugs or data."""
    try:
        state.result()
    except Exception as error:  # noqa: BLE001 - the error is classified, not handled
        return is_transient_error(error)
    return False


def shard_ids(warcs: list[str]) -> list[str]:
    return [f"{i:05d}" for i in range(len(warcs))]


def clean_temp(run_dir: Path) -> None:
    """Remove temp files a killed task left behind (they never replace a finished file)."""
    for p in run_dir.rglob(".*.tmp-*"):
        try:
            p.unlink()
        except OSError:
            pass

"""The one place that reads the environment, and the typed parameters of a curation run."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import fields, is_dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, field_validator

from tasks.align import AlignConfig
from tasks.crossbatch import CrossbatchConfig
from tasks.dedup import DedupConfig
from tasks.embed import EmbedConfig
from tasks.extract import ExtractConfig
from tasks.fetch import FetchConfig
from tasks.image import ImageConfig
from tasks.io.ccconfig import CCConfig
from tasks.io.http import HttpConfig
from tasks.io.replay import ReplayConfig
from tasks.recaption import RecaptionConfig
from tasks.refine import RefineConfig
from tasks.release import ReleaseConfig
from tasks.source import SourceConfig

DEFAULT_OUT = "./danqing-out"

# Every tunable section of a thresholds file and the frozen config it builds.
CONFIG_SECTIONS: dict[str, type] = {
    "extract": ExtractConfig,
    "source": SourceConfig,
    "fetch": FetchConfig,
    "http": HttpConfig,
    "replay": ReplayConfig,
    "refine": RefineConfig,
    "image": ImageConfig,
    "embed": EmbedConfig,
    "dedup": DedupConfig,
    "align": AlignConfig,
    "crossbatch": CrossbatchConfig,
    "cc": CCConfig,
    "recaption": RecaptionConfig,
    "release": ReleaseConfig,
}


# Old spellings still read, (section, setting) -> the (section, setting) that holds the value now.
ALIASES: dict[tuple[str, str], tuple[str, str]] = {
    ("dedup", "nprobe"): ("dedup", "nprobes"),  # one spelling with the cross-batch search's nprobes
    ("crossbatch", "threshold"): ("dedup", "threshold"),  # one radius: a duplicate within a batch or across
}


def canonical_config(config: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The config with every old spelling under its current name; one setting given under two spellings with
    different values is a clear error."""
    out: dict[str, dict[str, Any]] = {section: {} for section in config}
    spelled: dict[tuple[str, str], str] = {}
    for section, values in config.items():
        for name, value in (values or {}).items():
            target = ALIASES.get((section, name), (section, name))
            held = out.setdefault(target[0], {})
            if target[1] in held and held[target[1]] != value:
                raise ValueError(f"{'.'.join(target)} given twice with different values: {spelled[target]} = "
                                 f"{held[target[1]]!r} and {section}.{name} = {value!r}")
            held[target[1]], spelled[target] = value, f"{section}.{name}"
    return out


# One batch's flow run stays small (a few thousand task runs) while a snapshot (~90,000 WARCs) is ~90 batches.
DEFAULT_BATCH_SIZE = 1000
TRIM_EVERY_S = 10.0  # how often the flow process and (by default) each Dask worker hands free pages back


class LocalClusterSpec(BaseModel):
    """The Dask LocalCluster started when no scheduler address is given."""

    n_workers: int = Field(default_factory=lambda: max(1, min(4, os.cpu_count() or 1)))
    threads_per_worker: int = 1  # one model copy per worker process; threads would share the GIL anyway
    processes: bool = True  # False: threads in this process (debugging, in-process tests)
    memory_limit: str = "6GiB"  # per worker; Dask spills and then pauses before the machine swaps
    # Dask sets MALLOC_TRIM_THRESHOLD_=65536 in workers against fragmentation; any fixed value turns off
    # glibc's adaptive mmap threshold and costs ~25% on image decoding (bench/overhead.py). None: unset.
    malloc_trim_threshold: int | None = None
    profile: bool = False  # Dask's statistical profiler (dashboard "Profile" tab); costs ~5% on CPU-bound tasks
    # Dask's developer logs (each comm's recent messages, the transition and stimulus logs) keep this many entries
    # each; a compute-task message holds the task's arguments, so at Dask's 1000 they held ~35 MB in the flow
    # process and filled only after ~25 small batches: the run's memory grew batch by batch (bench/scale.py)
    debug_log_length: int = Field(50, ge=0)
    # glibc keeps what a process frees for reuse, and fragmentation keeps it from reusing all of it: each batch's
    # peak left the workers' and the flow process's RSS higher (bench/scale.py). Every this many seconds each
    # process hands its free pages back (malloc_trim); None: never. Unlike MALLOC_TRIM_THRESHOLD_ (above) it
    # leaves glibc's adaptive mmap threshold on.
    trim_every_s: float | None = Field(TRIM_EVERY_S, gt=0)


class CurateParams(BaseModel):
    """Parameters of one curation run; the Prefect UI renders them as a form."""

    warcs: list[str] = Field(default_factory=list, description=(
        "WARC files: local paths or http(s)/s3 URLs; with a snapshot, names from its listing (empty: all of it)"))
    out: str = Field(DEFAULT_OUT, description="output root; runs go to <out>/<run-id>")
    run_id: str | None = Field(None, description="default: derived from the inputs, so a re-run resumes")
    snapshot: str | None = Field(None, description=(
        "Common Crawl snapshot id (CC-MAIN-YYYY-WW) whose WARCs to curate; with local WARC files only the "
        "name recorded (default: the WARC's isPartOf)"))
    warc_limit: int | None = Field(None, ge=0, description="snapshot: curate this many of its WARC files")
    warc_offset: int = Field(0, ge=0, description="snapshot: skip this many WARC files of its listing first")
    select: Literal["scan", "index"] = Field("scan", description=(
        "scan: read whole WARC files; index: read only the Chinese HTML records the columnar index points to"))
    cc_base_url: str | None = Field(None, description=(
        "one server holding collinfo.json and crawl-data/ instead of Common Crawl's hosts (a mirror)"))
    fetcher: Literal["http", "replay"] = Field("http", description="http: the web; replay: images held in the WARCs")
    retry_failed: bool = Field(False, description=(
        "fetch again only the URLs that failed transiently (connect errors, timeouts, 429, 5xx) in finished "
        "fetch shards, then recompute what depends on them; permanent failures are never retried"))
    models: dict[str, str | None] = Field(default_factory=dict, description="role -> HF id, local dir, or placeholder")
    config: dict[str, dict[str, Any]] = Field(default_factory=dict, description="section -> field -> value")
    lancedb: str | None = Field(None, description="LanceDB URI; default <out>/lancedb")
    max_failure_fraction: float = Field(0.01, description="row-level contract failures tolerated per shard")
    gpu_slots: int = Field(1, description="concurrent model tasks (Prefect tag 'gpu' limit)")
    gpu_resource: bool = Field(False, description="annotate model tasks with the Dask resource GPU=1")
    commit_after: list[str] = Field(default_factory=list, description=(
        "flow-run ids that must finish before this run commits (a backfill commits in snapshot order)"))
    batch_size: int = Field(DEFAULT_BATCH_SIZE, gt=0, description=(
        "WARC files per batch: a longer list runs as batches in listing order, each its own flow run under "
        "<run>/batches/<k>/, deduplicated inside the batch and then against the batches committed before it"))
    batch_parallel: int = Field(2, gt=0, description=(
        "batches curated at once (only their commits wait for each other); under a deployment, how many batch "
        "runs are unfinished at a time"))
    batch: int | None = Field(None, ge=0, description=(
        "set by a batched run's parent flow run: which of its batches this flow run curates"))
    replay_from: list[str] = Field(default_factory=list, description=(
        "set by a batched run's parent flow run: with the replay fetcher, all the run's WARC files"))
    cc_index_part: str | None = Field(None, description=(
        "set by a batched run's parent flow run (--select index): this batch's rows of the run's one pass over "
        "the columnar index"))

    @field_validator("config")
    @classmethod
    def _current_names(cls, config: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        """Every stage reads its settings from here under their current names, whatever spelling was given."""
        return canonical_config(config)


def cc_config(params: CurateParams):
    """How Common Crawl is reached: the `cc` settings, with --cc-base-url as both of its hosts."""
    values = dict(params.config.get("cc") or {})
    if params.cc_base_url:
        base = params.cc_base_url.rstrip("/")
        values.update(index_base=base, data_base=base)
    return build_config("cc", values)


def idempotency_key(params: CurateParams) -> str:
    """One key per snapshot and run settings: triggering the same snapshot again returns the run that exists.

    The snapshot id leads the key so the UI's runs read well; the hash covers everything that changes the
    run's output (selection, models, thresholds, output root), so a deliberately different run gets its own.
    """
    # ordering, and where a batch finds its index rows: not the output
    body = params.model_dump(mode="json", exclude={"commit_after", "batch_parallel", "cc_index_part"})
    digest = hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return f"curate:{params.snapshot or 'warcs'}:{digest}"


def run_name(params: CurateParams) -> str:
    """The flow-run name: the snapshot id (or the first WARC file's name) and a short key."""
    what = params.snapshot or (Path(params.warcs[0]).name.split(".")[0] if params.warcs else "empty")
    return f"{what}-{idempotency_key(params)[-6:]}"


def build_config(section: str, values: dict[str, Any] | None):
    """The frozen config of one section, with overrides (old spellings read); unknown names are a clear error."""
    cls = CONFIG_SECTIONS[section]
    config = canonical_config({section: dict(values or {})})
    elsewhere = sorted(f"{s}.{n}" for s, moved in config.items() if s != section for n in moved)
    if elsewhere:
        raise ValueError(f"section {section!r}: old spelling(s) of {elsewhere}, which another section reads; "
                         "pass the whole config through check_config")
    values = config[section]
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"unknown setting(s) {unknown} in section {section!r}; known: {sorted(known)}")
    return cls(**{k: _tuples(v) for k, v in values.items()})


def _tuples(v):
    """JSON and YAML give lists where the configs are frozen tuples."""
    return tuple(_tuples(x) for x in v) if isinstance(v, list) else v


def check_config(config: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The config under its current names, once every section of it builds."""
    unknown = sorted(set(config) - set(CONFIG_SECTIONS))
    if unknown:
        raise ValueError(f"unknown section(s) {unknown}; known: {sorted(CONFIG_SECTIONS)}")
    config = canonical_config(config)
    for section, values in config.items():
        build_config(section, values)
    return config


def load_thresholds(path: str) -> dict[str, dict[str, Any]]:
    """A thresholds file: JSON or YAML mapping section -> field -> value; returned under the current names."""
    text = Path(path).read_text()
    if path.endswith((".yaml", ".yml")):
        import yaml

        data = yaml.safe_load(text) or {}
    else:
        data = json.loads(text)
    if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
        raise ValueError(f"{path}: expected a mapping of section -> settings")
    return check_config(data)


def config_dict(obj) -> dict:
    return {f.name: getattr(obj, f.name) for f in fields(obj)} if is_dataclass(obj) else dict(obj)


def env(name: str, default: str | None = None) -> str | None:
    return os.environ.get(name, default)


def prefect_api_url() -> str | None:
    return env("PREFECT_API_URL") or None


def zombie_after_s() -> float:
    """How long a flow run may go without a heartbeat before it is marked crashed: DANQING_ZOMBIE_AFTER_S, else
    three of Prefect's heartbeat intervals (PREFECT_FLOWS_HEARTBEAT_FREQUENCY, 180 s by default)."""
    value = env("DANQING_ZOMBIE_AFTER_S")
    if value:
        return float(value)
    from prefect.settings import get_current_settings

    return 3.0 * float(get_current_settings().flows.heartbeat_frequency or 180)


def dask_address() -> str | None:
    """DANQING_DASK_ADDRESS: the scheduler that runs without --dask-address use (set by `danqing up`)."""
    return env("DANQING_DASK_ADDRESS") or None

"""A release: takedown lists, the release's rows, resharded parquet and webdataset writers, the dataset card."""

from __future__ import annotations

import json
import os
import re
import tarfile
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from tasks.dedup import CLUSTERS, kmeans
from tasks.paper import SOURCE as PAPER_SOURCE
from tasks.paper import rules_table, stages_table
from tasks.sites import SiteBlacklist, host_values, normalise_host
from tasks.write import end_of_archive, sample_bytes

# The URL parquet's columns and types: img2dataset reads `url` and `alt_text` (or `caption`) as strings and saves
# `recaption` with --save_additional_columns; `recaption` is always there (null where no recaption exists).
RELEASE_SCHEMA = pa.schema([
    ("url", pa.string()), ("alt_text", pa.string()), ("caption", pa.string()), ("recaption", pa.string()),
    ("width", pa.int64()), ("height", pa.int64()), ("sha256", pa.string()), ("page_url", pa.string()),
    ("snapshot", pa.string()), ("key", pa.string()),
])
EXCLUDE_KINDS = ("sha256", "url", "domain")
OPT_OUT_KINDS = ("robots", "opt_out")  # what --recheck-opt-out finds: robots.txt disallows, X-Robots-Tag opts out
_SHA256 = re.compile(r"[0-9a-fA-F]{64}")
_LABEL = re.compile(r"(?!-)[a-z0-9-]{1,63}(?<!-)")


@dataclass(frozen=True)
class ReleaseConfig:
    parquet_max_bytes: int = 256_000_000  # a data/train-*.parquet file is at most about this size
    tar_max_bytes: int = 1_000_000_000  # an images/*.tar shard is at most this size (one larger sample alone)
    row_group_rows: int = 10_000  # parquet row group: what one write holds in memory
    license: str = "cc-by-nc-4.0"  # DanQing's license; the card's front matter and its license section
    removal_contact: str = "open an issue on the project's repository, naming the image URL or its sha256"
    top_hosts: int = 20  # image hosts listed in the card (the paper's Table 7)

    def __post_init__(self) -> None:
        if min(self.parquet_max_bytes, self.tar_max_bytes, self.row_group_rows, self.top_hosts) < 1:
            raise ValueError("parquet_max_bytes, tar_max_bytes, row_group_rows and top_hosts must be >= 1")


class ExcludeFileError(ValueError):
    """A line of an exclude list that is no sha256, URL or domain; the message names the file and line."""


@dataclass(frozen=True)
class ExcludeList:
    """Takedown entries: image sha256s, exact image URLs, and domains (a domain covers its subdomains and matches
    the image host or the page host; `www.` is part of what is listed, never stripped)."""

    sha256: frozenset[str] = frozenset()
    urls: frozenset[str] = frozenset()
    domains: frozenset[str] = frozenset()

    @classmethod
    def parse(cls, lines: Iterable[str], source: str = "<exclude list>") -> ExcludeList:
        """One entry a line; blank lines and `#` comments are skipped; a bad line raises naming its number."""
        sha, urls, domains = set(), set(), set()
        for number, raw in enumerate(lines, 1):
            line = raw.strip().lstrip("\ufeff")
            if not _has_scheme(line):  # a URL keeps its fragment; elsewhere `#` opens a comment
                line = line.split("#", 1)[0].strip()
            if not line:
                continue
            if _SHA256.fullmatch(line):
                sha.add(line.lower())
            elif _has_scheme(line):
                parts = urlsplit(line)
                if not parts.hostname or " " in line:
                    raise ExcludeFileError(f"{source}:{number}: {raw.strip()!r} is a URL without a host")
                urls.add(line)
            else:
                domain = _domain(line)
                if domain is None:
                    raise ExcludeFileError(f"{source}:{number}: {raw.strip()!r} is not a sha256 (64 hex digits), "
                                           "an image URL (with a scheme) or a domain")
                domains.add(domain)
        return cls(frozenset(sha), frozenset(urls), frozenset(domains))

    @classmethod
    def load(cls, paths: Iterable[str | Path]) -> ExcludeList:
        parts = [cls.parse(Path(p).read_text(encoding="utf-8-sig").splitlines(), str(p)) for p in paths]
        return cls(*(frozenset().union(*(getattr(x, f) for x in parts)) for f in ("sha256", "urls", "domains")))

    def __bool__(self) -> bool:
        return bool(self.sha256 or self.urls or self.domains)

    def kinds(self, frame: pd.DataFrame) -> pd.Series:
        """Per row the kind of entry that excludes it (sha256 first, then url, then domain), else None."""
        out = pd.Series([None] * len(frame), index=frame.index, dtype=object)
        if not self or frame.empty:
            return out
        out[self._sites.mask(host_values(frame, "image_host", "url")) |
            self._sites.mask(host_values(frame, "page_host", "page_url"))] = "domain"
        out[frame["url"].isin(self.urls)] = "url"
        out[frame["sha256"].str.lower().isin(self.sha256)] = "sha256"
        return out

    @cached_property
    def _sites(self) -> SiteBlacklist:
        """The domains as the source stage's matcher (a host or one of its parent domains), `www.` kept."""
        return SiteBlacklist(self.domains, strip_www=False)


def _has_scheme(line: str) -> bool:
    return re.match(r"[A-Za-z][A-Za-z0-9+.-]*://", line) is not None


def _domain(text: str) -> str | None:
    """A domain name lower-cased (IDNs in their ASCII form), or None when the text is not one."""
    try:
        name = text.rstrip(".").encode("idna").decode("ascii").lower()
    except UnicodeError:
        return None
    labels = name.split(".")
    if len(labels) < 2 or not all(_LABEL.fullmatch(label) for label in labels):
        return None
    return name


def release_rows(frame: pd.DataFrame, recaptions: pd.DataFrame | None) -> pa.Table:
    """A dataset shard's rows in the release's columns, each unit's recaption joined by key (null when none)."""
    rows = frame.copy()
    if recaptions is not None and len(recaptions):
        rows = rows.merge(recaptions[["key", "recaption"]].drop_duplicates("key"), on="key", how="left")
    elif "recaption" not in rows.columns:
        rows["recaption"] = None
    missing = [c for c in RELEASE_SCHEMA.names if c not in rows.columns]
    if missing:
        raise ValueError(f"dataset shard lacks column(s) {missing}")
    rows["recaption"] = rows["recaption"].astype(object).where(rows["recaption"].notna(), None)
    return pa.Table.from_pandas(rows[RELEASE_SCHEMA.names], schema=RELEASE_SCHEMA, preserve_index=False)


class ParquetShards:
    """`<dir>/train-NNNNN.parquet` files of at most about `max_bytes` each. Rows are buffered into row groups of
    `group_rows`; a group is sized by its uncompressed bytes plus the footer it adds, so a file stays under the
    bound (a group too large for it alone is split). Names are fixed by `finish`."""

    def __init__(self, folder: Path, max_bytes: int, group_rows: int = ReleaseConfig.row_group_rows):
        self.folder, self.max_bytes, self.group_rows = Path(folder), max_bytes, group_rows
        self.paths: list[Path] = []
        self._writer: pq.ParquetWriter | None = None
        self._sink = None
        self._groups = 0
        self._buffer: list[pa.Table] = []

    def write(self, table: pa.Table) -> None:
        self._buffer.append(table)
        while sum(t.num_rows for t in self._buffer) >= self.group_rows:
            rows = pa.concat_tables(self._buffer)
            self._buffer = [rows.slice(self.group_rows)]
            self._write_group(rows.slice(0, self.group_rows))

    def _footer(self, groups: int) -> int:
        """A generous estimate of the footer of a file of `groups` row groups (about 1.2 KB a group measured)."""
        return 4096 + 256 * len(RELEASE_SCHEMA) * groups

    def _write_group(self, group: pa.Table) -> None:
        if group.num_rows == 0:
            return
        if group.num_rows > 1 and group.nbytes + self._footer(1) > self.max_bytes:  # alone too large: halves
            half = group.num_rows // 2
            self._write_group(group.slice(0, half))
            self._write_group(group.slice(half))
            return
        if self._writer is not None and \
                self._sink.tell() + group.nbytes + self._footer(self._groups + 1) > self.max_bytes:
            self._close()
        if self._writer is None:
            self.paths.append(self.folder / f"train-{len(self.paths):05d}.parquet")
            self._sink = open(self.paths[-1], "wb")  # noqa: SIM115 - closed by _close
            self._writer = pq.ParquetWriter(self._sink, RELEASE_SCHEMA)
            self._groups = 0
        self._writer.write_table(group, row_group_size=group.num_rows)
        self._groups += 1

    def _close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._sink.close()
            self._writer = self._sink = None

    def finish(self) -> list[Path]:
        """Close the last file and name them train-NNNNN-of-MMMMM.parquet (the hub's convention); an empty release
        still gets one file, so `load_dataset` finds its schema."""
        self._write_group(pa.concat_tables(self._buffer) if self._buffer else RELEASE_SCHEMA.empty_table())
        self._buffer = []
        if not self.paths:
            self._writer = pq.ParquetWriter(self.folder / "train-00000.parquet", RELEASE_SCHEMA)
            self.paths.append(self.folder / "train-00000.parquet")
            self._writer.close()
            self._writer = None
        self._close()
        final = []
        for i, path in enumerate(self.paths):
            target = path.with_name(f"train-{i:05d}-of-{len(self.paths):05d}.parquet")
            os.replace(path, target)
            final.append(target)
        return final


class TarShards:
    """`<dir>/NNNNN.tar` webdataset shards of at most `max_bytes` (a sample larger than that alone in a shard)."""

    def __init__(self, folder: Path, max_bytes: int):
        self.folder, self.max_bytes = Path(folder), max_bytes
        self.paths: list[Path] = []
        self._fh = None

    def write(self, sample: bytes) -> None:
        closing = len(end_of_archive(0))
        if self._fh is not None and self._fh.tell() + len(sample) + closing > self.max_bytes:
            self._close()
        if self._fh is None:
            self.paths.append(self.folder / f"{len(self.paths):05d}.tar")
            self._fh = open(self.paths[-1], "wb")  # noqa: SIM115 - closed by _close
        self._fh.write(sample)

    def _close(self) -> None:
        if self._fh is not None:
            self._fh.write(end_of_archive(self._fh.tell()))
            self._fh.close()
            self._fh = None

    def finish(self) -> list[Path]:
        self._close()
        return self.paths


def read_samples(tar_path: Path) -> Iterator[tuple[str, dict[str, bytes]]]:
    """A webdataset shard's samples in order, streamed: (key, {extension: bytes})."""
    key, members = None, {}
    with tarfile.open(tar_path, mode="r|") as tar:
        for info in tar:
            if not info.isfile():
                continue
            name = info.name.rsplit("/", 1)[-1]
            k, _, ext = name.partition(".")
            if k != key and key is not None:
                yield key, members
                members = {}
            key = k
            members[ext] = tar.extractfile(info).read()
    if key is not None:
        yield key, members


def release_sample(key: str, members: dict[str, bytes], recaption: str | None) -> bytes:
    """A sample as the release holds it: the run's image, caption and metadata, plus `<key>.recaption.txt`."""
    record = json.loads(members["json"])
    extra = {"recaption.txt": recaption.encode("utf-8")} if recaption else None
    return sample_bytes(key, members["jpg"], members["txt"].decode("utf-8"), record, extra)


@dataclass
class ReleaseStats:
    """What the card says about the release's own rows, counted while they stream past."""

    rows: int = 0
    excluded: Counter = field(default_factory=Counter)  # kind -> rows left out (sha256, url, domain, robots, ...)
    image_hosts: Counter = field(default_factory=Counter)
    caption_chars: Counter = field(default_factory=Counter)  # caption length in characters -> rows
    recaptioned: int = 0

    def add(self, kept: pd.DataFrame) -> None:
        self.rows += len(kept)
        self.image_hosts.update(h for h in host_values(kept, "image_host", "url").map(normalise_host) if h)
        self.caption_chars.update(kept["caption"].str.len())
        if "recaption" in kept.columns:
            self.recaptioned += int(kept["recaption"].fillna("").astype(bool).sum())


def cluster_sizes(blocks: Callable[[], Iterator[np.ndarray]], rows: int, seed: int = 0,
                  clusters: int = CLUSTERS, per_cluster: int = 50) -> list[int]:
    """Sizes, largest first, of a k-means over vectors too many to hold: `blocks()` streams them (twice). The
    centroids are trained on `per_cluster` rows a cluster drawn uniformly while streaming (the lowest random
    priorities seen), then every row is counted under its nearest centroid. At most `clusters`, at least 5 rows
    a cluster, as the run report's curve."""
    k = min(clusters, rows // 5)
    if k < 2:
        return [rows] if rows else []
    rng = np.random.default_rng(seed)
    want = per_cluster * k
    sample, priority = None, np.empty(0)
    for v in blocks():
        sample = v if sample is None else np.concatenate([sample, v])
        priority = np.concatenate([priority, rng.random(len(v))])
        if len(sample) > want:
            keep = np.argpartition(priority, want)[:want]
            sample, priority = sample[keep], priority[keep]
    if sample is None:
        return []
    centroids, _ = kmeans(sample, k, seed=seed)
    counts = np.zeros(len(centroids), np.int64)
    for v in blocks():
        counts += np.bincount(np.argmax(v @ centroids.T, axis=1), minlength=len(centroids))
    return sorted((int(c) for c in counts if c), reverse=True)


def size_category(n: int) -> str:
    """The hub's size_categories value for `n` rows."""
    for bound, name in ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"), (1_000_000, "100K<n<1M"),
                        (10_000_000, "1M<n<10M"), (100_000_000, "10M<n<100M"), (1_000_000_000, "100M<n<1B")):
        if n < bound:
            return name
    return "1B<n<10B"


@dataclass(frozen=True)
class CardInput:
    """Everything the card is generated from: the merged funnel of the units' reports, the runs, the units'
    reports themselves, and the release's own counts."""

    funnel: dict  # flows.report.merge_reports over every unit's report
    runs: list[dict]  # {"run_id", "dir", "snapshots", "units", "samples"} per run, in release order
    reports: list[dict]  # every unit's report.json
    stats: ReleaseStats
    excludes: ExcludeList
    recheck: bool
    mixed_models: list[str]  # the embed models when runs of different ones were merged on purpose; else []
    plots: tuple[str, ...] = ()  # plot file names under the release, shown in the card


def render_card(card: CardInput, config: ReleaseConfig) -> str:
    """DIR/README.md: hub front matter, then the funnel per rule beside Table 6, the runs, models, thresholds,
    placeholder warnings, top hosts, plots, license and removal, all from reports and the release's rows."""
    import yaml

    stats = card.stats
    front = {"license": config.license, "language": ["zh"], "size_categories": [size_category(stats.rows)],
             "task_categories": ["image-to-text", "text-to-image"], "pretty_name": "DanQing-style release",
             "configs": [{"config_name": "default", "data_files": [{"split": "train", "path": "data/train-*"}]}]}
    lines = ["---", yaml.safe_dump(front, sort_keys=False, allow_unicode=True).strip(), "---", "",
             "# Chinese image-text pairs from Common Crawl", "",
             f"{stats.rows} image-text pairs from {len(card.runs)} run(s), curated the way "
             f"{PAPER_SOURCE.split(' Table')[0]} was. `data/` holds the URL parquet (`url`, `alt_text`, `caption`, "
             "`recaption`, ...), `images/` the webdataset shards (`<key>.jpg`, `<key>.txt`, `<key>.json`"
             f"{', `<key>.recaption.txt`' if stats.recaptioned else ''}).", "",
             "```bash", "img2dataset --url_list data --input_format parquet --url_col url --caption_col alt_text \\",
             "  --save_additional_columns '[\"recaption\"]' --output_format webdataset --output_folder images", "```"]
    if stats.recaptioned:
        lines += ["", f"{stats.recaptioned} of the {stats.rows} pairs have a synthetic `recaption` (models below)."]
    lines += _funnel_lines(card.funnel, stats, card.excludes, card.recheck)
    lines += ["", "## Snapshots and runs", "", "| run | snapshots | units | samples committed |", "|---|---|---:|---:|"]
    lines += [f"| `{r['run_id']}` | {', '.join(r['snapshots']) or '-'} | {r['units']} | {r['samples']} |"
              for r in card.runs]
    lines += _model_lines(card.reports, card.mixed_models)
    lines += _threshold_lines([r.get("thresholds") or {} for r in card.reports])
    placeholder = sorted({s["stage"] for r in card.reports for s in r["stages"] if s.get("placeholder_model")})
    if placeholder:
        lines += ["", f"**Placeholder model** in {', '.join(placeholder)}: those stages ran on the built-in "
                      "deterministic placeholder, so their results exercise the code and judge nothing."]
    lines += ["", "## Top image hosts (cf. the paper's Table 7)", "", "| image host | pairs | % |", "|---|---:|---:|"]
    lines += [f"| {h} | {n} | {100 * n / stats.rows:.2f} |" for h, n in stats.image_hosts.most_common(config.top_hosts)]
    for name in card.plots:
        lines += ["", f"![{name}]({name})"]
    lines += ["", "## License and removal", "",
              f"Released under {config.license.upper()}; the images remain their owners'. To have an image removed, "
              f"{config.removal_contact}. Removals are applied at the next release with `danqing release --exclude`, "
              "which also takes a page or image domain; `--recheck-opt-out` re-reads each image host's robots.txt and "
              "X-Robots-Tag and leaves out what opts out since the crawl.", ""]
    return "\n".join(lines)


def _funnel_lines(funnel: dict, stats: ReleaseStats, excludes: ExcludeList, recheck: bool) -> list[str]:
    stages = funnel["stages"]
    raw = stages[0]["kept"] or 1
    lines = ["", f"## Funnel beside {PAPER_SOURCE}", "", *stages_table(stages)]
    excluded = sum(stats.excluded.values())
    lines.append(f"| release | {stats.rows + excluded} | {stats.rows} | {100 * stats.rows / raw:.1f} | - | - |")
    lines += ["", "Per rule:", "", *rules_table(stages), "", "Left out at release (takedown and opt-out):", "",
              "| kind | rows |", "|---|---:|"]
    kinds = [*EXCLUDE_KINDS, *(OPT_OUT_KINDS if recheck else ())]
    lines += [f"| {k} | {stats.excluded.get(k, 0)} |" for k in kinds]
    lines += ["", f"Exclude lists: {len(excludes.sha256)} sha256, {len(excludes.urls)} URL(s), "
                  f"{len(excludes.domains)} domain(s); opt-out re-checked: {'yes' if recheck else 'no'}."]
    return lines


def _model_lines(reports: list[dict], mixed: list[str]) -> list[str]:
    lines = ["", "## Models", "", "| role | model | revision | placeholder |", "|---|---|---|---|"]
    seen = set()
    for report in reports:
        for role, m in (report.get("models") or {}).items():
            row = (role, m.get("name"), m.get("revision"), bool(m.get("placeholder")))
            if row not in seen:
                seen.add(row)
                lines.append(f"| {role} | `{row[1]}` | {row[2] or '-'} | {'yes' if row[3] else 'no'} |")
        rc = report.get("recaption") or {}
        row = ("recaption", rc.get("model"), rc.get("revision"), False)
        if rc.get("ran") and row not in seen:
            seen.add(row)
            lines.append(f"| recaption | `{row[1]}` | {row[2] or '-'} | no |")
    if mixed:
        lines += ["", f"**Runs of different embed models were merged on request** ({', '.join(mixed)}): "
                      "cross-batch dedup compared each run only with runs of its own model."]
    return lines


def _threshold_lines(per_unit: list[dict]) -> list[str]:
    """Each threshold once: its value (every distinct value when the units differ), default, calibrated or not."""
    names = list(dict.fromkeys(n for t in per_unit for n in t))
    if not names:
        return []
    lines = ["", "## Thresholds", "", "| setting | value | default | calibrated |", "|---|---:|---:|---|"]
    for name in names:
        given = [t[name] for t in per_unit if name in t]
        values = " / ".join(str(v) for v in dict.fromkeys(g.get("value") for g in given))
        calibrated = {bool(g.get("calibrated")) for g in given}
        how = ("yes" if calibrated == {True} else "in some runs" if len(calibrated) > 1
               else "no (default)" if given[0].get("fittable") else "not fitted (paper's)")
        lines.append(f"| `{name}` | {values} | {given[0].get('default')} | {how} |")
    return lines


def caption_histogram(counts: Counter, cap: int = 120) -> tuple[list[int], list[int]]:
    """(lengths, rows) with lengths above `cap` in the last bin."""
    bins = Counter()
    for length, n in counts.items():
        bins[min(int(length), cap)] += n
    xs = list(range(cap + 1))
    return xs, [bins.get(x, 0) for x in xs]


"""Benchmark: curate_snapshot on a 1-worker, 1-thread Dask cluster vs one plain process, same stages, same shards.

overhead_fraction = flow seconds / plain seconds - 1 for a plain run and the flow run right after it, the
median over `--repeat` such pairs. The machine is shared and noisy: the same plain run measured 80 to 90 s
within an hour, and a pair run back to back shares the machine's state of those minutes, where the fastest
plain run of the session against the fastest flow run compares two different minutes (printed too, as
overhead_fraction_min, with overhead_fraction_worst: the slowest flow against the fastest plain run). Each run
starts after os.sync(): the runs write gigabytes, and the kernel's writeback of one run's files would
otherwise slow the next one's writes. Each flow run gets a new cluster and each plain run a new process, both
warmed alike (imports, jieba's dictionary). The Prefect server's and the cluster's start-up are excluded from
the flow time and reported apart as startup_seconds. Shards are generated WARC files of Chinese pages whose
images are WARC records (replayed), `--shard-mb` each (default 1000: the natural shard is one ~1 GB Common
Crawl WARC). Last stdout line: one JSON object of figures.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

GENERATOR = 4  # bump when the generated shards change: cached files of another version are not reused
WORDS = ["美丽", "的", "山水", "风景", "城市", "夜景", "一只", "可爱", "小猫", "在", "草地", "上", "玩耍", "传统",
         "建筑", "古老", "寺庙", "新鲜", "水果", "蔬菜", "市场", "里", "春天", "花朵", "盛开", "公园", "湖边", "孩子们"]


REPEATS = 0.3  # share of image records that re-use an earlier image of the shard (the paper's dedup removed 41%)


def _image(rng: np.random.Generator, w: int, h: int, grain: np.ndarray) -> bytes:
    """A photo-like image that passes stage 3's quality rules (texture, sharpness, entropy): a 36x48 grid of
    random colours with hard edges plus grain, ~75 KB as JPEG; every call a different one, far from the others
    under the dedup rule. Images the rules drop would leave the later stages nothing to do and the comparison
    would say nothing."""
    small = rng.integers(0, 255, (36, 48, 3), dtype=np.uint8)
    base = np.asarray(Image.fromarray(small).resize((w, h), Image.NEAREST), dtype=np.int16)
    buf = io.BytesIO()
    Image.fromarray(np.clip(base + grain, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=85)
    return buf.getvalue()


def write_shard(path: Path, index: int, target_bytes: int) -> None:
    """One WARC: pages with 10 images each, then the images as response records, until target_bytes."""
    from tasks.sample.warc import WarcWriter, languages_cld2

    rng = np.random.default_rng(index)
    grain = rng.normal(0, 8, (360, 480, 3)).astype(np.int16)  # drawn once: the grain need not differ
    seen: list[bytes] = []
    written = 0
    page = 0
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as fh:
        writer = WarcWriter(fh)
        meta = {"languages-cld2": languages_cld2([{"code": "zh", "text-covered": 0.99}])}
        while written < target_bytes:
            url = f"http://www.bench{index}.test/p{page}.html"
            imgs = []
            for j in range(10):
                caption = "".join(rng.choice(WORDS, size=int(rng.integers(8, 20))))
                imgs.append((f"http://img{index}.bench.test/{page}/{j}.jpg", caption))
            tags = "".join(f'<img src="{u}" alt="{c}">' for u, c in imgs)
            html = f"<html><body><p>图片新闻</p>{tags}</body></html>"
            writer.metadata(url, meta, concurrent_to=writer.response(url, html.encode(), "text/html; charset=utf-8"))
            for u, _ in imgs:
                if seen and rng.random() < REPEATS:
                    body = seen[int(rng.integers(0, len(seen)))]
                else:
                    body = _image(rng, 480, 360, grain)
                    if len(seen) < 2000:  # a bounded pool of earlier images to repeat
                        seen.append(body)
                    else:
                        seen[int(rng.integers(0, len(seen)))] = body
                writer.response(u, body, "image/jpeg")
                written += len(body)
            page += 1
    tmp.rename(path)


def shards(work: Path, n: int, mb: float) -> list[str]:
    """n generated shards of `mb` each, written once per generator version and size and then reused."""
    paths = []
    for i in range(n):
        p = work / f"bench-v{GENERATOR}-{mb:g}mb-{i:03d}.warc.gz"
        if not p.exists():
            write_shard(p, i, int(mb * 1e6))
        paths.append(str(p))
    return paths


def plain(warcs: list[str], out: Path) -> float:
    """The same stage functions in one process, intermediates in memory, the same dataset files written."""
    import numpy as np
    import pandas as pd

    from tasks import align, crossbatch, dedup, embed, extract, fetch, image, refine, source, write
    from tasks.io import lance
    from tasks.io import shards as io_shards
    from tasks.io.replay import ReplayFetcher
    from tasks.models import load_model, resolve_model

    out.mkdir(parents=True, exist_ok=True)
    os.sync()  # the previous run's gigabytes of writes are flushed before this run is timed
    start = time.perf_counter()
    model = load_model(resolve_model("embed", None))
    results = [extract.extract_warc(w) for w in warcs]
    fetcher = ReplayFetcher(pd.concat([r.replay for r in results], ignore_index=True))
    uri = str(out / "lancedb")
    scored, vectors = [], []
    for r in results:
        f = r.candidates[r.candidates["drop_reason"].isna()].drop(columns=["drop_reason"])
        for fn in (source.select_sources, lambda x: fetch.fetch_images(x, fetcher), refine.refine_text,
                   image.filter_images):
            f = fn(f)
            f = f[f["drop_reason"].isna()].drop(columns=["drop_reason"])
        s, v = embed.embed_pairs(f, model, model)
        lance.upsert_embeddings(uri, model.identity, "plain", "bench", v)
        scored.append(s[s["drop_reason"].isna()])
        vectors.append(v)
    allv = pd.concat(vectors, ignore_index=True)
    groups = dedup.dedup(np.stack(allv["vector"].to_numpy()).astype(np.float32), dedup.DedupConfig())
    kept = set(allv["key"][groups.keep])
    scored = [s[s["key"].isin(kept)] for s in scored]
    band = align.choose_band(pd.concat([s["align_cosine"] for s in scored]).to_numpy(), align.AlignConfig(),
                             "placeholder", True)
    table = lance.open_embeddings(uri, model.identity)
    written = []
    for i, s in enumerate(scored):
        k = align.apply_band(s, band)
        k = k[k["drop_reason"].isna()]
        v = allv[allv["key"].isin(k["key"])]
        found, _ = crossbatch.search_committed(table, np.stack(v["vector"].to_numpy()) if len(v) else np.zeros((0, 1)),
                                               [r["run_id"] for r in lance.earlier_runs(uri, "plain")],
                                               dedup.DedupConfig().threshold)
        k = crossbatch.mark_crossbatch(k, crossbatch.match_frame(v["key"].to_numpy(), found))
        k = k[k["drop_reason"].isna()]
        write.write_webdataset(k, out / f"{i:05d}.tar")
        io_shards.write_parquet(write.metadata(k), out / f"{i:05d}.parquet")
        written += k["key"].tolist()
    lance.commit_run(uri, table.name, "plain", "bench", written)
    return time.perf_counter() - start


def flow(warcs: list[str], out: Path) -> tuple[float, float, int]:
    """(flow seconds, start-up seconds, samples) on a 1-worker, 1-thread LocalCluster of processes."""
    from distributed import Client, LocalCluster

    from flows import runtime
    from flows.curate import curate_snapshot
    from flows.settings import CurateParams

    t0 = time.perf_counter()
    runtime.task_runner(None)  # applies the project's worker environment to the cluster below
    with runtime.prefect_api(out / ".logs", out / ".prefect"), LocalCluster(
        n_workers=1, threads_per_worker=1, processes=True, memory_limit="8GiB", dashboard_address=":0",
        local_directory=str(out / ".dask"),
    ) as cluster, Client(cluster) as client:
        # modules imported and jieba's dictionary loaded on the worker: start-up, as in the plain process
        client.run(_warm)
        startup = time.perf_counter() - t0
        params = CurateParams(warcs=warcs, out=str(out), fetcher="replay")
        os.sync()  # as for plain(): no run pays for the writeback of the one before it
        t1 = time.perf_counter()
        result = curate_snapshot.with_options(task_runner=runtime.task_runner(cluster.scheduler_address, None, out))(
            params)
        elapsed = time.perf_counter() - t1
    return elapsed, startup, result["report"]["samples"]


def fresh_plain(warcs: list[str], out: Path) -> float:
    """plain() in a new process, warmed as the flow's new worker is: each flow run gets a new cluster, so a
    plain run in this long-lived process would meet warm caches (the model's first forward, first imports)
    that no flow run has, and be a few seconds faster from the second repeat on."""
    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing import get_context

    with ProcessPoolExecutor(1, mp_context=get_context("spawn")) as pool:
        pool.submit(_warm).result()
        return pool.submit(plain, warcs, out).result()


def _warm() -> None:
    import flows.steps  # noqa: F401
    import tasks.models  # noqa: F401
    from tasks.source import count_words

    count_words("预热分词词典")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--shards", type=int, default=2)
    ap.add_argument("--shard-mb", type=float, default=1000.0, help="shard size (the natural shard: one ~1 GB WARC)")
    ap.add_argument("--repeat", type=int, default=3,
                    help="plain/flow pairs, run back to back; the median pair is the figure (the machine is noisy)")
    ap.add_argument("--quick", action="store_true", help="2 shards of 5 MB, one repeat: about a minute")
    ap.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "danqing-bench"))
    args = ap.parse_args()
    if args.quick:
        args.shards, args.shard_mb, args.repeat = 2, 5.0, 1
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    warcs = shards(work, args.shards, args.shard_mb)
    import shutil

    plains, flows, startups = [], [], []
    for _ in range(max(1, args.repeat)):
        for d in ("plain", "flow"):
            shutil.rmtree(work / d, ignore_errors=True)
        plains.append(fresh_plain(warcs, work / "plain"))
        flow_s, startup_s, samples = flow(warcs, work / "flow")
        flows.append(flow_s)
        startups.append(startup_s)
        print(f"pair {len(flows)}: plain {plains[-1]:.2f} s, flow {flow_s:.2f} s, "
              f"overhead {flow_s / plains[-1] - 1:.4f}", flush=True)
    if not samples:
        raise SystemExit("the flow kept no samples: the generated shards no longer pass the stage rules, and a "
                         "comparison of runs that skip the later stages says nothing")
    pairs = sorted(zip(plains, flows, strict=True), key=lambda pf: pf[1] / pf[0])
    plain_s, flow_s = pairs[len(pairs) // 2]  # the median pair (of an even count, the higher one)
    figures = {
        "shards": args.shards, "shard_mb": args.shard_mb, "samples": samples, "repeats": len(plains),
        "plain_seconds": round(plain_s, 2), "flow_seconds": round(flow_s, 2),
        "startup_seconds": round(min(startups), 2), "overhead_fraction": round(flow_s / plain_s - 1, 4),
        "overhead_fraction_min": round(min(flows) / min(plains) - 1, 4),
        "overhead_fraction_worst": round(max(flows) / min(plains) - 1, 4),
    }
    from bench.common import report

    report(figures)


if __name__ == "__main__":
    main()

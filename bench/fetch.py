"""Benchmark: the fetch stage (tasks/io/http.py + tasks/fetch.py) against img2dataset, and our JPEG decode.

A local HTTP server in its own process serves real photos (../shared/fixtures/images, each re-encoded as JPEG
at several sizes) under --urls distinct URLs, with injected trouble, fixed per URL by a seeded draw:
20-200 ms latency before the headers; 5% answer 404; 2% answer 429 with `Retry-After: 1` on their first request
(then 200); 1% are slow drips (a few bytes, then one byte every 0.5 s, and the connection closed after 12 s
with the body incomplete). Both sides fetch the same URL list and end in the same work: decode, shrink to a
256 px longer side keeping the ratio (never enlarging), JPEG re-encode at quality 95, write a shard.

- Ours: the URL list split into --shards shards fetched at once, each in its own process (as the pipeline runs
  one fetch task per shard on a single-threaded Dask worker) by an HttpFetcher with concurrency = per_host =
  --concurrency / --shards (so both sides keep --concurrency requests in flight), then tasks.fetch.fetch_shard
  (FetchConfig(max_side=256): sniff, draft decode, EXIF, resize, quality metrics, JPEG) and the pipeline's blob
  writer. Robots.txt is on (the server has none: one 404 per shard), retries 2, a 10 s total deadline per
  attempt, no per-host rate limit (one host here would make a rate the bottleneck), the SSRF guard on with
  127.0.0.1/32 allowed. CPU = the shard processes' whole CPU time less --shards times the CPU of the same
  command on a one-URL list (start-up: imports and first-use initialisation), the median of three such runs.
- img2dataset 1.47.0 from its own venv (bench/setup_baselines.sh): `--processes_count 1 --thread_count
  <concurrency> --retries 2 --timeout 10 --resize_mode keep_ratio --resize_only_if_bigger True --image_size 256
  --output_format webdataset`. CPU = the whole process tree's CPU time (rusage of the waited child), minus the
  CPU of the same command on a one-URL list (its start-up: imports, pool spawn), the median of three such runs.

Figures: speedup_vs_img2dataset = (our successes / our CPU s) / (its successes / its CPU s), the median over
--fetch-rounds paired rounds (order alternating; the machine is shared, so single CPU figures are noisy);
success_rate and img2dataset_success_rate over all URLs; slowest_shard_over_median = our slowest shard's wall
time / the median shard's, the worst round. gigabyte_peak_rss_mb: peak RSS (the high-water mark reset just
before) of a fresh fetch process while it asks for a 1 GB streamed body (default 20 MB cap; it ends as
fetch.too_large), beside its RSS right before.

Decode: JPEGs of 512x512 and 1600x1200 (from the same photos) to 224x224 bicubic RGB, tasks.fetch.decode_resized
(draft: DCT-domain downscale) against plain Pillow (open, convert RGB, resize), over 8 photos PASSES times;
--rounds paired rounds, each timing both on the same images back to back, order alternating; the figure is the
median of the per-round ratios (plain time / ours).

Last stdout line: one JSON object of figures.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import random
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's tasks/, not an installed copy
SHARED_IMAGES = ROOT.parent / "shared" / "fixtures" / "images"
SIDES = (320, 512, 1024, 1600)  # longer sides of the served copies: every one is shrunk to 256 by both sides
PASSES = 4  # passes over the decode images per timing, so one timing is tens of ms, not a few
DRIP_S = 12.0  # a slow drip closes after this, incomplete: longer than both sides' 10 s deadline
SEED = 20260115


def photos() -> list[bytes]:
    """Every fixture photo, RGB, re-encoded as JPEG at each of SIDES (enlarged where smaller)."""
    from PIL import Image

    out = []
    for path in sorted(SHARED_IMAGES.rglob("*")):
        if path.suffix.lower() not in (".jpg", ".jpeg", ".png"):
            continue
        with Image.open(path) as im:
            rgb = im.convert("RGB")
        for side in SIDES:
            scale = side / max(rgb.size)
            copy = rgb.resize((max(1, round(rgb.width * scale)), max(1, round(rgb.height * scale))),
                              Image.Resampling.BICUBIC)
            buf = io.BytesIO()
            copy.save(buf, "JPEG", quality=90)
            out.append(buf.getvalue())
    if not out:
        raise SystemExit(f"no fixture images under {SHARED_IMAGES}")
    return out


def fate(i: int) -> tuple[str, float]:
    """(kind, latency s) of URL i: ok, 404, 429 (first request only) or drip; fixed by the seed."""
    rng = random.Random(SEED * 1_000_003 + i)
    draw = rng.random()
    kind = "404" if draw < 0.05 else "429" if draw < 0.07 else "drip" if draw < 0.08 else "ok"
    return kind, rng.uniform(0.02, 0.2)


# ---------------------------------------------------------------- the server (its own process)


def serve(port_file: str, n_images: int) -> None:
    from aiohttp import web

    images = photos()[:n_images] if n_images else photos()
    asked: set[int] = set()

    async def image(request: web.Request) -> web.StreamResponse:
        i = int(request.match_info["i"])
        kind, latency = fate(i)
        await asyncio.sleep(latency)
        if kind == "404":
            return web.Response(status=404, text="not found")
        if kind == "429" and i not in asked:
            asked.add(i)
            return web.Response(status=429, text="slow down", headers={"Retry-After": "1"})
        body = images[i % len(images)]
        if kind != "drip":
            return web.Response(body=body, content_type="image/jpeg")
        resp = web.StreamResponse(headers={"Content-Type": "image/jpeg", "Content-Length": str(len(body))})
        await resp.prepare(request)
        await resp.write(body[:16])
        end = time.monotonic() + DRIP_S
        k = 16
        while time.monotonic() < end:
            await asyncio.sleep(0.5)
            await resp.write(body[k:k + 1])
            k += 1
        request.transport.close()  # incomplete: the client sees a broken body, never an image
        return resp

    async def forget(request: web.Request) -> web.Response:
        asked.clear()  # every run meets the same 429s
        return web.Response(text="ok")

    sys.path.insert(0, str(ROOT / "tests"))
    from local_http import gigabyte  # the same endless body the tests stream

    async def main() -> None:
        app = web.Application()
        app.router.add_get("/img/{i}.jpg", image)
        app.router.add_get("/gigabyte", gigabyte)
        app.router.add_get("/reset", forget)
        runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0, backlog=1024)
        await site.start()
        Path(port_file + ".tmp").write_text(str(site._server.sockets[0].getsockname()[1]))
        os.replace(port_file + ".tmp", port_file)
        await asyncio.Event().wait()

    asyncio.run(main())


def reset(base: str) -> None:
    import urllib.request

    with urllib.request.urlopen(f"{base}/reset", timeout=10) as resp:
        resp.read()


def start_server(work: Path, n_images: int = 0) -> tuple[subprocess.Popen, int]:
    port_file = work / "port"
    port_file.unlink(missing_ok=True)
    proc = subprocess.Popen([sys.executable, __file__, "--serve", str(port_file), "--n-images", str(n_images)],
                            cwd=ROOT)
    deadline = time.monotonic() + 120
    while not port_file.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit("the benchmark server did not start")
        time.sleep(0.1)
    return proc, int(port_file.read_text())


# ---------------------------------------------------------------- our side (a subprocess)


def ours(urls_file: str, out_dir: str, shard: int, concurrency: int) -> None:
    """One shard, as one fetch task of the pipeline does it (a Dask worker process, one thread)."""
    import pandas as pd

    from tasks.fetch import FetchConfig, fetch_shard
    from tasks.io import shards as shard_io
    from tasks.io.http import HttpConfig, HttpFetcher

    urls = Path(urls_file).read_text().split()
    http = HttpConfig(concurrency=concurrency, per_host=concurrency, retries=2, total_timeout_s=10.0,
                      connect_timeout_s=10.0, allow_networks=("127.0.0.1/32",))
    cfg = FetchConfig(max_side=256)
    cpu0, wall0 = time.process_time(), time.perf_counter()
    frame = pd.DataFrame({"key": [f"{shard:02d}{j:06d}" for j in range(len(urls))], "url": urls})
    out, _ = fetch_shard(frame, HttpFetcher(http), cfg)
    kept = out[out["drop_reason"].isna()]
    shard_io.write_blobs(kept["key"].tolist(), kept["image"].tolist(), Path(out_dir) / f"{shard:05d}.images.bin")
    print(json.dumps({"cpu_s": time.process_time() - cpu0, "wall_s": time.perf_counter() - wall0,
                      "successes": len(kept)}))


def ours_shards(urls: list[str], work: Path, shards: int, concurrency: int, startup: float) -> dict:
    """Every shard in its own process, all at once, `concurrency / shards` requests in flight each.

    CPU: the processes' whole CPU time (rusage of the waited children) less `shards` times `startup`, the CPU of
    the same command on a one-URL list (ours_startup): the same rule as img2dataset's.
    """
    _children_cpu()
    cpu, results = _ours_run(urls, work, shards, concurrency)
    return {"cpu_s": cpu - shards * startup, "wall_s": max(r["wall_s"] for r in results),
            "successes": sum(r["successes"] for r in results), "shard_wall_s": [r["wall_s"] for r in results]}


def ours_startup(url: str, work: Path) -> float:
    _children_cpu()
    return statistics.median(_ours_run([url], work, 1, 1)[0] for _ in range(3))


def _ours_run(urls: list[str], work: Path, shards: int, concurrency: int) -> tuple[float, list[dict]]:
    out = work / "ours"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir()
    procs = []
    for k in range(shards):
        part = work / f"shard-{k}.txt"
        part.write_text("\n".join(urls[k::shards]) + "\n")
        procs.append(subprocess.Popen([sys.executable, __file__, "--ours", str(part), str(out), str(k),
                                       str(max(1, concurrency // shards))], cwd=ROOT, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    results = []
    for p in procs:
        stdout, stderr = p.communicate()
        if p.returncode != 0:
            raise SystemExit(f"our shard failed: {stderr[-3000:]}")
        results.append(json.loads(stdout.strip().splitlines()[-1]))
    return _children_cpu(), results


def gigabyte_probe(url: str) -> None:
    from tasks.io.http import HttpConfig, HttpFetcher

    fetcher = HttpFetcher(HttpConfig(allow_networks=("127.0.0.1/32",), robots=False))
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak, so the imports' high-water mark hides nothing
    before = _status_mb("VmRSS:")
    [res] = fetcher.fetch_many([url])
    print(json.dumps({"reason": res.reason, "error": res.error, "rss_before_mb": before,
                      "peak_rss_mb": _status_mb("VmHWM:")}))


def _status_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field):
            return int(line.split()[1]) / 1024
    return float("nan")


def run_json(args: list[str]) -> dict:
    res = subprocess.run([sys.executable, __file__, *args], cwd=ROOT, capture_output=True, text=True)
    if res.returncode != 0:
        raise SystemExit(f"{args[0]} failed: {res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------- img2dataset (its own venv)


def img2dataset(python: str, urls_file: Path, out: Path, concurrency: int) -> tuple[float, int, float]:
    """(CPU s of the process tree, successes, wall s) of one img2dataset run."""
    shutil.rmtree(out, ignore_errors=True)
    cmd = [str(Path(python).parent / "img2dataset"), "--url_list", str(urls_file), "--input_format", "txt",
           "--output_folder", str(out), "--output_format", "webdataset", "--processes_count", "1",
           "--thread_count", str(concurrency), "--retries", "2", "--timeout", "10", "--resize_mode", "keep_ratio",
           "--resize_only_if_bigger", "True", "--image_size", "256", "--enable_wandb", "False",
           "--distributor", "multiprocessing"]
    env = {**os.environ, "WANDB_MODE": "disabled"}
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    _, err = proc.communicate()  # reaped here: its tree's CPU joins RUSAGE_CHILDREN
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"img2dataset failed: {err.decode()[-2000:]}")
    successes = sum(json.loads(p.read_text()).get("successes", 0) for p in out.glob("*_stats.json"))
    return _children_cpu(), successes, wall


_last_children_cpu = 0.0


def _children_cpu() -> float:
    """CPU s of waited children since the last call (the whole img2dataset tree: its pool is joined)."""
    global _last_children_cpu
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    total = r.ru_utime + r.ru_stime
    delta, _last_children_cpu = total - _last_children_cpu, total
    return delta


# ---------------------------------------------------------------- decode


def decode_bench(rounds: int) -> dict:
    from PIL import Image

    from tasks.fetch import decode_resized

    base = photos()[::len(SIDES)][:8]  # one copy per photo
    figures = {}
    for w, h in ((512, 512), (1600, 1200)):
        jpegs = []
        for data in base:
            with Image.open(io.BytesIO(data)) as im:
                buf = io.BytesIO()
                im.convert("RGB").resize((w, h), Image.Resampling.BICUBIC).save(buf, "JPEG", quality=90)
                jpegs.append(buf.getvalue())

        def plain(jpegs: list[bytes] = jpegs) -> None:
            for data in jpegs * PASSES:
                with Image.open(io.BytesIO(data)) as im:
                    im.convert("RGB").resize((224, 224), Image.Resampling.BICUBIC)

        def fast(jpegs: list[bytes] = jpegs) -> None:
            for data in jpegs * PASSES:
                decode_resized(data, (224, 224))

        ratios = []
        for r in range(rounds):
            pair = []
            for fn in ((plain, fast) if r % 2 else (fast, plain)):
                t = time.perf_counter()
                fn()
                pair.append((fn, time.perf_counter() - t))
            times = dict(pair)
            ratios.append(times[plain] / times[fast])
        figures[f"decode_speedup_{w if w == h else max(w, h)}"] = round(statistics.median(ratios), 2)
    return figures


# ---------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="2,000 URLs, fewer decode rounds (under 3 minutes)")
    ap.add_argument("--urls", type=int, help="URLs (default 5,000; 2,000 with --quick)")
    ap.add_argument("--concurrency", type=int, default=64, help="requests in flight, both sides")
    ap.add_argument("--shards", type=int, default=8, help="our shards, fetched at once")
    ap.add_argument("--rounds", type=int, help="paired decode rounds (default 15; 7 with --quick)")
    ap.add_argument("--fetch-rounds", type=int, help="paired fetch rounds, ours and img2dataset (default 3; 1 quick)")
    ap.add_argument("--work", default=None, help="scratch directory (default: a temporary one)")
    ap.add_argument("--no-baseline", action="store_true", help="skip img2dataset")
    ap.add_argument("--serve", help=argparse.SUPPRESS)
    ap.add_argument("--n-images", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--ours", nargs=4, help=argparse.SUPPRESS)
    ap.add_argument("--gigabyte", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.serve:
        return serve(a.serve, a.n_images)
    if a.ours:
        return ours(a.ours[0], a.ours[1], int(a.ours[2]), int(a.ours[3]))
    if a.gigabyte:
        return gigabyte_probe(a.gigabyte)

    n = a.urls or (2000 if a.quick else 5000)
    rounds = a.rounds or (7 if a.quick else 15)
    fetch_rounds = a.fetch_rounds or (1 if a.quick else 3)
    work = Path(a.work or tempfile.mkdtemp(prefix="bench-fetch-"))
    work.mkdir(parents=True, exist_ok=True)
    python = None
    if not a.no_baseline:
        python = subprocess.run(["bash", str(ROOT / "bench" / "setup_baselines.sh")], capture_output=True,
                                text=True, check=True).stdout.strip().splitlines()[-1]
    server, port = start_server(work)
    figures: dict = {"urls": n, "concurrency": a.concurrency, "shards": a.shards}
    try:
        base = f"http://127.0.0.1:{port}"
        urls = [f"{base}/img/{i}.jpg" for i in range(n)]
        urls_file = work / "urls.txt"
        urls_file.write_text("\n".join(urls) + "\n")
        kinds = [fate(i)[0] for i in range(n)]
        figures["served"] = {k: kinds.count(k) for k in ("ok", "404", "429", "drip")}

        first_ok = next(u for u, k in zip(urls, kinds, strict=True) if k == "ok")
        probe = run_json(["--gigabyte", f"{base}/gigabyte"])
        figures.update(gigabyte_reason=probe["reason"], gigabyte_rss_before_mb=round(probe["rss_before_mb"], 1),
                       gigabyte_peak_rss_mb=round(probe["peak_rss_mb"], 1))
        # start-up CPU of each side: the median of three one-URL runs of the same command
        mine_startup = ours_startup(first_ok, work)
        one = work / "one.txt"
        one.write_text(first_ok + "\n")
        if python:
            _children_cpu()
            their_startup = statistics.median(img2dataset(python, one, work / "i2d-one", a.concurrency)[0]
                                              for _ in range(3))
        # paired rounds, the order alternating; the server forgets which 429s it sent before each run
        rounds_out = []
        for r in range(fetch_rounds):
            mine = theirs = None
            for side in (("ours", "theirs") if r % 2 == 0 else ("theirs", "ours")):
                reset(base)
                if side == "ours":
                    mine = ours_shards(urls, work, a.shards, a.concurrency, mine_startup)
                elif python:
                    _children_cpu()
                    theirs = img2dataset(python, urls_file, work / "i2d", a.concurrency)
            rounds_out.append((mine, theirs))
        walls = [m["shard_wall_s"] for m, _ in rounds_out]
        figures.update(
            ours_startup_cpu_s=round(mine_startup, 2),
            ours_cpu_s=[round(m["cpu_s"], 2) for m, _ in rounds_out],
            ours_wall_s=[round(m["wall_s"], 1) for m, _ in rounds_out],
            success_rate=round(rounds_out[-1][0]["successes"] / n, 4),
            slowest_shard_over_median=round(max(max(w) / statistics.median(w) for w in walls), 2))
        if python:
            speedups = []
            for m, (cpu, successes, _) in rounds_out:
                their_cpu = max(cpu - their_startup, 1e-6)
                speedups.append((m["successes"] / m["cpu_s"]) / (successes / their_cpu) if successes else 0.0)
            figures.update(
                img2dataset_startup_cpu_s=round(their_startup, 2),
                img2dataset_cpu_s=[round(t[0] - their_startup, 2) for _, t in rounds_out],
                img2dataset_wall_s=[round(t[2], 1) for _, t in rounds_out],
                img2dataset_success_rate=round(rounds_out[-1][1][1] / n, 4),
                speedup_rounds=[round(x, 2) for x in speedups],
                speedup_vs_img2dataset=round(statistics.median(speedups), 2))
        else:
            figures.update(img2dataset_success_rate=None, speedup_vs_img2dataset=None)
    finally:
        server.terminate()
        server.wait(timeout=30)
    figures.update(decode_bench(rounds))
    print(json.dumps(figures))


if __name__ == "__main__":
    main()

"""End-to-end on other inputs: the real Common Crawl excerpt, images over HTTP, an external Dask cluster, the CLI."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from _fixtures import fixture_path
from PIL import Image
from test_curate import IN_PROCESS, check_report, run_sample

from flows.curate import curate
from flows.runtime import free_port
from flows.settings import CurateParams, LocalClusterSpec

ROOT = Path(__file__).resolve().parents[2]
CAPTION = "一只可爱的小猫在阳光明媚的花园里安静地睡觉"


def test_real_common_crawl_excerpt_without_network(prefect_server, tmp_path):
    """Pages and <img> counts of the real excerpt; images whose hosts cannot resolve end as fetch.http_error."""
    warc = fixture_path("warc/warcfile.warc.gz")
    # resolve=[]: no host resolves and no DNS query leaves the machine, as on a machine with no network.
    # Its alt texts are all 1-4 words (spam and navigation): min_words 1 lets some reach the fetcher.
    params = CurateParams(warcs=[str(warc)], out=str(tmp_path),
                          config={"http": {"resolve": []}, "source": {"min_words": 1}})
    result = curate(params, cluster=IN_PROCESS)
    stages = {s["stage"]: s for s in result["report"]["stages"]}
    assert stages["extract"]["pages_total"] == 16
    assert stages["extract"]["pages_selected"] == 11
    assert stages["extract"]["in"] == 96
    fetch = stages["fetch"]
    assert fetch["in"] > 0 and fetch["kept"] == 0
    assert fetch["dropped"]["fetch.http_error"] == fetch["in"]
    check_report(Path(result["run_dir"]) / "report.json")


class _Images(BaseHTTPRequestHandler):
    files: dict[str, tuple[int, str, bytes]] = {}

    def do_GET(self):  # noqa: N802 - the stdlib's name
        status, ctype, body = self.files.get(self.path, (404, "text/plain", b"not found"))
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def _jpeg(w: int, h: int, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _page_warc(path: Path, pages: list[tuple[str, str]]) -> None:
    from tasks.sample.warc import WarcWriter, languages_cld2

    with open(path, "wb") as fh:
        writer = WarcWriter(fh)
        for url, html in pages:
            response_id = writer.response(url, html.encode(), "text/html; charset=utf-8")
            cld2 = languages_cld2([{"code": "zh", "code-iso-639-3": "zho", "text-covered": 0.95}])
            writer.metadata(url, {"languages-cld2": cld2}, concurrent_to=response_id)


def test_http_fetcher_against_a_local_server(prefect_server, tmp_path):
    """The HTTP fetcher over a real server on 127.0.0.1: success, 404, not an image, too large; an empty WARC."""
    _Images.files = {
        "/ok1.jpg": (200, "image/jpeg", _jpeg(320, 240, 1)),
        "/ok2.jpg": (200, "image/jpeg", _jpeg(400, 300, 2)),
        "/page.jpg": (200, "image/jpeg", b"<html><body>not an image</body></html>"),
        "/huge.jpg": (200, "image/jpeg", _jpeg(1600, 1200, 3)),
    }
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Images)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        names = ["ok1.jpg", "ok2.jpg", "missing.jpg", "page.jpg", "huge.jpg"]
        imgs = "".join(f'<img src="{base}/{n}" alt="{CAPTION}{i}号">' for i, n in enumerate(names))
        _page_warc(tmp_path / "pages.warc.gz", [("http://www.example-zh.test/a.html",
                                                 f"<html><body><p>{CAPTION}</p>{imgs}</body></html>")])
        (tmp_path / "empty.warc.gz").write_bytes(b"")
        params = CurateParams(warcs=[str(tmp_path / "pages.warc.gz"), str(tmp_path / "empty.warc.gz")],
                              out=str(tmp_path / "out"),
                              # the server is on loopback, which the SSRF guard refuses unless allowed
                              config={"http": {"max_bytes": 200_000, "allow_networks": ["127.0.0.1/32"]}})
        result = curate(params, cluster=IN_PROCESS)
    finally:
        server.shutdown()
    fetch = {s["stage"]: s for s in result["report"]["stages"]}["fetch"]
    assert fetch["in"] == 5 and fetch["kept"] == 2
    assert fetch["dropped"]["fetch.http_error"] == 1
    assert fetch["dropped"]["fetch.not_image"] == 1
    assert fetch["dropped"]["fetch.too_large"] == 1
    meta = pd.read_parquet(Path(result["run_dir"]) / "steps" / "fetch" / "00000.parquet")
    assert sorted(zip(meta["original_width"], meta["original_height"], strict=True)) == [(320, 240), (400, 300)]
    check_report(Path(result["run_dir"]) / "report.json")


def test_retry_failed_fetches_only_transient_failures_then_recomputes_downstream(tmp_path):
    """The fetch ledger over a real server: a 503 is asked again under retry_failed, a 404 never; a plain
    re-run after the retry rewrites nothing."""
    from dataclasses import replace

    from flows import steps
    from flows.engine import RunContext

    hits: dict[str, int] = {}

    class Counting(_Images):
        def do_GET(self):  # noqa: N802 - the stdlib's name
            hits[self.path] = hits.get(self.path, 0) + 1
            super().do_GET()

    _Images.files = {"/ok.jpg": (200, "image/jpeg", _jpeg(320, 240, 1)),
                     "/busy.jpg": (503, "text/plain", b"busy")}
    server = ThreadingHTTPServer(("127.0.0.1", 0), Counting)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        imgs = "".join(f'<img src="{base}/{n}" alt="{CAPTION}{i}号">' for i, n in enumerate(["ok.jpg", "busy.jpg",
                                                                                           "gone.jpg"]))
        _page_warc(tmp_path / "pages.warc.gz", [("http://www.example-zh.test/a.html",
                                                 f"<html><body><p>{CAPTION}</p>{imgs}</body></html>")])
        ctx = RunContext(run_dir=str(tmp_path / "run"), run_id="retry", lancedb=str(tmp_path / "lancedb"),
                         config={"http": {"allow_networks": ["127.0.0.1/32"], "retries": 1, "backoff_s": 0.01}})

        def run(context):
            extract = steps.extract.fn(context, "00000", str(tmp_path / "pages.warc.gz"))
            fetch = steps.fetch.fn(context, "00000", steps.source.fn(context, "00000", extract))
            return fetch, steps.image.fn(context, "00000", steps.refine.fn(context, "00000", fetch))

        fetch, image = run(ctx)
        assert fetch.kept == 1 and fetch.dropped == {"fetch.http_error": 2}
        assert fetch.extra["transient_failures"] == 1 and fetch.extra["requests"] == 4  # 1 + 2 + 1
        ledger = pd.read_parquet(tmp_path / "run" / "steps" / "fetch" / "00000.ledger.parquet").set_index("url")
        assert ledger.loc[f"{base}/busy.jpg", ["status", "attempts", "transient"]].tolist() == [503, 2, True]
        assert ledger.loc[f"{base}/gone.jpg", ["status", "attempts", "transient"]].tolist() == [404, 1, False]
        assert ledger.loc[f"{base}/busy.jpg", "error"] == "HTTP 503"

        assert run(ctx)[0] == fetch  # a plain re-run asks nothing
        _Images.files["/busy.jpg"] = (200, "image/jpeg", _jpeg(400, 300, 2))
        before = dict(hits)
        retried, image2 = run(replace(ctx, retry_failed=True))
        asked = {p: hits[p] - before.get(p, 0) for p in hits if hits[p] != before.get(p, 0)}
        assert asked == {"/busy.jpg": 1}  # robots.txt too was read once, by the first run's fetcher
        assert retried.kept == 2 and retried.hash != fetch.hash and image2.hash != image.hash
        assert retried.extra["transient_failures"] == 0 and retried.extra["requests"] == 1
        ledger = pd.read_parquet(tmp_path / "run" / "steps" / "fetch" / "00000.ledger.parquet").set_index("url")
        assert ledger.loc[f"{base}/busy.jpg", ["status", "attempts", "transient"]].tolist() == [200, 3, False]

        files = {p: p.stat().st_mtime_ns for p in (tmp_path / "run").rglob("*") if p.is_file()}
        assert run(ctx)[0] == retried  # plain re-run after the retry: nothing fetched, nothing rewritten
        assert run(replace(ctx, retry_failed=True))[0] == retried  # no transient failure left: nothing either
        assert {p: p.stat().st_mtime_ns for p in (tmp_path / "run").rglob("*") if p.is_file()} == files
        assert hits["/busy.jpg"] == before["/busy.jpg"] + 1 and hits["/gone.jpg"] == 1
    finally:
        server.shutdown()


@pytest.fixture
def external_cluster(prefect_server, tmp_path):
    """A real `dask scheduler` and two `dask worker` processes on 127.0.0.1."""
    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    env = {**os.environ, "PREFECT_API_URL": prefect_server}
    dask = [sys.executable, "-m", "distributed.cli.dask_scheduler"]
    procs = [subprocess.Popen([*dask, "--host", "127.0.0.1", "--port", str(port), "--dashboard-address", ":0"],
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
    for i in range(2):
        gpu = ["--resources", "GPU=1"] if i == 1 else []  # one "GPU" worker: model tasks must run only there
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "distributed.cli.dask_worker", address, "--nthreads", "1", "--name", f"w{i}",
             "--dashboard-address", ":0", "--local-directory", str(tmp_path / f"w{i}"), *gpu],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=str(ROOT)))
    try:
        from distributed import Client

        deadline = time.monotonic() + 90
        while True:
            try:
                with Client(address, timeout=5) as client:
                    client.wait_for_workers(2, timeout=60)
                break
            except (OSError, TimeoutError):
                if time.monotonic() > deadline:
                    raise
                time.sleep(1)
        yield address
    finally:
        for p in procs[::-1]:
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()


def test_run_on_an_external_dask_cluster(external_cluster, sample_crawl, tmp_path):
    params = CurateParams(warcs=[str(p) for p in sample_crawl.warcs], out=str(tmp_path), fetcher="replay")
    result = curate(params, dask_address=external_cluster)
    embeds = [json.loads(p.read_text()) for p in (Path(result["run_dir"]) / "steps" / "embed").glob("*.done.json")]
    assert len(embeds) == 3 and {m["extra"]["worker"] for m in embeds} == {"w1"}
    others = [json.loads(p.read_text()) for p in (Path(result["run_dir"]) / "steps" / "image").glob("*.done.json")]
    assert len(others) == 3
    reference = run_sample(tmp_path / "local", sample_crawl)
    assert [s["kept"] for s in result["report"]["stages"]] == [s["kept"] for s in reference["report"]["stages"]]
    check_report(Path(result["run_dir"]) / "report.json", "--kept-all")


def test_unreachable_dask_address_is_a_clear_error(prefect_server, sample_crawl, tmp_path):
    address = f"tcp://127.0.0.1:{free_port()}"
    params = CurateParams(warcs=[str(p) for p in sample_crawl.warcs], out=str(tmp_path), fetcher="replay")
    start = time.monotonic()
    with pytest.raises(ConnectionError, match="cannot reach the Dask scheduler"):
        curate(params, dask_address=address, cluster=LocalClusterSpec())
    assert time.monotonic() - start < 60
    assert not any(tmp_path.iterdir())  # no work started


def test_cli_missing_path_fails_before_any_work(tmp_path, capsys):
    from flows.cli import main

    rc = main(["run", "--warc", str(tmp_path / "nope.warc.gz"), "--out", str(tmp_path / "out")])
    assert rc == 2
    assert "not found" in capsys.readouterr().err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_cli_user_named_model_that_cannot_load_is_an_error(prefect_server, sample_crawl, tmp_path, capsys):
    from flows.cli import main

    rc = main(["run", "--warc", *map(str, sample_crawl.warcs), "--out", str(tmp_path), "--fetcher", "replay",
               "--embed-model", str(tmp_path / "no-such-model"), "--no-progress", "--workers", "1"])
    assert rc == 2
    assert "no-such-model" in capsys.readouterr().err


def test_cli_default_run_starts_its_own_prefect_server(tmp_path):
    """The README's command: `danqing run` on the sample crawl, no server started by hand."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    env.update(PREFECT_HOME=str(tmp_path / "prefect-home"), PREFECT_SERVER_ANALYTICS_ENABLED="false")
    res = subprocess.run([sys.executable, "-m", "flows.cli", "run", "--out", str(tmp_path / "out"), "--workers", "1"],
                         cwd=str(ROOT), env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "dataset:" in res.stdout and "report:" in res.stdout
    reports = list((tmp_path / "out").glob("*/report.json"))
    assert len(reports) == 1
    check_report(reports[0], "--kept-all")
    assert json.loads(reports[0].read_text())["samples"] > 0
    # the temporary server kept its history under the output root, not in the user's Prefect home
    assert (tmp_path / "out" / ".prefect" / "prefect.db").is_file()
    assert not (tmp_path / "prefect-home" / "prefect.db").exists()

"""A real Prometheus scrapes genserve.metrics' /metrics and sees what was recorded.

Needs the ``prometheus`` and ``promtool`` binaries (Debian: ``apt-get install -y
prometheus``; the service need not run, the test starts its own on loopback with
a temporary config and TSDB). Skips without them. Today it scrapes a bare
``Metrics`` HTTP server; it is meant to scrape a running ``genserve serve`` later.
"""
from __future__ import annotations

import json
import pathlib
import shutil
import socket
import subprocess
import time
import urllib.parse
import urllib.request

import pytest
import yaml

from genserve.metrics import Metrics

PROMETHEUS = shutil.which("prometheus")
PROMTOOL = shutil.which("promtool")
DASHBOARDS = sorted((pathlib.Path(__file__).resolve().parents[1]
                     / "deploy" / "grafana" / "dashboards").glob("*.json"))
pytestmark = pytest.mark.skipif(PROMETHEUS is None, reason="prometheus not installed "
                                "(apt-get install prometheus)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=5) as resp:
        return json.loads(resp.read())


def query(base: str, expr: str) -> dict:
    return get_json(f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": expr}))


def wait_for(check, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    last = None
    while time.monotonic() < deadline:
        try:
            last = check()
            if last:
                return last
        except OSError as exc:  # not listening yet
            last = exc
        time.sleep(0.25)
    raise AssertionError(f"timed out waiting for {what}: {last!r}")


def record(m: Metrics, scale: int) -> None:
    for _ in range(scale):
        m.request_finished("image", "sd3-tiny", "OK", latency_s=0.8, queue_s=0.05, slo_met=True)
    m.request_finished("video", "wan-tiny", "OK", latency_s=40.0, queue_s=2.0, slo_met=False)
    m.request_finished("image", "sd3-tiny", "CANCELLED", queue_s=0.1)
    m.set_queue("image", queued=2, running=3, paused=0)
    m.set_queue("video", queued=1, running=1, paused=1)
    m.preempted("video")
    m.resharded()
    m.step("video", "wan-tiny", 2, 1, 1.5, 1.2, [0, 1])
    m.step("image", "sd3-tiny", 1, 3, 0.1, 0.09, [1])
    m.decision(0.0003)
    m.worker_restarted(1)
    m.set_workers(up=2, down=0)


@pytest.fixture()
def scraped(tmp_path):
    """A Metrics server with a few requests recorded and a Prometheus scraping it
    every second; yields (metrics, prometheus base URL)."""
    m = Metrics(version="test", policy="genserve", device_kind="cpu")
    record(m, scale=3)
    server = m.start_http_server(0, addr="127.0.0.1")
    prom_port = free_port()
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "scrape_configs": [{"job_name": "genserve", "static_configs": [
            {"targets": [f"127.0.0.1:{server.server_port}"]}]}],
    }
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    log = open(tmp_path / "prometheus.log", "w")
    proc = subprocess.Popen(
        [PROMETHEUS, f"--config.file={tmp_path / 'prometheus.yml'}",
         f"--storage.tsdb.path={tmp_path / 'tsdb'}",
         f"--web.listen-address=127.0.0.1:{prom_port}"],
        stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{prom_port}"
    try:
        wait_for(lambda: urllib.request.urlopen(f"{base}/-/ready", timeout=2).status == 200,
                 30, "prometheus ready")
        yield m, base
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
        server.shutdown()
        server.server_close()


def series(base: str, expr: str) -> dict[tuple, float]:
    data = query(base, expr)
    assert data["status"] == "success", data
    return {tuple(sorted((k, v) for k, v in r["metric"].items() if k not in ("instance", "job"))):
            float(r["value"][1]) for r in data["data"]["result"]}


def test_prometheus_scrapes_recorded_requests(scraped):
    m, base = scraped
    got = wait_for(lambda: series(base, "genserve_requests_total"), 30, "first scrape")
    assert got[(("__name__", "genserve_requests_total"), ("model", "sd3-tiny"),
                ("status", "OK"), ("task", "image"))] == 3
    assert got[(("__name__", "genserve_requests_total"), ("model", "sd3-tiny"),
                ("status", "CANCELLED"), ("task", "image"))] == 1
    assert got[(("__name__", "genserve_requests_total"), ("model", "wan-tiny"),
                ("status", "OK"), ("task", "video"))] == 1
    up = series(base, 'up{job="genserve"}')
    assert list(up.values()) == [1.0]

    # New requests show up in the next scrapes.
    record(m, scale=2)
    key = (("task", "image"),)
    wait_for(lambda: series(base, 'sum by (task) (genserve_requests_total{status="OK"})')
             .get(key) == 5, 15, "second batch scraped")
    slo = series(base, "sum by (task, outcome) (genserve_slo_total)")
    assert slo[(("outcome", "met"), ("task", "image"))] == 5
    assert slo[(("outcome", "missed"), ("task", "video"))] == 2


def test_dashboard_queries_evaluate(scraped):
    m, base = scraped
    wait_for(lambda: series(base, "genserve_requests_total"), 30, "first scrape")
    record(m, scale=2)
    time.sleep(3)  # a few scrapes, so rate() has points on both sides of the change
    exprs = [t["expr"] for path in DASHBOARDS
             for p in json.loads(path.read_text())["panels"] for t in p.get("targets", [])]
    assert exprs
    empty = []
    for expr in exprs:
        for var, value in {"$__rate_interval": "30s", "$__range": "5m", "$instance": ".*"}.items():
            expr = expr.replace(var, value)
        data = query(base, expr)
        assert data["status"] == "success", (expr, data)
        if not data["data"]["result"]:
            empty.append(expr)
    # Every panel has data once the server has done a little of everything.
    assert not empty, empty


@pytest.mark.skipif(PROMTOOL is None, reason="promtool not installed")
def test_promtool_lints_exposition():
    m = Metrics()
    record(m, scale=1)
    out = subprocess.run([PROMTOOL, "check", "metrics"], input=m.render(),
                         capture_output=True, timeout=30)
    assert out.returncode == 0, (out.stdout + out.stderr).decode()

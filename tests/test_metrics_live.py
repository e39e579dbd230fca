"""A running server's /metrics after real traffic, and a real Prometheus scraping it."""
from __future__ import annotations

import subprocess
import threading
import urllib.request

import grpc
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from conftest import ServerProcess
from genserve.client import Client
from genserve.metrics import FAMILIES
from test_metrics_prometheus import PROMETHEUS, free_port, series, wait_for

pytestmark = pytest.mark.slow
CONCURRENT_DEADLINES = 12  # videos abandoned at their callers' deadlines at about the same time


@pytest.fixture(scope="module")
def metered():
    port = free_port()
    srv = ServerProcess("--num-workers", "2", "--metrics-port", str(port))
    try:  # (a failure here must not leave the server running)
        with Client(srv.target) as client:
            for i in range(3):
                client.generate(f"image {i}", task="image", steps=2, seed=i)
            client.generate("a video", task="video", steps=2)
            with pytest.raises(grpc.RpcError):
                client.generate("bad", task="image", width=8)
            stream = client.stream("cancel me", task="video", steps=40, request_id="m-cancel")
            for event in stream:
                if event.step == 1:
                    client.cancel("m-cancel")
                if event.type >= 7:  # terminal
                    break
            with pytest.raises(grpc.RpcError) as err:  # the caller's deadline passes mid-run
                client.generate("too slow", task="video", width=128, height=128, num_frames=33, steps=50,
                                timeout_s=0.5)
            assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            # callers whose deadlines pass together (each client cancels a few ms before
            # the server's copy of its deadline runs out): all counted DEADLINE_EXCEEDED
            codes = []

            def too_slow(i):
                with pytest.raises(grpc.RpcError) as err:
                    list(client.stream(f"too slow {i}", task="video", width=128, height=128, num_frames=33,
                                       steps=50, timeout_s=0.5 + 0.05 * (i % 4)))
                codes.append(err.value.code())

            threads = [threading.Thread(target=too_slow, args=(i,)) for i in range(CONCURRENT_DEADLINES)]
            [t.start() for t in threads]
            [t.join(60) for t in threads]
            assert codes == [grpc.StatusCode.DEADLINE_EXCEEDED] * CONCURRENT_DEADLINES
    except BaseException:
        srv.stop()
        raise
    yield srv, f"http://127.0.0.1:{port}"
    srv.stop()


def scrape(url: str) -> dict:
    with urllib.request.urlopen(f"{url}/metrics", timeout=5) as resp:
        return {f.name: f for f in text_string_to_metric_families(resp.read().decode())}


def test_every_family_exported_with_type_and_labels(metered):
    _, url = metered
    got = scrape(url)
    for fam in FAMILIES:
        name = fam.name.removesuffix("_total") if fam.kind == "counter" else fam.name
        assert name in got, f"{fam.name} missing"
        assert got[name].type == fam.kind, (fam.name, got[name].type)
        labelled = [s for s in got[name].samples if not s.name.endswith(("_created",))]
        assert labelled, f"{fam.name} has no samples after traffic"
        for sample in labelled:
            assert set(fam.labels) <= set(sample.labels), (fam.name, sample.labels)
            assert not any("m-cancel" in v or "image 0" in v for v in sample.labels.values())
    requests = {(s.labels["task"], s.labels["status"]): s.value for s in got["genserve_requests"].samples
                if s.name == "genserve_requests_total"}
    assert requests[("image", "OK")] == 3 and requests[("video", "OK")] == 1
    assert requests[("video", "CANCELLED")] == 1
    # refusals and abandoned calls count too, by the status the caller saw
    assert requests[("image", "INVALID_ARGUMENT")] == 1
    wait_for(lambda: video_count(url, "DEADLINE_EXCEEDED") == 1 + CONCURRENT_DEADLINES,  # (counted when
             30, "every abandoned video in the metrics as DEADLINE_EXCEEDED")            # the run stops)
    assert video_count(url, "CANCELLED") == 1 and video_count(url, "INTERNAL") == 0


def video_count(url: str, status: str) -> float:
    return sum(s.value for s in scrape(url)["genserve_requests"].samples
               if s.name == "genserve_requests_total" and s.labels["task"] == "video"
               and s.labels["status"] == status)


@pytest.mark.skipif(PROMETHEUS is None, reason="prometheus not installed (apt-get install prometheus)")
def test_prometheus_scrapes_the_server(metered, tmp_path):
    _, url = metered
    prom_port = free_port()
    config = {"global": {"scrape_interval": "1s"},
              "scrape_configs": [{"job_name": "genserve", "static_configs": [{"targets": [url[len("http://"):]]}]}]}
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    proc = subprocess.Popen([PROMETHEUS, f"--config.file={tmp_path / 'prometheus.yml'}",
                             f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                             f"--web.listen-address=127.0.0.1:{prom_port}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{prom_port}"
    try:
        got = wait_for(lambda: series(base, 'sum by (task) (genserve_requests_total{status="OK"})'),
                       60, "a scrape of the live server")
        assert got[(("task", "image"),)] == 3 and got[(("task", "video"),)] == 1
    finally:
        proc.terminate()
        proc.wait(10)

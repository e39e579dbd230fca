"""Scrape the server's Prometheus endpoint during a run (queue depth over time).

A daemon thread fetches ``/metrics`` every ``interval_s`` and keeps the gauges
named in ``GAUGES`` per ``task`` label (and the running totals of the
dispatch-overhead histogram, ``OVERHEAD``: their last sum / count is the
run's mean overhead per dispatch), timestamped on the run's clock (seconds
since ``t0`` on ``time.monotonic()``, as in ``requests.jsonl``). A failed
scrape is counted and skipped: the run never depends on the endpoint.
"""
from __future__ import annotations

import http.client
import json
import threading
import time
import urllib.parse
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable

from prometheus_client.parser import text_string_to_metric_families

GAUGES = ("genserve_queue_depth", "genserve_running_requests", "genserve_paused_requests")
OVERHEAD = ("genserve_dispatch_overhead_seconds_sum", "genserve_dispatch_overhead_seconds_count")


@dataclass(frozen=True, slots=True)
class MetricSample:
    """One gauge value at one scrape."""

    t_s: float  # seconds since the run's start
    name: str
    task: str
    value: float


def parse_gauges(text: str, t_s: float, names: Iterable[str] = GAUGES) -> list[MetricSample]:
    """The samples of ``names`` in a Prometheus text exposition."""
    wanted = set(names)
    out = []
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name in wanted:
                out.append(MetricSample(t_s, s.name, s.labels.get("task", ""), float(s.value)))
    return out


def metrics_url(target: str) -> str:
    """``HOST:PORT`` or a full URL → the URL of the metrics page; ValueError
    if that is not an http(s) URL with a host."""
    url = target if "://" in target else "http://" + target
    url = url if url.rstrip("/").endswith("/metrics") else url.rstrip("/") + "/metrics"
    try:
        parts = urllib.parse.urlsplit(url)
        ok = parts.scheme in ("http", "https") and parts.hostname and parts.port != 0
    except ValueError:  # e.g. a port that is not a number
        ok = False
    if not ok or any(c.isspace() for c in url):
        raise ValueError(f"metrics URL {target!r}: expected HOST:PORT or an http(s) URL")
    return url


def fetch(url: str, t_s: float, timeout_s: float) -> list[MetricSample]:
    """One scrape of ``url``: the samples of ``GAUGES`` and ``OVERHEAD``."""
    with urllib.request.urlopen(url, timeout=timeout_s) as resp:
        text = resp.read().decode("utf-8")
    return parse_gauges(text, t_s, GAUGES + OVERHEAD)


def check_metrics_url(target: str, timeout_s: float = 5.0) -> str:
    """The metrics URL of ``target`` once it answered one scrape; ValueError
    (one line) if it is not an http(s) URL or does not answer with metrics."""
    url = metrics_url(target)
    try:
        fetch(url, 0.0, timeout_s)
    except (OSError, ValueError, http.client.HTTPException) as err:
        raise ValueError(f"cannot scrape the metrics URL {url}: {err}") from None
    return url


class Scraper:
    """Background scraper; ``start`` / ``stop``, then read ``samples``."""

    def __init__(self, url: str, t0: float, interval_s: float = 0.5, timeout_s: float = 2.0):
        self.url, self.t0 = metrics_url(url), t0
        self.interval_s, self.timeout_s = interval_s, timeout_s
        self.samples: list[MetricSample] = []
        self.num_failed = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="loadgen-scraper", daemon=True)

    def scrape_once(self) -> None:
        t_s = time.monotonic() - self.t0
        try:
            self.samples.extend(fetch(self.url, t_s, self.timeout_s))
        except (OSError, ValueError, http.client.HTTPException):
            self.num_failed += 1

    def _loop(self) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            self.scrape_once()
            self._stop.wait(max(0.0, self.interval_s - (time.monotonic() - started)))

    def start(self) -> "Scraper":
        self._thread.start()
        return self

    def stop(self) -> list[MetricSample]:
        self._stop.set()
        self._thread.join(self.timeout_s + self.interval_s + 1.0)
        self.scrape_once()  # the state after the run
        return self.samples


def write_samples(path: str | Path, samples: Iterable[MetricSample]) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        for s in samples:
            fh.write(json.dumps(asdict(s)) + "\n")


def read_samples(path: str | Path) -> list[MetricSample]:
    with open(path, encoding="utf-8") as fh:
        return [MetricSample(**json.loads(line)) for line in fh if line.strip()]

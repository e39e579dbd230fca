"""Prometheus metrics of a GenServe server.

``Metrics`` owns its own ``CollectorRegistry`` (never the process-global one), so
a test or a simulator may build several side by side. The engine calls its plain
methods at the points named in each docstring; nothing here reads a clock, and
every duration is passed in seconds (Prometheus base units).

Labels are kept low-cardinality on purpose: task class, model name (from the
server's configuration), final gRPC status name, device index, SP degree and a
power-of-two batch-size bucket. Request ids and prompts never become labels.
Values outside a known set (status names, tasks) or past a per-label cap
(models, devices) are folded into ``"other"`` so a bug upstream cannot blow up
the series count.

``FAMILIES`` lists every family with its type and label names; dashboards and
tests cross-check against it (``FAMILY_NAMES``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client import start_http_server as _start_http_server

# Every gRPC status code name; anything else is reported as "UNKNOWN".
GRPC_STATUS_NAMES = frozenset({
    "OK", "CANCELLED", "UNKNOWN", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED",
    "NOT_FOUND", "ALREADY_EXISTS", "PERMISSION_DENIED", "RESOURCE_EXHAUSTED",
    "FAILED_PRECONDITION", "ABORTED", "OUT_OF_RANGE", "UNIMPLEMENTED",
    "INTERNAL", "UNAVAILABLE", "DATA_LOSS", "UNAUTHENTICATED",
})
TASK_NAMES = frozenset({"image", "video"})
OTHER = "other"
# Most distinct values kept per free-form label (model, device); later ones
# are reported as "other".
MAX_LABEL_VALUES = 64

# End-to-end latency: images take sub-second to a minute, videos seconds to an
# hour, so one bucket list spans 0.05 s to 3600 s.
LATENCY_BUCKETS_S = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300,
                     600, 1200, 1800, 3600)
QUEUE_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30,
                   60, 120, 300, 600, 1800, 3600)
# One denoising step: ~10 ms (tiny CPU preset) to minutes (large video, one GPU).
STEP_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20,
                  40, 80, 160, 320)
# measured / predicted step time; 1.0 is a perfect prediction.
RATIO_BUCKETS = (0.25, 0.5, 0.67, 0.8, 0.9, 0.95, 1.0, 1.05, 1.1, 1.25, 1.5,
                 2.0, 4.0)
DECISION_BUCKETS_S = (1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3,
                      5e-3, 1e-2, 2.5e-2, 5e-2, 0.1, 0.25, 0.5, 1.0)
SP_DEGREE_BUCKETS = (1, 2, 4, 8)
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32)


@dataclass(frozen=True, slots=True)
class Family:
    """One exported metric family as PromQL names it.

    ``name`` is the series name for counters and gauges (counters end in
    ``_total``) and the base name for histograms, whose series add
    ``_bucket``, ``_sum`` and ``_count``.
    """

    name: str
    kind: str  # "counter" | "gauge" | "histogram"
    labels: tuple[str, ...]
    help: str


FAMILIES: tuple[Family, ...] = (
    Family("genserve_requests_total", "counter", ("task", "model", "status"),
           "Requests finished, by final gRPC status name."),
    Family("genserve_request_latency_seconds", "histogram", ("task",),
           "End-to-end latency of requests that finished OK."),
    Family("genserve_queue_delay_seconds", "histogram", ("task",),
           "Time from arrival to the first step."),
    Family("genserve_slo_total", "counter", ("task", "outcome"),
           "Finished requests that carried an SLO, by outcome met|missed."),
    Family("genserve_queue_depth", "gauge", ("task",),
           "Requests waiting for their first step."),
    Family("genserve_running_requests", "gauge", ("task",),
           "Requests that have started and are being given steps."),
    Family("genserve_paused_requests", "gauge", ("task",),
           "Started requests currently preempted (holding state, no step)."),
    Family("genserve_preemptions_total", "counter", ("task",),
           "Times a started request was denied its next step."),
    Family("genserve_reshards_total", "counter", (),
           "Times a video's sequence-parallel group changed size or place."),
    Family("genserve_sp_degree", "histogram", (),
           "Sequence-parallel degree of each video step."),
    Family("genserve_image_batch_size", "histogram", (),
           "Number of images in each batched image step."),
    Family("genserve_step_latency_seconds", "histogram",
           ("model", "sp_degree", "batch_size"),
           "Measured wall time of one denoising step (batch size bucketed "
           "to a power of two)."),
    Family("genserve_step_prediction_error_ratio", "histogram", ("model",),
           "Measured over predicted step time; 1 is a perfect prediction."),
    Family("genserve_device_busy_seconds_total", "counter", ("device",),
           "Seconds each device spent running steps."),
    Family("genserve_worker_restarts_total", "counter", ("device",),
           "Worker processes restarted after a failure."),
    Family("genserve_scheduler_decision_seconds", "histogram", (),
           "Wall time of one scheduling decision (policy plan call)."),
    Family("genserve_dispatch_overhead_seconds", "histogram", (),
           "Wall time of a dispatch beyond the compute its workers report (round trip and engine "
           "turnaround)."),
    Family("genserve_build_info", "gauge", ("version", "policy", "device_kind"),
           "Constant 1, labelled with the server build and setup."),
    Family("genserve_workers", "gauge", ("state",),
           "Worker processes by state up|down."),
    Family("genserve_sp_max_degree", "gauge", (),
           "Largest sequence-parallel group plans may use now (1 after a worker crash until the "
           "workers have joined a new process group)."),
)
FAMILY_NAMES: tuple[str, ...] = tuple(f.name for f in FAMILIES)

_BUCKETS = {
    "genserve_request_latency_seconds": LATENCY_BUCKETS_S,
    "genserve_queue_delay_seconds": QUEUE_BUCKETS_S,
    "genserve_sp_degree": SP_DEGREE_BUCKETS,
    "genserve_image_batch_size": BATCH_SIZE_BUCKETS,
    "genserve_step_latency_seconds": STEP_BUCKETS_S,
    "genserve_step_prediction_error_ratio": RATIO_BUCKETS,
    "genserve_scheduler_decision_seconds": DECISION_BUCKETS_S,
    "genserve_dispatch_overhead_seconds": DECISION_BUCKETS_S,
}


def batch_bucket(batch_size: int) -> str:
    """The label for a batch size: the smallest power of two >= it ("1" for <= 1)."""
    size = 1
    while size < batch_size:
        size *= 2
    return str(size)


def _make(family: Family, registry: CollectorRegistry):
    if family.kind == "counter":
        return Counter(family.name, family.help, family.labels, registry=registry)
    if family.kind == "gauge":
        return Gauge(family.name, family.help, family.labels, registry=registry)
    return Histogram(family.name, family.help, family.labels,
                     buckets=_BUCKETS[family.name], registry=registry)


class Metrics:
    """The server's metrics, registered in a registry of their own.

    Thread-safe (prometheus-client metrics are); cheap enough to call on every
    step. Build info is set once here; every other family starts empty.
    """

    def __init__(self, version: str = "unknown", policy: str = "unknown",
                 device_kind: str = "unknown",
                 max_label_values: int = MAX_LABEL_VALUES) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._m = {f.name: _make(f, self.registry) for f in FAMILIES}
        self._max_label_values = max_label_values
        self._seen: dict[str, set[str]] = {}
        self._m["genserve_build_info"].labels(
            version=version, policy=policy, device_kind=device_kind).set(1)

    # -- label hygiene -------------------------------------------------
    def _free(self, label: str, value: object) -> str:
        """Bound a free-form label (model, device) to the first N values seen."""
        text = str(value)
        seen = self._seen.setdefault(label, set())
        if text in seen:
            return text
        if len(seen) >= self._max_label_values:
            return OTHER
        seen.add(text)
        return text

    @staticmethod
    def _task(task: str) -> str:
        return task if task in TASK_NAMES else OTHER

    @staticmethod
    def _status(status: str) -> str:
        return status if status in GRPC_STATUS_NAMES else "UNKNOWN"

    def prepare(self, num_devices: int) -> None:
        """Create the zero-valued series of every known label set (tasks,
        devices), so dashboards and alerts see 0 rather than no data."""
        for task in sorted(TASK_NAMES):
            self._m["genserve_preemptions_total"].labels(task=task)
            for outcome in ("met", "missed"):
                self._m["genserve_slo_total"].labels(task=task, outcome=outcome)
            self.set_queue(task, 0, 0, 0)
        for device in range(num_devices):
            self._m["genserve_device_busy_seconds_total"].labels(device=self._free("device", device))
            self._m["genserve_worker_restarts_total"].labels(device=self._free("device", device))
        self.set_workers(up=num_devices, down=0)

    # -- requests -------------------------------------------------------
    def calls_ended(self, task: str, model: str, status: str, count: int = 1) -> None:
        """Count ``count`` calls that ended with ``status``: the request
        counter counts calls, and callers attached to one request by its id
        are calls of their own (``request_finished`` counts the request's
        first)."""
        if count > 0:
            self._m["genserve_requests_total"].labels(
                task=self._task(task), model=self._free("model", model),
                status=self._status(status)).inc(count)

    def request_finished(self, task: str, model: str, status: str,
                         latency_s: float | None = None,
                         queue_s: float | None = None,
                         slo_met: bool | None = None) -> None:
        """Record a request's one terminal outcome.

        Call exactly once per request, when its final status is known.
        ``status`` is the gRPC status code name (``"OK"``, ``"CANCELLED"``...).
        ``latency_s`` (arrival to last byte of the result) is observed only for
        status OK, so cancellations and errors do not skew latency panels.
        ``queue_s`` (arrival to first step) is observed whenever given.
        ``slo_met`` is None for requests without an SLO (they count in neither
        outcome); otherwise it says whether the deadline was met (a request
        that failed or was cancelled should be passed ``False`` if it had one).
        """
        task = self._task(task)
        self.calls_ended(task, model, status)
        if latency_s is not None and status == "OK":
            self._m["genserve_request_latency_seconds"].labels(task=task).observe(latency_s)
        if queue_s is not None:
            self._m["genserve_queue_delay_seconds"].labels(task=task).observe(queue_s)
        if slo_met is not None:
            outcome = "met" if slo_met else "missed"
            self._m["genserve_slo_total"].labels(task=task, outcome=outcome).inc()

    def set_queue(self, task: str, queued: int, running: int, paused: int) -> None:
        """Set the current number of queued, running and paused requests of a task.

        Call after every scheduling decision (the values are a snapshot).
        """
        task = self._task(task)
        self._m["genserve_queue_depth"].labels(task=task).set(queued)
        self._m["genserve_running_requests"].labels(task=task).set(running)
        self._m["genserve_paused_requests"].labels(task=task).set(paused)

    def preempted(self, task: str) -> None:
        """Count one preemption: a started request denied its next step."""
        self._m["genserve_preemptions_total"].labels(task=self._task(task)).inc()

    def resharded(self) -> None:
        """Count one reshape/move of a video's sequence-parallel group."""
        self._m["genserve_reshards_total"].inc()

    # -- steps and devices ---------------------------------------------
    def step(self, task: str, model: str, sp_degree: int, batch_size: int,
             measured_s: float, predicted_s: float | None,
             device_ids: Sequence[int | str]) -> None:
        """Record one executed step (a video SP step or an image batch step).

        ``measured_s`` is the step's wall time as the workers reported it;
        ``predicted_s`` is what the cost model predicted (None or <= 0: no
        prediction, the error ratio is not observed). Every device in
        ``device_ids`` is counted busy for ``measured_s``. Video steps feed the
        SP-degree histogram, image steps the batch-size histogram.
        """
        model = self._free("model", model)
        self._m["genserve_step_latency_seconds"].labels(
            model=model, sp_degree=str(int(sp_degree)),
            batch_size=batch_bucket(batch_size)).observe(measured_s)
        if predicted_s is not None and predicted_s > 0:
            self._m["genserve_step_prediction_error_ratio"].labels(
                model=model).observe(measured_s / predicted_s)
        if task == "video":
            self._m["genserve_sp_degree"].observe(sp_degree)
        elif task == "image":
            self._m["genserve_image_batch_size"].observe(batch_size)
        busy = self._m["genserve_device_busy_seconds_total"]
        for device in device_ids:
            busy.labels(device=self._free("device", device)).inc(measured_s)

    def decision(self, seconds: float) -> None:
        """Observe the wall time of one scheduling decision."""
        self._m["genserve_scheduler_decision_seconds"].observe(seconds)

    def dispatch_overhead(self, seconds: float) -> None:
        """Observe one dispatch's wall time beyond its workers' compute."""
        self._m["genserve_dispatch_overhead_seconds"].observe(max(seconds, 0.0))

    def worker_restarted(self, device: int | str) -> None:
        """Count one restart of the worker process on ``device``."""
        self._m["genserve_worker_restarts_total"].labels(
            device=self._free("device", device)).inc()

    def set_workers(self, up: int, down: int) -> None:
        """Set how many worker processes are up and down right now."""
        workers = self._m["genserve_workers"]
        workers.labels(state="up").set(up)
        workers.labels(state="down").set(down)

    def set_sp_max_degree(self, degree: int) -> None:
        """Set the largest sequence-parallel group plans may use now."""
        self._m["genserve_sp_max_degree"].set(degree)

    # -- exposition -----------------------------------------------------
    def render(self) -> bytes:
        """The registry in Prometheus text exposition format."""
        return generate_latest(self.registry)

    def start_http_server(self, port: int, addr: str = "0.0.0.0"):
        """Serve ``/metrics`` for this registry on its own port, in a daemon thread.

        ``port=0`` picks a free port (read it from ``server.server_port``).
        Returns the server; stop it with ``server.shutdown()`` then
        ``server.server_close()``.
        """
        server, _thread = _start_http_server(port, addr=addr, registry=self.registry)
        return server


def family(name: str) -> Family:
    """The ``Family`` called ``name`` (KeyError if none)."""
    for fam in FAMILIES:
        if fam.name == name:
            return fam
    raise KeyError(name)


def series_names(families: Iterable[Family] = FAMILIES) -> frozenset[str]:
    """Every series name PromQL can select for these families."""
    names: set[str] = set()
    for fam in families:
        if fam.kind == "histogram":
            names.update(fam.name + s for s in ("_bucket", "_sum", "_count"))
        else:
            names.add(fam.name)
    return frozenset(names)

"""``summarize(records)``: the run's figures as a pure function of its records.

Everything in ``summary.json`` is recomputed from ``requests.jsonl`` alone, so
a summary can be rebuilt (or a run re-cut) after the fact. Warm-up records are
counted in ``num_warmup`` and excluded from every other figure.

Definitions:
- attainment: requests that met their SLO / all measured requests of the
  class, failed and rejected ones included (they count as misses);
- goodput: requests that met their SLO per second of the measured window
  (first measured send to last measured finish);
- latency: the server's ``latency_ms`` of requests that finished OK (client
  latency, queueing and first-event time are of those requests too);
- achieved send rate: (n - 1) / (last send - first send); the intended rate is
  the same over the planned send times (open loop only).
"""
from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Sequence

import numpy as np

from .records import RequestRecord

TASK_ORDER = ("image", "video")
RATE_TOLERANCE = 0.05  # warn when achieved and intended send rates differ by more


@dataclass(frozen=True, slots=True)
class Percentiles:
    """p50/p95/p99 (and mean) of one quantity; None when there is no sample."""

    count: int
    mean: float | None
    p50: float | None
    p95: float | None
    p99: float | None


@dataclass(frozen=True, slots=True)
class ClassSummary:
    """Figures of one request class (``all``, ``image`` or ``video``)."""

    num_requests: int
    num_ok: int
    num_met: int
    attainment: float | None
    goodput_per_s: float | None
    latency_ms: Percentiles
    client_latency_ms: Percentiles
    queue_ms: Percentiles
    first_event_ms: Percentiles
    preemptions_per_request: float | None


@dataclass(frozen=True, slots=True)
class Summary:
    """The figures of one run; ``to_dict`` is the ``summary.json`` layout."""

    num_requests: int
    num_warmup: int
    window_s: float
    attainment: float | None
    goodput_per_s: float | None
    throughput_per_s: float | None
    achieved_rate_per_s: float | None
    intended_rate_per_s: float | None
    rate_deviation: float | None  # achieved / intended - 1
    rate_warning: bool
    send_lag_ms: Percentiles  # actual minus planned send time (open loop)
    statuses: dict[str, int]
    errors: dict[str, int]
    classes: dict[str, ClassSummary] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def percentiles(values: Sequence[float]) -> Percentiles:
    if not len(values):
        return Percentiles(0, None, None, None, None)
    arr = np.asarray(values, dtype=float)
    p50, p95, p99 = (float(x) for x in np.percentile(arr, [50, 95, 99]))
    return Percentiles(len(arr), float(arr.mean()), p50, p95, p99)


def _ratio(num: float, den: float) -> float | None:
    return num / den if den > 0 else None


def _window_s(records: Sequence[RequestRecord]) -> float:
    if not records:
        return 0.0
    return max(r.finish_s for r in records) - min(r.send_s for r in records)


def _rate(times: Sequence[float]) -> float | None:
    if len(times) < 2:
        return None
    span_s = max(times) - min(times)
    return (len(times) - 1) / span_s if span_s > 0 else None


def summarize_class(records: Sequence[RequestRecord], window_s: float) -> ClassSummary:
    ok = [r for r in records if r.ok]
    met = sum(r.slo_met for r in records)
    started = [r for r in ok if r.first_event_s >= 0]
    return ClassSummary(
        num_requests=len(records), num_ok=len(ok), num_met=met,
        attainment=_ratio(met, len(records)),
        goodput_per_s=_ratio(met, window_s),
        latency_ms=percentiles([r.latency_ms for r in ok]),
        client_latency_ms=percentiles([r.client_latency_ms for r in ok]),
        queue_ms=percentiles([r.queue_ms for r in ok]),
        first_event_ms=percentiles([(r.first_event_s - r.send_s) * 1000.0 for r in started]),
        preemptions_per_request=_ratio(sum(r.num_preemptions for r in ok), len(ok)),
    )


def summarize(records: Sequence[RequestRecord]) -> Summary:
    """The run's summary; depends on nothing but ``records``."""
    measured = [r for r in records if not r.warmup]
    window_s = _window_s(measured)
    achieved = _rate([r.send_s for r in measured])
    planned = [r.intended_s for r in measured]
    intended = _rate(planned) if planned and min(planned) >= 0 else None
    deviation = achieved / intended - 1.0 if achieved and intended else None
    lags = [(r.send_s - r.intended_s) * 1000.0 for r in measured if r.intended_s >= 0]
    statuses = Counter(r.status for r in measured)
    tasks = [t for t in TASK_ORDER if any(r.task == t for r in measured)]
    tasks += sorted({r.task for r in measured} - set(tasks))
    classes = {"all": summarize_class(measured, window_s)}
    classes.update({t: summarize_class([r for r in measured if r.task == t], window_s) for t in tasks})
    overall = classes["all"]
    return Summary(
        num_requests=len(measured), num_warmup=len(records) - len(measured), window_s=window_s,
        attainment=overall.attainment, goodput_per_s=overall.goodput_per_s,
        throughput_per_s=_ratio(overall.num_ok, window_s),
        achieved_rate_per_s=achieved, intended_rate_per_s=intended, rate_deviation=deviation,
        rate_warning=deviation is not None and abs(deviation) > RATE_TOLERANCE,
        send_lag_ms=percentiles(lags),
        statuses=dict(sorted(statuses.items())),
        errors={k: v for k, v in sorted(statuses.items()) if k != "OK"},
        classes=classes,
    )


def _fmt(value: float | None, spec: str = ".0f") -> str:
    return "-" if value is None else format(value, spec)


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value * 100:.1f}%"


def format_table(summary: Summary) -> str:
    """A terminal table of the summary (one row per class)."""
    head = (f"{'class':<7}{'reqs':>6}{'ok':>6}{'met':>6}{'attain':>8}{'goodput/s':>10}"
            f"{'p50 ms':>9}{'p95 ms':>9}{'p99 ms':>9}{'queue p50':>10}{'queue p95':>10}")
    lines = [head, "-" * len(head)]
    for name, c in summary.classes.items():
        lines.append(f"{name:<7}{c.num_requests:>6}{c.num_ok:>6}{c.num_met:>6}"
                     f"{_pct(c.attainment):>8}"
                     f"{_fmt(c.goodput_per_s, '.3f'):>10}{_fmt(c.latency_ms.p50):>9}"
                     f"{_fmt(c.latency_ms.p95):>9}{_fmt(c.latency_ms.p99):>9}"
                     f"{_fmt(c.queue_ms.p50):>10}{_fmt(c.queue_ms.p95):>10}")
    errors = ", ".join(f"{k}={v}" for k, v in summary.errors.items()) or "none"
    lines.append(f"window {summary.window_s:.1f} s, warm-up {summary.num_warmup} excluded, errors: {errors}")
    lines.append(f"send rate: achieved {_fmt(summary.achieved_rate_per_s, '.3f')}/s, "
                 f"intended {_fmt(summary.intended_rate_per_s, '.3f')}/s, "
                 f"send lag p99 {_fmt(summary.send_lag_ms.p99, '.1f')} ms")
    if summary.rate_warning:
        lines.append(f"WARNING: achieved send rate differs from the intended one by "
                     f"{summary.rate_deviation * 100:+.1f}% (> {RATE_TOLERANCE * 100:.0f}%)")
    return "\n".join(lines)

"""Summaries of simulation results: the figures of the standard benchmarks."""
from __future__ import annotations

import math
from typing import Sequence

from .simulator import DONE, REJECTED, UNFINISHED, SimResult
from .types import IMAGE, VIDEO


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile (q in 0..100); NaN when empty."""
    xs = sorted(values)
    if not xs:
        return math.nan
    pos = (len(xs) - 1) * q / 100.0
    lo = int(math.floor(pos))
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def _frac(num: int, den: int) -> float:
    return num / den if den else math.nan


def summarize(result: SimResult) -> dict:
    """The JSON-ready summary documented in docs/scheduler.md."""
    outs = result.outcomes
    by_task = {t: [o for o in outs if o.task == t] for t in (IMAGE, VIDEO)}
    met = sum(o.met_slo for o in outs)
    span_s = max(result.end_s - result.start_s, 1e-9)
    latency, queueing = {}, {}
    for task, group in by_task.items():
        lat = [o.latency_s * 1e3 for o in group if o.status == DONE]
        wait = [(o.first_start_s - o.arrival_s) * 1e3 for o in group
                if not math.isnan(o.first_start_s)]
        latency[task] = {"p50": percentile(lat, 50), "p95": percentile(lat, 95),
                         "p99": percentile(lat, 99)}
        queueing[task] = {"p50": percentile(wait, 50), "p95": percentile(wait, 95)}
    videos = by_task[VIDEO]
    done_videos = [o for o in videos if o.status == DONE]
    images_done = [o for o in by_task[IMAGE] if o.status == DONE]
    return {
        "attainment": _frac(met, len(outs)),
        "attainment_image": _frac(sum(o.met_slo for o in by_task[IMAGE]), len(by_task[IMAGE])),
        "attainment_video": _frac(sum(o.met_slo for o in videos), len(videos)),
        "goodput_rps": met / span_s,
        "latency_ms": latency,
        "queueing_ms": queueing,
        "preemptions_per_video": _frac(sum(o.num_preemptions for o in videos), len(videos)),
        "busy_fraction": result.busy_device_s / (result.num_devices * span_s),
        "decision_ms": {"p50": percentile(result.decision_ms, 50),
                        "p99": percentile(result.decision_ms, 99),
                        "max": max(result.decision_ms, default=math.nan)},
        "num_decisions": len(result.decision_ms),
        "completed": sum(o.status == DONE for o in outs),
        "submitted": len(outs),
        "rejected": sum(o.status == REJECTED for o in outs),
        "unfinished": sum(o.status == UNFINISHED for o in outs),
        "mean_video_max_sp_degree": _frac(sum(o.max_sp_degree for o in done_videos),
                                          len(done_videos)),
        "mean_image_batch": _frac(sum(o.mean_batch for o in images_done), len(images_done)),
        "sim_span_s": span_s,
        "sim_wall_s": result.wall_s,
        "sim_requests_per_wall_s": _frac(len(outs), result.wall_s) if result.wall_s else math.nan,
    }


def json_safe(obj):
    """NaN and infinities become None (strict JSON)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj

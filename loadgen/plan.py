"""The workload a run sends: generated or replayed, then given steps and SLOs.

Arrival processes, class and shape mixes and the trace format all come from
``genserve.scheduler.workload`` (shared with the simulator); this module only
chooses between them and fills per-class steps and SLOs into the
``TraceRequest``s. The one addition is ``constant`` arrivals (evenly spaced at
the rate), which the shared module does not offer: the class and shape draws
still come from its ``generate``, only the times are replaced.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, Sequence

from genserve.scheduler.workload import (
    MIN_SLO_MS,
    TraceRequest,
    WorkloadSpec,
    generate,
    parse_shapes,
    read_trace,
    resolve,
    truncate,
)

ARRIVALS = ("poisson", "gamma", "constant")
TINY_IMAGE_SHAPES = "64x64"
TINY_VIDEO_SHAPES = "64x64x9"


@dataclass(frozen=True, slots=True)
class WorkloadOptions:
    """What to send. ``trace`` (a JSON-lines trace file) replaces generation."""

    trace: str = ""
    arrival: str = "poisson"  # poisson | gamma | constant
    rate_rps: float = 1.0
    cv: float = 1.0  # gamma only
    image_fraction: float = 0.7
    image_shapes: str = TINY_IMAGE_SHAPES  # "WxH[:weight],..."
    video_shapes: str = TINY_VIDEO_SHAPES  # "WxHxF[:weight],..."
    num_requests: int = 0  # 0: until duration_s (a trace: its first N arrivals; 0: all)
    duration_s: float = 0.0  # 0: until num_requests (a trace: its arrivals within; 0: all)
    seed: int = 0
    image_model: str = ""
    video_model: str = ""
    steps_image: int = 0  # 0: as in the trace, else the server's default
    steps_video: int = 0
    slo_ms_image: float = 0.0  # 0: as in the trace, else slo_scale or the server's default
    slo_ms_video: float = 0.0
    slo_scale: float = 0.0  # with ``profile``: slo_ms = scale x isolated latency
    profile: str = ""  # latency profile (name or JSON path) for slo_scale
    max_devices: int = 2  # isolated latency: best SP degree up to this

    def validate(self) -> None:
        if self.arrival not in ARRIVALS:
            raise ValueError(f"arrival must be one of {', '.join(ARRIVALS)}")
        if not self.trace and self.num_requests <= 0 and self.duration_s <= 0:
            raise ValueError("give num_requests or duration_s (or a trace)")
        if self.slo_scale and not self.profile:
            raise ValueError("slo_scale needs a latency profile (--profile) to compute SLOs; "
                             "without one, requests carry slo_ms=0 and the server's "
                             "--default-slo-scale applies")
        if min(self.steps_image, self.steps_video) < 0:
            raise ValueError("steps must be positive (0: default)")
        if any(0 < slo < MIN_SLO_MS for slo in (self.slo_ms_image, self.slo_ms_video)):
            raise ValueError(f"a fixed SLO must be 0 (the server's default) or at least "
                             f"{MIN_SLO_MS:g} ms")


def generated(opts: WorkloadOptions) -> tuple[TraceRequest, ...]:
    """Arrivals and class/shape draws from the shared ``generate``."""
    spec = WorkloadSpec(
        rate_rps=opts.rate_rps, arrival="poisson" if opts.arrival == "constant" else opts.arrival,
        cv=opts.cv, image_fraction=opts.image_fraction,
        image_shapes=parse_shapes(opts.image_shapes, "image"),
        video_shapes=parse_shapes(opts.video_shapes, "video"),
        num_requests=opts.num_requests,
        # constant arrivals are re-timed below, so draw by count, then cut by duration
        duration_s=0.0 if opts.arrival == "constant" and opts.num_requests else opts.duration_s,
        seed=opts.seed, image_model=opts.image_model, video_model=opts.video_model)
    if opts.arrival != "constant":
        return generate(spec)
    if not opts.num_requests:
        spec = replace(spec, num_requests=int(opts.duration_s * opts.rate_rps) + 1, duration_s=0.0)
    evenly = (replace(t, arrival_s=round((i + 1) / opts.rate_rps, 6))
              for i, t in enumerate(generate(spec)))
    return tuple(t for t in evenly if not opts.duration_s or t.arrival_s <= opts.duration_s)


def with_defaults(trace: Sequence[TraceRequest], opts: WorkloadOptions) -> tuple[TraceRequest, ...]:
    """Fill unset models, steps and SLOs from the per-class options (never
    overriding the trace)."""
    models = {"image": opts.image_model, "video": opts.video_model}
    steps = {"image": opts.steps_image, "video": opts.steps_video}
    slos = {"image": opts.slo_ms_image, "video": opts.slo_ms_video}
    return tuple(replace(t, model=t.model or models[t.task],
                         num_inference_steps=t.num_inference_steps or steps[t.task],
                         slo_ms=t.slo_ms or slos[t.task]) for t in trace)


def with_scaled_slos(trace: Sequence[TraceRequest], cost, slo_scale: float,
                     max_devices: int | Callable[[str], int]) -> tuple[TraceRequest, ...]:
    """Give each request without an SLO ``slo_scale`` x its isolated latency under
    ``cost`` (the shared ``resolve``); models, steps and order stay as given."""
    order = sorted(range(len(trace)), key=lambda i: trace[i].arrival_s)  # resolve's order
    slos = dict(zip(order, (r.slo_ms for r in resolve(trace, cost, slo_scale, max_devices))))
    return tuple(replace(t, slo_ms=t.slo_ms or max(MIN_SLO_MS, round(slos[i], 3)))
                 for i, t in enumerate(trace))


def build_workload(opts: WorkloadOptions) -> tuple[TraceRequest, ...]:
    """The requests of a run, sorted by arrival time."""
    opts.validate()
    if opts.trace:
        trace = truncate(read_trace(opts.trace), opts.num_requests, opts.duration_s)
    else:
        trace = generated(opts)
    trace = with_defaults(sorted(trace, key=lambda t: t.arrival_s), opts)
    if opts.slo_scale:
        from genserve.scheduler.latency import LatencyModel

        trace = with_scaled_slos(trace, LatencyModel.load(opts.profile), opts.slo_scale,
                                 opts.max_devices)
    return trace

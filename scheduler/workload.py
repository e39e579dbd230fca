"""Workloads: generated arrivals or trace files (JSON lines), torch-free.

Shared by the simulator and the load generator. A trace line holds
``arrival_s``, ``task`` (image|video), ``model`` ("": the profile's default
model for the task), ``width``, ``height``, ``num_frames``,
``num_inference_steps`` (0: the model's default) and ``slo_ms`` (0: the
default SLO, slo_scale × isolated latency). Other keys are kept in ``extra``
(a prompt, for instance) and written back. Sizes and steps are whole numbers,
times finite; steps are at most ``MAX_STEPS``, arrivals at most
``MAX_ARRIVAL_S`` and a positive ``slo_ms`` at least ``MIN_SLO_MS`` (see
``from_json``).

``generate`` draws arrivals (Poisson, or Gamma with a coefficient of
variation for bursts), a class mix and a shape mix from a seeded RNG;
``resolve`` fills in models, steps, SLOs and deadlines from a latency model.
"""
from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Iterable, Sequence

from .types import IMAGE, TASKS, VIDEO

TRACE_KEYS = ("arrival_s", "task", "model", "width", "height", "num_frames",
              "num_inference_steps", "slo_ms")
# Bounds on a trace line beyond the API's 32 bits. The simulator runs a few
# thousand steps a second and the live server caps steps at 50, so more than
# MAX_STEPS steps is a typo that would keep a simulation busy for weeks; an
# arrival beyond MAX_ARRIVAL_S (about 116 days) swamps the milliseconds a
# latency is made of (1e300 + 2.0 == 1e300).
MAX_STEPS = 10_000
MAX_ARRIVAL_S = 1e7
# The API's slo_ms is whole milliseconds, 0 meaning the default SLO: a
# positive SLO under 1 ms cannot be sent as it is (0.4 rounded to 0, the
# default, while the simulator missed it), so a trace may not hold one.
MIN_SLO_MS = 1.0


@dataclass(frozen=True, slots=True)
class TraceRequest:
    """One request of a workload, before defaults are resolved."""

    arrival_s: float
    task: str
    width: int
    height: int
    num_frames: int = 1
    model: str = ""
    num_inference_steps: int = 0
    slo_ms: float = 0.0
    extra: tuple[tuple[str, object], ...] = ()  # other trace keys, kept as read


@dataclass(frozen=True, slots=True)
class Request:
    """A resolved request: every default filled in."""

    req_id: str
    arrival_s: float
    task: str
    model: str
    width: int
    height: int
    num_frames: int
    num_steps: int
    slo_ms: float

    @property
    def deadline_s(self) -> float:
        return self.arrival_s + self.slo_ms / 1e3


@dataclass(frozen=True, slots=True)
class Shape:
    width: int
    height: int
    num_frames: int = 1
    weight: float = 1.0


DEFAULT_IMAGE_SHAPES = (Shape(512, 512), Shape(768, 768), Shape(1024, 1024))
DEFAULT_VIDEO_SHAPES = (Shape(832, 480, 33), Shape(832, 480, 81))


@dataclass(frozen=True, slots=True)
class WorkloadSpec:
    """A generated workload. Give ``num_requests`` or ``duration_s`` (or both:
    whichever ends first)."""

    rate_rps: float = 0.5
    arrival: str = "poisson"  # poisson | gamma
    cv: float = 1.0  # gamma: coefficient of variation of inter-arrival times
    image_fraction: float = 0.7
    image_shapes: tuple[Shape, ...] = DEFAULT_IMAGE_SHAPES
    video_shapes: tuple[Shape, ...] = DEFAULT_VIDEO_SHAPES
    num_requests: int = 200
    duration_s: float = 0.0
    seed: int = 0
    image_model: str = ""
    video_model: str = ""

    def __post_init__(self):
        if self.rate_rps <= 0:
            raise ValueError("rate_rps must be positive")
        if self.arrival not in ("poisson", "gamma"):
            raise ValueError("arrival must be poisson or gamma")
        if self.arrival == "gamma" and self.cv <= 0:
            raise ValueError("cv must be positive")
        if not 0.0 <= self.image_fraction <= 1.0:
            raise ValueError("image_fraction must be in [0, 1]")
        if self.num_requests <= 0 and self.duration_s <= 0:
            raise ValueError("give num_requests or duration_s")


def generate(spec: WorkloadSpec) -> tuple[TraceRequest, ...]:
    rng = random.Random(spec.seed)
    out = []
    t = 0.0
    limit = spec.num_requests if spec.num_requests > 0 else math.inf
    while len(out) < limit:
        t += _gap_s(rng, spec)
        if spec.duration_s > 0 and t > spec.duration_s:
            break
        is_image = rng.random() < spec.image_fraction
        shapes = spec.image_shapes if is_image else spec.video_shapes
        s = rng.choices(shapes, weights=[x.weight for x in shapes])[0]
        out.append(TraceRequest(arrival_s=round(t, 6), task=IMAGE if is_image else VIDEO,
                                width=s.width, height=s.height,
                                num_frames=1 if is_image else s.num_frames,
                                model=spec.image_model if is_image else spec.video_model))
    return tuple(out)


def _gap_s(rng: random.Random, spec: WorkloadSpec) -> float:
    if spec.arrival == "poisson":
        return rng.expovariate(spec.rate_rps)
    shape = 1.0 / (spec.cv ** 2)
    return rng.gammavariate(shape, 1.0 / (spec.rate_rps * shape))


def resolve(trace: Iterable[TraceRequest], cost, slo_scale: float,
            max_devices: int | Callable[[str], int]) -> tuple[Request, ...]:
    """Fill in models (``cost.default_model``), steps (``cost.default_steps``)
    and SLOs (slo_scale × ``cost.isolated_latency_ms`` at up to
    ``max_devices``, or ``max_devices(model)``). ``cost`` is a LatencyModel
    (or anything with those)."""
    out = []
    for i, t in enumerate(sorted(trace, key=lambda x: x.arrival_s)):
        model = t.model or cost.default_model(t.task)
        steps = t.num_inference_steps or cost.default_steps(model)
        devices = max_devices(model) if callable(max_devices) else max_devices
        slo = t.slo_ms or slo_scale * cost.isolated_latency_ms(
            model, t.width, t.height, t.num_frames, steps, t.task, devices)
        out.append(Request(f"r{i:06d}", t.arrival_s, t.task, model, t.width, t.height,
                           t.num_frames, steps, slo))
    return tuple(out)


def to_json(t: TraceRequest) -> dict:
    d = {"arrival_s": t.arrival_s, "task": t.task, "model": t.model, "width": t.width,
         "height": t.height, "num_frames": t.num_frames,
         "num_inference_steps": t.num_inference_steps, "slo_ms": t.slo_ms}
    d.update(dict(t.extra))
    return d


def from_json(d: dict) -> TraceRequest:
    """One trace line's request; ValueError for one no server could take.

    Sizes and steps must be whole numbers (512 or 512.0, not 64.9 or true);
    times must be finite; steps at most MAX_STEPS, arrivals at most
    MAX_ARRIVAL_S, slo_ms 0 or at least MIN_SLO_MS; everything within the
    API's 32 bits."""
    if not isinstance(d, dict):
        raise ValueError("a trace line must be a JSON object")
    task = d.get("task")
    if task not in TASKS:
        raise ValueError(f"trace line: task must be image or video, got {task!r}")
    frames = _whole(d, "num_frames", 1) or 1
    t = TraceRequest(
        arrival_s=_number(d, "arrival_s", None), task=task, width=_whole(d, "width", None),
        height=_whole(d, "height", None), num_frames=1 if task == IMAGE else frames,
        model=str(d.get("model", "") or ""),
        num_inference_steps=_whole(d, "num_inference_steps", 0),
        slo_ms=_number(d, "slo_ms", 0.0),
        extra=tuple(sorted((k, v) for k, v in d.items() if k not in TRACE_KEYS)))
    for ok, rule in ((0 <= t.arrival_s <= MAX_ARRIVAL_S,
                      f"arrival_s must be in 0..{MAX_ARRIVAL_S:.0f} s (about 116 days), "
                      f"got {t.arrival_s:g}"),
                     (min(t.width, t.height, t.num_frames) >= 1,
                      "width, height and num_frames must be positive"),
                     (t.num_inference_steps >= 0, "num_inference_steps must not be negative"),
                     (t.num_inference_steps <= MAX_STEPS,
                      f"num_inference_steps must be at most {MAX_STEPS}, got {t.num_inference_steps}"),
                     (0 <= t.slo_ms < math.inf, "slo_ms must be a finite number >= 0"),
                     (t.slo_ms == 0 or t.slo_ms >= MIN_SLO_MS,
                      f"slo_ms must be 0 (the default SLO) or at least {MIN_SLO_MS:g} ms (the "
                      f"API's unit), got {t.slo_ms:g}"),
                     (max(t.width, t.height, t.num_frames, t.slo_ms)
                      < 2 ** 32, "sizes and slo_ms must fit 32 bits (the API's fields)")):
        if not ok:  # also NaN
            raise ValueError(f"trace line: {rule}")
    return t


def _number(d: dict, key: str, default: float | None) -> float:
    """``d[key]`` as a finite float (``default`` when absent, null or 0;
    None: the key is required)."""
    value = _value(d, key, default)
    try:
        number = float(value)
    except OverflowError:  # an int beyond any float
        number = math.inf
    except (TypeError, ValueError):
        raise ValueError(f"trace line: {key} must be a number, got {value!r}") from None
    if not math.isfinite(number):
        raise ValueError(f"trace line: {key} must be a finite number, got {value!r}")
    return number


def _whole(d: dict, key: str, default: int | None) -> int:
    """``d[key]`` as an int (``default`` when absent, null or 0; None: the
    key is required). 512.0 is 512; 64.9 and Infinity are refused, where
    int() would truncate or raise OverflowError."""
    value = _value(d, key, default)
    if isinstance(value, float) and not value.is_integer():
        raise ValueError(f"trace line: {key} must be a finite whole number, got {value!r}")
    try:
        return int(value)
    except (TypeError, ValueError):  # "a", [], {}: int()'s own message names neither
        raise ValueError(f"trace line: {key} must be a whole number, got {value!r}") from None


def _value(d: dict, key: str, default):
    if default is None and key not in d:
        raise ValueError(f"trace line: missing field {key!r}")
    value = d[key] if default is None else d.get(key)
    if isinstance(value, bool):  # float(true) is 1.0: a typo, not a number
        raise ValueError(f"trace line: {key} must be a number, got {str(value).lower()}")
    return value if default is None or value else default


def read_trace(path: str | Path) -> tuple[TraceRequest, ...]:
    """The requests of a JSON-lines trace (blank and # lines skipped; a
    UTF-8 byte-order mark allowed); ValueError naming the file and line of
    the first bad one."""
    out = []
    with open(path, encoding="utf-8-sig") as f:
        try:
            for n, line in enumerate(f, 1):
                line = line.strip()
                if not line or line.startswith("#"):
                    continue
                try:
                    out.append(from_json(json.loads(line)))
                except (KeyError, ValueError, TypeError, OverflowError) as e:
                    raise ValueError(f"{path}:{n}: {e}") from None
                except RecursionError:  # json's parser recurses per level
                    raise ValueError(f"{path}:{n}: nested too deeply") from None
        except UnicodeDecodeError as e:
            raise ValueError(f"{path}: not UTF-8 text ({e})") from None
    return tuple(out)


def truncate(trace: Iterable[TraceRequest], num_requests: int = 0,
             duration_s: float = 0.0) -> tuple[TraceRequest, ...]:
    """``trace`` sorted by arrival time, cut the way ``--num-requests`` and
    ``--duration-s`` cut a trace in both ``simulate`` and ``loadgen``: the
    requests arriving at or before ``duration_s`` (0: no limit), then the
    first ``num_requests`` of those (0: all). Equal arrivals keep file order."""
    ordered = sorted(trace, key=lambda t: t.arrival_s)
    if duration_s > 0:
        ordered = [t for t in ordered if t.arrival_s <= duration_s]
    return tuple(ordered[:num_requests] if num_requests > 0 else ordered)


def write_trace(path: str | Path, trace: Sequence[TraceRequest]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for t in trace:
            f.write(json.dumps(to_json(t)) + "\n")


def with_slo(trace: Sequence[TraceRequest], slo_ms: float) -> tuple[TraceRequest, ...]:
    return tuple(replace(t, slo_ms=slo_ms) for t in trace)


def parse_shapes(text: str, task: str) -> tuple[Shape, ...]:
    """"512x512,1024x1024" (images) or "832x480x33,832x480x81" (videos);
    an optional ":weight" suffix weights a shape."""
    out = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        dims, _, weight = part.partition(":")
        try:
            nums = [int(x) for x in dims.lower().split("x")]
            w = float(weight or 1.0)
        except ValueError:
            raise ValueError(f"bad shape {part!r}") from None
        if len(nums) not in (2, 3) or (task == VIDEO and len(nums) != 3):
            raise ValueError(f"bad shape {part!r}: WIDTHxHEIGHT{'xFRAMES' if task == VIDEO else ''}")
        if min(nums) < 1 or not w > 0:
            raise ValueError(f"bad shape {part!r}: sizes and weight must be positive")
        frames = nums[2] if len(nums) == 3 else 1
        out.append(Shape(nums[0], nums[1], frames, w))
    if not out:
        raise ValueError("no shapes given")
    return tuple(out)

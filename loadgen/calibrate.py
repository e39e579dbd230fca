"""A latency profile measured through the public API (for the simulator in compare).

For each distinct (task, model, shape, steps) of a workload, requests are sent
alone, one after another, and timed from their streamed events (``elapsed_s``
is seconds since the server received the request):
    step    the gaps between consecutive STEP events;
    encode  arrival → first STEP, less one step (so the server's per-request
            overhead before the first step counts, as it does in a live latency);
    decode  last STEP → COMPLETED (decode and media encoding).
Only SP degree 1 and batch size 1 are observable this way; the latency model
extrapolates the rest, as it does for any profile without those points.
"""
from __future__ import annotations

import statistics
from typing import Iterable, Sequence

from genserve.client import Client
from genserve.scheduler.profile import DecodeSample, Profile, StepSample
from genserve.scheduler.workload import TraceRequest
from genserve.v1 import genserve_pb2 as pb

EV = pb.GenerateEvent.Type
TASK_OF = {pb.TASK_TEXT_TO_IMAGE: "image", pb.TASK_TEXT_TO_VIDEO: "video"}


def _keys(items: Iterable[TraceRequest]) -> list[TraceRequest]:
    seen, out = set(), []
    for t in items:
        key = (t.task, t.model, t.width, t.height, t.num_frames, t.num_inference_steps)
        if key not in seen:
            seen.add(key)
            out.append(t)
    return out


def time_one(client: Client, item: TraceRequest, seed: int) -> tuple[str, list[float], float, float]:
    """(model, step ms list, encode ms, decode ms) of one request run alone."""
    events = list(client.stream("calibration", task=item.task, model=item.model, width=item.width,
                                height=item.height,
                                num_frames=item.num_frames if item.task == "video" else None,
                                steps=item.num_inference_steps or None, seed=seed, output_format="raw"))
    last = events[-1]
    if last.type != EV.COMPLETED:
        raise RuntimeError(f"calibration request failed: {last.status_code} {last.reason}")
    steps = [e.elapsed_s for e in events if e.type == EV.STEP]
    gaps_ms = [(b - a) * 1e3 for a, b in zip(steps, steps[1:])]
    step_ms = statistics.median(gaps_ms) if gaps_ms else steps[0] * 1e3
    encode_ms = max(0.0, steps[0] * 1e3 - step_ms)
    decode_ms = max(1e-3, (last.elapsed_s - steps[-1]) * 1e3)
    return last.response.model, gaps_ms or [step_ms], encode_ms, decode_ms


def calibrate(target: str, items: Sequence[TraceRequest], repeats: int = 3,
              name: str = "live-calibration", client_options: dict | None = None) -> Profile:
    """A profile of the models ``items`` use, measured on the server at ``target``
    (``client_options``: ``Client``'s credentials and token)."""
    step_samples, decode_samples, encodes = [], [], {}
    with Client(target, **(client_options or {})) as client:
        cards = client.models()
        for item in _keys(items):
            for r in range(repeats + 1):  # the first run warms caches and is dropped
                model, gaps, encode_ms, decode_ms = time_one(client, item, seed=r)
                if r == 0:
                    continue
                frames = item.num_frames if item.task == "video" else 1
                step_samples += [StepSample(model, item.task, item.width, item.height, frames, 1, 1, g)
                                 for g in gaps]
                decode_samples.append(DecodeSample(model, item.width, item.height, frames, 1, decode_ms))
                encodes.setdefault(model, []).append(encode_ms)
    used = {s.model for s in step_samples}
    return Profile.from_measurements(
        name, step_samples, decode_samples,
        encode_ms={m: statistics.median(v) for m, v in encodes.items()},
        default_steps={c.name: c.default_steps for c in cards if c.name in used},
        default_models={TASK_OF[c.task]: c.name for c in cards if c.is_default and c.name in used},
        hardware="measured through the gRPC API by genserve loadgen")

"""Work in flight on the workers, and what its replies teach the cost model.

``InFlight`` is one dispatch from its send to its members' DispatchDone, with
the predictions it went out with (when its devices free). ``Feedback`` turns
the replies into calibration and metrics: measured step, encode and decode
times correct the latency model (a loaded machine slows them all), and a
dispatch's wall time beyond the compute its leader reports (the round trip,
and the engine's turnaround when it went out right after the replies that
freed its block) is its overhead, which the model learns (``dispatch_ms``)
and ``genserve_dispatch_overhead_seconds`` shows.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from genserve.models.base import GenParams
from genserve.scheduler.types import Dispatch
from genserve.workers import protocol as P


@dataclass(slots=True)
class InFlight:
    dispatch: Dispatch
    model: str
    sent_s: float
    predicted_step_ms: float
    pending: set[int]  # members whose DispatchDone has not arrived
    extra_ms: tuple[float, float] = (0.0, 0.0)  # predicted encode, decode (the leader's)
    fresh: int = 0  # requests the dispatch starts (their prompts are encoded first)
    # requests it finishes: then its leader decodes alone and the other members
    # free their devices as soon as their steps end; else the block frees as one
    finishing: int = 0
    report: P.DispatchDone | None = None  # the leader's, held until the block frees
    broken: bool = False  # a member died or lost its SP group: the block no longer frees as one
    broken_s: float = 0.0  # when it broke (time.monotonic)
    moving: dict[str, bytes | None] = field(default_factory=dict)  # state moves awaited (req -> bytes)
    compute_ms: float = 0.0  # the leader's reported step times so far
    turnaround_ms: float = 0.0  # from the replies that freed its devices to the decision to send it
    overdue_logged: bool = False  # the watchdog has said it runs far past its prediction
    killed: bool = False  # the watchdog killed the workers it waits for (they hung)

    @property
    def leader(self) -> int:
        return self.dispatch.device_ids[0]

    def busy_until(self, device_id: int, dispatch_ms: float) -> float:
        """When ``device_id`` is predicted free (the leader decodes; the others do not)."""
        encode_ms, decode_ms = self.extra_ms
        ms = encode_ms + self.dispatch.num_steps * self.predicted_step_ms + dispatch_ms
        return self.sent_s + (ms + (decode_ms if device_id == self.leader else 0.0)) / 1e3


class Feedback:
    """The engine's link from worker replies to the cost model and metrics."""

    def __init__(self, cost, metrics):
        self.cost, self.metrics = cost, metrics

    def dispatch_ms(self) -> float:
        return self.cost.dispatch_ms() if hasattr(self.cost, "dispatch_ms") else 0.0

    def predict(self, d: Dispatch, model: str, p: GenParams, batch: int, fresh: int, finishing: int,
                sent_s: float, turnaround_ms: float) -> InFlight:
        """The in-flight record of ``d`` with its predicted step, encode and decode times."""
        degree = len(d.device_ids)
        return InFlight(d, model, sent_s,
                        self.cost.step_ms(model, p.width, p.height, p.num_frames, degree, batch),
                        set(d.device_ids), fresh=fresh, finishing=finishing, turnaround_ms=turnaround_ms,
                        extra_ms=(fresh * self.cost.encode_ms(model),
                                  finishing * self.cost.decode_ms(model, p.width, p.height, p.num_frames,
                                                                  degree)))

    def step(self, fl: InFlight, task: str, p: GenParams, batch: int, step_ms: float) -> float:
        """Learn from one measured step; the calibrated step time after it."""
        degree = len(fl.dispatch.device_ids)
        predicted = self.cost.step_ms(fl.model, p.width, p.height, p.num_frames, degree, batch)
        self.cost.observe_step(fl.model, p.width, p.height, p.num_frames, degree, batch, step_ms)
        fl.compute_ms += step_ms
        self.metrics.step(task, fl.model, degree, batch, step_ms / 1e3, predicted / 1e3,
                          fl.dispatch.device_ids)
        return self.cost.step_ms(fl.model, p.width, p.height, p.num_frames, degree, batch)

    def done(self, fl: InFlight, msg: P.DispatchDone, now: float,
             params_of: Callable[[str], GenParams | None]) -> None:
        """Learn from the leader's DispatchDone: encode, decode, overhead."""
        if fl.fresh and msg.encode_ms > 0:
            self.cost.observe_encode(fl.model, msg.encode_ms / fl.fresh)
        degree = len(fl.dispatch.device_ids)
        for fin in msg.finished:
            q = params_of(fin.req_id)
            if q is not None and fin.decode_ms > 0:
                self.cost.observe_decode(fl.model, q.width, q.height, q.num_frames, degree, fin.decode_ms)
        if fl.moving or msg.failed:  # a state move in between is not overhead
            return
        compute_ms = fl.compute_ms + msg.encode_ms + sum(f.decode_ms for f in msg.finished)
        overhead_ms = fl.turnaround_ms + (now - fl.sent_s) * 1e3 - compute_ms
        if hasattr(self.cost, "observe_dispatch"):
            self.cost.observe_dispatch(max(overhead_ms, 0.0))
        self.metrics.dispatch_overhead(overhead_ms / 1e3)

"""The engine's record of one request, and the views built from it."""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable

from genserve.scheduler.types import RequestView
from genserve.types import Event, EventType, Request, Result
from genserve.workers.protocol import Finished

log = logging.getLogger("genserve.engine")

Sink = Callable[[Event], None]


@dataclass(slots=True)
class Tracked:
    """Mutable; touched only by the engine thread."""

    req: Request
    slo_ms: int
    sinks: list[Sink]
    steps_done: int = 0
    device_ids: tuple[int, ...] = ()  # where its state lives
    holders: set[int] = field(default_factory=set)  # workers holding its state
    running: bool = False
    paused: bool = False  # preempted, waiting to resume
    num_preemptions: int = 0
    sp_degrees: list[int] = field(default_factory=list)
    started_s: float | None = None
    cancel_requested: bool = False
    # the status it ends with if cancelled: DEADLINE_EXCEEDED when it was
    # abandoned by its last caller at that caller's deadline
    cancel_status: str = "CANCELLED"
    done: bool = False
    dispatch_id: int = 0  # its latest dispatch; outcomes of older ones are stale
    crash_restarts: int = 0  # times it restarted from step 0 after losing its state
    # submissions of its id that arrived after it was cancelled but before it
    # stopped (a running request stops at its next step boundary): each is a
    # new request, admitted when this one ends
    successors: list[tuple[Request, Sink]] = field(default_factory=list)

    @property
    def deadline_s(self) -> float:
        return self.req.arrival_s + self.slo_ms / 1e3

    def restart_from_scratch(self) -> None:
        """Its state is gone (a worker crashed): run it again from step 0."""
        self.steps_done, self.holders, self.device_ids = 0, set(), ()
        self.running, self.paused = False, True
        self.crash_restarts += 1

    def view(self) -> RequestView:
        p = self.req.params
        return RequestView(
            req_id=self.req.req_id, task=self.req.task, model=self.req.model,
            width=p.width, height=p.height, num_frames=p.num_frames,
            num_steps=p.num_steps, steps_done=self.steps_done,
            arrival_s=self.req.arrival_s, deadline_s=self.deadline_s,
            num_preemptions=self.num_preemptions, device_ids=tuple(sorted(self.holders)),
            running=self.running, paused=self.paused)

    def emit(self, now_s: float, type_: EventType, **fields) -> None:
        event = Event(self.req.req_id, type_, now_s - self.req.arrival_s, **fields)
        if event.terminal:
            self.done = True
        for sink in self.sinks:
            try:
                sink(event)
            except Exception:  # a broken sink must not break the engine
                log.exception("event sink failed for %s", self.req.req_id)

    def result(self, now_s: float, fin: Finished) -> Result:
        r, p = self.req, self.req.params
        latency_ms = (now_s - r.arrival_s) * 1e3
        started = self.started_s if self.started_s is not None else now_s
        return Result(
            req_id=r.req_id, model=r.model, task=r.task, data=fin.data,
            mime_type=fin.mime_type, output_format=r.output_format,
            width=fin.width, height=fin.height, num_frames=fin.num_frames,
            fps=r.fps if r.task == "video" else 0,  # an image has no frame rate
            seed=p.seed, num_steps=p.num_steps,
            queue_ms=(started - r.arrival_s) * 1e3, latency_ms=latency_ms,
            slo_ms=self.slo_ms, slo_met=latency_ms <= self.slo_ms,
            num_preemptions=self.num_preemptions, sp_degrees=tuple(self.sp_degrees))

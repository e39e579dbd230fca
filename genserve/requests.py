"""The requests the engine tracks, from admission to their end.

``Requests`` owns each unfinished request's ``Tracked`` record and every way
one ends: completed with its result, failed or cancelled (its state on the
workers dropped), each counted once in the metrics. A request id may be
resubmitted while it runs: the same request attaches its caller to the
running one, a different one is refused ``ALREADY_EXISTS``, and one that
arrives while the id is being cancelled starts afresh after it ends.
Touched only by the engine thread.
"""
from __future__ import annotations

import logging
import time
from typing import Callable

from genserve.tracked import Sink, Tracked
from genserve.types import Event, EventType, Request
from genserve.workers import protocol as P

log = logging.getLogger("genserve.engine")


class Requests:
    def __init__(self, executor, metrics, default_slo_ms: Callable[[Request], int]):
        """``default_slo_ms(req)``: the SLO of a request that names none."""
        self.executor, self.metrics = executor, metrics
        self.default_slo_ms = default_slo_ms
        self.tracked: dict[str, Tracked] = {}

    def __iter__(self):
        return iter(list(self.tracked.values()))

    def __len__(self) -> int:
        return len(self.tracked)

    def get(self, req_id: str) -> Tracked | None:
        return self.tracked.get(req_id)

    def current(self, req_id: str, dispatch_id: int) -> Tracked | None:
        """The request, if ``dispatch_id`` is still its latest dispatch."""
        t = self.tracked.get(req_id)
        return t if t is not None and t.dispatch_id == dispatch_id else None

    def params_of(self, req_id: str):
        t = self.tracked.get(req_id)
        return t.req.params if t is not None else None

    def num_waiting(self) -> int:
        """Requests accepted and not started yet."""
        return sum(1 for t in self.tracked.values() if t.started_s is None)

    # ---- admission -------------------------------------------------------
    def admit(self, req: Request, sink: Sink) -> None:
        """Track ``req`` (QUEUED), or attach ``sink`` to the unfinished request of its id."""
        try:
            self._admit(req, sink)
        except Exception:  # a bug here must end this request, counted, not leave its caller waiting
            log.exception("request %s could not be admitted: it ends INTERNAL", req.req_id)
            reason = "the server hit a bug while admitting this request (see its log)"
            t = self.tracked.get(req.req_id)
            if t is not None and sink in t.sinks:
                self.finish(t, EventType.FAILED, "INTERNAL", reason)
                return
            self.metrics.request_finished(req.task, req.model, "INTERNAL", None, None, None)
            sink(Event(req.req_id, EventType.FAILED, 0.0, status="INTERNAL", reason=reason))

    def _admit(self, req: Request, sink: Sink) -> None:
        existing = self.tracked.get(req.req_id)
        if existing is not None:  # same id still unfinished
            if existing.cancel_requested:  # stopping: the resubmission (any request) starts afresh after it
                existing.successors.append((req, sink))
            elif existing.req.fingerprint != req.fingerprint:
                self.metrics.request_finished(req.task, req.model, "ALREADY_EXISTS", None, None, None)
                sink(Event(req.req_id, EventType.FAILED, 0.0, status="ALREADY_EXISTS",
                           reason="request_id: in use by a different unfinished request; "
                                  "resubmit the same request to attach to it, or use another id"))
            else:  # attach: every caller gets the events from here on
                existing.sinks.append(sink)
            return
        slo_ms = req.slo_ms or self.default_slo_ms(req)
        t = Tracked(req, slo_ms, [sink])
        self.tracked[req.req_id] = t
        t.emit(time.monotonic(), EventType.QUEUED, queue_position=self.num_waiting() - 1)

    # ---- ends ------------------------------------------------------------
    def complete(self, t: Tracked, fin: P.Finished, now: float) -> None:
        """``t`` finished on a worker: its result goes to its callers."""
        if t.cancel_requested:  # Cancel already answered True: the result is not delivered
            self.finish(t, EventType.CANCELLED, "CANCELLED", "cancelled")
            return
        try:
            result = t.result(now, fin)
        except Exception:  # a bug here must end the request, not leave it with no steps to run
            log.exception("request %s: its result could not be made", t.req.req_id)
            self.finish(t, EventType.FAILED, "INTERNAL", "the server failed to make the result (see its log)")
            return
        self.tracked.pop(t.req.req_id, None)
        self.metrics.request_finished(t.req.task, t.req.model, "OK", result.latency_ms / 1e3,
                                      result.queue_ms / 1e3, result.slo_met)
        self.metrics.calls_ended(t.req.task, t.req.model, "OK", len(t.sinks) - 1)  # attached callers
        t.emit(now, EventType.COMPLETED, result=result)

    def finish(self, t: Tracked, kind: EventType, status: str, reason: str) -> None:
        """End a request without a result (failed or cancelled), freeing its state."""
        if t.done:
            return
        self.tracked.pop(t.req.req_id, None)
        if t.holders and not t.running:
            for device_id in t.holders:
                self.executor.send(device_id, P.Drop((t.req.req_id,)))
        now = time.monotonic()
        queue_s = ((t.started_s or now) - t.req.arrival_s)
        slo_met = False  # a failure counts as a miss
        if kind == EventType.CANCELLED:  # its caller ended it (a cancel, a deadline, a closed call):
            status = t.cancel_status    # a miss once its SLO had passed, else nobody can tell
            slo_met = False if now - t.req.arrival_s > t.slo_ms / 1e3 else None
        self.metrics.request_finished(t.req.task, t.req.model, status, now - t.req.arrival_s, queue_s, slo_met)
        self.metrics.calls_ended(t.req.task, t.req.model, status, len(t.sinks) - 1)  # attached callers
        t.emit(now, kind, reason=reason, status=status)
        for req, sink in t.successors:  # its id is free again
            self.admit(req, sink)

    def abandon(self, req_id: str, sink: Sink, status: str) -> bool:
        """The caller behind ``sink`` is gone: it gets no more events. True
        when it was the request's last caller: the request is to be cancelled
        (its end counts ``status`` unless an explicit Cancel came first)."""
        t = self.tracked.get(req_id)
        if t is None or t.done:
            return False
        waiting = [r for r, s in t.successors if s == sink]
        if waiting:  # a resubmission that had not started: its call ends here, counted
            t.successors = [(r, s) for r, s in t.successors if s != sink]
            for r in waiting:
                self.metrics.request_finished(r.task, r.model, status, None, None, None)
        if sink not in t.sinks:
            return False
        t.sinks.remove(sink)
        if t.sinks:  # the others go on: this call ends here
            self.metrics.calls_ended(t.req.task, t.req.model, status)
            return False
        if not t.cancel_requested:  # (an explicit Cancel keeps CANCELLED)
            t.cancel_status = status
        return True

    def cancel_successors(self, t: Tracked) -> None:
        """Cancel the resubmissions waiting for ``t`` (being cancelled) to end:
        a Cancel of the id while it stops reaches them too."""
        successors, t.successors = t.successors, []
        now = time.monotonic()
        for req, sink in successors:
            self.metrics.request_finished(req.task, req.model, "CANCELLED", None, None, None)
            try:
                sink(Event(req.req_id, EventType.CANCELLED, now - req.arrival_s, status="CANCELLED",
                           reason="cancelled"))
            except Exception:  # a broken sink must not break the engine
                log.exception("event sink failed for %s", req.req_id)

    def end_all(self, status: str, reason: str) -> None:
        """End every unfinished request now, FAILED with ``status`` and ``reason``."""
        while self.tracked:  # (a finished request may admit a resubmission of its id)
            for t in list(self.tracked.values()):
                self.finish(t, EventType.FAILED, status, reason)

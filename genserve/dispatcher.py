"""Dispatches from the plan to the workers and back.

``Dispatcher`` sends each planned dispatch to its block's workers (first
fetching a state that has to move from a worker outside the block), keeps it
in flight (``inflight``; ``busy`` maps each device to the dispatch it runs),
and applies what the members report: the leader's StepDone after each step,
and every member's DispatchDone at the end. A block whose steps all continue
frees as one when its last member reports, and only then do its requests
stop running: the members report a few ms apart, and a plan made in between
would see a request ready with part of its block busy, so give its free
devices to other work and count it preempted. A dispatch that finishes a
request frees each member as it reports (the leader alone decodes, as the
simulator has it), and so does one that broke (a member died or lost its SP
group: another may still be stuck in a collective). Touched only by the
engine thread.
"""
from __future__ import annotations

import itertools
import logging
import time

from genserve.dispatch import member_messages, needs_move
from genserve.inflight import Feedback, InFlight
from genserve.requests import Requests
from genserve.scheduler.types import Dispatch
from genserve.tracked import Tracked
from genserve.types import EventType
from genserve.workers import protocol as P

log = logging.getLogger("genserve.engine")


class Dispatcher:
    def __init__(self, executor, requests: Requests, cost, metrics):
        self.executor, self.requests, self.cost, self.metrics = executor, requests, cost, metrics
        self.feedback = Feedback(cost, metrics)
        self.inflight: dict[int, InFlight] = {}  # dispatch id -> work
        self.busy: dict[int, int] = {}  # device id -> dispatch id
        self.woke_s = 0.0  # when the engine's last wait for replies returned
        self._freed_s: dict[int, float] = {}  # device id -> when its last dispatch ended
        self._ids = itertools.count(1)

    def busy_until(self, device_id: int, now: float) -> float:
        """When busy ``device_id`` is predicted free."""
        fl = self.inflight.get(self.busy.get(device_id, -1))
        if fl is None:  # down: never idle soon
            return now + 3600.0
        return fl.busy_until(device_id, self.feedback.dispatch_ms())

    # ---- out -------------------------------------------------------------
    def dispatch(self, d: Dispatch, ts: list[Tracked], now: float) -> None:
        dispatch_id = next(self._ids)
        fresh = sum(1 for t in ts if t.started_s is None)
        finishing = sum(1 for t in ts if t.steps_done + d.num_steps >= t.req.params.num_steps)
        # sent at once after the replies that freed its block: the engine's turnaround counts
        freed = all(self._freed_s.get(x, -1.0) >= self.woke_s for x in d.device_ids)
        fl = self.feedback.predict(d, ts[0].req.model, ts[0].req.params, len(ts), fresh, finishing, now,
                                   max(now - self.woke_s, 0.0) * 1e3 if freed else 0.0)
        self.inflight[dispatch_id] = fl
        for device_id in d.device_ids:
            self.busy[device_id] = dispatch_id
        for t in ts:
            if needs_move(t, d.device_ids):  # its state lives only outside the block
                fl.moving[t.req.req_id] = None
                self.executor.send(min(t.holders), P.Export((t.req.req_id,)))
        for t in ts:
            t.dispatch_id = dispatch_id
            self._mark_running(t, d, now)
        if not fl.moving:
            self._send(dispatch_id, fl, ts)

    def _send(self, dispatch_id: int, fl: InFlight, ts: list[Tracked]) -> None:
        """Send the dispatch to every member; old copies outside the block go."""
        block = set(fl.dispatch.device_ids)
        for member, msg in member_messages(dispatch_id, fl.dispatch, ts, fl.moving).items():
            if not self.executor.send(member, msg):
                log.warning("worker %d unreachable; its death will be handled", member)
        for t in ts:
            for stale in t.holders - block:
                self.executor.send(stale, P.Drop((t.req.req_id,)))
            t.holders = set(block)
            if t.cancel_requested:  # cancelled while the dispatch waited for a state move:
                for member in block:  # a Drop before it would have taken the state it runs on
                    self.executor.send(member, P.Drop((t.req.req_id,)))

    def _mark_running(self, t: Tracked, d: Dispatch, now: float) -> None:
        degree = len(d.device_ids)
        previous = t.sp_degrees[-1] if t.started_s is not None and t.sp_degrees else 0
        t.running, t.device_ids = True, tuple(d.device_ids)
        if degree not in t.sp_degrees:
            t.sp_degrees.append(degree)
        elif t.sp_degrees[-1] != degree:
            t.sp_degrees.append(degree)
        if t.started_s is None:
            t.started_s = now
            t.emit(now, EventType.STARTED, sp_degree=degree)
        elif t.paused:
            t.paused = False
            t.emit(now, EventType.RESUMED, sp_degree=degree)
        if previous and previous != degree:
            self.metrics.resharded()
            t.emit(now, EventType.RESHARDED, sp_degree=degree)

    def stop(self, t: Tracked) -> None:
        """Cancel running ``t``: the workers abort it at the next step boundary."""
        t.cancel_requested = True
        fl = self.inflight.get(t.dispatch_id)
        if fl is not None and fl.moving:  # not sent yet: _send follows it with the Drop
            return
        for device_id in t.device_ids:
            self.executor.send(device_id, P.Drop((t.req.req_id,)))

    # ---- back ------------------------------------------------------------
    def on_reply(self, device_id: int, msg) -> bool:
        """Apply a worker's reply about a dispatch; False for any other message."""
        if isinstance(msg, P.StepDone):
            self._on_step(msg)
        elif isinstance(msg, P.DispatchDone):
            self._on_dispatch_done(device_id, msg)
        elif isinstance(msg, P.Exported):
            self._on_exported(msg)
        else:
            return False
        return True

    def _on_step(self, msg: P.StepDone) -> None:
        fl = self.inflight.get(msg.dispatch_id)
        now = time.monotonic()
        ts = [self.requests.current(r, msg.dispatch_id) for r in msg.req_ids]
        if fl is None or not all(ts):
            return
        degree = len(fl.dispatch.device_ids)
        step_ms = self.feedback.step(fl, ts[0].req.task, ts[0].req.params, len(msg.req_ids), msg.step_ms)
        for t, steps in zip(ts, msg.step_indices):
            t.steps_done = steps
            q = t.req.params
            eta_s = ((q.num_steps - steps) * step_ms
                     + self.cost.decode_ms(t.req.model, q.width, q.height, q.num_frames, degree)) / 1e3
            t.emit(now, EventType.STEP, step=steps, num_steps=q.num_steps, eta_s=eta_s)

    def _on_exported(self, msg: P.Exported) -> None:
        for dispatch_id, fl in list(self.inflight.items()):
            if msg.req_id in fl.moving and fl.moving[msg.req_id] is None:
                fl.moving[msg.req_id] = msg.state
                if all(v is not None for v in fl.moving.values()):
                    self._send_moved(dispatch_id, fl)
                return

    def _send_moved(self, dispatch_id: int, fl: InFlight) -> None:
        lost = [r for r, data in fl.moving.items() if not data]
        ts = [self.requests.get(r) for r in fl.dispatch.req_ids]
        if lost or not all(ts):
            self._abort(dispatch_id, "state was lost while moving to another device")
            return
        self._send(dispatch_id, fl, ts)

    def _abort(self, dispatch_id: int, reason: str) -> None:
        fl = self.inflight.pop(dispatch_id)
        log.warning("dispatch %d of %s not sent: %s", dispatch_id, ", ".join(fl.dispatch.req_ids), reason)
        for device_id in fl.dispatch.device_ids:
            self.busy.pop(device_id, None)
        for r in fl.dispatch.req_ids:
            t = self.requests.get(r)
            if t is not None:
                t.running = False
                if t.cancel_requested:  # it ends as asked, whatever became of its state
                    self.requests.finish(t, EventType.CANCELLED, "CANCELLED", "cancelled")
                else:
                    self.requests.finish(t, EventType.FAILED, "INTERNAL", reason)

    def _on_dispatch_done(self, device_id: int, msg: P.DispatchDone) -> None:
        fl = self.inflight.get(msg.dispatch_id)
        if fl is None:  # its members are no longer awaited (a worker died): what it says still counts
            self._free(device_id, msg.dispatch_id)
            self._on_outcomes(device_id, None, msg)
            return
        fl.pending.discard(device_id)
        if msg.group_lost and not fl.broken:
            self._break(msg.dispatch_id, fl)
        if fl.finishing or fl.broken:
            self._free(device_id, msg.dispatch_id)
            if not fl.pending:
                self.inflight.pop(msg.dispatch_id)
            if device_id == fl.leader:  # only the leader reports outcomes
                self._on_outcomes(device_id, fl, msg)
            return
        if device_id == fl.leader:
            fl.report = msg
        if not fl.pending:
            self.inflight.pop(msg.dispatch_id)
            for member in fl.dispatch.device_ids:
                self._free(member, msg.dispatch_id)
            self._on_outcomes(fl.leader, fl, fl.report)

    def member_lost(self, dispatch_id: int, device_id: int) -> None:
        """Member ``device_id`` of in-flight ``dispatch_id`` died: it is no
        longer awaited, and the block breaks."""
        fl = self.inflight[dispatch_id]
        fl.pending.discard(device_id)
        self.busy.pop(device_id, None)
        if not fl.broken:
            self._break(dispatch_id, fl)
        if not fl.pending:
            self.inflight.pop(dispatch_id)

    def _break(self, dispatch_id: int, fl: InFlight) -> None:
        """A member of ``fl`` died or lost its SP group: there is no step to
        continue together, so its members free as they report (one may still
        be stuck in a collective with the lost one), those that have reported
        at once, and the leader's report, if held, takes effect now."""
        fl.broken, fl.broken_s = True, time.monotonic()
        for member in fl.dispatch.device_ids:
            if member not in fl.pending:
                self._free(member, dispatch_id)
        if fl.report is not None:
            report, fl.report = fl.report, None
            self._on_outcomes(fl.leader, fl, report)

    def _free(self, device_id: int, dispatch_id: int) -> None:
        if self.busy.get(device_id) == dispatch_id:
            self.busy.pop(device_id)
            self._freed_s[device_id] = time.monotonic()

    def _on_outcomes(self, device_id: int, fl: InFlight | None, msg: P.DispatchDone) -> None:
        """Apply the leader's report of a dispatch (``fl`` None: no longer in flight)."""
        now = time.monotonic()
        if fl is not None:
            self.feedback.done(fl, msg, now, self.requests.params_of)
        for req_id in msg.paused:
            t = self.requests.current(req_id, msg.dispatch_id)
            if t is None:
                continue
            t.running = False
            if t.cancel_requested:  # the Drop raced the step's end: free it now
                self.requests.finish(t, EventType.CANCELLED, "CANCELLED", "cancelled")
        for fin in msg.finished:
            t = self.requests.current(fin.req_id, msg.dispatch_id)
            if t is not None:
                t.running = False
                self.requests.complete(t, fin, now)
        for f in msg.failed:
            t = self.requests.current(f.req_id, msg.dispatch_id)
            if t is not None:
                t.running, t.holders = False, t.holders - {device_id}
                # cancelled already: it ends as asked, whatever stopped its step
                kind = (EventType.CANCELLED if f.status == "CANCELLED" or t.cancel_requested
                        else EventType.FAILED)
                if f.status != "CANCELLED":
                    log.warning("request %s failed on worker %d: %s: %s", f.req_id, device_id, f.status,
                                f.message)
                self.requests.finish(t, kind, f.status,
                                     "cancelled" if kind == EventType.CANCELLED else f.message)

    def withdraw(self, dispatch_id: int) -> InFlight:
        """Take back a dispatch that has not gone out: its devices free."""
        fl = self.inflight.pop(dispatch_id)
        for device_id in fl.dispatch.device_ids:
            if self.busy.get(device_id) == dispatch_id:
                self.busy.pop(device_id)
        return fl

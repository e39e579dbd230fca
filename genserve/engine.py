"""The engine: one loop that plans, dispatches and collects step results.

``Engine.step()`` reads as the design: take arrivals and cancels, ask the
policy for a plan over idle devices, dispatch it, then wait for step results
and apply them. It runs on its own thread; the frontend calls the thread-safe
``submit`` / ``cancel`` and receives ``Event``s through per-request sinks.
"""
from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
from typing import Callable

from genserve.config import EngineConfig
from genserve.dispatch import check_dispatch, member_messages, needs_move
from genserve.inflight import Feedback, InFlight
from genserve.recovery import RestartBackoff, SPRecovery
from genserve.scheduler import make_policy as _make_named_policy
from genserve.scheduler.types import IDLE_REPLAN_S, ClusterSpec, DeviceView, Dispatch, StepPlan
from genserve.tracked import Sink, Tracked
from genserve.types import Event, EventType, Request, RequestError
from genserve.workers import protocol as P
from genserve.worker_loss import WorkerLoss
from genserve.workers.executor import Executor

SLO_MS_MAX = 2**32 - 1  # the API's slo_ms is unsigned 32-bit
WATCHDOG_S = 5.0  # how often the engine looks for hung dispatches while they run
NO_WORKER_UP = "no worker is up (restarting after a failure); retry on another replica"

log = logging.getLogger("genserve.engine")


def make_fallback_policy(spec: ClusterSpec):
    return _make_named_policy("fcfs", spec)


class Engine(WorkerLoss):
    def __init__(self, config: EngineConfig, executor: Executor, make_policy, cost, metrics,
                 cards: dict[str, P.ModelCard], max_queue: int = 4096):
        """``make_policy(ClusterSpec) -> Policy``: the policy is rebuilt if what
        the executor can do changes (a crash turns sequence parallelism off)."""
        self.config, self.executor, self.cost = config, executor, cost
        self._make_policy = make_policy
        self.max_sp_degree = executor.max_sp_degree
        self.metrics, self.cards, self.max_queue = metrics, cards, max_queue
        self.feedback = Feedback(cost, metrics)
        self.tracked: dict[str, Tracked] = {}
        self.inflight: dict[int, InFlight] = {}  # dispatch id -> work
        self.busy: dict[int, int] = {}  # device id -> dispatch id
        self._woke_s = 0.0  # when the last wait for replies returned
        self._freed_s: dict[int, float] = {}  # device id -> when its last dispatch ended
        self.down: set[int] = set()  # devices whose worker is restarting
        self.hung: set[int] = set()  # devices whose worker the watchdog killed, until its death arrives
        self._ids = itertools.count(1)
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._dirty = True  # something changed since the last plan
        self._num_waiting = 0  # read by other threads (queue bound); engine writes it
        self.num_invalid_dispatches = 0  # policy plans this executor could not run (a bug)
        self.recovery = SPRecovery(executor)
        self.restarts = RestartBackoff()
        for device_id in range(executor.num_devices):
            self.restarts.started(device_id)
        self._set_sp_degree(self.max_sp_degree)
        # Called on the engine thread with the number of workers down whenever
        # it changes (the frontend turns it into health status).
        self.on_workers_down: Callable[[int], None] = lambda num_down: None

    # ---- thread-safe API -------------------------------------------------
    def submit(self, req: Request, sink: Sink) -> None:
        """Queue a request; its events go to ``sink`` (called on the engine
        thread; must not block). Raises RequestError when the queue is full,
        or UNAVAILABLE while every worker is down: a crash-looping worker may
        not be back for minutes, and another replica can serve it now (those
        already accepted wait for the restart)."""
        if len(self.down) >= self.executor.num_devices:
            raise RequestError("UNAVAILABLE", NO_WORKER_UP)
        if self._num_waiting >= self.max_queue:
            raise RequestError("RESOURCE_EXHAUSTED",
                               f"queue full ({self.max_queue} waiting requests); retry later")
        self._num_waiting += 1  # corrected by the engine thread on its next pass
        self._post(("submit", req, sink))

    def cancel(self, req_id: str) -> bool:
        """Cancel a queued, running or paused request. True if it was unfinished."""
        done = threading.Event()
        answer = [False]
        self._post(("cancel", req_id, answer, done))
        done.wait(timeout=5.0)
        return answer[0]

    @property
    def num_unfinished(self) -> int:
        """Requests accepted and not yet ended (read from any thread)."""
        return len(self.tracked) + self._inbox.qsize()

    def abandon(self, req_id: str, sink: Sink, status: str = "CANCELLED") -> None:
        """The caller that submitted with ``sink`` is gone (its deadline
        passed: ``status`` DEADLINE_EXCEEDED; or it cancelled or closed its
        call): it gets no more events, and the request is cancelled, with that
        status in the metrics, when no caller is left. Does not wait (safe
        from any thread or an event loop)."""
        self._post(("abandon", req_id, sink, status))

    def end_all(self, status: str, reason: str) -> None:
        """End every unfinished request now, FAILED with ``status`` and
        ``reason`` (the server is going: its callers learn why). Does not wait."""
        self._post(("end_all", status, reason))

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="genserve-engine", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 10.0) -> None:
        self._stop.set()
        self.executor.wake()
        if self._thread is not None:
            self._thread.join(timeout_s)

    def _post(self, item) -> None:
        self._inbox.put(item)
        self.executor.wake()

    # ---- the loop --------------------------------------------------------
    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.step()
            except Exception:  # the loop must survive its own bugs
                log.exception("engine step failed")
                self._end_stranded()
                time.sleep(0.05)
        self._end_all("UNAVAILABLE", "server shutting down")

    def _end_all(self, status: str, reason: str) -> None:
        while self.tracked:  # (a finished request may admit a resubmission of its id)
            for t in list(self.tracked.values()):
                self._finish(t, EventType.FAILED, status, reason)

    def _end_stranded(self) -> None:
        """After a bug in the loop: a request it left with nothing to wait for
        (running on a dispatch that is gone, or with no step left) ends
        INTERNAL rather than hanging."""
        for t in list(self.tracked.values()):
            gone = t.running and t.dispatch_id not in self.inflight
            if gone or (not t.running and t.steps_done >= t.req.params.num_steps):
                log.error("request %s was left stranded by the failed step: it ends INTERNAL", t.req.req_id)
                t.running = False
                self._finish(t, EventType.FAILED, "INTERNAL",
                             "the server hit a bug while running this request (see its log)")

    def step(self) -> None:
        self._take_inbox()
        if self._dirty:
            self._schedule()
            self._export_queue()
        replies = self.executor.wait(self._wait_timeout())
        self._woke_s = time.monotonic()
        for device_id, msg in replies:
            self._on_reply(device_id, msg)
        for device_id in self.restarts.due():
            self.executor.respawn(device_id, standalone=True)  # its Ready arrives through wait()
        self.recovery.tick(self.down)  # after a crash, once every worker is back
        self._watch_overdue(self._woke_s)
        if not replies and self.tracked:
            self._dirty = True  # a timed re-plan: a policy may wait for time to pass

    def _export_queue(self) -> None:
        for task in ("image", "video"):
            ts = [t for t in self.tracked.values() if t.req.task == task]
            self.metrics.set_queue(task, queued=sum(t.started_s is None for t in ts),
                                   running=sum(t.running for t in ts),
                                   paused=sum(t.started_s is not None and not t.running for t in ts))
        self.metrics.set_workers(up=self.executor.num_devices - len(self.down), down=len(self.down))

    def _wait_timeout(self) -> float | None:
        # Results, arrivals and worker deaths all wake the wait; poll only when
        # requests wait with nothing running (a worker restarting, or a policy
        # holding work back), so a time-based decision is not missed, when
        # a dead worker's restart is due, and now and then while dispatches
        # run (the overdue watchdog).
        timeouts = [self.restarts.next_in_s()]
        if self.tracked and not self.inflight:
            timeouts.append(IDLE_REPLAN_S)
        if self.inflight:
            timeouts.append(WATCHDOG_S)
        timeouts = [t for t in timeouts if t is not None]
        return min(timeouts) if timeouts else None

    def _take_inbox(self) -> None:
        while True:
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                break
            self._dirty = True
            if item[0] == "submit":
                self._admit_or_fail(item[1], item[2])
            elif item[0] == "cancel":
                _, req_id, answer, done = item
                answer[0] = self._cancel(req_id)
                done.set()
            elif item[0] == "abandon":
                self._abandon(*item[1:])
            elif item[0] == "end_all":
                self._end_all(*item[1:])
        self._num_waiting = sum(1 for t in self.tracked.values() if t.started_s is None)

    def _admit(self, req: Request, sink: Sink) -> None:
        existing = self.tracked.get(req.req_id)
        if existing is not None:  # same id still unfinished
            if existing.req.fingerprint != req.fingerprint:
                self.metrics.request_finished(req.task, req.model, "ALREADY_EXISTS", None, None, None)
                sink(Event(req.req_id, EventType.FAILED, 0.0, status="ALREADY_EXISTS",
                           reason="request_id: in use by a different unfinished request; "
                                  "resubmit the same request to attach to it, or use another id"))
            elif existing.cancel_requested:  # stopping: the resubmission starts afresh after it
                existing.successors.append((req, sink))
            else:  # attach: every caller gets the events from here on
                existing.sinks.append(sink)
            return
        slo_ms = req.slo_ms or self._default_slo_ms(req)
        t = Tracked(req, slo_ms, [sink])
        self.tracked[req.req_id] = t
        position = sum(1 for x in self.tracked.values() if x.started_s is None) - 1
        t.emit(time.monotonic(), EventType.QUEUED, queue_position=position)

    def _admit_or_fail(self, req: Request, sink: Sink) -> None:
        """``_admit``; a bug there ends this request INTERNAL, counted, rather
        than leave its caller waiting for an event that never comes (the
        loop's own repair only sees requests it tracks)."""
        try:
            self._admit(req, sink)
        except Exception:
            log.exception("request %s could not be admitted: it ends INTERNAL", req.req_id)
            reason = "the server hit a bug while admitting this request (see its log)"
            t = self.tracked.get(req.req_id)
            if t is not None and sink in t.sinks:
                self._finish(t, EventType.FAILED, "INTERNAL", reason)
                return
            self.metrics.request_finished(req.task, req.model, "INTERNAL", None, None, None)
            sink(Event(req.req_id, EventType.FAILED, 0.0, status="INTERNAL", reason=reason))

    def _default_slo_ms(self, req: Request) -> int:
        """slo_scale × the request's predicted latency alone at its best
        allowed allocation (as the simulator's workloads define it), within
        what the API's slo_ms (uint32) can carry."""
        p = req.params
        devices = self.max_sp_degree if req.task == "video" else 1
        alone_ms = self.cost.isolated_latency_ms(req.model, p.width, p.height, p.num_frames, p.num_steps,
                                                 req.task, devices)
        slo_ms = self.config.default_slo_scale * alone_ms
        return int(min(max(slo_ms, 1.0), SLO_MS_MAX)) if slo_ms == slo_ms else SLO_MS_MAX  # NaN: no bound

    # ---- planning and dispatch -------------------------------------------
    def _schedule(self) -> None:
        self._dirty = False
        views = [t.view() for t in self.tracked.values() if not t.done and not t.cancel_requested]
        idle = [d for d in range(self.executor.num_devices) if d not in self.busy and d not in self.down]
        if not views or not idle:
            return
        now = time.monotonic()
        devices = [DeviceView(d, d in idle, now if d in idle else self._busy_until(d, now))
                   for d in range(self.executor.num_devices)]
        t0 = time.perf_counter()
        try:
            plan: StepPlan = self.policy.plan(now, views, devices, self.cost)
            for d in plan.dispatches:
                problem = check_dispatch(d, [self.tracked.get(r) for r in d.req_ids], set(idle),
                                         self.max_sp_degree)
                if problem:
                    raise ValueError(f"the plan holds a dispatch this executor cannot run: {d}: {problem}")
        except Exception:  # a policy bug must not strand requests: decide this one plainly
            log.exception("policy %s failed; falling back to fcfs for this decision", self.policy.name)
            self.num_invalid_dispatches += 1
            plan = self._fallback.plan(now, views, devices, self.cost)
        self.metrics.decision(time.perf_counter() - t0)
        self._apply(plan, set(idle), now)

    def _busy_until(self, device_id: int, now: float) -> float:
        fl = self.inflight.get(self.busy.get(device_id, -1))
        if fl is None:  # down: never idle soon
            return now + 3600.0
        return fl.busy_until(device_id, self.feedback.dispatch_ms())

    def _apply(self, plan: StepPlan, idle: set[int], now: float) -> None:
        if log.isEnabledFor(logging.DEBUG) and (plan.dispatches or plan.preempted):
            log.debug("plan idle=%s dispatch=%s preempt=%s", sorted(idle),
                      [(d.req_ids, d.device_ids, d.num_steps) for d in plan.dispatches], plan.preempted)
        for rej in plan.rejected:
            t = self.tracked.get(rej.req_id)
            if t is not None and not t.running:
                eta = max(0.0, rej.estimated_finish_s - now)
                late = rej.estimated_finish_s - t.deadline_s
                self._finish(t, EventType.FAILED, "RESOURCE_EXHAUSTED",
                             f"cannot meet its SLO of {t.slo_ms} ms: estimated to finish in {eta:.2f} s, "
                             f"{late:.2f} s after its deadline (admission control)")
        for req_id in plan.preempted:
            t = self.tracked.get(req_id)
            if t is not None and t.steps_done > 0 and not t.running and not t.paused:
                t.paused, t.num_preemptions = True, t.num_preemptions + 1
                self.metrics.preempted(t.req.task)
                t.emit(now, EventType.PREEMPTED, reason="preempted by the scheduler")
        for d in plan.dispatches:
            ts = [self.tracked.get(r) for r in d.req_ids]
            problem = check_dispatch(d, ts, idle, self.max_sp_degree)
            if problem:
                log.error("policy %s produced an invalid dispatch %s: %s", self.policy.name, d, problem)
                self.num_invalid_dispatches += 1
                continue
            idle -= set(d.device_ids)
            self._dispatch(d, ts, now)

    def _dispatch(self, d: Dispatch, ts: list[Tracked], now: float) -> None:
        dispatch_id = next(self._ids)
        fresh = sum(1 for t in ts if t.started_s is None)
        finishing = sum(1 for t in ts if t.steps_done + d.num_steps >= t.req.params.num_steps)
        # sent at once after the replies that freed its block: the engine's turnaround counts
        freed = all(self._freed_s.get(x, -1.0) >= self._woke_s for x in d.device_ids)
        fl = self.feedback.predict(d, ts[0].req.model, ts[0].req.params, len(ts), fresh, finishing, now,
                                   max(now - self._woke_s, 0.0) * 1e3 if freed else 0.0)
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

    # ---- results ---------------------------------------------------------
    def _on_reply(self, device_id: int, msg) -> None:
        self._dirty = True
        if isinstance(msg, P.StepDone):
            self._on_step(device_id, msg)
        elif isinstance(msg, P.DispatchDone):
            self._on_dispatch_done(device_id, msg)
        elif isinstance(msg, P.Exported):
            self._on_exported(msg)
        elif not self._on_worker_lifecycle(device_id, msg):
            log.warning("unexpected message from worker %d: %r", device_id, msg)

    def _on_step(self, device_id: int, msg: P.StepDone) -> None:
        fl = self.inflight.get(msg.dispatch_id)
        now = time.monotonic()
        ts = [self._current(r, msg.dispatch_id) for r in msg.req_ids]
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
        ts = [self.tracked[r] for r in fl.dispatch.req_ids if r in self.tracked]
        if lost or len(ts) != len(fl.dispatch.req_ids):
            self._abort_dispatch(dispatch_id, "state was lost while moving to another device")
            return
        self._send(dispatch_id, fl, ts)

    def _abort_dispatch(self, dispatch_id: int, reason: str) -> None:
        fl = self.inflight.pop(dispatch_id)
        log.warning("dispatch %d of %s not sent: %s", dispatch_id, ", ".join(fl.dispatch.req_ids), reason)
        for device_id in fl.dispatch.device_ids:
            self.busy.pop(device_id, None)
        for r in fl.dispatch.req_ids:
            t = self.tracked.get(r)
            if t is not None:
                t.running = False
                if t.cancel_requested:  # it ends as asked, whatever became of its state
                    self._finish(t, EventType.CANCELLED, "CANCELLED", "cancelled")
                else:
                    self._finish(t, EventType.FAILED, "INTERNAL", reason)

    def _on_dispatch_done(self, device_id: int, msg: P.DispatchDone) -> None:
        """A member's DispatchDone. A block whose steps all continue frees as
        one when its last member reports, and only then do its requests stop
        running: the members report a few ms apart, and a plan made in between
        would see a request ready with part of its block busy, so give its
        free devices to other work and count it preempted. A dispatch that
        finishes a request frees each member as it reports (the leader alone
        decodes, as the simulator has it)."""
        fl = self.inflight.get(msg.dispatch_id)
        if msg.group_lost:
            self._group_broke(device_id, msg.dispatch_id)
        if fl is None:  # its members are no longer awaited (a worker died): what it says still counts
            self._free(device_id, msg.dispatch_id)
            self._on_outcomes(device_id, None, msg)
            return
        fl.pending.discard(device_id)
        if fl.finishing:
            self._free(device_id, msg.dispatch_id)
            if not fl.pending:
                self.inflight.pop(msg.dispatch_id)
            if device_id == fl.leader:  # only the leader reports outcomes
                self._on_outcomes(device_id, fl, msg)
            return
        if device_id == fl.leader:
            fl.report = msg
        if not fl.pending:
            self._block_done(msg.dispatch_id, fl)

    def _block_done(self, dispatch_id: int, fl: InFlight) -> None:
        """Every member of ``fl`` has reported (or died): its block frees and
        its leader's report, if one came, takes effect."""
        self.inflight.pop(dispatch_id, None)
        for device_id in fl.dispatch.device_ids:
            self._free(device_id, dispatch_id)
        if fl.report is not None:
            self._on_outcomes(fl.leader, fl, fl.report)

    def _free(self, device_id: int, dispatch_id: int) -> None:
        if self.busy.get(device_id) == dispatch_id:
            self.busy.pop(device_id)
            self._freed_s[device_id] = time.monotonic()

    def _on_outcomes(self, device_id: int, fl: InFlight | None, msg: P.DispatchDone) -> None:
        """Apply the leader's report of a dispatch (``fl`` None: no longer in flight)."""
        now = time.monotonic()
        if fl is not None:
            self.feedback.done(fl, msg, now, self._params_of)
        for req_id in msg.paused:
            t = self._current(req_id, msg.dispatch_id)
            if t is None:
                continue
            t.running = False
            if t.cancel_requested:  # the Drop raced the step's end: free it now
                self._finish(t, EventType.CANCELLED, "CANCELLED", "cancelled")
        for fin in msg.finished:
            t = self._current(fin.req_id, msg.dispatch_id)
            if t is not None:
                t.running = False
                self._complete(t, fin, now)
        for f in msg.failed:
            t = self._current(f.req_id, msg.dispatch_id)
            if t is not None:
                t.running, t.holders = False, t.holders - {device_id}
                kind = EventType.CANCELLED if f.status == "CANCELLED" else EventType.FAILED
                if kind == EventType.FAILED:
                    log.warning("request %s failed on worker %d: %s: %s", f.req_id, device_id, f.status,
                                f.message)
                self._finish(t, kind, f.status, f.message)

    def _current(self, req_id: str, dispatch_id: int) -> Tracked | None:
        """The request, if ``dispatch_id`` is still its latest dispatch."""
        t = self.tracked.get(req_id)
        return t if t is not None and t.dispatch_id == dispatch_id else None

    def _params_of(self, req_id: str):
        t = self.tracked.get(req_id)
        return t.req.params if t is not None else None

    def _complete(self, t: Tracked, fin: P.Finished, now: float) -> None:
        if t.cancel_requested:  # Cancel already answered True: the result is not delivered
            self._finish(t, EventType.CANCELLED, "CANCELLED", "cancelled")
            return
        try:
            result = t.result(now, fin)
        except Exception:  # a bug here must end the request, not leave it with no steps to run
            log.exception("request %s: its result could not be made", t.req.req_id)
            self._finish(t, EventType.FAILED, "INTERNAL", "the server failed to make the result (see its log)")
            return
        self.tracked.pop(t.req.req_id, None)
        self.metrics.request_finished(t.req.task, t.req.model, "OK", result.latency_ms / 1e3,
                                      result.queue_ms / 1e3, result.slo_met)
        self.metrics.calls_ended(t.req.task, t.req.model, "OK", len(t.sinks) - 1)  # attached callers
        t.emit(now, EventType.COMPLETED, result=result)

    def _finish(self, t: Tracked, kind: EventType, status: str, reason: str) -> None:
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
            self._admit(req, sink)

    def _abandon(self, req_id: str, sink: Sink, status: str) -> None:
        t = self.tracked.get(req_id)
        if t is None or t.done:
            return
        t.successors = [(r, s) for r, s in t.successors if s is not sink]
        if sink in t.sinks:
            t.sinks.remove(sink)
            if not t.sinks:  # nobody waits for it any more: its end counts this call
                if not t.cancel_requested:  # (an explicit Cancel keeps CANCELLED)
                    t.cancel_status = status
                self._cancel(req_id)
            else:  # the others go on: this call ends here
                self.metrics.calls_ended(t.req.task, t.req.model, status)

    def _cancel(self, req_id: str) -> bool:
        t = self.tracked.get(req_id)
        if t is None or t.done:
            return False
        if t.running:  # aborted at the next step boundary by the worker
            t.cancel_requested = True
            fl = self.inflight.get(t.dispatch_id)
            if fl is not None and fl.moving:  # not sent yet: _send follows it with the Drop
                return True
            for device_id in t.device_ids:
                self.executor.send(device_id, P.Drop((req_id,)))
        else:
            self._finish(t, EventType.CANCELLED, "CANCELLED", "cancelled")
        return True

    def _set_sp_degree(self, degree: int) -> None:
        """The largest SP group plans may use; the policies are rebuilt for it."""
        self.max_sp_degree = degree
        self.policy = self._make_policy(self.cluster_spec())
        self._fallback = make_fallback_policy(self.cluster_spec())
        self.metrics.set_sp_max_degree(degree)

    def cluster_spec(self) -> ClusterSpec:
        # Only the Wan adapter has a sequence-parallel path: images run on one device.
        return ClusterSpec(self.executor.num_devices, max_sp_degree=self.max_sp_degree, migratable=True,
                           max_image_batch=self.config.max_image_batch, max_image_sp_degree=1)

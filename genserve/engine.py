"""The engine: one loop that plans, dispatches and collects step results.

``Engine.step()`` reads as the design: take arrivals and cancels, ask the
policy for a plan over idle devices, dispatch it, then wait for step results
and apply them. It runs on its own thread; the frontend calls the thread-safe
``submit`` / ``cancel`` and receives ``Event``s through per-request sinks.

Its parts, each given what it works on: ``Requests`` (requests.py) tracks
every unfinished request and ends it; ``Dispatcher`` (dispatcher.py) sends
dispatches and applies the workers' reports; ``WorkerLoss``
(worker_loss.py) handles dead and hung workers and the SP degree they leave.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from typing import Callable

from genserve.config import EngineConfig
from genserve.dispatch import check_dispatch
from genserve.dispatcher import Dispatcher
from genserve.requests import Requests
from genserve.scheduler import make_policy as _make_named_policy
from genserve.scheduler.types import IDLE_REPLAN_S, ClusterSpec, DeviceView, StepPlan
from genserve.tracked import Sink
from genserve.types import EventType, Request, RequestError
from genserve.workers import protocol as P
from genserve.worker_loss import WorkerLoss
from genserve.workers.executor import Executor

SLO_MS_MAX = 2**32 - 1  # the API's slo_ms is unsigned 32-bit
WATCHDOG_S = 5.0  # how often the engine looks for hung dispatches while they run
NO_WORKER_UP = "no worker is up (restarting after a failure); retry on another replica"

log = logging.getLogger("genserve.engine")


def make_fallback_policy(spec: ClusterSpec):
    return _make_named_policy("fcfs", spec)


class Engine:
    def __init__(self, config: EngineConfig, executor: Executor, make_policy, cost, metrics,
                 cards: dict[str, P.ModelCard], max_queue: int = 4096):
        """``make_policy(ClusterSpec) -> Policy``: the policy is rebuilt if what
        the executor can do changes (a crash turns sequence parallelism off)."""
        self.config, self.executor, self.cost = config, executor, cost
        self._make_policy = make_policy
        self.metrics, self.cards, self.max_queue = metrics, cards, max_queue
        # each video model's own SP limit (its attention heads split over the group)
        self._video_sp_limits = {c.name: c.max_sp_degree for c in cards.values() if c.task == "video"}
        self.requests = Requests(executor, metrics, self._default_slo_ms)
        self.dispatcher = Dispatcher(executor, self.requests, cost, metrics)
        self.loss = WorkerLoss(config, executor, self.requests, self.dispatcher, metrics)
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._dirty = True  # something changed since the last plan
        self._num_waiting = 0  # read by other threads (queue bound); engine writes it
        self._taking = False  # the engine thread holds inbox items it has not applied yet
        self.num_invalid_dispatches = 0  # policy plans this executor could not run (a bug)
        self._planned_sp_degree = 0  # the SP degree the policy was built for
        self._num_down = 0  # as last told to on_workers_down
        self._sync_sp_degree()
        # Called on the engine thread with the number of workers down whenever
        # it changes (the frontend turns it into health status).
        self.on_workers_down: Callable[[int], None] = lambda num_down: None

    # the parts' state, as tests and the frontend read it
    @property
    def tracked(self):
        return self.requests.tracked

    @property
    def inflight(self):
        return self.dispatcher.inflight

    @property
    def busy(self):
        return self.dispatcher.busy

    @property
    def feedback(self):
        return self.dispatcher.feedback

    @property
    def down(self) -> set[int]:
        return self.loss.down

    @property
    def max_sp_degree(self) -> int:
        """The largest SP group plans may use now: what the workers can form
        (1 after a crash, until they rejoin). Each video model runs within its
        own limit too (``sp_degree_of``)."""
        return self.loss.sp_degree

    def sp_degree_of(self, model: str) -> int:
        """The largest SP group a step of ``model`` runs on now (ListModels'
        ``max_sp_degree``, the default SLO's allocation): a video model's
        limit within what the workers can form; images run on one device."""
        return min(self._video_sp_limits.get(model, 1), self.max_sp_degree)

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
        """Requests accepted and not yet ended (read from any thread). The
        reads go in this order so a submit the engine thread is taking from
        the inbox is always counted: it leaves the inbox only after
        ``_taking`` is set, and ``_taking`` clears only after it is tracked."""
        in_inbox = self._inbox.qsize()
        taking = self._taking
        return len(self.requests) + in_inbox + taking

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
        self.requests.end_all("UNAVAILABLE", "server shutting down")

    def _end_stranded(self) -> None:
        """After a bug in the loop: a request it left with nothing to wait for
        (running on a dispatch that is gone, or with no step left) ends
        INTERNAL rather than hanging."""
        for t in self.requests:
            gone = t.running and t.dispatch_id not in self.inflight
            if gone or (not t.running and t.steps_done >= t.req.params.num_steps):
                log.error("request %s was left stranded by the failed step: it ends INTERNAL", t.req.req_id)
                t.running = False
                self.requests.finish(t, EventType.FAILED, "INTERNAL",
                                     "the server hit a bug while running this request (see its log)")

    def step(self) -> None:
        self._take_inbox()
        if self._dirty:
            self._schedule()
            self._export_queue()
        replies = self.executor.wait(self._wait_timeout())
        self.dispatcher.woke_s = now = time.monotonic()
        for device_id, msg in replies:
            self._on_reply(device_id, msg)
        self.loss.tick()  # restarts that are due; the SP rejoin once every worker is up
        self.loss.watch_overdue(now)
        if len(self.down) != self._num_down:
            self._num_down = len(self.down)
            self.on_workers_down(self._num_down)
        if not replies and self.tracked:
            self._dirty = True  # a timed re-plan: a policy may wait for time to pass

    def _on_reply(self, device_id: int, msg) -> None:
        self._dirty = True
        if isinstance(msg, P.DispatchDone) and msg.group_lost:
            self.loss.group_broke(device_id, msg.dispatch_id)
        if not (self.dispatcher.on_reply(device_id, msg) or self.loss.on_lifecycle(device_id, msg)):
            log.warning("unexpected message from worker %d: %r", device_id, msg)

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
        # a dead worker's restart or an SP rejoin round is due, and now and then
        # while dispatches run (the overdue watchdog).
        timeouts = [self.loss.restarts.next_in_s(), self.loss.recovery.next_in_s()]
        if self.tracked and not self.inflight:
            timeouts.append(IDLE_REPLAN_S)
        if self.inflight:
            timeouts.append(WATCHDOG_S)
        timeouts = [t for t in timeouts if t is not None]
        return min(timeouts) if timeouts else None

    def _take_inbox(self) -> None:
        self._taking = True
        try:
            self._apply_inbox()
        finally:
            self._taking = False
        self._num_waiting = self.requests.num_waiting()

    def _apply_inbox(self) -> None:
        while True:
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                break
            self._dirty = True
            if item[0] == "submit":
                self.requests.admit(item[1], item[2])
            elif item[0] == "cancel":
                _, req_id, answer, done = item
                answer[0] = self._cancel(req_id, waiting_too=True)
                done.set()
            elif item[0] == "abandon":
                if self.requests.abandon(*item[1:]):
                    self._cancel(item[1])
            elif item[0] == "end_all":
                self.requests.end_all(*item[1:])

    def _default_slo_ms(self, req: Request) -> int:
        """slo_scale × the request's predicted latency alone at its best
        allowed allocation (as the simulator's workloads define it), within
        what the API's slo_ms (uint32) can carry."""
        p = req.params
        devices = self.sp_degree_of(req.model)
        alone_ms = self.cost.isolated_latency_ms(req.model, p.width, p.height, p.num_frames, p.num_steps,
                                                 req.task, devices)
        slo_ms = self.config.default_slo_scale * alone_ms
        return int(min(max(slo_ms, 1.0), SLO_MS_MAX)) if slo_ms == slo_ms else SLO_MS_MAX  # NaN: no bound

    def _cancel(self, req_id: str, waiting_too: bool = False) -> bool:
        """Cancel ``req_id``; ``waiting_too`` (a Cancel, not a caller leaving):
        also the resubmissions of the id waiting for it to stop."""
        t = self.requests.get(req_id)
        if t is None or t.done:
            return False
        if waiting_too and t.cancel_requested:
            self.requests.cancel_successors(t)
        if t.running:  # aborted at the next step boundary by the worker
            self.dispatcher.stop(t)
        else:
            self.requests.finish(t, EventType.CANCELLED, "CANCELLED", "cancelled")
        return True

    # ---- planning --------------------------------------------------------
    def _schedule(self) -> None:
        self._dirty = False
        self._sync_sp_degree()
        views = [t.view() for t in self.tracked.values() if not t.done and not t.cancel_requested]
        idle = [d for d in range(self.executor.num_devices) if d not in self.busy and d not in self.down]
        if not views or not idle:
            return
        now = time.monotonic()
        devices = [DeviceView(d, d in idle, now if d in idle else self.dispatcher.busy_until(d, now))
                   for d in range(self.executor.num_devices)]
        t0 = time.perf_counter()
        try:
            plan: StepPlan = self.policy.plan(now, views, devices, self.cost)
            for d in plan.dispatches:
                problem = check_dispatch(d, [self.tracked.get(r) for r in d.req_ids], set(idle),
                                         self.max_sp_degree, self.sp_degree_of)
                if problem:
                    raise ValueError(f"the plan holds a dispatch this executor cannot run: {d}: {problem}")
        except Exception:  # a policy bug must not strand requests: decide this one plainly
            log.exception("policy %s failed; falling back to fcfs for this decision", self.policy.name)
            self.num_invalid_dispatches += 1
            plan = self._fallback.plan(now, views, devices, self.cost)
        self.metrics.decision(time.perf_counter() - t0)
        self._apply(plan, set(idle), now)

    def _apply(self, plan: StepPlan, idle: set[int], now: float) -> None:
        if log.isEnabledFor(logging.DEBUG) and (plan.dispatches or plan.preempted):
            log.debug("plan idle=%s dispatch=%s preempt=%s", sorted(idle),
                      [(d.req_ids, d.device_ids, d.num_steps) for d in plan.dispatches], plan.preempted)
        for rej in plan.rejected:
            t = self.tracked.get(rej.req_id)
            if t is not None and not t.running:
                eta = max(0.0, rej.estimated_finish_s - now)
                late = rej.estimated_finish_s - t.deadline_s
                self.requests.finish(t, EventType.FAILED, "RESOURCE_EXHAUSTED",
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
            problem = check_dispatch(d, ts, idle, self.max_sp_degree, self.sp_degree_of)
            if problem:
                log.error("policy %s produced an invalid dispatch %s: %s", self.policy.name, d, problem)
                self.num_invalid_dispatches += 1
                continue
            idle -= set(d.device_ids)
            self.dispatcher.dispatch(d, ts, now)

    def _sync_sp_degree(self) -> None:
        """Rebuild the policies when the SP degree the workers can run changed."""
        if self.max_sp_degree != self._planned_sp_degree:
            self._planned_sp_degree = self.max_sp_degree
            self.policy = self._make_policy(self.cluster_spec())
            self._fallback = make_fallback_policy(self.cluster_spec())

    def cluster_spec(self) -> ClusterSpec:
        # Only the Wan adapter has a sequence-parallel path: images run on one device.
        # Video models are listed only where their limit caps something.
        return ClusterSpec(self.executor.num_devices, max_sp_degree=self.max_sp_degree, migratable=True,
                           max_image_batch=self.config.max_image_batch, max_image_sp_degree=1,
                           video_sp_limits=tuple(sorted((m, k) for m, k in self._video_sp_limits.items()
                                                        if k < self.max_sp_degree)))

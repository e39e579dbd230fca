"""Discrete-event simulator: the same policy objects and latency model as the
live server, on a simulated clock ("one scheduler, two clocks").

Events are arrivals and dispatch completions. At every instant with events,
completions are applied first, then arrivals, then the policy plans (when a
device is idle or a request arrived) and the plan is checked and applied.
When requests wait with nothing running and nothing left to arrive, the
policy is asked again every ``IDLE_REPLAN_S``, as the engine does (for at
most ``max_idle_s`` of simulated time: then what is left is unfinished).
A dispatch lasts the *true* time of its steps (``true_cost``, optionally with
log-normal noise) plus encode for requests it starts, decode for requests it
finishes (on the block's first device only, as the workers do: the others are
released when the steps end), a state move for requests it moves, and the
profile's per-dispatch overhead (``dispatch_ms``); each step's true time is fed
back to the *planning* model through ``observe_step`` (online calibration).
"""
from __future__ import annotations

import heapq
import math
import random
import time
from dataclasses import dataclass
from typing import Sequence

from .check import check_plan
from .latency import LatencyModel
from .types import IDLE_REPLAN_S, ClusterSpec, DeviceView, Dispatch, RequestView, StepPlan
from .workload import Request

DONE, REJECTED, UNFINISHED = "done", "rejected", "unfinished"


class PlanError(RuntimeError):
    """A policy produced an invalid plan."""


@dataclass(frozen=True, slots=True)
class Outcome:
    """What happened to one request."""

    req_id: str
    task: str
    model: str
    arrival_s: float
    deadline_s: float
    status: str  # DONE, REJECTED or UNFINISHED
    finish_s: float = math.nan
    first_start_s: float = math.nan
    num_preemptions: int = 0
    max_sp_degree: int = 0
    mean_batch: float = 0.0

    @property
    def met_slo(self) -> bool:
        return self.status == DONE and self.finish_s <= self.deadline_s + 1e-9

    @property
    def latency_s(self) -> float:
        return self.finish_s - self.arrival_s


@dataclass(frozen=True, slots=True)
class SimResult:
    policy: str
    num_devices: int
    outcomes: tuple[Outcome, ...]
    decision_ms: tuple[float, ...]
    busy_device_s: float
    start_s: float
    end_s: float
    wall_s: float
    invalid_plans: int = 0


@dataclass(slots=True)
class _Req:
    """The simulator's bookkeeping of one active request (its view is kept
    apart, in ``Simulator.views``, so that a decision lists them in one call)."""

    first_start_s: float = math.nan
    max_degree: int = 0
    batch_sum: int = 0
    dispatches: int = 0
    # the running dispatch's encode and decode of this request (None: not in it), to calibrate
    encode_ms: float | None = None
    decode_ms: float | None = None


class Simulator:
    """One run of one policy over one workload. Use ``simulate`` for the usual case."""

    def __init__(self, policy, requests: Sequence[Request], cluster: ClusterSpec, plan_cost,
                 true_cost=None, noise_cv: float = 0.0, seed: int = 0, check: bool = True,
                 strict: bool = True, max_idle_s: float = 600.0, on_progress=None,
                 progress_every_s: float = 10.0):
        self.policy, self.cluster, self.cost = policy, cluster, plan_cost
        # on_progress(requests ended, requests in all, wall seconds): called
        # about every progress_every_s of wall time (a long run is not silent)
        self.on_progress, self.progress_every_s = on_progress, progress_every_s
        self.true_cost = true_cost or plan_cost
        self.noise_cv, self.rng = noise_cv, random.Random(seed)
        self.check, self.strict = check, strict
        self.max_idle_s = max_idle_s
        self.requests = sorted(requests, key=lambda r: r.arrival_s)
        # active requests, in arrival order: bookkeeping and what policies see
        self.active: dict[str, _Req] = {}
        self.views: dict[str, RequestView] = {}
        self.outcomes: list[Outcome] = []
        # a busy device's view, made when its dispatch starts (None: idle; an
        # idle device's view is made at each decision, as it is free "now")
        self.busy_view: list[DeviceView | None] = [None] * cluster.num_devices
        self.num_idle = cluster.num_devices  # Nones in busy_view
        self.events: list = []
        self.seq = 0
        self.decision_ms: list[float] = []
        self.busy_device_s = 0.0
        self.invalid = 0
        self.now = 0.0
        # a LatencyModel takes repeated identical measurements in one call
        self._counted = isinstance(plan_cost, LatencyModel)
        # optional parts of the CostModel protocol, looked up once
        self._dispatch_ms = getattr(self.true_cost, "dispatch_ms", None)
        self._move_ms = getattr(self.true_cost, "move_ms", None)

    def run(self) -> SimResult:
        wall0 = time.perf_counter()
        for r in self.requests:
            self._push(r.arrival_s, 1, r)
        idle_since = None
        rounds, report_at = 0, wall0 + self.progress_every_s
        while self.events:
            rounds += 1
            if self.on_progress is not None and rounds % 256 == 0 and time.perf_counter() >= report_at:
                self.on_progress(len(self.outcomes), len(self.requests), time.perf_counter() - wall0)
                report_at = time.perf_counter() + self.progress_every_s
            self.now = self.events[0][0]
            arrived = self._pop_instant()
            if arrived or self.num_idle:
                self._decide()
            if self.events or not self.active:
                idle_since = None
            elif idle_since is None or self.now - idle_since < self.max_idle_s:
                idle_since = self.now if idle_since is None else idle_since
                self._push(self.now + IDLE_REPLAN_S, 2, None)  # the engine's timed re-plan
        for rid, st in self.active.items():  # stalled: the policy never ran them
            self.outcomes.append(self._outcome(self.views[rid], st, UNFINISHED))
        start = self.requests[0].arrival_s if self.requests else 0.0
        return SimResult(self.policy.name, self.cluster.num_devices, tuple(self.outcomes),
                         tuple(self.decision_ms), self.busy_device_s, start, self.now,
                         time.perf_counter() - wall0, self.invalid)

    def _push(self, t: float, kind: int, payload) -> None:
        self.seq += 1
        heapq.heappush(self.events, (t, kind, self.seq, payload))

    def _pop_instant(self) -> bool:
        """Apply every event at ``now`` (completions sort before arrivals)."""
        arrived = False
        while self.events and self.events[0][0] <= self.now + 1e-12:
            _, kind, _, payload = heapq.heappop(self.events)
            if kind == 0:
                self._complete(*payload)
            elif kind == 2:
                pass  # a timed re-plan: wakes the policy only
            else:
                arrived = True
                self.active[payload.req_id] = _Req()
                self.views[payload.req_id] = _arrived(payload)
        return arrived

    def _decide(self) -> None:
        if not self.views:
            return
        views = list(self.views.values())
        now = self.now
        devices = [view or _device_view(d, True, now) for d, view in enumerate(self.busy_view)]
        t0 = time.perf_counter()
        plan = self.policy.plan(self.now, views, devices, self.cost)
        self.decision_ms.append((time.perf_counter() - t0) * 1e3)
        if self.check:
            errors = check_plan(plan, views, devices, self.cluster)
            if errors:
                self.invalid += 1
                if self.strict:
                    raise PlanError(f"{self.policy.name} at t={self.now:.6f}: " + "; ".join(errors))
                return
        if plan.dispatches or plan.preempted or plan.rejected:  # most plans change nothing
            self._apply(plan)

    def _apply(self, plan: StepPlan) -> None:
        for rej in plan.rejected:
            st = self.active.pop(rej.req_id)
            self.outcomes.append(self._outcome(self.views.pop(rej.req_id), st, REJECTED))
        for rid in plan.preempted:
            v = self.views[rid]
            self.views[rid] = _view(v, v.steps_done, v.num_preemptions + 1, v.device_ids,
                                   v.running, True)
        for disp in plan.dispatches:
            self._start(disp)

    def _start(self, disp: Dispatch) -> None:
        views, cost = self.views, self.true_cost
        degree, batch = len(disp.device_ids), len(disp.req_ids)
        device_ids = tuple(disp.device_ids)
        v0 = views[disp.req_ids[0]]
        ms = cost.step_ms(v0.model, v0.width, v0.height, v0.num_frames, degree, batch)
        if self.noise_cv > 0:
            step_ms = [ms * self._noise() for _ in range(disp.num_steps)]
        else:
            step_ms = [ms] * disp.num_steps
        # the engine's round trip and turnaround, once per dispatch
        extra_ms = self._dispatch_ms() if self._dispatch_ms is not None else 0.0
        decode_ms = 0.0
        for rid in disp.req_ids:
            st, v = self.active[rid], views[rid]
            st.encode_ms = st.decode_ms = None
            if v.steps_done == 0:
                enc = cost.encode_ms(v.model)
                extra_ms += enc
                st.encode_ms = enc
                st.first_start_s = self.now
            elif tuple(v.device_ids) != device_ids and self._move_ms is not None:
                extra_ms += self._move_ms(v.model)
            if v.steps_done + disp.num_steps >= v.num_steps:
                dec = cost.decode_ms(v.model, v.width, v.height, v.num_frames, degree)
                decode_ms += dec
                st.decode_ms = dec
            if degree > st.max_degree:
                st.max_degree = degree
            st.batch_sum += batch
            st.dispatches += 1
            views[rid] = _view(v, v.steps_done, v.num_preemptions, device_ids, True, False)
        steps_end = self.now + (sum(step_ms) + extra_ms) / 1e3
        end = steps_end + decode_ms / 1e3
        early = disp.device_ids[1:] if decode_ms > 0 else ()  # the leader decodes; the others let go
        busy = self.busy_view
        for d in disp.device_ids:
            if busy[d] is None:
                self.num_idle -= 1
            busy[d] = _device_view(d, False, steps_end if d in early else end)
        self.busy_device_s += (steps_end - self.now) * degree + (end - steps_end)
        if early:
            self._push(steps_end, 0, (early,))
        self._push(end, 0, (disp, step_ms, batch, early))

    def _release(self, device_ids, keep: tuple = ()) -> None:
        """Make ``device_ids`` idle, except those in ``keep``."""
        busy = self.busy_view
        for d in device_ids:
            if d not in keep and busy[d] is not None:
                self.num_idle += 1
                busy[d] = None

    def _complete(self, disp, step_ms: list[float] | None = None, batch: int = 0,
                  released: tuple = ()) -> None:
        if step_ms is None:  # a block's other devices, released at the start of its decode
            self._release(disp)
            return
        v0 = self.views[disp.req_ids[0]]
        degree = len(disp.device_ids)
        if self.noise_cv <= 0 and self._counted:  # identical steps: one closed-form update
            self.cost.observe_step(v0.model, v0.width, v0.height, v0.num_frames, degree, batch,
                                   step_ms[0], count=len(step_ms))
        else:
            for ms in step_ms:
                self.cost.observe_step(v0.model, v0.width, v0.height, v0.num_frames, degree,
                                       batch, ms)
        self._release(disp.device_ids, keep=released)  # those may run something else by now
        for rid in disp.req_ids:
            st, v = self.active[rid], self.views[rid]
            if self._counted:
                self._calibrate_extras(v, degree, st)
            done = v.steps_done + disp.num_steps
            if done >= v.num_steps:  # no policy sees its view again
                del self.active[rid], self.views[rid]
                self.outcomes.append(self._outcome(v, st, DONE))
            else:
                self.views[rid] = _view(v, done, v.num_preemptions, v.device_ids, False, v.paused)

    def _calibrate_extras(self, v: RequestView, degree: int, st: _Req) -> None:
        if st.encode_ms is not None:
            self.cost.observe_encode(v.model, st.encode_ms)
        if st.decode_ms is not None:
            self.cost.observe_decode(v.model, v.width, v.height, v.num_frames, degree, st.decode_ms)

    def _noise(self) -> float:
        if self.noise_cv <= 0:
            return 1.0
        sigma = math.sqrt(math.log(1 + self.noise_cv ** 2))
        return self.rng.lognormvariate(-sigma * sigma / 2, sigma)

    def _outcome(self, v: RequestView, st: _Req, status: str) -> Outcome:
        return _outcome(v.req_id, v.task, v.model, v.arrival_s, v.deadline_s, status,
                        self.now if status == DONE else math.nan, st.first_start_s,
                        v.num_preemptions, st.max_degree,
                        st.batch_sum / st.dispatches if st.dispatches else 0.0)


# -- view objects, made fast -------------------------------------------------
# The simulator makes a few view objects per request and per decision, and a
# frozen dataclass's __init__ sets each field through object.__setattr__
# (about 1,500 instructions a field: a third of a simulated request). These
# make the same objects from a plain class with the same slots, whose
# instance then becomes the frozen class (allowed: the layouts are the same;
# a field added to the frozen class makes the switch raise TypeError, never a
# half-made view). tests/test_simulator_views.py checks they equal __init__'s.
_new_object = object.__new__

class _DeviceViewParts:
    __slots__ = DeviceView.__slots__


def _device_view(device_id: int, idle: bool, busy_until_s: float) -> DeviceView:
    """``DeviceView(device_id, idle, busy_until_s)`` (the commonest view: made
    without an __init__ call)."""
    v = _new_object(_DeviceViewParts)
    v.device_id, v.idle, v.busy_until_s = device_id, idle, busy_until_s
    v.__class__ = DeviceView
    return v


class _RequestViewParts:
    __slots__ = RequestView.__slots__

    def __init__(self, req_id, task, model, width, height, num_frames, num_steps, steps_done,
                 arrival_s, deadline_s, num_preemptions, device_ids, running, paused):
        self.req_id, self.task, self.model = req_id, task, model
        self.width, self.height, self.num_frames = width, height, num_frames
        self.num_steps, self.steps_done = num_steps, steps_done
        self.arrival_s, self.deadline_s = arrival_s, deadline_s
        self.num_preemptions, self.device_ids = num_preemptions, device_ids
        self.running, self.paused = running, paused


def _request_view(*fields) -> RequestView:
    """``RequestView(*fields)``, every field given."""
    v = _RequestViewParts(*fields)
    v.__class__ = RequestView
    return v


class _OutcomeParts:
    __slots__ = Outcome.__slots__

    def __init__(self, req_id, task, model, arrival_s, deadline_s, status, finish_s,
                 first_start_s, num_preemptions, max_sp_degree, mean_batch):
        self.req_id, self.task, self.model = req_id, task, model
        self.arrival_s, self.deadline_s, self.status = arrival_s, deadline_s, status
        self.finish_s, self.first_start_s = finish_s, first_start_s
        self.num_preemptions, self.max_sp_degree = num_preemptions, max_sp_degree
        self.mean_batch = mean_batch


def _outcome(*fields) -> Outcome:
    """``Outcome(*fields)``, every field given."""
    o = _OutcomeParts(*fields)
    o.__class__ = Outcome
    return o


def _arrived(r: Request) -> RequestView:
    return _request_view(r.req_id, r.task, r.model, r.width, r.height, r.num_frames,
                         r.num_steps, 0, r.arrival_s, r.deadline_s, 0, (), False, False)


def _view(v: RequestView, steps_done: int, num_preemptions: int, device_ids: tuple,
          running: bool, paused: bool) -> RequestView:
    """``v`` with its progress and placement changed."""
    return _request_view(v.req_id, v.task, v.model, v.width, v.height, v.num_frames,
                         v.num_steps, steps_done, v.arrival_s, v.deadline_s, num_preemptions,
                         device_ids, running, paused)


def simulate(policy, requests: Sequence[Request], cluster: ClusterSpec, plan_cost,
             true_cost=None, noise_cv: float = 0.0, seed: int = 0,
             check: bool = True, on_progress=None) -> SimResult:
    """Run ``policy`` over ``requests`` on ``cluster``; see the module docstring."""
    return Simulator(policy, requests, cluster, plan_cost, true_cost, noise_cv, seed,
                     check, on_progress=on_progress).run()

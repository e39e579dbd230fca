"""Per-decision context shared by every policy: who is where, what is free,
and cached predictions of how long each request still needs.

A ``Snapshot`` is built at the top of ``Policy.plan`` and thrown away at the
end; it reads only its inputs (no clock, no I/O). Its predictions depend only
on the cost model's calibration and the cluster, so a policy may hand it a
``PredictionMemo`` that keeps them from one decision to the next.
"""
from __future__ import annotations

import math
from typing import Sequence

from .blocks import degrees_upto, mask_of
from .check import expected_preempted
from .types import (IMAGE, VIDEO, ClusterSpec, CostModel, DeviceView, Dispatch,
                    Rejection, RequestView, StepPlan)

INF = math.inf
NO_PLAN = StepPlan()  # a plan that changes nothing (immutable: one serves every decision)


class PredictionMemo:
    """A policy's store of ``Snapshot`` predictions, kept across decisions while
    they cannot change: the same cost model at the same calibration (its
    ``version``) and the same cluster. A cost model with no ``version`` gets an
    empty store at every decision."""

    __slots__ = ("_cost", "_version", "_cluster", "_table")

    def __init__(self) -> None:
        self._cost = self._version = self._cluster = None
        self._table: dict[tuple, float] = {}

    def table(self, cost: CostModel, cluster: ClusterSpec) -> dict[tuple, float]:
        version = getattr(cost, "version", None)
        if version is None:
            return {}
        if not (cost is self._cost and version == self._version and cluster is self._cluster):
            self._cost, self._version, self._cluster = cost, version, cluster
            self._table = {}
        return self._table


class Snapshot:
    """Inputs of one decision, indexed, plus memoised remaining-time predictions."""

    __slots__ = ("now_s", "cluster", "cost", "requests", "_by_id", "idle_mask",
                 "free_time_s", "ready", "_running", "degrees", "_memo", "num_devices", "dispatch_ms")

    def __init__(self, now_s: float, requests: Sequence[RequestView],
                 devices: Sequence[DeviceView], cost: CostModel, cluster: ClusterSpec,
                 memo: PredictionMemo | None = None):
        self.now_s = now_s
        self.cluster = cluster
        self.cost = cost
        self.num_devices = cluster.num_devices
        self.requests = requests
        self._by_id: dict[str, RequestView] | None = None
        idle_mask = 0
        self.free_time_s = free = [now_s] * cluster.num_devices
        for d in devices:
            if d.idle:
                idle_mask |= 1 << d.device_id
            elif d.device_id < cluster.num_devices:
                t = d.busy_until_s  # max(t, now_s) without the call: this loop is hot
                free[d.device_id] = t if t > now_s else now_s
        self.idle_mask = idle_mask
        self.ready = [r for r in requests if not r.running]
        self._running: list[RequestView] | None = None
        self.degrees = degrees_upto(min(cluster.max_sp_degree, cluster.num_devices))
        self._memo = memo.table(cost, cluster) if memo is not None else {}
        self.dispatch_ms = cost.dispatch_ms() if hasattr(cost, "dispatch_ms") else 0.0

    @property
    def running(self) -> list[RequestView]:
        """Requests with a step in flight (made on first use: a pass over all
        requests that most decisions of the request-level policies skip)."""
        if self._running is None:
            self._running = [r for r in self.requests if r.running]
        return self._running

    @property
    def by_id(self) -> dict[str, RequestView]:
        """Requests by id (made on first use: few policies need it)."""
        if self._by_id is None:
            self._by_id = {r.req_id: r for r in self.requests}
        return self._by_id

    # -- what a request may be given ----------------------------------------
    def allowed_degrees(self, r: RequestView, limit: int | None = None) -> tuple[int, ...]:
        """SP degrees ``r`` may run at next (pinned when state cannot move)."""
        if r.steps_done > 0 and not self.cluster.migratable and r.device_ids:
            return (len(r.device_ids),)
        if is_image(r):
            limit = min(limit or self.cluster.max_image_sp_degree, self.cluster.max_image_sp_degree)
        elif self.cluster.video_sp_limits:
            cap = self.cluster.video_sp_limit(r.model)
            limit = cap if limit is None else min(limit, cap)
        if limit is None:
            return self.degrees
        return tuple(k for k in self.degrees if k <= limit) or (1,)

    def pinned_mask(self, r: RequestView) -> int:
        """Devices ``r`` must run on (0: anywhere)."""
        if r.steps_done > 0 and not self.cluster.migratable and r.device_ids:
            return mask_of(r.device_ids)
        return 0

    # -- predictions ----------------------------------------------------------
    def step_s(self, r: RequestView, degree: int, batch: int = 1) -> float:
        """A step as a step-level policy runs it: its compute and one
        dispatch's overhead (a request-level policy pays the overhead once
        per request, so for it this errs on the safe side)."""
        key = (r.model, r.width, r.height, r.num_frames, degree, batch)
        v = self._memo.get(key)
        if v is None:
            v = (self.cost.step_ms(r.model, r.width, r.height, r.num_frames, degree, batch)
                 + self.dispatch_ms) / 1e3
            self._memo[key] = v
        return v

    def overhead_s(self, r: RequestView, degree: int, steps: int) -> float:
        """Encode (if not started) + decode (if ``steps`` finishes it), seconds."""
        fresh = r.steps_done == 0 and not r.running
        last = steps >= r.steps_left
        if not fresh and not last:
            return 0.0
        key = (r.model, r.width, r.height, r.num_frames, degree, fresh, last)
        v = self._memo.get(key)
        if v is None:
            v = self.cost.encode_ms(r.model) / 1e3 if fresh else 0.0
            if last:
                v += self.cost.decode_ms(r.model, r.width, r.height, r.num_frames, degree) / 1e3
            self._memo[key] = v
        return v

    def remaining_s(self, r: RequestView, degree: int, batch: int = 1) -> float:
        """Time to finish ``r`` from a start now at ``degree`` in a batch of ``batch``."""
        # requests of one class with as many steps left share the answer
        left = r.num_steps - r.steps_done  # r.steps_left, without the property call
        key = (r.model, r.width, r.height, r.num_frames, left,
               r.steps_done == 0 and not r.running, degree, batch)
        v = self._memo.get(key)
        if v is None:
            v = left * self.step_s(r, degree, batch) + self.overhead_s(r, degree, left)
            self._memo[key] = v
        return v

    def dispatch_s(self, r: RequestView, degree: int, batch: int, steps: int) -> float:
        return steps * self.step_s(r, degree, batch) + self.overhead_s(r, degree, steps)

    def durations(self, r: RequestView, batch: int = 1) -> tuple[tuple[int, float], ...]:
        """(degree, remaining_s) for each allowed degree, shared by the class."""
        key = ("durs", r.model, r.width, r.height, r.num_frames, r.steps_left,
               r.steps_done == 0 and not r.running, self.pinned_mask(r), batch)
        v = self._memo.get(key)
        if v is None:
            v = tuple((k, self.remaining_s(r, k, batch)) for k in self.allowed_degrees(r))
            self._memo[key] = v
        return v

    def best_remaining_s(self, r: RequestView) -> float:
        # hot (edf orders by it): steps_left and pinned_mask (0 unless started) inlined
        key = ("best", r.model, r.width, r.height, r.num_frames, r.num_steps - r.steps_done,
               r.steps_done == 0 and not r.running,
               self.pinned_mask(r) if r.steps_done > 0 else 0)
        v = self._memo.get(key)
        if v is None:
            v = min(self.remaining_s(r, k) for k in self.allowed_degrees(r))
            self._memo[key] = v
        return v

    def slack_s(self, r: RequestView, degree: int, batch: int = 1, start_s: float | None = None) -> float:
        start = self.now_s if start_s is None else start_s
        return r.deadline_s - start - self.remaining_s(r, degree, batch)

    def hopeless(self, r: RequestView) -> bool:
        """Cannot meet its deadline even alone at its best allowed degree."""
        return r.deadline_s - self.now_s < self.best_remaining_s(r)

    def class_key(self, r: RequestView) -> tuple:
        return (r.model, r.width, r.height, r.num_frames)

    def finish_plan(self, dispatches: list[Dispatch],
                    rejected: Sequence[Rejection] = ()) -> StepPlan:
        """Wrap dispatches in a plan, listing preemptions by the exact rule."""
        return finish_plan(self.ready, dispatches, rejected)


def finish_plan(requests: Sequence[RequestView], dispatches: Sequence[Dispatch] = (),
                rejected: Sequence[Rejection] = ()) -> StepPlan:
    """``Snapshot.finish_plan`` without a snapshot (for a policy that can tell
    it will dispatch nothing before it builds one)."""
    dispatched = {rid for d in dispatches for rid in d.req_ids} if dispatches else ()
    preempted = expected_preempted(requests, dispatched)  # running ones never are
    if not (dispatches or preempted or rejected):
        return NO_PLAN
    return StepPlan(dispatches=tuple(dispatches),
                    preempted=tuple(sorted(preempted)), rejected=tuple(rejected))


def slo_s(r: RequestView) -> float:
    return max(r.deadline_s - r.arrival_s, 1e-6)


def is_video(r: RequestView) -> bool:
    return r.task == VIDEO


def is_image(r: RequestView) -> bool:
    return r.task == IMAGE

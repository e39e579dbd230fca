"""Step-level comparison points: edf-step (ablation) and tetris (baseline).

* edf-step: at every step boundary, requests in deadline order (hopeless
  ones last) each take the smallest SP degree that keeps them on time, on
  whatever aligned block is free (a smaller one if that is all there is);
  images batch with same-shape ones that stay on time; a started request
  left out is preempted; leftover devices double the most urgent runs.
  Preemption, elastic SP and batching, but no joint search.
* tetris (TetriServe-style): round-based; each request runs a round's worth
  of steps at the SP degree that meets its deadline with the least device
  time, chosen jointly by a knapsack over the free devices that maximises
  the requests kept on time; no batching and no cross-class preemption (a
  started video is never paused).
"""
from __future__ import annotations

from dataclasses import dataclass

from .blocks import BlockPool
from .dp import solve_mckp
from .guards import FirstSight, admit_in_order, is_forced
from .placement import Claim, grow, place, step_gain, worth_growing, to_dispatches
from .snapshot import PredictionMemo, Snapshot, is_image, is_video, slo_s
from .types import ClusterSpec, CostModel, RequestView, StepPlan

BIG = 1e3


@dataclass(frozen=True, slots=True)
class StepOptions:
    admission_control: bool = False
    max_preemptions: int = 4  # edf-step: starvation guard, as in genserve
    starvation_factor: float = 4.0
    max_image_degree: int = 4
    chunk_ms: float = 0.0  # edf-step: steps per dispatch (0: one)
    round_ms: float = 1000.0  # tetris: work per round


class _StepBase:
    def __init__(self, cluster: ClusterSpec, options: StepOptions, name: str):
        self.cluster = cluster
        self.options = options
        self.name = name
        self._first_sight = FirstSight()
        self._predictions = PredictionMemo()  # kept while the calibration holds

    def _start(self, now_s, requests, devices, cost):
        snap = Snapshot(now_s, requests, devices, cost, self.cluster, self._predictions)
        new_ids = self._first_sight.new_ids(requests)
        rejected = []
        if self.options.admission_control and new_ids:
            ordered = sorted(requests, key=lambda r: (snap.hopeless(r), r.deadline_s))
            rejected = admit_in_order(
                snap, new_ids, ordered, lambda r: _min_work(snap, r),
                lambda r: snap.best_remaining_s(r))
        gone = {r.req_id for r in rejected}
        return snap, [r for r in snap.ready if r.req_id not in gone], rejected

    def _degrees(self, snap: Snapshot, r: RequestView) -> tuple[int, ...]:
        limit = self.options.max_image_degree if is_image(r) else None
        return snap.allowed_degrees(r, limit)


def _min_work(snap: Snapshot, r: RequestView) -> float:
    return min(k * snap.remaining_s(r, k) for k in snap.allowed_degrees(r))


class EdfStepPolicy(_StepBase):
    def plan(self, now_s, requests, devices, cost: CostModel) -> StepPlan:
        snap, ready, rejected = self._start(now_s, requests, devices, cost)
        if not snap.idle_mask:
            return snap.finish_plan([], rejected)
        o = self.options
        ready.sort(key=lambda r: (not is_forced(snap, r, o.max_preemptions, o.starvation_factor),
                                  snap.hopeless(r), r.deadline_s, r.req_id))
        pool = BlockPool(self.cluster.num_devices, snap.idle_mask)
        claims: list[Claim] = []
        taken: set[str] = set()
        for r in ready:
            if r.req_id in taken or not pool.free:
                continue
            members = self._batch(snap, r, ready, taken)
            k = self._need(snap, members)
            fallback = tuple(d for d in self._degrees(snap, r) if d < k)[::-1]
            claim = Claim(members, k, fallback, snap.pinned_mask(r),
                          sum(1 << d for m in members for d in m.device_ids))
            if place(pool, [claim]):
                claims.append(claim)
                taken.update(m.req_id for m in members)
        for c in claims:  # deadline order: most urgent grows first
            limit = (min(o.max_image_degree, snap.cluster.max_image_sp_degree) if is_image(c.members[0])
                     else self._degrees(snap, c.members[0])[-1])
            while (not c.pin and 2 * c.degree <= limit and worth_growing(snap, c)
                   and grow(pool, c, snap.num_devices)):
                pass
        return snap.finish_plan(to_dispatches(snap, claims, o.chunk_ms / 1e3), rejected)

    def _batch(self, snap, head, ready, taken) -> list[RequestView]:
        if not is_image(head):
            return [head]
        members = [head]
        for r in ready:
            if len(members) >= self.cluster.max_image_batch:
                break
            if (r is head or r.req_id in taken or not is_image(r)
                    or snap.class_key(r) != snap.class_key(head)
                    or snap.pinned_mask(r) != snap.pinned_mask(head)):
                continue
            trial = members + [r]
            if all(snap.hopeless(m) or self._meets(snap, m, len(trial)) for m in trial):
                members = trial
        return members

    def _meets(self, snap, r, batch) -> bool:
        return any(snap.slack_s(r, k, batch) >= 0 for k in self._degrees(snap, r))

    def _need(self, snap, members) -> int:
        degrees = self._degrees(snap, members[0])
        for k in degrees:
            if all(snap.hopeless(m) or snap.slack_s(m, k, len(members)) >= 0 for m in members):
                return k
        return degrees[0]


class TetrisPolicy(_StepBase):
    def plan(self, now_s, requests, devices, cost: CostModel) -> StepPlan:
        snap, ready, rejected = self._start(now_s, requests, devices, cost)
        if not snap.idle_mask:
            return snap.finish_plan([], rejected)
        free = snap.idle_mask.bit_count()
        live = [r for r in ready if not snap.hopeless(r) or _pinned_video(r)]
        live.sort(key=lambda r: (not _pinned_video(r), r.deadline_s))
        live = live[:2 * free + 4] + [r for r in live[2 * free + 4:] if _pinned_video(r)]
        items = [self._options(snap, r, free) for r in live]
        picks = solve_mckp([[(w, v) for w, v, _ in opts] for opts in items], free)
        claims = [opts[p][2] for opts, p in zip(items, picks) if opts[p][2] is not None]
        pool = BlockPool(self.cluster.num_devices, snap.idle_mask)
        placed = place(pool, claims)
        taken = {r.req_id for c in placed for r in c.members}
        rest = sorted((r for r in ready if r.req_id not in taken),
                      key=lambda r: (snap.hopeless(r), r.deadline_s))
        placed += place(pool, [Claim([r], 1, (), snap.pinned_mask(r),
                                     sum(1 << d for d in r.device_ids)) for r in rest])
        return snap.finish_plan(to_dispatches(snap, placed, self.options.round_ms / 1e3),
                                rejected)

    def _options(self, snap: Snapshot, r: RequestView, free: int) -> list[tuple]:
        degrees = [k for k in self._degrees(snap, r) if k <= free]
        norm = snap.num_devices * slo_s(r)
        options = []
        for k in degrees:
            dur = snap.remaining_s(r, k)
            value = (1.0 if snap.now_s + dur <= r.deadline_s else 0.0) - 0.01 * k * dur / norm
            fallback = tuple(d for d in degrees if d < k)[::-1]
            options.append((k, value + 0.001, Claim([r], k, fallback, snap.pinned_mask(r),
                                                    sum(1 << d for d in r.device_ids))))
        later = snap.now_s + self.options.round_ms / 1e3
        can_wait = any(later + snap.remaining_s(r, k) <= r.deadline_s for k in degrees)
        pause = (1.0 if can_wait else 0.0) - (BIG if _pinned_video(r) else 0.0)
        return [(0, pause, None)] + options


def _pinned_video(r: RequestView) -> bool:
    """No cross-class preemption: a started video always keeps running."""
    return is_video(r) and r.steps_done > 0


def make_step_policy(cluster: ClusterSpec, name: str, **options):
    cls = {"edf-step": EdfStepPolicy, "tetris": TetrisPolicy}[name]
    return cls(cluster, StepOptions(**options), name)

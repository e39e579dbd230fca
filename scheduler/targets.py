"""Which requests to aim at, and when: a look-ahead plan.

* Images: a fluid EDF pass (Moore–Hodgson). Each image that can meet its
  deadline alone is given the least device-time that meets it (amortised
  over the batch its class could form); in deadline order the accumulated
  work must fit in the devices' capacity until each deadline, and when it
  does not, the image with the most work so far is given up.
* Videos: commitment (``Commitments``). A video joins the plan when a
  virtual schedule of the plan plus it still finishes every committed video
  on time; a committed video stays a target until it cannot meet its
  deadline even alone (whether the virtual schedule fits it at this instant
  or not: targets must not flip in and out from one step to the next; one it
  does not fit still books the devices it will run on), unless giving it up
  lets others fit: while some with slack do not, the video with the most
  work left is given up if that leaves fewer late (Moore–Hodgson), so an
  overload costs the few longest videos rather than making every video
  late. The virtual schedule spreads the kept images' work over every
  device first (images are short and urgent), then places the committed
  videos least slack first (or, when that leaves one late, in the previous
  plan's order if that fits more), each on the earliest aligned block at the
  smallest degree that finishes it on time.

Given-up requests are still served, at lowest priority. ``Plan`` records
the virtual start, degree and block of each kept video.
"""
from __future__ import annotations

import heapq
from collections import deque
from dataclasses import dataclass

from .snapshot import INF, Snapshot, is_image, is_video

MARGIN = 0.02  # a plan must leave this share of the remaining time


@dataclass(frozen=True, slots=True)
class Plan:
    degree: int
    start_s: float
    finish_s: float
    block: int  # device mask


@dataclass(frozen=True, slots=True)
class TargetSet:
    """Result of the look-ahead pass."""

    kept: frozenset[str]  # requests planned to meet their deadline
    hopeless: frozenset[str]  # cannot meet it even alone
    dropped: frozenset[str]  # feasible alone, given up for the others
    tightness: float  # how loaded the plan is (0..1)
    finish_estimate_s: dict  # req_id -> planned finish (kept and dropped)
    plans: dict  # req_id -> Plan of kept videos
    image_work_s: float = 0.0  # device-seconds the kept images need


def min_work_s(snap: Snapshot, r, batch: int = 1) -> float:  # used by tests and docs
    """Device-seconds of the cheapest degree that meets the deadline from now
    alone (inf when none does), amortised over ``batch`` where a batch of
    that size still meets it."""
    best = INF
    budget = r.deadline_s - snap.now_s
    batched = snap.durations(r, batch) if batch > 1 else None
    for i, (k, dur) in enumerate(snap.durations(r)):
        if dur > budget:
            continue
        work = k * dur
        if batched is not None and batched[i][1] <= budget:
            work = min(work, k * batched[i][1] / batch)
        best = min(best, work)
    return best


def select_targets(snap: Snapshot, requests, capacity_factor: float = 0.9,
                   max_batch: int = 8, commitments: "Commitments | None" = None) -> TargetSet:
    images, videos = [], []
    for r in requests:
        (images if is_image(r) else videos).append(r)
    kept, hopeless, dropped, finish, work, tight = _images(snap, images, capacity_factor,
                                                        max_batch)
    commitments = commitments if commitments is not None else Commitments()
    plans, v_hopeless, v_dropped, v_tight = commitments.update(snap, videos,
                                                               work / snap.num_devices)
    for rid, p in plans.items():
        finish[rid] = p.finish_s
    # every committed video still feasible alone is aimed at, planned or not:
    # one the virtual schedule cannot fit at this instant (a block busy a
    # moment longer) stays a target rather than flip out and back each step
    video_kept = {v.req_id for v in videos if v.req_id in commitments.ids}
    return TargetSet(frozenset(kept | video_kept), frozenset(hopeless | v_hopeless),
                     frozenset(dropped | v_dropped), max(tight, v_tight), finish, plans, work)


def _images(snap: Snapshot, images, capacity_factor: float, max_batch: int):
    counts: dict[tuple, int] = {}
    for r in images:
        key = (r.model, r.width, r.height, r.num_frames)  # snap.class_key(r)
        counts[key] = counts.get(key, 0) + 1
    entries, hopeless = [], set()
    # per class and progress, for each degree: (run time alone, work alone,
    # run time in the class's batch, least work when that batch is on time)
    table: dict[tuple, tuple] = {}
    now = snap.now_s
    for r in images:
        done = r.steps_done
        key = (r.model, r.width, r.height, r.num_frames, r.num_steps - done,
               done == 0 and not r.running, snap.pinned_mask(r) if done else 0)
        rows = table.get(key)
        if rows is None:
            batch = min(counts[key[:4]], max_batch)
            batched = snap.durations(r, batch)
            rows = table[key] = tuple(
                (dur, k * dur, bdur, min(k * bdur / batch, k * dur))
                for (k, dur), (_, bdur) in zip(snap.durations(r), batched))
        budget = r.deadline_s - now
        work = INF
        for dur, solo_work, bdur, least_work in rows:
            if dur <= budget:
                w = least_work if bdur <= budget else solo_work
                if w < work:
                    work = w
        if work == INF:
            hopeless.add(r.req_id)
        else:
            entries.append((r.deadline_s, work, r.req_id))
    entries.sort()
    n = snap.num_devices * capacity_factor
    heap: list[tuple[float, str]] = []
    total, load = 0.0, 0.0  # load: the largest work / capacity so far
    dropped: set[str] = set()
    finish: dict[str, float] = {}
    for deadline, work, rid in entries:
        heapq.heappush(heap, (-work, rid))
        total += work
        span = deadline - now
        capacity = n * (span if span > 1e-9 else 1e-9)
        while total > capacity and heap:
            w, victim = heapq.heappop(heap)
            total += w
            dropped.add(victim)
            finish[victim] = deadline
        if total / capacity > load:
            load = total / capacity
        if rid not in dropped:
            finish[rid] = now + total / n
    kept = {rid for _, _, rid in entries if rid not in dropped}
    return kept, hopeless, dropped, finish, total, min(load, 1.0)


class Commitments:
    """The videos a policy has taken on (see the module docstring). Keeping
    them stable means a new arrival never silently displaces a video already
    promised its deadline, and nothing thrashes between in and out."""

    __slots__ = ("ids", "max_trials", "admit_margin", "stretch", "sticky", "start_now_s",
                 "given_up", "order")

    def __init__(self, max_trials: int = 4, admit_margin: float = 0.3, sticky: bool = True,
                 start_now_s: float = 0.0):
        self.ids: set[str] = set()
        self.sticky = sticky  # keep a committed video until it is hopeless
        self.max_trials = max_trials
        self.admit_margin = admit_margin  # a newcomer must fit with this share spare
        self.stretch = 1.0  # video run times x this: room left for images to come
        self.start_now_s = start_now_s  # ... but not on devices free this soon (0: off)
        self.given_up: set[str] = set()  # given up to let others fit: back only if all fit
        self.order: dict[str, int] = {}  # the last plan's order (req_id -> rank by start)

    def update(self, snap: Snapshot, videos, load_s: float):
        feasible, hopeless = [], set()
        for v in videos:
            if snap.now_s + snap.best_remaining_s(v) > v.deadline_s:
                hopeless.add(v.req_id)
            else:
                feasible.append(v)
        committed = [v for v in feasible if v.req_id in self.ids]
        self.given_up.intersection_update(v.req_id for v in feasible)
        plans, failed, free = self._plan(snap, committed, load_s)
        if failed and self.sticky:
            committed, (plans, failed, free) = self._give_up_longest(
                snap, committed, load_s, (plans, failed, free))
        if not self.sticky:
            committed = [v for v in committed if v.req_id not in failed]
        trials = 0
        # (not the plan's first free device: a newcomer may fit ahead of
        # looser committed videos, which the trial below finds)
        first_free = min(snap.free_time_s) + load_s
        for v in sorted((v for v in feasible if v.req_id not in self.ids),
                        key=lambda v: (_latest_start_s(snap, v), v.req_id)):
            if trials >= self.max_trials:
                break
            if first_free + snap.best_remaining_s(v) > v.deadline_s:
                continue  # late even alone on the first device free of images
            if v.req_id not in self.given_up:  # (one given up: only if the whole plan fits it)
                after = free.copy()
                plan = _fit(snap, v, after, self.admit_margin, self.stretch)
                if plan is not None:  # fits after every committed video: nothing moves
                    committed.append(v)
                    plans[v.req_id], free = plan, after
                    continue
                now = self._start_now(snap, v, free)
                if now is not None:
                    committed.append(v)
                    plans[v.req_id], free = now
                    continue
            trials += 1  # it might fit ahead of looser videos: replan them all
            trial = _schedule(snap, committed + [v], load_s, v.req_id, self.admit_margin,
                              self.stretch)
            if v.req_id not in trial[1] and trial[1] <= failed:  # no new casualty
                committed.append(v)
                plans, _, free = trial
                self.given_up.discard(v.req_id)
        self.ids = {v.req_id for v in committed}
        self.order = {rid: i for i, rid in enumerate(
            sorted(plans, key=lambda rid: (plans[rid].start_s, rid)))}
        dropped = {v.req_id for v in feasible if v.req_id not in self.ids}
        return plans, hopeless, dropped, _tightness(snap, plans)

    def _plan(self, snap: Snapshot, videos, load_s: float):
        """The virtual schedule of ``videos``, least slack first; when that
        leaves some late, in the last plan's order (new ones after it, least
        slack first) if that leaves fewer late. A video taken on because it
        fit after the others must not become late just because the next plan
        orders it ahead of them."""
        out = _schedule(snap, videos, load_s, stretch=self.stretch)
        if out[1] and self.order:
            alt = _schedule(snap, videos, load_s, stretch=self.stretch, order=self.order)
            if len(alt[1]) < len(out[1]):
                return alt
        return out

    def _give_up_longest(self, snap: Snapshot, committed: list, load_s: float, planned):
        """Moore–Hodgson over the committed videos: while some do not fit and
        at least one of those has slack (it would be on time alone on 2
        devices), give up the video with the most device time left, if that
        leaves fewer late. (A tight video late in the plan is often late only
        there: its run grows onto devices as they free and catches up; a
        loose one late means the devices are overloaded.) Returns
        (committed, (plans, failed, free)) after it."""
        failed = planned[1]
        while failed and len(committed) > 1:
            if not any(_has_slack(snap, v) for v in committed if v.req_id in failed):
                break
            victim = max(committed, key=lambda v: (_least_work_s(snap, v), v.req_id))
            rest = [v for v in committed if v is not victim]
            trial = self._plan(snap, rest, load_s)
            if len(trial[1]) >= len(failed):
                break
            committed, planned, failed = rest, trial, trial[1]
            self.given_up.add(victim.req_id)
        return committed, planned

    def _start_now(self, snap: Snapshot, v, free: "_Free"):
        """(plan, free times after it) when v can start within ``start_now_s``
        on the devices the plan leaves free (after the committed videos and
        the waiting images' work) and finish on time at its profiled speed.
        The admission margin and the stretch keep room for images still to
        come; a block idle now is room already there, and a video refused it
        is served late or not at all."""
        if self.start_now_s <= 0 or free.first() > snap.now_s + self.start_now_s:
            return None
        after = free.copy()
        plan = _fit(snap, v, after, MARGIN, 1.0)
        if plan is None or plan.start_s > snap.now_s + self.start_now_s:
            return None
        return plan, after

    def try_commit(self, snap: Snapshot, v, videos, load_s: float) -> bool:
        """Commit v if the plan still holds with it (normal margin): the test
        admission control applies to a newcomer it would otherwise refuse."""
        committed = [x for x in videos if x.req_id in self.ids]
        _, failed, _ = _schedule(snap, committed + [v], load_s, stretch=self.stretch)
        if failed:
            return False
        self.ids.add(v.req_id)
        return True


class ImageLoad:
    """Device-seconds of image work arriving per second, over a recent
    window: the share of the devices that images still to come will need,
    which a plan for videos must leave free."""

    __slots__ = ("window_s", "events", "first_s")

    def __init__(self, window_s: float = 60.0):
        self.window_s = window_s
        self.events: deque = deque()  # (arrival_s, device-seconds at degree 1)
        self.first_s: float | None = None

    def observe(self, snap: Snapshot, new_requests) -> None:
        for r in new_requests:
            if is_image(r):
                self.events.append((r.arrival_s, snap.remaining_s(r, 1)))
                if self.first_s is None or r.arrival_s < self.first_s:
                    self.first_s = r.arrival_s

    def devices(self, now_s: float) -> float:
        while self.events and self.events[0][0] < now_s - self.window_s:
            self.events.popleft()
        if self.first_s is None:
            return 0.0
        span = max(min(self.window_s, now_s - self.first_s), 10.0)
        return sum(w for _, w in self.events) / span


def _tightness(snap: Snapshot, plans: dict) -> float:
    busy_s = sum(p.degree * (p.finish_s - p.start_s) for p in plans.values())
    horizon = max((p.finish_s for p in plans.values()), default=snap.now_s) - snap.now_s
    return min(busy_s / (snap.num_devices * horizon), 1.0) if horizon > 0 else 0.0


class _Free:
    """Device free times of a virtual schedule, with every aligned block's
    all-free time kept per degree, so the earliest block is one ``min``."""

    __slots__ = ("dev", "blocks")

    def __init__(self, times, degrees):
        self.dev = list(times)
        n = len(self.dev)
        self.blocks = {k: [max(self.dev[s:s + k]) for s in range(0, n - k + 1, k)]
                       for k in degrees}

    def copy(self) -> "_Free":
        other = object.__new__(_Free)
        other.dev = list(self.dev)
        other.blocks = {k: list(row) for k, row in self.blocks.items()}
        return other

    def earliest(self, k: int) -> tuple[float, int]:
        row = self.blocks[k]
        t = min(row)
        return t, row.index(t) * k

    def at(self, start: int, k: int) -> float:
        return self.blocks[k][start // k]

    def book(self, start: int, k: int, until: float) -> None:
        dev = self.dev
        for d in range(start, start + k):
            dev[d] = until
        for kk, row in self.blocks.items():
            for s in range(start - start % kk, start + k, kk):
                if s // kk < len(row):  # devices past the last whole block: none
                    row[s // kk] = max(dev[s:s + kk])

    def first(self) -> float:
        return min(self.dev)


def _schedule(snap: Snapshot, videos, load_s: float, newcomer: str = "",
              margin: float = MARGIN, stretch: float = 1.0, order: dict | None = None):
    """List schedule of videos, least slack first (those ranked in ``order``
    first, in that order): (plans, videos that do not fit, device free times
    after it)."""
    free = _Free((t + load_s for t in snap.free_time_s), snap.degrees)
    rank = order or {}
    jobs = sorted(((rank.get(v.req_id, INF), _latest_start_s(snap, v), v.req_id, v)
                   for v in videos), key=lambda j: j[:3])
    plans: dict = {}
    failed = set()
    for _, _, rid, v in jobs:
        plan = _fit(snap, v, free, margin if rid == newcomer else MARGIN, stretch)
        if plan is None:
            failed.add(rid)
            if rid != newcomer:  # still a target: keep its devices from newcomers
                _book_anyway(snap, v, free)
        else:
            plans[rid] = plan
    return plans, failed, free


def _book_anyway(snap: Snapshot, v, free: _Free) -> None:
    """Book a committed video the plan could not fit where it will run
    anyway: as a target it keeps running least laxity first, so a newcomer
    planned into its devices would be the one to miss. The smallest degree
    that still meets its deadline without the allowances, else the degree
    that finishes it first."""
    if _fit(snap, v, free, 0.0, 1.0) is not None:
        return
    best = None
    for k, dur in snap.durations(v):
        t, start = free.earliest(k)
        if best is None or t + dur < best[0]:
            best = (t + dur, start, k)
    if best is not None:
        free.book(best[1], best[2], best[0])


def _has_slack(snap: Snapshot, v) -> bool:
    """v would be on time alone from now at its second-smallest degree (2)."""
    durations = snap.durations(v)
    return snap.now_s + durations[min(1, len(durations) - 1)][1] <= v.deadline_s


def _least_work_s(snap: Snapshot, v) -> float:
    """Device-seconds v has left at its most efficient degree."""
    return min(k * dur for k, dur in snap.durations(v))


def _latest_start_s(snap: Snapshot, v) -> float:
    """Latest start at the cheapest degree that meets the deadline from now
    (least slack first packs tight videos before loose ones)."""
    best = None
    for _, dur in snap.durations(v):
        if snap.now_s + dur <= v.deadline_s:
            return v.deadline_s - dur
        best = v.deadline_s - dur
    return best if best is not None else v.deadline_s


def _fit(snap: Snapshot, v, free: _Free, margin: float = MARGIN, stretch: float = 1.0):
    """Smallest degree whose earliest aligned block finishes v on time (its
    own block on a tie), its run time × ``stretch``; books that block."""
    pin = snap.pinned_mask(v)
    own = min(v.device_ids) if v.device_ids else -1
    for k, dur in snap.durations(v):
        dur *= stretch
        if pin:
            start = own
            t = free.at(start, k)
        else:
            t, start = free.earliest(k)
            if own >= 0 and own % k == 0 and own + k <= snap.num_devices and (
                    free.at(own, k) <= t + 1e-9):
                start = own
        if t + dur <= v.deadline_s - margin * dur:
            free.book(start, k, t + dur)
            return Plan(k, t, t + dur, ((1 << k) - 1) << start)
    return None


def _mask(devices) -> int:
    m = 0
    for d in devices:
        m |= 1 << d
    return m

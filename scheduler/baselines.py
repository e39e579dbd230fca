"""Request-level baselines: fcfs, sjf, edf, static and fixed-sp.

These run the way existing servers do: a started request keeps its devices
until it finishes (one dispatch of all its remaining steps), videos run at a
fixed SP degree, images one batch per device, batched only with same-shape
requests admitted at the same time. Each is the best honest version of
itself:

* fcfs / sjf / edf share one pool. Videos take an aligned block anywhere;
  when the head of the queue does not fit, it gets a reservation (the block
  that frees first) and later requests backfill around it if they do not
  delay it (EASY backfilling). Same-shape images waiting together are spread
  over the free devices, then batched. edf serves hopeless requests last and
  caps a batch so that no member misses its deadline.
* static gives images a fixed share of devices (one batch per device) and
  videos the rest, tiled into fixed groups of at most the video degree.
* fixed-sp (xDiT-style) tiles all devices into fixed groups of one degree;
  each group serves one request at a time (no batching, no preemption).
  static and fixed-sp queue in deadline order, hopeless requests last.

A video model with a lower SP limit (``ClusterSpec.video_sp_limits``) runs
at that limit instead of the video degree; in static and fixed-sp on the
first devices of its group, which it holds whole, as an image does.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from operator import attrgetter

from .blocks import BlockPool, block_mask, ids_of, tile_blocks
from .guards import FirstSight, admit_in_order
from .snapshot import NO_PLAN, PredictionMemo, Snapshot, finish_plan, is_image, is_video
from .types import IMAGE, TASKS, VIDEO, ClusterSpec, CostModel, Dispatch, RequestView, StepPlan

ORDERS = ("fcfs", "sjf", "edf")


@dataclass(frozen=True, slots=True)
class RequestLevelOptions:
    order: str = "fcfs"  # fcfs | sjf | edf
    video_degree: int = 4  # fixed SP degree of every video
    admission_control: bool = False
    groups: str = "buddy"  # buddy (any aligned block) | fixed-sp | static
    static_image_fraction: float = 0.5  # static: share of devices for images
    batching: bool = True


class RequestLevelPolicy:
    """A started request keeps its devices until it finishes."""

    def __init__(self, cluster: ClusterSpec, options: RequestLevelOptions, name: str):
        if options.order not in ORDERS:
            raise ValueError(f"order must be one of {ORDERS}")
        self.cluster = cluster
        self.options = options
        self.name = name
        self._first_sight = FirstSight()
        self._predictions = PredictionMemo()
        n = cluster.num_devices
        limit = min(options.video_degree, cluster.max_sp_degree, n)
        self.video_degree = 1 << (max(limit, 1).bit_length() - 1)
        # a video model with a lower SP limit runs at that limit (in fixed-sp
        # and static, on the first devices of its group: the group stays held)
        self._video_degrees = {m: min(self.video_degree, cluster.video_sp_limit(m))
                               for m, _ in cluster.video_sp_limits}
        self._min_video_degree = min([self.video_degree, *self._video_degrees.values()])
        # images take a whole group in fixed-sp, as xDiT does
        self.image_degree = (min(self.video_degree, cluster.max_image_sp_degree)
                             if options.groups == "fixed-sp" else 1)
        self._groups = self._make_groups(n)
        self._group_ids = {m: ids_of(m) for m, _ in self._groups or ()}  # a group's devices
        self._startable: dict[int, set[str]] = {}  # free mask -> tasks that could start on it
        # edf: waiting requests' best remaining times, by req_id (see _kept_bests)
        self._bests: dict[str, tuple] = {}
        self._bests_table = None  # the prediction table they were read from

    def _make_groups(self, n: int):
        """(mask, tasks) per fixed group, or None for buddy allocation."""
        o = self.options
        if o.groups == "fixed-sp":
            return [(m, ("image", "video")) for m in tile_blocks(n, self.video_degree)]
        if o.groups == "static":
            if n == 1:  # nothing to split: one device serves both classes
                return [(block_mask(0, 1), ("image", "video"))]
            n_img = min(max(round(o.static_image_fraction * n), 1), n - 1)
            groups = [(block_mask(d, 1), ("image",)) for d in range(n_img)]
            return groups + [(m, ("video",)) for m in tile_blocks(n, self.video_degree, n_img)]
        return None

    def plan(self, now_s: float, requests, devices, cost: CostModel) -> StepPlan:
        if not self.options.admission_control:  # the usual decision places nothing: tell it
            idle = 0                             # before making a Snapshot
            for d in devices:
                if d.idle:
                    idle |= 1 << d.device_id
            if not idle:  # no room: a started request left waiting is listed as paused
                return finish_plan(requests) if _started_waiting(requests) else NO_PLAN
            if not self._may_start(requests, idle):
                return NO_PLAN  # (no started request waits either: it could resume)
        snap = Snapshot(now_s, requests, devices, cost, self.cluster, self._predictions)
        if self._groups is not None and not self.options.admission_control:
            # only a request some free group serves can start (the others are
            # passed over): one pass picks those, and the started ones
            tasks = self._startable_on(snap.idle_mask)
            waiting, started = [], []
            for r in snap.ready:
                if r.steps_done > 0:
                    started.append(r)
                elif r.task in tasks:
                    waiting.append(r)
        else:
            waiting = [r for r in snap.ready if r.steps_done == 0]  # in no order yet
            # started ones that wait too (rare here): only they can be preempted
            started = [r for r in snap.ready if r.steps_done > 0] if (
                len(waiting) < len(snap.ready)) else []
        rejected = (self._admission(snap, requests, started, waiting)
                    if self.options.admission_control else [])
        if not snap.idle_mask or not snap.ready:  # nowhere to place, or nothing to
            return finish_plan(started, (), rejected)
        if rejected:
            gone = {r.req_id for r in rejected}
            waiting = [r for r in waiting if r.req_id not in gone]
        pool = BlockPool(self.cluster.num_devices, snap.idle_mask)
        out = self._resume(snap, pool, started) if started else []
        if self._groups is None:
            out += self._buddy(snap, pool, self._ordered(snap, waiting))
        else:
            out += self._grouped(snap, pool, waiting)
        if not (started or rejected):  # the usual plan: no started request to list as paused
            return StepPlan(tuple(out)) if out else NO_PLAN
        return finish_plan(started, out, rejected)

    def _may_start(self, requests, idle: int) -> bool:
        """Whether this decision might place a request on the ``idle`` devices
        (False: its plan is surely empty; most decisions at a high load)."""
        tasks = self._startable.get(idle)
        if tasks is None:
            tasks = self._startable_on(idle)
        if not tasks:  # no new request fits (fixed-sp: a group's leader still decodes)
            return _started_waiting(requests)
        # a waiting request that could start, or a started one (rare here: it
        # may resume on any idle devices); newest first, the likeliest to wait
        for r in reversed(requests):
            if (r.task in tasks or r.steps_done > 0) and not r.running:
                return True
        return False

    def _startable_on(self, free: int) -> set[str]:
        """The tasks a request could start on the ``free`` devices: one a
        wholly free group serves, or (buddy) whose degree fits an aligned free
        block. Memoised per mask (a node has few)."""
        tasks = self._startable.get(free)
        if tasks is None:
            if self._groups is not None:
                tasks = _tasks_of([g for g in self._groups if free & g[0] == g[0]])
            else:
                pool = BlockPool(self.cluster.num_devices, free)
                tasks = {task for task in TASKS if pool.can_take(
                    self._min_video_degree if task == VIDEO else self.image_degree)}
            self._startable[free] = tasks
        return tasks

    # -- ordering and admission ---------------------------------------------
    def _degree(self, r: RequestView) -> int:
        if is_video(r):
            return self._video_degrees.get(r.model, self.video_degree)
        return self.image_degree

    def _ordered(self, snap: Snapshot, waiting: list) -> list:
        """``waiting`` (requests not started) in queue order: fcfs by (arrival,
        id), sjf by (remaining time, arrival, id), edf by (hopeless, deadline, id)."""
        if len(waiting) < 2:  # the usual case; keys are pure, so none need computing
            return list(waiting)
        order = self.options.order
        if order == "fcfs":
            return sorted(waiting, key=_BY_ARRIVAL)
        if order == "sjf":
            return sorted(waiting, key=lambda r: (
                snap.remaining_s(r, self._degree(r)), r.arrival_s, r.req_id))
        # edf: the deadline order, stably split into on-time then hopeless (the
        # same order as the key (hopeless, deadline, id)). Sorted by the
        # deadline alone first (a float key sorts ~3x faster than the pair in
        # CPython), and by the pair if two deadlines are equal (rare: they go by id)
        queue = self._split_hopeless(snap, sorted(waiting, key=_DEADLINE), check_ties=True)
        if queue is None:
            queue = self._split_hopeless(snap, sorted(waiting, key=_BY_DEADLINE), check_ties=False)
        return queue

    def _split_hopeless(self, snap: Snapshot, by_deadline: list, check_ties: bool) -> list | None:
        """``by_deadline`` (in deadline order) split stably into on-time then
        hopeless requests (Snapshot.hopeless), with each request's best
        remaining time kept from earlier decisions (see _kept_bests), else
        looked up once per lane (class and step count). None if ``check_ties``
        and two deadlines are equal."""
        on_time, late = [], []
        now = snap.now_s
        kept = self._kept_bests(snap)
        by_lane: dict[tuple, float] = {}
        last = None
        for r in by_deadline:
            deadline = r.deadline_s
            if deadline == last and check_ties:
                return None
            last = deadline
            entry = kept.get(r.req_id)
            if entry is not None and entry[0] is r:
                b = entry[1]
            else:
                lane = (r.model, r.width, r.height, r.num_frames, r.num_steps)
                b = by_lane.get(lane)
                if b is None:
                    b = by_lane[lane] = snap.best_remaining_s(r)
                kept[r.req_id] = (r, b)
            (late if deadline - now < b else on_time).append(r)
        return on_time + late if late else on_time

    def _kept_bests(self, snap: Snapshot) -> dict[str, tuple]:
        """req_id -> (view, best remaining time) of requests not started, kept
        across decisions: at a high load edf orders the same waiting requests
        at every decision, and a lookup by id costs much less than one by lane.
        An entry serves only the very view it was made for (a view is
        immutable; one held here is never another's), while the predictions
        hold (the same memo table); cleared when they change, or when finished
        requests' entries would outnumber the others."""
        table = self._predictions.table(snap.cost, self.cluster)
        if table is not self._bests_table or len(self._bests) > 2 * len(snap.requests) + 64:
            self._bests_table, self._bests = table, {}
        return self._bests

    def _admission(self, snap: Snapshot, requests, started: list, waiting: list) -> list:
        """Refusals of newcomers the queue ahead of them would push past their
        deadline (admission control on)."""
        new_ids = self._first_sight.new_ids(requests)
        if not new_ids:
            return []
        ordered = snap.running + started + self._ordered(snap, waiting)
        return admit_in_order(
            snap, new_ids, ordered,
            lambda r: self._degree(r) * snap.remaining_s(r, self._degree(r)),
            lambda r: snap.remaining_s(r, self._degree(r)))

    # -- placement -------------------------------------------------------------
    def _resume(self, snap: Snapshot, pool: BlockPool, started: list) -> list[Dispatch]:
        """Started requests that are not running (rare here) go back first."""
        out = []
        for r in started:
            size = len(r.device_ids) or self._degree(r)
            pin = snap.pinned_mask(r)
            mask = (pin if pool.take_exact(pin) else 0) if pin else pool.take(
                size, prefer=sum(1 << d for d in r.device_ids))
            if mask:
                out.append(Dispatch((r.req_id,), ids_of(mask), r.steps_left))
        return out

    def _buddy(self, snap: Snapshot, pool: BlockPool, queue: list) -> list[Dispatch]:
        out = []
        placed = []  # (block, head, degree, batch) of each dispatch: free times, if asked
        reserved, reserved_until = 0, math.inf
        taken: set[str] = set()
        groups = _image_groups(snap, queue) if self.options.batching else {}
        for r in queue:
            if not pool.free:
                break
            if r.req_id in taken:
                continue
            size = (self._video_degrees.get(r.model, self.video_degree) if r.task == VIDEO
                    else self.image_degree)  # _degree(r)
            slots = pool.free.bit_count()  # a batch is sized by the devices free before
            mask = pool.take(size, within=~reserved)
            # made once known to be needed (most heads do not fit); with no
            # image queued (or no batching) a request runs alone
            members = None
            if not mask and reserved:  # backfill: reserved devices too, if done before they are due
                members = self._batch(snap, r, groups, taken, slots) if groups else [r]
                done_s = snap.now_s + snap.remaining_s(r, size, len(members))
                mask = pool.take(size) if done_s <= reserved_until else 0
            if not mask:
                if not reserved:
                    free_time = _free_times(snap, placed)
                    reserved, reserved_until = _earliest_block(snap, free_time, size)
                continue
            if members is None:
                members = self._batch(snap, r, groups, taken, slots) if groups else [r]
            ids = tuple([m.req_id for m in members])
            taken.update(ids)
            block = _block_ids(mask)
            placed.append((block, r, size, len(members)))
            out.append(Dispatch(ids, block, r.steps_left))
        return out

    def _grouped(self, snap: Snapshot, pool: BlockPool, waiting: list) -> list[Dispatch]:
        out = []
        # the tasks the wholly free groups serve (none: no group is free); the
        # free groups are those inside pool.free, as the groups do not overlap
        servable = self._startable_on(pool.free)
        if not servable:
            return out
        # a request no free group serves is passed over: only the others need ordering
        if len(servable) < len(TASKS):
            waiting = [r for r in waiting if r.task in servable]
        queue = self._ordered(snap, waiting)
        groups = _image_groups(snap, queue) if self.options.batching and IMAGE in servable else {}
        taken: set[str] = set()
        for r in queue:
            if not servable:  # every group is taken
                break
            if r.task not in servable or r.req_id in taken:
                continue
            # the first free group that serves it
            group = next(m for m, tasks in self._groups if pool.free & m == m and r.task in tasks)
            pool.take_exact(group)
            servable = self._startable_on(pool.free)
            if groups:  # a batch is sized by the free groups that serve it, this one included
                slots = 1 + sum(1 for m, tasks in self._groups
                                if pool.free & m == m and r.task in tasks)
                members = self._batch(snap, r, groups, taken, slots)
            else:
                members = [r]
            ids = tuple([m.req_id for m in members])
            taken.update(ids)
            block = self._group_ids[group]
            if is_image(r):  # the group stays held; the image runs on what it can use
                block = block[:min(len(block), self.cluster.max_image_sp_degree)]
            elif len(block) > self._degree(r):  # so does a video of a model with a lower SP limit
                block = block[:self._degree(r)]
            out.append(Dispatch(ids, block, r.steps_left))
        return out

    def _batch(self, snap: Snapshot, head: RequestView, groups: dict, taken: set,
               slots: int) -> list[RequestView]:
        """The head plus same-shape, same-length images waiting with it
        (``groups``: see _image_groups)."""
        if not is_image(head) or not self.options.batching:
            return [head]
        limit = self.cluster.max_image_batch
        slots = max(slots, 1)
        mates = []
        for r in groups.get((snap.class_key(head), head.steps_left), ()):
            if r is not head and r.req_id not in taken:
                mates.append(r)
                if len(mates) >= limit * slots:
                    break
        size = min(limit, max(1, math.ceil((len(mates) + 1) / slots)))
        members = [head] + mates[:size - 1]
        if self.options.order == "edf":
            while len(members) > 1 and any(
                    snap.slack_s(m, 1, len(members)) < 0 for m in members if not snap.hopeless(m)):
                members.pop()
        return members


# blocks.ids_of, memoised: plans ask for the same few aligned blocks
_block_ids = lru_cache(maxsize=1024)(ids_of)

_BY_ARRIVAL = attrgetter("arrival_s", "req_id")  # fcfs order
_BY_DEADLINE = attrgetter("deadline_s", "req_id")
_DEADLINE = attrgetter("deadline_s")


def _tasks_of(groups: list) -> set[str]:
    """The tasks some group in ``groups`` serves."""
    return {task for _, tasks in groups for task in tasks}


def _started_waiting(requests) -> bool:
    """Some started request is not running (rare here: a request-level
    dispatch runs all its steps): it may resume, or be listed as paused."""
    for r in requests:
        if r.steps_done > 0 and not r.running:
            return True
    return False


def _free_times(snap: Snapshot, placed: list) -> list[float]:
    """When each device frees, counting the dispatches ``placed`` so far in
    this plan (made only when a reservation needs it: rarely)."""
    free_time = list(snap.free_time_s)
    for block, head, degree, batch in placed:
        done_s = snap.now_s + snap.remaining_s(head, degree, batch)
        for d in block:
            free_time[d] = done_s
    return free_time


def _image_groups(snap: Snapshot, queue: list) -> dict:
    """Queued images by (class, steps left), in queue order: batch mates.
    Only groups of two or more (an image alone in its group runs alone: the
    usual case, and _batch is not asked)."""
    if len(queue) < 2:
        return {}
    groups: dict = {}
    for r in queue:
        if r.task == IMAGE:  # is_image(r) without the call: once per queued request
            groups.setdefault((snap.class_key(r), r.steps_left), []).append(r)
    return {key: group for key, group in groups.items() if len(group) > 1}


def _earliest_block(snap: Snapshot, free_time: list[float], size: int) -> tuple[int, float]:
    best, best_t = 0, math.inf
    for start in range(0, snap.num_devices - size + 1, size):
        t = max(free_time[start:start + size])
        if t < best_t:
            best, best_t = block_mask(start, size), t
    return best, best_t


def make_request_level(cluster: ClusterSpec, name: str, **options) -> RequestLevelPolicy:
    presets = {"fcfs": dict(order="fcfs"), "sjf": dict(order="sjf"), "edf": dict(order="edf"),
               "static": dict(order="edf", groups="static"),
               "fixed-sp": dict(order="edf", groups="fixed-sp", batching=False)}
    opts = dict(options)
    if "fixed_sp_degree" in opts:
        opts["video_degree"] = opts.pop("fixed_sp_degree")
    for key, value in presets[name].items():
        if key == "order" and name in ("static", "fixed-sp"):
            opts.setdefault(key, value)  # their queue order is an option
        else:
            opts[key] = value
    return RequestLevelPolicy(cluster, RequestLevelOptions(**opts), name)

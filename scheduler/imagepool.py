"""Image batching: forming batches (units) of images for a given device budget.

Images of the same model and resolution share a unit, each at its own step.
A unit's step time grows with its size, so an image joins only if the new
step time keeps every member (and itself) on time: no member is pushed past
its deadline. Given ``slots`` devices, images taken in priority order open a
new unit while devices remain (spreading: lower latency) and otherwise join
a unit of their class (batching: less device time). An image that cannot
meet its deadline at SP degree 1 opens a unit at the smallest degree that
does (elastic SP for images), when enough slots remain.

A policy forms units for several device budgets in one decision, so each
image's budget at each degree is computed once per pool (``_cap``).
"""
from __future__ import annotations

import heapq
import math
from dataclasses import dataclass, field

from .snapshot import Snapshot
from .types import RequestView

INF = math.inf


@dataclass(slots=True)
class Unit:
    """One dispatch-to-be: a batch of same-class images (or one video)."""

    key: tuple
    degree: int
    members: list = field(default_factory=list)
    cap_s: float = INF  # largest step time keeping every member on time
    pin: int = 0  # devices it must run on (state cannot move); 0: anywhere
    prefer: int = 0  # devices holding some member's state
    serial_s: float = 0.0  # members' encodes and decodes: run one after another
    index: list = field(default_factory=list)  # members' positions in the pool
    # another image of its class can still join: not full, and its step time
    # one member larger still within ``cap_s`` (never true again once false:
    # a join only lowers ``cap_s`` and lengthens the step)
    open: bool = True


class ImagePool:
    """Ready images in priority order, with per-image step-time budgets."""

    def __init__(self, snap: Snapshot, images: list[RequestView], max_batch: int,
                 max_degree: int, batching: bool = True):
        self.snap = snap
        self.images = images
        self.max_batch = max(1, max_batch if batching else 1)
        max_degree = min(max_degree, snap.cluster.max_image_sp_degree)
        self.degrees = tuple(k for k in snap.degrees if k <= max_degree) or (1,)
        now = snap.now_s
        self.left = [r.num_steps - r.steps_done for r in images]  # steps left
        self.budget = [r.deadline_s - now for r in images]  # time until the deadline
        self._caps: dict[tuple[int, int], tuple[float, float]] = {}
        self.need = [self._need(i) for i in range(len(images))]  # smallest on-time degree, or -1

    def allowed(self, r: RequestView) -> tuple[int, ...]:
        """Degrees r may run at: its pinned block's size when its state cannot move."""
        pin = self.snap.pinned_mask(r)
        return (pin.bit_count(),) if pin else self.degrees

    def _cap(self, i: int, k: int) -> tuple[float, float]:
        """(largest per-step time at degree k that still finishes image i on
        time, its encode and decode at k)."""
        v = self._caps.get((i, k))
        if v is None:
            left = self.left[i]
            over = self.snap.overhead_s(self.images[i], k, left)
            v = self._caps[(i, k)] = ((self.budget[i] - over) / left, over)
        return v

    def _need(self, i: int) -> int:
        r = self.images[i]
        for k in self.allowed(r):
            if self.snap.step_s(r, k, 1) <= self._cap(i, k)[0]:
                return k
        return -1

    def form(self, slots: int, scan_limit: int | None = None,
             only_on_time: bool = True, forced=frozenset()) -> tuple[list[Unit], int]:
        """Units for ``slots`` devices, and the number of slots they use.

        With ``only_on_time`` images that cannot meet their deadline are left
        out, except those in ``forced`` (the starvation guard's: they must
        run however late); late ones join or open units after the others'
        fashion, never pushing an on-time member past its deadline.
        """
        units: list[Unit] = []
        by_key: dict[tuple, list] = {}  # class -> heap of (size, seq, unit)
        joinable: dict[tuple, int] = {}  # class -> its open units
        used = 0
        idle = self.snap.idle_mask
        limit = len(self.images) if scan_limit is None else min(scan_limit, len(self.images))
        for i in range(limit):
            r = self.images[i]
            k = self.need[i]
            pin = self.snap.pinned_mask(r) if r.steps_done else 0
            if pin and idle & pin != pin:
                continue  # its state is on devices that are busy now
            on_time = k > 0
            if not on_time:
                if only_on_time and r.req_id not in forced:
                    continue
                k = self.allowed(r)[0]
            key = (r.model, r.width, r.height, r.num_frames, pin)
            if used + k <= slots:  # spread while devices remain
                cap, over = self._cap(i, k)
                unit = Unit(key, k, [r], cap if on_time else INF, pin, _prefer(r), over, [i])
                units.append(unit)
                heapq.heappush(by_key.setdefault(key, []), (1, len(units), unit))
                used += k
                if self._reopen(unit):
                    joinable[key] = joinable.get(key, 0) + 1
            elif joinable.get(key):  # (no open unit: every try would fail)
                joined = self._join(by_key[key], i, on_time)
                if joined is not None and not self._reopen(joined):
                    joinable[key] -= 1
        return units, used

    def _reopen(self, unit: Unit) -> bool:
        """Whether another member could join ``unit`` (sets ``unit.open``)."""
        size = len(unit.members)
        unit.open = size < self.max_batch and self.snap.step_s(
            unit.members[0], unit.degree, size + 1) <= unit.cap_s
        return unit.open

    def _join(self, heap: list, i: int, on_time: bool) -> Unit | None:
        """Add image i to the smallest unit of its class that stays on time
        with it (the three smallest are tried); the unit it joined."""
        r = self.images[i]
        tried = []
        joined = None
        while heap and len(tried) < 3:
            size, seq, unit = heapq.heappop(heap)
            tried.append((size, seq, unit))
            if size >= self.max_batch:
                break
            if not unit.open:
                continue
            own_cap, over = self._cap(i, unit.degree)
            cap = min(unit.cap_s, own_cap) if on_time else unit.cap_s
            if self.snap.step_s(r, unit.degree, size + 1) <= cap and self._fits(
                    unit, i, over, on_time):
                unit.members.append(r)
                unit.index.append(i)
                unit.cap_s = cap
                unit.serial_s += over
                unit.prefer |= _prefer(r)
                tried[-1] = (size + 1, seq, unit)
                joined = unit
                break
        for entry in tried:
            heapq.heappush(heap, entry)
        return joined

    def _fits(self, unit: Unit, i: int, over: float, on_time: bool) -> bool:
        """No member on time without image i is late with it, nor i itself
        if it can be on time: a worker encodes each new member and decodes
        each finished one in turn, so each waits for the others' encodes and
        decodes (``cap_s`` counts only its own)."""
        snap, k, size = self.snap, unit.degree, len(unit.members)
        r = self.images[i]
        before, after = snap.step_s(r, k, size), snap.step_s(r, k, size + 1)
        serial = unit.serial_s + over
        left, budget = self.left, self.budget
        for m in unit.index:
            if left[m] * before + unit.serial_s <= budget[m] < left[m] * after + serial:
                return False
        return not on_time or left[i] * after + serial <= budget[i]


def _prefer(r: RequestView) -> int:
    m = 0
    for d in r.device_ids:
        m |= 1 << d
    return m

"""Image batching: forming batches (units) of images for a given device budget.

Images of the same model and resolution share a unit, each at its own step.
A unit's step time grows with its size, so an image joins only if the new
step time keeps every member (and itself) on time: no member is pushed past
its deadline. Given ``slots`` devices, images taken in priority order open a
new unit while devices remain (spreading: lower latency) and otherwise join
a unit of their class (batching: less device time). An image that cannot
meet its deadline at SP degree 1 opens a unit at the smallest degree that
does (elastic SP for images), when enough slots remain.
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


class ImagePool:
    """Ready images in priority order, with per-image step-time budgets."""

    def __init__(self, snap: Snapshot, images: list[RequestView], max_batch: int,
                 max_degree: int, batching: bool = True):
        self.snap = snap
        self.images = images
        self.max_batch = max(1, max_batch if batching else 1)
        max_degree = min(max_degree, snap.cluster.max_image_sp_degree)
        self.degrees = tuple(k for k in snap.degrees if k <= max_degree) or (1,)
        self.need = [self._need(r) for r in images]  # smallest on-time degree, or -1

    def allowed(self, r: RequestView) -> tuple[int, ...]:
        """Degrees r may run at: its pinned block's size when its state cannot move."""
        pin = self.snap.pinned_mask(r)
        return (pin.bit_count(),) if pin else self.degrees

    def cap_s(self, r: RequestView, k: int) -> float:
        """Largest per-step time at degree k that still finishes r on time."""
        budget = r.deadline_s - self.snap.now_s
        return (budget - self.snap.overhead_s(r, k, r.steps_left)) / r.steps_left

    def _need(self, r: RequestView) -> int:
        for k in self.allowed(r):
            if self.snap.step_s(r, k, 1) <= self.cap_s(r, k):
                return k
        return -1

    def form(self, slots: int, scan_limit: int | None = None,
             only_on_time: bool = True) -> tuple[list[Unit], int]:
        """Units for ``slots`` devices, and the number of slots they use.

        With ``only_on_time`` images that cannot meet their deadline are left
        out; otherwise they join or open units after the others' fashion,
        never pushing an on-time member past its deadline.
        """
        units: list[Unit] = []
        by_key: dict[tuple, list] = {}  # class -> heap of (size, seq, unit)
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
                if only_on_time:
                    continue
                k = self.allowed(r)[0]
            key = (r.model, r.width, r.height, r.num_frames, pin)
            if used + k <= slots:  # spread while devices remain
                unit = Unit(key, k, [r], self.cap_s(r, k) if on_time else INF, pin, _prefer(r),
                            self.snap.overhead_s(r, k, r.steps_left))
                units.append(unit)
                heapq.heappush(by_key.setdefault(key, []), (1, len(units), unit))
                used += k
            elif self.max_batch > 1 and key in by_key:
                self._join(by_key[key], r, on_time)
        return units, used

    def _join(self, heap: list, r: RequestView, on_time: bool) -> bool:
        """Add r to the smallest unit of its class that stays on time with it
        (the three smallest are tried)."""
        tried = []
        joined = False
        while heap and len(tried) < 3:
            size, seq, unit = heapq.heappop(heap)
            tried.append((size, seq, unit))
            if size >= self.max_batch:
                break
            cap = min(unit.cap_s, self.cap_s(r, unit.degree) if on_time else INF)
            if self.snap.step_s(r, unit.degree, size + 1) <= cap and self._fits(unit, r, on_time):
                unit.members.append(r)
                unit.cap_s = cap
                unit.serial_s += self.snap.overhead_s(r, unit.degree, r.steps_left)
                unit.prefer |= _prefer(r)
                tried[-1] = (size + 1, seq, unit)
                joined = True
                break
        for entry in tried:
            heapq.heappush(heap, entry)
        return joined

    def _fits(self, unit: Unit, r: RequestView, on_time: bool) -> bool:
        """No member on time without r is late with it, nor r itself if it
        can be on time: a worker encodes each new member and decodes each
        finished one in turn, so each waits for the others' encodes and
        decodes (``cap_s`` counts only its own)."""
        snap, k, size = self.snap, unit.degree, len(unit.members)
        before, after = snap.step_s(r, k, size), snap.step_s(r, k, size + 1)
        serial = unit.serial_s + snap.overhead_s(r, k, r.steps_left)
        for m in unit.members:
            left = m.deadline_s - snap.now_s
            if m.steps_left * before + unit.serial_s <= left < m.steps_left * after + serial:
                return False
        return not on_time or r.steps_left * after + serial <= r.deadline_s - snap.now_s


def _prefer(r: RequestView) -> int:
    m = 0
    for d in r.device_ids:
        m |= 1 << d
    return m

"""Admission control and the starvation guard, shared by the policies."""
from __future__ import annotations

from typing import Callable, Iterable, Sequence

from .snapshot import Snapshot, is_video
from .types import Rejection, RequestView


class FirstSight:
    """Remembers the requests a policy has seen, so that admission control
    refuses a request only at the first decision that sees it (up front)."""

    __slots__ = ("_seen",)

    def __init__(self) -> None:
        self._seen: set[str] = set()

    def new_ids(self, requests: Sequence[RequestView]) -> set[str]:
        present = {r.req_id for r in requests}
        new = {rid for rid in present if rid not in self._seen}
        self._seen = present  # forget finished ones: the set stays small
        return new


def rejection(r: RequestView, estimated_finish_s: float) -> Rejection:
    late_s = estimated_finish_s - r.deadline_s
    return Rejection(r.req_id, f"estimated to finish {late_s:.2f} s after its deadline",
                     estimated_finish_s)


def admit_in_order(snap: Snapshot, new_ids: set[str], ordered: Iterable[RequestView],
                   work_s: Callable[[RequestView], float],
                   duration_s: Callable[[RequestView], float]) -> list[Rejection]:
    """Refuse new requests whose fluid finish estimate misses their deadline.

    ``ordered`` is the policy's service order over all unfinished requests;
    a request starts when the device-seconds ahead of it are spread over all
    devices, and takes ``duration_s`` from there. Refused requests add no work.
    """
    out = []
    ahead = 0.0
    n = snap.num_devices
    for r in ordered:
        if r.req_id in new_ids and r.steps_done == 0 and not r.running:
            finish = snap.now_s + ahead / n + duration_s(r)
            if finish > r.deadline_s:
                out.append(rejection(r, finish))
                continue
        ahead += work_s(r)
    return out


def is_forced(snap: Snapshot, r: RequestView, max_preemptions: int,
              starvation_factor: float, targets=None) -> bool:
    """Must not be left waiting: a video paused ``max_preemptions`` times
    (while it can still meet its deadline: among ``targets`` when given), or
    any request that has waited ``starvation_factor`` × its SLO (aging)."""
    if r.running:
        return False
    if (is_video(r) and r.steps_done > 0 and r.num_preemptions >= max_preemptions
            and (r.req_id in targets if targets is not None else not snap.hopeless(r))):
        return True
    return aged(snap, r, starvation_factor)


def aged(snap: Snapshot, r: RequestView, starvation_factor: float) -> bool:
    # (slo_s inlined: every waiting request is tested at every decision)
    return starvation_factor > 0 and snap.now_s - r.arrival_s >= starvation_factor * max(
        r.deadline_s - r.arrival_s, 1e-6)


def forced_set(snap: Snapshot, ready, max_preemptions: int, starvation_factor: float,
               targets, share: float) -> set[str]:
    """Requests that must run now: target videos paused ``max_preemptions``
    times, and aged requests oldest first while the aged ones (running ones
    included) hold at most ``share`` of the devices (at least one), so aging
    guarantees progress without letting a backlog crowd out the on-time work."""
    out = {r.req_id for r in ready
           if r.num_preemptions >= max_preemptions and r.steps_done > 0 and is_video(r)
           and r.req_id in targets}
    budget = max(1, int(share * snap.num_devices))
    budget -= sum(len(r.device_ids) for r in snap.running if aged(snap, r, starvation_factor))
    for r in sorted((r for r in ready if r.req_id not in out
                     and aged(snap, r, starvation_factor)), key=lambda r: r.arrival_s):
        if budget <= 0:
            break
        out.add(r.req_id)
        budget -= 1
    return out

"""From chosen degrees to aligned device blocks, and from blocks to dispatches."""
from __future__ import annotations

import math
from dataclasses import dataclass

from .blocks import BlockPool, ids_of
from .snapshot import Snapshot
from .types import Dispatch, RequestView


@dataclass(slots=True)
class Claim:
    """A request (or image batch) that should run now at ``degree``."""

    members: list  # RequestView, priority order
    degree: int
    fallback: tuple[int, ...] = ()  # smaller degrees to try if ``degree`` does not fit
    pin: int = 0  # must run exactly on these devices
    prefer: int = 0  # devices holding its state
    blocks: tuple[int, ...] = ()  # blocks of ``degree`` to try in order (empty: any)
    may_hold: bool = False  # may keep a block's idle devices for a later start
    mask: int = 0  # set by ``place``
    held: bool = False  # set by ``place``: devices kept idle, nothing dispatched
    first: bool = False  # placed before others of any size (its block is planned)


def place(pool: BlockPool, claims: list[Claim]) -> list[Claim]:
    """Give each claim a block from ``pool`` (pinned ones first, then largest
    first, keeping priority order within a size); returns the placed claims,
    holds included (``held``). A claim that fits at none of its degrees (and
    cannot hold) is left out."""
    order = sorted(range(len(claims)),
                   key=lambda i: (not claims[i].pin, not claims[i].first, -claims[i].degree, i))
    placed = []
    start_free = pool.free
    reserved = 0  # busy devices promised to a hold
    for i in order:
        if not pool.free:
            break  # nothing left to give (holds need an idle device too)
        c = claims[i]
        if c.pin and not c.may_hold:
            if pool.take_exact(c.pin):
                c.mask = c.pin
                placed.append(c)
            continue
        if c.blocks:
            reserved = _place_blocks(pool, c, start_free, reserved)
            if c.mask:
                placed.append(c)
                continue
        for k in (c.degree, *c.fallback):
            if c.pin or k > c.degree:
                continue
            mask = pool.take(k, prefer=c.prefer, within=~reserved)
            if mask:
                c.mask, c.degree = mask, k
                placed.append(c)
                break
    return placed


def _place_blocks(pool: BlockPool, c: Claim, start_free: int, reserved: int) -> int:
    """Run on the first free block of ``c.blocks``, or hold the first one whose
    busy devices are in flight (not taken by this plan, not promised)."""
    used_now = start_free & ~pool.free
    for bm in c.blocks:
        if reserved & bm:
            continue
        if pool.free & bm == bm:
            pool.take_exact(bm)
            c.mask = bm
            return reserved
        if c.may_hold and not used_now & bm:
            pool.take_exact(bm & pool.free)
            c.mask, c.held = bm, True
            return reserved | bm
    return reserved


def grow(pool: BlockPool, claim: Claim, num_devices: int) -> bool:
    """Double a placed claim's block into its free buddy; False if not free."""
    size = claim.mask.bit_count()
    start = (claim.mask & -claim.mask).bit_length() - 1
    parent = start - start % (2 * size)
    if parent + 2 * size > num_devices:
        return False
    buddy = (((1 << (2 * size)) - 1) << parent) & ~claim.mask
    if not pool.take_exact(buddy):
        return False
    claim.mask |= buddy
    claim.degree = 2 * size
    return True


def chunk_steps(snap: Snapshot, members: list[RequestView], degree: int, chunk_s: float) -> int:
    """Steps to dispatch: as many as fit in ``chunk_s`` (at least one), never
    past any member's last step."""
    left = min(r.steps_left for r in members)
    if chunk_s <= 0 or left <= 1:
        return 1
    step = snap.step_s(members[0], degree, len(members))
    return max(1, min(left, int(chunk_s / max(step, 1e-9))))


def to_dispatches(snap: Snapshot, claims: list[Claim], chunk_s: float) -> list[Dispatch]:
    out = []
    for c in claims:
        if c.held:
            continue
        steps = chunk_steps(snap, c.members, c.degree, chunk_s)
        out.append(Dispatch(tuple(r.req_id for r in c.members), ids_of(c.mask), steps))
    return out


# Growing a run onto idle devices moves its state and ties its step to every
# device of the block: worth it only for a clear saving, not for profile noise.
MIN_GROW_GAIN = 0.05


def worth_growing(snap: Snapshot, claim: Claim) -> bool:
    """Doubling the claim's block saves time; for requests that already hold
    state (which must move), at least ``MIN_GROW_GAIN`` of a step and more
    over its remaining steps than moving the state there and back."""
    gain = step_gain(snap, claim)
    if all(not m.steps_done or len(m.device_ids) >= 2 * claim.degree for m in claim.members):
        return gain > 0.01  # nothing to move: fresh, or back to a block it ran on
    if gain < MIN_GROW_GAIN:
        return False
    r = claim.members[0]
    move_s = snap.cost.move_ms(r.model) / 1e3 if hasattr(snap.cost, "move_ms") else 0.0
    steps_left = min(m.steps_left for m in claim.members)
    saved_s = gain * snap.step_s(r, claim.degree, len(claim.members)) * steps_left
    return saved_s > 2 * move_s


def step_gain(snap: Snapshot, claim: Claim) -> float:
    """Relative step-time saving from doubling the claim's degree."""
    r = claim.members[0]
    k, b = claim.degree, len(claim.members)
    if 2 * k not in snap.degrees:
        return 0.0
    now, nxt = snap.step_s(r, k, b), snap.step_s(r, 2 * k, b)
    return (now - nxt) / now if now > 0 and math.isfinite(now) else 0.0

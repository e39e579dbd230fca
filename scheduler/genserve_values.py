"""What each option of GenServe's joint search is worth (see genserve_policy.py).

Laxity: a target request's laxity is its slack at the smallest degree that
still meets its deadline. It *can wait* when its laxity exceeds the time it
would wait for devices (a device or a block of that degree freeing) plus a
patience share of its remaining time. Values:

* ``ON_TIME`` for each target kept on time: run now at an allocation that
  finishes it in time if held to the end, or left waiting while it can wait.
  While images that cannot wait need devices (for ``contention`` seconds), a
  video is valued as slowed (to at least half its degree) or paused for that
  long and then caught up at up to twice its degree: it is shrunk or paused
  for images only when its laxity absorbs it, the most slack first.
* A target that can wait gains only ``URGENT`` × how little laxity it has
  when run now, so spare devices go least laxity first.
* Small terms break ties: an image before a video (far less work ahead),
  keeping a started request running (``STICKY``; for a video only if it ran
  its last step, not one paused earlier: two videos that cannot both run do
  not take turns, which would make both late), device time above the
  efficient degree (scaled by load), reshaping. A forced request outweighs
  everything.
"""
from __future__ import annotations

from .blocks import BlockPool
from .imagepool import ImagePool, Unit
from .placement import Claim, grow, place, step_gain, worth_growing
from .snapshot import INF, Snapshot, is_image, is_video, slo_s

ON_TIME = 1.0
FORCED = 1e3  # a forced request outweighs any number of others
URGENT = 0.05  # running a request that could wait, by how little laxity it has
DEVICE = 0.01  # device time above the most efficient degree (scaled by load)
PREEMPT = 0.02  # pausing a started request (hysteresis)
RESHAPE = 0.03  # changing a started video's degree (churn breaks blocks apart)
STICKY = 0.1  # keeping a started request running: beats any laxity difference
IMAGE_FIRST = 0.15  # an image on time beats a video on time (far less work ahead)
MARGIN = 0.02  # predicted finish must leave this share of the remaining time
CLOSE = 0.5  # on time only without the margin: a target's last chance, worth less


def wait_until_free_s(snap: Snapshot) -> float:
    busy = [t for t in snap.free_time_s if t > snap.now_s]
    return min(busy) - snap.now_s if busy else 0.0


def need_degree(snap: Snapshot, r, degrees) -> int:
    """Smallest degree that meets r's deadline from now (if none, the one that
    finishes it first: the largest, where SP pays)."""
    for k in degrees:
        dur = snap.remaining_s(r, k)
        if snap.now_s + dur <= r.deadline_s - MARGIN * dur:
            return k
    return fastest_degree(snap, r, degrees)


def fastest_degree(snap: Snapshot, r, degrees) -> int:
    """The degree among ``degrees`` that finishes r first (the smaller on a
    tie): the largest where SP pays; one device where SP steps are slower,
    e.g. a small video on CPU workers sharing cores."""
    return min(degrees, key=lambda k: (snap.remaining_s(r, k), k))


def laxity_s(snap: Snapshot, r, k: int) -> float:
    return r.deadline_s - snap.now_s - snap.remaining_s(r, k)


def urgency(snap: Snapshot, r, k: int) -> float:
    """1 with no laxity left, 0 with a whole SLO of it."""
    return 1.0 - min(max(laxity_s(snap, r, k) / slo_s(r), 0.0), 1.0)


# A predicted wait for a busy device is counted this many times over: a
# device's free time is a prediction (a decode or a step can run long on a
# loaded machine), and a request that bets on it and loses misses outright.
WAIT_MARGIN = 2.0


def can_wait(dec, r, k: int, wait_s: float) -> bool:
    snap = dec.snap
    return laxity_s(snap, r, k) >= WAIT_MARGIN * wait_s + dec.patience * snap.remaining_s(r, k)


# -- images -------------------------------------------------------------------
def candidate_slots(free: int) -> list[int]:
    """Device budgets to try for the image pool: all up to 8, then a
    geometric ladder (1, 1.5, 2, 3, 4, 6, ... and ``free``)."""
    if free <= 8:
        return list(range(1, free + 1))
    out, g = set(range(1, 5)), 4
    while g <= free:
        out.update((g, g + g // 2))
        g *= 2
    return sorted(x for x in out | {free} if x <= free)


def image_options(dec, pool: ImagePool, free: int) -> list[tuple]:
    """(devices, value, claims) for each device budget of the image pool."""
    options = [(0, 0.0, [])]
    seen = {0}
    for g in candidate_slots(free):
        units, used = pool.form(g, scan_limit=g * min(pool.max_batch, 8) + 16, forced=dec.forced)
        if used in seen:
            continue
        seen.add(used)
        value = sum(_unit_value(dec, u) for u in units)
        claims = [Claim(list(u.members), u.degree, _fallback(u.degree) if not u.pin else (),
                        u.pin, u.prefer) for u in units]
        options.append((used, value, claims))
    return options


def _unit_value(dec, unit: Unit) -> float:
    snap = dec.snap
    size, k = len(unit.members), unit.degree
    value = 0.0
    for r in unit.members:
        if r.req_id in dec.forced:
            value += FORCED
        if r.req_id in dec.targets and snap.now_s + snap.remaining_s(r, k, size) <= r.deadline_s:
            need = need_degree(snap, r, dec.image_degrees)
            # a started image finishes: its few steps left are cheap, and a
            # pause bets its deadline on a prediction of when it resumes
            if r.steps_done > 0 or not can_wait(dec, r, need, dec.wait_s):
                value += ON_TIME + IMAGE_FIRST
            value += URGENT * urgency(snap, r, need) + (STICKY if r.steps_done > 0 else 0.0)
        if r.steps_done > 0:
            value += PREEMPT
    if k > 1:
        r = unit.members[0]
        extra = k * snap.remaining_s(r, k, size) - snap.remaining_s(r, 1, size)
        value -= DEVICE * dec.tightness * extra / (snap.num_devices * slo_s(r))
    return value


# -- videos -------------------------------------------------------------------
def video_candidates(dec, videos: list, free: int) -> list:
    """Forced videos, then target videos least laxity first (at most 2·free + 4)."""
    snap = dec.snap
    chosen = [v for v in videos if v.req_id in dec.forced or v.req_id in dec.targets]
    chosen.sort(key=lambda v: (v.req_id not in dec.forced,
                               laxity_s(snap, v, need_degree(snap, v, snap.allowed_degrees(v)))))
    limit = max(2 * free + 4, sum(1 for v in chosen if v.req_id in dec.forced))
    return chosen[:limit]


def held_devices(dec, videos: list, hold_s: float) -> int:
    """EASY-style reservations: a target video that cannot wait and finds no
    free block of the degree it needs keeps the idle devices of the block that
    frees first, if it frees within ``hold_s`` (blocks disjoint, least laxity
    first), so that nothing else starts there and pushes its start back."""
    snap = dec.snap
    held, reserved = 0, 0
    for v in videos:
        if v.req_id not in dec.targets or snap.pinned_mask(v):
            continue
        k = need_degree(snap, v, dec.video_degrees(v))
        wait, block = block_free_s(snap, k, reserved, _available_s(dec))
        if wait <= 1e-9 or wait > hold_s or not block or can_wait(dec, v, k, wait):
            continue
        reserved |= block
        held |= block & snap.idle_mask
    return held


def image_holds(dec, pool: BlockPool, placed: list, hold_s: float) -> int:
    """Reservations for target images the joint search could not place for
    want of a free block of the degree they need: the idle devices of the
    block that frees first, if it frees within ``hold_s`` and the image is
    still on time starting then, so that leftover work (a one-step fill of a
    given-up video, a grown run) does not take them and keep the block from
    ever being whole (devices free one at a time)."""
    snap, img = dec.snap, dec.img_pool
    if img is None or not pool.free:
        return 0
    taken = {r.req_id for c in placed for r in c.members}
    claimed = snap.idle_mask & ~pool.free  # idle at the snapshot, taken by this plan
    held = 0
    placeable = {k: pool.can_take(k) for k in set(img.need) if k > 0}  # (pool is not changed here)
    for r, k in zip(img.images, img.need):
        if k <= 0 or r.req_id in taken or r.req_id not in dec.targets or placeable[k]:
            continue
        if snap.pinned_mask(r):
            continue
        wait, block = block_free_s(snap, k, held | claimed, _available_s(dec))
        if not block or wait > hold_s or laxity_s(snap, r, k) < WAIT_MARGIN * wait:
            continue
        held |= block
    return held & pool.free


def _resume_wait_s(dec, k: int) -> float:
    """How long a request paused now waits for a block of k devices: the
    devices idle now go to others in this plan (that is what the pause is
    for), so only busy devices' availability counts."""
    wait = dec.resume_wait.get(k)
    if wait is None:
        snap = dec.snap
        avail = [INF if snap.idle_mask >> d & 1 else t for d, t in enumerate(_available_s(dec))]
        wait = dec.resume_wait[k] = block_free_s(snap, k, 0, avail)[0]
    return wait


def _available_s(dec) -> list[float]:
    """When each device is free for new work: a busy device running a target
    that has steps left after this one is taken until that target finishes
    (it keeps its devices); others when their dispatch ends."""
    if dec.avail is not None:
        return dec.avail
    snap = dec.snap
    out = dec.avail = list(snap.free_time_s)
    for r in snap.running:
        if r.req_id in dec.targets and r.device_ids:
            end = snap.now_s + snap.remaining_s(r, len(r.device_ids))
            for d in r.device_ids:
                if not snap.idle_mask >> d & 1:
                    out[d] = max(out[d], end)
    return out


def block_free_s(snap: Snapshot, k: int, exclude: int = 0,
                 free_time_s: list | None = None) -> tuple[float, int]:
    """(time from now until some aligned block of k devices, none in
    ``exclude``, is all free, its mask); free times ``snap.free_time_s``
    unless given."""
    free_time_s = snap.free_time_s if free_time_s is None else free_time_s
    best, best_mask = INF, 0
    for start in range(0, snap.num_devices - k + 1, k):
        bm = ((1 << k) - 1) << start
        if bm & exclude:
            continue
        t = max(free_time_s[start:start + k])
        if t < best:
            best, best_mask = t, bm
    return best - snap.now_s, best_mask


def contention_s(dec, pool: ImagePool) -> float:
    """How long target images that cannot wait will need devices (the longest
    such image alone at the degree it needs); inf when none needs any now."""
    snap = dec.snap
    horizon = INF
    for r, k in zip(pool.images, pool.need):
        if k > 0 and r.req_id in dec.targets:
            if not can_wait(dec, r, k, dec.wait_s):
                dur = snap.remaining_s(r, k)
                horizon = dur if horizon == INF else max(horizon, dur)
    return horizon


def two_phase_finish_s(snap: Snapshot, v, k: int, pace: int, horizon_s: float) -> float:
    """Finish if v runs at degree k (0: paused) for ``horizon_s``, then at
    degree ``pace`` to the end (k held to the end when k >= pace)."""
    if k >= pace or horizon_s == INF:
        return snap.now_s + (snap.remaining_s(v, k) if k else INF)
    done = 0.0 if k == 0 else horizon_s / snap.step_s(v, k)
    if done >= v.steps_left:
        return snap.now_s + snap.remaining_s(v, k)
    rest = (v.steps_left - done) * snap.step_s(v, pace) + snap.overhead_s(v, pace, v.steps_left)
    return snap.now_s + horizon_s + rest


def video_options(dec, v, free: int, contention: float) -> list[tuple]:
    """Pause, or run at degree k now. Running is valued as held at k to the
    end, or, while images that cannot wait need devices (``contention``
    seconds), as slowed to k (or paused) for that long only and then at up to
    twice the degree it needs (elastic SP: shrink for an image, then catch up)."""
    snap = dec.snap
    degrees = dec.video_degrees(v)
    target = v.req_id in dec.targets
    need = need_degree(snap, v, degrees)
    efficient = need * snap.remaining_s(v, need)
    slo = slo_s(v)
    started = v.steps_done > 0
    running = started and not v.paused  # ran its last step: a pause now is a preemption
    options = []
    if not target:  # forced but past saving: the cheapest degree will do
        degrees = degrees[:1]
    catch_up = fastest_degree(snap, v, [d for d in degrees if d <= 2 * need])  # pace after a slow-down
    for k in degrees:
        if k > free or (target and 2 * k < need):  # slow down at most to half
            continue
        dur = snap.remaining_s(v, k)
        value = 0.0
        finish = two_phase_finish_s(snap, v, k, catch_up, contention) if target else INF
        if finish <= v.deadline_s - MARGIN * dur:
            value += ON_TIME + URGENT * urgency(snap, v, need) + (STICKY if running else 0.0)
        elif finish <= v.deadline_s:  # not hopeless yet: left waiting it would be
            value += CLOSE + (STICKY if running else 0.0)
        value -= DEVICE * dec.tightness * max(k * dur - efficient, 0.0) / (snap.num_devices * slo)
        if started and k != len(v.device_ids):
            value -= RESHAPE
        options.append((k, value, Claim([v], k, (), snap.pinned_mask(v), _mask(v.device_ids))))
    pause = 0.0
    if target:
        if contention < INF:
            wait = 0.0 if started else block_free_s(snap, need)[0]
            ok = laxity_s(snap, v, catch_up) >= wait + contention + MARGIN * efficient / need
        else:
            ok = can_wait(dec, v, need, max(_resume_wait_s(dec, need), dec.wait_s))
        pause += ON_TIME if ok else 0.0
    if started:
        pause -= PREEMPT
    if v.req_id in dec.forced:
        pause -= FORCED
    return [(0, pause, None)] + options


def fixed_video_degrees(snap: Snapshot, v, elastic: bool, fixed: int) -> tuple[int, ...]:
    if elastic or (v.steps_done > 0 and not snap.cluster.migratable):
        return snap.allowed_degrees(v)
    if v.steps_done > 0 and v.device_ids:
        return (len(v.device_ids),)
    return (max(k for k in snap.allowed_degrees(v) if k <= max(fixed, 1)),)


# -- leftover devices ---------------------------------------------------------
def leftover(dec, pool: BlockPool, ready: list, placed: list, o) -> list:
    """Use devices the joint search left idle (work conservation): speed up
    placed runs, least laxity first, by doubling their blocks; then serve
    non-target work, oldest first. Images grow, and non-target videos (long
    steps that break blocks apart) run, only when no target video waits.
    Without preemption a video keeps what it is given to the end, so spare
    devices go to images only: a video does not grow, and a given-up video
    fills devices only when nothing else runs or is placed at all."""
    # a target video held back keeps non-target videos off the devices, unless
    # nothing runs or is placed at all: then holding back serves no one
    idle = not placed and pool.free == (1 << dec.snap.num_devices) - 1
    waiting = not idle and (bool(dec.held) or _video_behind(dec, placed))
    out: list = []
    for stage in (("fill", "grow") if o.leftover_first == "fill" else ("grow", "fill")):
        if not pool.free:
            break
        if stage == "fill":
            out += _fill(dec, pool, ready, placed + out, o,
                         videos_too=not waiting and o.fill_videos and (o.preemption or idle))
        elif o.elastic_sp:
            _grow_all(dec, pool, placed + out, o.max_image_degree if not waiting else 1,
                      videos_too=o.preemption)
    return out


def _video_behind(dec, placed: list) -> bool:
    """Some target video is not running, or runs below the degree it needs."""
    snap = dec.snap
    degree = {c.members[0].req_id: c.degree for c in placed}
    for r in snap.requests:
        if r.req_id in dec.targets and is_video(r):
            k = len(r.device_ids) if r.running else degree.get(r.req_id, 0)
            if k < need_degree(snap, r, dec.video_degrees(r)):
                return True
    return False


def _fill(dec, pool: BlockPool, ready: list, placed: list, o, videos_too: bool) -> list:
    snap = dec.snap
    taken = {r.req_id for c in placed for r in c.members}
    rest = sorted((r for r in ready if r.req_id not in taken), key=lambda r: r.arrival_s)
    # the oldest few fill every free device many times over
    images = [r for r in rest if is_image(r)][:2 * pool.count() * snap.cluster.max_image_batch]
    claims = []
    if images:
        img_pool = ImagePool(snap, images, snap.cluster.max_image_batch, 1, o.batching)
        units, _ = img_pool.form(pool.count(), only_on_time=False)
        claims += [Claim(list(u.members), u.degree, (), u.pin, u.prefer) for u in units]
    # on whole blocks where it can, never below ``fill_min_degree``: a given-up
    # video's step on one device is long, and the block it breaks is the one
    # an image that cannot wait needs next. No larger than the degree that
    # finishes it first, though (fastest_degree): where SP does not pay, one
    # device is fastest, and frees soonest.
    if videos_too:
        for v in rest:
            if is_video(v):
                allowed = dec.video_degrees(v)
                degrees = [k for k in allowed if k <= 4] or [allowed[0]]
                degrees = degrees[:degrees.index(fastest_degree(snap, v, degrees)) + 1]
                fallback = tuple(k for k in reversed(degrees[:-1]) if k >= dec.fill_min_degree)
                claims.append(Claim([v], degrees[-1], fallback, snap.pinned_mask(v),
                                    _mask(v.device_ids)))
    claims.sort(key=lambda c: min(r.arrival_s for r in c.members))
    return place(pool, claims)


def _grow_all(dec, pool: BlockPool, claims: list, max_image_degree: int,
              videos_too: bool = True) -> None:
    snap = dec.snap

    def slack(c):
        return min(r.deadline_s - snap.now_s - snap.remaining_s(r, c.degree, len(c.members))
                   for r in c.members)

    for c in sorted(claims, key=slack):
        limit = (min(max_image_degree, snap.cluster.max_image_sp_degree) if is_image(c.members[0])
                 else dec.video_degrees(c.members[0])[-1])
        if is_video(c.members[0]) and (not videos_too or len(dec.video_degrees(c.members[0])) == 1):
            continue
        while (not c.pin and 2 * c.degree <= limit and worth_growing(snap, c)
               and grow(pool, c, snap.num_devices)):
            pass


def _fallback(k: int) -> tuple[int, ...]:
    out = []
    while k > 1:
        k //= 2
        out.append(k)
    return tuple(out)


def _mask(device_ids) -> int:
    m = 0
    for d in device_ids:
        m |= 1 << d
    return m

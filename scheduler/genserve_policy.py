"""GenServe: the joint, step-level, SLO-aware policy (docs/scheduler.md).

At every decision point:

1. *Targets* (targets.py): images kept by a fluid EDF pass; videos by
   commitment to a virtual schedule on aligned blocks. The rest are served
   at lowest priority.
2. *Options* (genserve_values.py): the image pool may take g devices (for
   each g, images are spread, then batched without pushing any member past
   its deadline, each batch at the smallest SP degree that keeps it on time:
   imagepool.py); each committed video may take degree k in {0 (pause), 1,
   2, 4, 8}. An option is worth one per target kept on time, valued against
   the time images that cannot wait need devices, so that a video is shrunk
   or paused for them only when its laxity absorbs it (most slack first).
3. *Joint search* (dp.py): a multiple-choice knapsack over the free devices.
4. *Placement* (placement.py) on aligned blocks, preferring devices that hold
   a request's state; holds for a video, and then for an image, whose
   block frees shortly (devices free one at a time: work started on the
   first would keep the block from ever being whole); leftover devices speed
   up urgent runs and then serve non-target work.

Starvation guard: a committed video paused ``max_preemptions`` times, and a
request waiting ``starvation_factor`` × its SLO (on a bounded share of the
devices), is forced: it outweighs everything else in the search, so it is not
paused for other work, though it may wait for a block of the degree it needs
(docs/scheduler.md, item 6).
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Callable

from . import genserve_values as gv
from .blocks import BlockPool
from .dp import solve_mckp
from .guards import FirstSight, forced_set, rejection
from .imagepool import ImagePool
from .placement import Claim, place, to_dispatches
from .snapshot import PredictionMemo, Snapshot, is_image, is_video
from .targets import Commitments, ImageLoad, select_targets
from .types import ClusterSpec, CostModel, DeviceView, RequestView, StepPlan


@dataclass(frozen=True, slots=True)
class GenServeOptions:
    preemption: bool = True  # pause or shrink started requests (off: each keeps its block to the end)
    elastic_sp: bool = True  # per-step SP degree (images and videos)
    batching: bool = True  # dynamic image batching
    admission_control: bool = False  # refuse infeasible requests up front
    max_preemptions: int = 4  # per committed video; then it is forced (not paused for others)
    starvation_factor: float = 4.0  # force in after waiting this many SLOs
    starvation_share: float = 0.25  # ...on at most this share of the devices
    fixed_sp_degree: int = 4  # video degree when elastic_sp is off
    chunk_ms: float = 0.0  # dispatch as many steps as fit (0: one step)
    capacity_factor: float = 0.9  # share of device time the target pass counts on
    patience: float = 0.25  # a request can wait with this share of its run time spare
    max_image_degree: int = 4  # largest SP degree tried for an image batch
    leftover_first: str = "grow"  # leftover devices: "fill" non-targets or "grow" runs
    hold_s: float = 0.5  # keep idle devices for a video whose block frees this soon
    admit_margin: float = 0.3  # a video is taken on with this share of its run time spare
    admit_margin_share: float = 0.2  # ... when images need this share of the devices (less: less)
    start_now_s: float = 0.1  # ... unless it can start on free devices within this time
    fill_videos: bool = True  # serve given-up videos on idle devices (else only when aged)
    fill_min_degree: int = 2  # ... on blocks smaller than 4 down to this size


@dataclass(slots=True)
class _Decision:
    """Working state of one plan."""

    snap: Snapshot
    targets: frozenset
    forced: set
    tightness: float
    wait_s: float  # until a busy device frees, or a target video's step ends (what waiting costs at least)
    patience: float
    image_degrees: tuple
    video_degrees: Callable
    fill_min_degree: int = 2
    held: int = 0  # idle devices reserved for videos that cannot wait
    img_pool: ImagePool | None = None
    avail: list | None = None  # per device: when free for new work (genserve_values)
    resume_wait: dict = field(default_factory=dict)  # degree -> wait of a pause (cached)
    claims: list = field(default_factory=list)


class GenServePolicy:
    """The GenServe policy; ablations switch off one mechanism each."""

    def __init__(self, cluster: ClusterSpec, options: GenServeOptions | None = None,
                 name: str = "genserve"):
        self.cluster = cluster
        self.options = options or GenServeOptions()
        self.name = name
        self._first_sight = FirstSight()
        self._commitments = Commitments(admit_margin=self.options.admit_margin,
                                        start_now_s=self.options.start_now_s)
        self._image_load = ImageLoad()
        self._predictions = PredictionMemo()  # kept while the calibration holds

    def plan(self, now_s: float, requests: list[RequestView] | tuple,
             devices: list[DeviceView] | tuple, cost: CostModel) -> StepPlan:
        o = self.options
        kept: list[Claim] = []
        if not o.preemption:
            requests, devices, kept = keep_started(now_s, requests, devices, cost, self.cluster)
        snap = Snapshot(now_s, requests, devices, cost, self.cluster, self._predictions)
        for c in kept:
            c.pin = snap.pinned_mask(c.members[0])  # (state that cannot move cannot grow)
        new_ids = self._first_sight.new_ids(requests)
        self._image_load.observe(snap, [snap.by_id[rid] for rid in new_ids])
        image_share = min(self._image_load.devices(now_s) / snap.num_devices, 0.8)
        self._commitments.stretch = 1.0 / (1.0 - image_share)
        # the margin keeps room for images still to come: none needed without them
        self._commitments.admit_margin = o.admit_margin * min(
            image_share / o.admit_margin_share, 1.0) if o.admit_margin_share > 0 else o.admit_margin
        ts = select_targets(snap, requests, o.capacity_factor, self.cluster.max_image_batch,
                            self._commitments)
        rejected = self._admission(snap, new_ids, ts)
        if not snap.idle_mask:
            return snap.finish_plan(to_dispatches(snap, kept, o.chunk_ms / 1e3), rejected)
        gone = {r.req_id for r in rejected}
        ready = [r for r in snap.ready if r.req_id not in gone]
        dec = self._decision(snap, ts, ready)
        self._joint(dec, ready)
        pool = BlockPool(self.cluster.num_devices, snap.idle_mask & ~dec.held)
        placed = kept + place(pool, dec.claims)
        pool.free &= ~gv.image_holds(dec, pool, placed, o.hold_s)
        placed += gv.leftover(dec, pool, ready, placed, o)
        return snap.finish_plan(to_dispatches(snap, placed, o.chunk_ms / 1e3), rejected)

    def _decision(self, snap: Snapshot, ts, ready: list) -> _Decision:
        o = self.options
        forced = forced_set(snap, ready, o.max_preemptions if o.preemption else 0,
                            o.starvation_factor, ts.kept, o.starvation_share)
        if not o.preemption:  # started, yet not kept on its block (keep_started): next best
            forced.update(r.req_id for r in ready if r.steps_done > 0)
        image_cap = min(o.max_image_degree if o.elastic_sp else 1, self.cluster.max_image_sp_degree)
        image_degrees = tuple(k for k in snap.degrees if k <= image_cap)

        def video_degrees(v):
            return gv.fixed_video_degrees(snap, v, o.elastic_sp, o.fixed_sp_degree)

        wait_s = gv.wait_until_free_s(snap)
        if wait_s == 0.0:  # nothing in flight (rare: most decisions skip this pass)
            kept_ready = [r for r in ready if r.req_id in ts.kept]
            if len(kept_ready) > snap.idle_mask.bit_count():
                # not a device each: one left waiting waits for a step of what runs instead
                steps = [snap.step_s(r, 1) for r in kept_ready if is_video(r)]
                wait_s = min(steps) if steps else 0.0
        return _Decision(snap, ts.kept, forced, ts.tightness, wait_s,
                         o.patience, image_degrees, video_degrees, o.fill_min_degree)

    def _admission(self, snap: Snapshot, new_ids: set, ts) -> list:
        if not self.options.admission_control or not new_ids:
            return []
        out = []
        videos = [r for r in snap.requests if is_video(r)]
        load_s = ts.image_work_s / snap.num_devices
        for rid in sorted(new_ids):
            r = snap.by_id[rid]
            if r.steps_done or r.running or rid in ts.kept:
                continue
            if is_video(r) and rid not in ts.hopeless and self._commitments.try_commit(
                    snap, r, videos, load_s):
                continue  # fits without the newcomer's safety margin: admitted
            est = max(ts.finish_estimate_s.get(rid, 0.0), snap.now_s + snap.best_remaining_s(r))
            out.append(rejection(r, est))
        return out

    def _joint(self, dec: _Decision, ready: list[RequestView]) -> None:
        snap, o = dec.snap, self.options
        wanted = [r for r in ready if r.req_id in dec.targets or r.req_id in dec.forced]
        images = sorted((r for r in wanted if is_image(r)),
                        key=lambda r: (r.req_id not in dec.forced, r.deadline_s))
        videos = gv.video_candidates(dec, [r for r in wanted if is_video(r)],
                                     snap.idle_mask.bit_count())
        dec.held = gv.held_devices(dec, videos, o.hold_s)
        free = (snap.idle_mask & ~dec.held).bit_count()
        img_pool = ImagePool(snap, images, self.cluster.max_image_batch,
                             dec.image_degrees[-1], o.batching)
        dec.img_pool = img_pool
        pool_options = gv.image_options(dec, img_pool, free)
        contention = gv.contention_s(dec, img_pool)
        video_options = [gv.video_options(dec, v, free, contention) for v in videos]
        items = [[(w, val) for w, val, _ in pool_options]]
        items += [[(w, val) for w, val, _ in opts] for opts in video_options]
        picks = solve_mckp(items, free)
        dec.claims = list(pool_options[picks[0]][2])
        for opts, pick in zip(video_options, picks[1:]):
            if opts[pick][2] is not None:
                dec.claims.append(opts[pick][2])


def keep_started(now_s: float, requests, devices, cost: CostModel,
                 cluster: ClusterSpec) -> tuple[list, list, list]:
    """Without preemption, a started request keeps its block to the end: it
    is never paused, shrunk or moved (an image batch may still grow onto
    free devices: ``leftover``). Each started request waiting on its own idle block (an image
    batch: those sharing one) gets a claim on that block, and the rest of the
    plan sees the request running and the block busy until the request ends.
    Returns (requests, devices, claims). A started request whose block is not
    all idle (a finishing batch member's decode still holds its leader) or
    not its own is left to the rest of the plan."""
    idle = {d.device_id for d in devices if d.idle}
    groups: dict[tuple, list] = {}
    for r in requests:
        if r.steps_done > 0 and not r.running and r.device_ids and idle.issuperset(r.device_ids):
            groups.setdefault(tuple(sorted(r.device_ids)), []).append(r)
    claims, busy_until, taken = [], {}, set()
    for ids, members in groups.items():
        first = members[0]
        if taken.intersection(ids) or (len(members) > 1 and (
                len(members) > cluster.max_image_batch or any(
                    is_video(m) or (m.model, m.shape) != (first.model, first.shape)
                    for m in members))):
            continue
        taken.update(ids)
        k, b = len(ids), len(members)
        end = now_s + max(m.steps_left * cost.step_ms(m.model, m.width, m.height, m.num_frames, k, b)
                          + cost.decode_ms(m.model, m.width, m.height, m.num_frames, k)
                          for m in members) / 1e3
        busy_until.update((d, end) for d in ids)
        mask = sum(1 << d for d in ids)
        claims.append(Claim(sorted(members, key=lambda m: m.deadline_s), k, prefer=mask, mask=mask))
    if not claims:
        return list(requests), list(devices), []
    kept = {m.req_id for c in claims for m in c.members}
    requests = [replace(r, running=True) if r.req_id in kept else r for r in requests]
    devices = [DeviceView(d.device_id, False, busy_until[d.device_id])
               if d.device_id in busy_until else d for d in devices]
    by_id = {r.req_id: r for r in requests}
    for c in claims:
        c.members = [by_id[m.req_id] for m in c.members]
    return requests, devices, claims


def make_genserve(cluster: ClusterSpec, name: str = "genserve", **options) -> GenServePolicy:
    variants = {"genserve": {}, "genserve:no-preempt": {"preemption": False},
                "genserve:no-elastic-sp": {"elastic_sp": False},
                "genserve:no-batching": {"batching": False}}
    opts = dict(options)
    opts.update(variants[name])
    return GenServePolicy(cluster, GenServeOptions(**opts), name)

"""The pure scheduler interface: plain data in, a plan out.

The engine (live server) and the simulator both build these views at every
decision point and call ``Policy.plan``; neither the policy nor the cost model
sees torch, a clock or I/O. Times are seconds on the caller's clock (wall time
in the server, simulated time in the simulator); durations carry their unit in
the name.

Decision points: a step (or a batch of steps) finishes somewhere, a request
arrives, or a request is cancelled. The policy may only place work on devices
that are idle now; work already in flight is never interrupted (preemption
happens at step boundaries, when a request is *not* given its next step).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence

IMAGE = "image"
VIDEO = "video"
TASKS = (IMAGE, VIDEO)
# With requests waiting and nothing running, nothing else wakes a policy: the
# engine and the simulator both re-plan after this long (a policy may be
# waiting for time to pass, e.g. for a request to become late)
IDLE_REPLAN_S = 0.05


@dataclass(frozen=True, slots=True)
class RequestView:
    """One unfinished request as the policy sees it."""

    req_id: str
    task: str  # IMAGE or VIDEO
    model: str  # model name, a key of the latency model
    width: int
    height: int
    num_frames: int  # 1 for images
    num_steps: int  # denoising steps in total
    steps_done: int  # steps completed so far (0: not started)
    arrival_s: float
    deadline_s: float  # arrival_s + SLO
    num_preemptions: int = 0  # times this request was paused so far
    device_ids: tuple[int, ...] = ()  # devices holding its state (empty: none yet)
    running: bool = False  # a step is in flight now on device_ids
    # Listed in StepPlan.preempted by an earlier plan and not dispatched since
    # (the caller sets it when it applies a plan's ``preempted`` and clears it
    # when the request is dispatched again). Lets a stateless policy list a
    # pause exactly once; see StepPlan.preempted.
    paused: bool = False

    @property
    def steps_left(self) -> int:
        return self.num_steps - self.steps_done

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.width, self.height, self.num_frames)


@dataclass(frozen=True, slots=True)
class DeviceView:
    """One device. ``idle`` devices may receive work in this plan."""

    device_id: int
    idle: bool
    busy_until_s: float  # predicted end of the work in flight (== now when idle)


@dataclass(frozen=True, slots=True)
class ClusterSpec:
    """What the executor can do; fixed for the life of an engine or simulation."""

    num_devices: int
    max_sp_degree: int = 8  # largest SP group the executor supports (power of two)
    # A started request may run its next step on other devices or at another
    # degree (its state is moved). When False, it must resume on device_ids.
    migratable: bool = True
    max_image_batch: int = 16  # largest image batch the executor accepts
    # Largest block an image (batch) may run on: 1 when the image model has
    # no sequence-parallel path (e.g. the live server's SD3 adapter).
    max_image_sp_degree: int = 8
    # (model, limit) pairs: a video of that model runs on at most ``limit``
    # devices (a power of two; e.g. its attention heads split over no more).
    # A model not listed may use max_sp_degree. See ``video_sp_limit``.
    video_sp_limits: tuple[tuple[str, int], ...] = ()

    def video_sp_limit(self, model: str) -> int:
        """The largest SP degree a video of ``model`` may run at."""
        for name, limit in self.video_sp_limits:
            if name == model:
                return min(limit, self.max_sp_degree)
        return self.max_sp_degree


@dataclass(frozen=True, slots=True)
class Dispatch:
    """Run ``num_steps`` steps of ``req_ids`` on ``device_ids``.

    ``req_ids`` is one video, or a batch of images of the same model and
    resolution (each at its own step). ``device_ids`` is an aligned block:
    a power-of-two count starting at a multiple of that count. A request that
    reaches its last step is decoded in the same dispatch.

    Refinements (checked by ``genserve.scheduler.check.check_plan``):
    ``1 <= num_steps <= steps_left`` of every member, so every member runs
    exactly ``num_steps`` steps; a batch holds at most
    ``ClusterSpec.max_image_batch`` requests; ``len(device_ids)`` is at most
    ``ClusterSpec.max_sp_degree``. A request that has not started yet is
    text-encoded in the same dispatch (``CostModel.encode_ms`` counts in its
    duration, as ``decode_ms`` does for one that finishes).
    """

    req_ids: tuple[str, ...]
    device_ids: tuple[int, ...]
    num_steps: int = 1


@dataclass(frozen=True, slots=True)
class Rejection:
    """A request refused by admission control (it cannot meet its SLO).

    Only a request that has not started (``steps_done == 0``, not running) is
    refused, and it is not dispatched in the same plan. The engine ends it
    with status RESOURCE_EXHAUSTED and reports ``estimated_finish_s``.
    """

    req_id: str
    reason: str
    estimated_finish_s: float


@dataclass(frozen=True, slots=True)
class StepPlan:
    """The policy's decision at one decision point."""

    dispatches: tuple[Dispatch, ...] = ()
    # Started, unfinished requests not running now that this plan pauses
    # (counted as one preemption each; the engine emits PREEMPTED). A request
    # listed here stays paused until a later plan dispatches it.
    # Exact rule: a plan lists precisely the requests with steps_done > 0,
    # not running, not ``paused``, and not in any of its dispatches. A request
    # left waiting at several decision points in a row is therefore counted
    # once per pause, and a short wait for a busy device counts as a pause.
    preempted: tuple[str, ...] = ()
    rejected: tuple[Rejection, ...] = ()


class CostModel(Protocol):
    """Predicted latencies (ms); calibrated online from measured step times."""

    def step_ms(self, model: str, width: int, height: int, num_frames: int,
                sp_degree: int, batch_size: int) -> float: ...

    def encode_ms(self, model: str) -> float: ...

    def decode_ms(self, model: str, width: int, height: int, num_frames: int,
                  sp_degree: int) -> float: ...

    def observe_step(self, model: str, width: int, height: int, num_frames: int,
                     sp_degree: int, batch_size: int, measured_ms: float) -> None: ...


class Policy(Protocol):
    """A scheduling policy: a pure function of its inputs (plus its own
    bookkeeping, which must depend only on those inputs)."""

    name: str

    def plan(self, now_s: float, requests: Sequence[RequestView],
             devices: Sequence[DeviceView], cost: CostModel) -> StepPlan: ...

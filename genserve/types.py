"""Plain data that crosses the frontend ⇄ engine boundary.

The frontend turns protos into ``Request`` and ``Event`` back into protos; the
engine never sees a proto. Status names are gRPC status code names so the
frontend can map them one to one.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field

from genserve.models.base import GenParams

IMAGE = "image"
VIDEO = "video"

IMAGE_FORMATS = ("png", "jpeg", "webp", "raw")
VIDEO_FORMATS = ("mp4", "gif", "webp", "raw")
# what a request that names no format or fps gets (the workers' warm-up encodes these too)
DEFAULT_FORMAT = {IMAGE: "png", VIDEO: "mp4"}
DEFAULT_FPS = 8


@dataclass(frozen=True, slots=True)
class Request:
    """A validated, defaulted generation request."""

    req_id: str
    model: str
    task: str  # IMAGE or VIDEO
    params: GenParams
    output_format: str  # one of IMAGE_FORMATS / VIDEO_FORMATS
    fps: int
    slo_ms: int  # 0: the engine picks the default SLO
    arrival_s: float  # time.monotonic() at arrival
    # what the client asked for (its request message without the id): a
    # resubmission of a running id attaches only when this is the same
    fingerprint: str = ""


class EventType(enum.Enum):
    QUEUED = "QUEUED"
    STARTED = "STARTED"
    STEP = "STEP"
    PREEMPTED = "PREEMPTED"
    RESUMED = "RESUMED"
    RESHARDED = "RESHARDED"
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"


TERMINAL = (EventType.COMPLETED, EventType.FAILED, EventType.CANCELLED)


@dataclass(frozen=True, slots=True)
class Result:
    """The outcome of a completed request."""

    req_id: str
    model: str
    task: str
    data: bytes
    mime_type: str
    output_format: str
    width: int
    height: int
    num_frames: int
    fps: int
    seed: int
    num_steps: int
    queue_ms: float
    latency_ms: float
    slo_ms: int
    slo_met: bool
    num_preemptions: int
    sp_degrees: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class Event:
    """One progress event of one request. Exactly one terminal event is sent."""

    req_id: str
    type: EventType
    elapsed_s: float
    queue_position: int = 0
    step: int = 0
    num_steps: int = 0
    eta_s: float = 0.0
    sp_degree: int = 0
    reason: str = ""
    status: str = "OK"  # gRPC status code name for FAILED / CANCELLED
    result: Result | None = field(default=None, repr=False)

    @property
    def terminal(self) -> bool:
        return self.type in TERMINAL


class RequestError(Exception):
    """A request refused before it runs, with the gRPC status to return."""

    def __init__(self, status: str, message: str):
        super().__init__(message)
        self.status = status
        self.message = message

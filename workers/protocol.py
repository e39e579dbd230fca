"""Messages between the engine and its workers.

They travel over local pipes between processes of one host (never a socket
reachable from outside). New requests are sent in full once (``NewRequest``);
after that a dispatch names them by id. Tensors never cross: only ids,
parameters, timings and the finished, encoded media.
"""
from __future__ import annotations

from dataclasses import dataclass

from genserve.models.base import GenParams, ModelLimits
from genserve.workers.parallel import DistSpec


FRESH, PEER, BYTES = "fresh", "peer", "bytes"


@dataclass(frozen=True, slots=True)
class NewRequest:
    """A request this worker holds no state for. ``source`` says where the
    state comes from: FRESH (encode the prompt and prepare it here), PEER
    (broadcast by ``RunSteps.state_src``, a member of the same block) or BYTES
    (``state``, moved through host memory from a worker outside the block)."""

    req_id: str
    model: str
    params: GenParams
    output_format: str
    fps: int
    source: str = FRESH
    state: bytes = b""


@dataclass(frozen=True, slots=True)
class RunSteps:
    """Run ``num_steps`` steps of ``req_ids`` (one batch) and report back.

    Requests reaching their last step are decoded and encoded to media in the
    same dispatch. ``new`` holds the requests whose state is created here.
    """

    dispatch_id: int
    model: str
    req_ids: tuple[str, ...]
    num_steps: int
    new: tuple[NewRequest, ...] = ()
    # The SP block running this dispatch (every member gets the same message,
    # its own ``new``); the first member leads: it reports steps and results.
    # Empty: this device alone.
    device_ids: tuple[int, ...] = ()
    state_src: int = -1  # the member that broadcasts state to PEER members


@dataclass(frozen=True, slots=True)
class Export:
    """Send these requests' state back as bytes (to move it to another block)."""

    req_ids: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Exported:
    req_id: str
    state: bytes  # empty when the worker holds no state for it


@dataclass(frozen=True, slots=True)
class Drop:
    """Forget these requests' state (cancelled, failed or finished elsewhere)."""

    req_ids: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Shutdown:
    pass


@dataclass(frozen=True, slots=True)
class Rejoin:
    """Leave the current sequence-parallel world and join ``dist``, a new one
    every worker is told to join (after a crash, to bring SP back). The join
    runs beside the worker's steps, which meanwhile use no process group."""

    dist: DistSpec


@dataclass(frozen=True, slots=True)
class Rejoined:
    """The outcome of a ``Rejoin``; ``init_method`` names the world it was for."""

    device_id: int
    init_method: str
    ok: bool
    message: str = ""


@dataclass(frozen=True, slots=True)
class ModelCard:
    """What the engine and frontend need to know of a loaded model."""

    name: str
    task: str  # "image" | "video"
    limits: ModelLimits
    # the largest SP degree (a power of two) the model's step can run at: 1
    # without a sequence-parallel path; a video model's attention heads must
    # split evenly over the group (Wan 2.1 1.3B's 12 heads: at most 4)
    max_sp_degree: int = 8


@dataclass(frozen=True, slots=True)
class Warmup:
    """Timings of one warm-up request at a model's default size, batch 1."""

    model: str
    width: int
    height: int
    num_frames: int
    encode_ms: float
    step_ms: float  # the faster of two steps (the first pays one-time costs)
    decode_ms: float


@dataclass(frozen=True, slots=True)
class Ready:
    """Sent once when the worker has loaded (and warmed up) its models."""

    device_id: int
    models: tuple[ModelCard, ...]
    load_s: float
    warmups: tuple[Warmup, ...] = ()


@dataclass(frozen=True, slots=True)
class StepDone:
    """One step of a dispatch finished (sent after every step)."""

    dispatch_id: int
    req_ids: tuple[str, ...]  # the batch that ran this step
    step_indices: tuple[int, ...]  # each request's steps done after this step
    step_ms: float  # the batched forward pass (and noise-scheduler update)


@dataclass(frozen=True, slots=True)
class Finished:
    """A request's media, produced by the worker that ran its last step."""

    req_id: str
    data: bytes
    mime_type: str
    width: int
    height: int
    num_frames: int
    decode_ms: float


@dataclass(frozen=True, slots=True)
class Failed:
    req_id: str
    status: str  # gRPC status code name
    message: str


@dataclass(frozen=True, slots=True)
class DispatchDone:
    """The end of a dispatch; every request in it appears in exactly one of
    ``paused`` (state kept here), ``finished`` or ``failed``."""

    dispatch_id: int
    paused: tuple[str, ...]
    finished: tuple[Finished, ...]
    failed: tuple[Failed, ...]
    encode_ms: float  # prompt encoding + preparation of the new requests
    # this member's SP group broke in the dispatch (a member died, or this one
    # could not go on with the others and left the world): SP needs a new world
    group_lost: bool = False

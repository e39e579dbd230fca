"""The adapter contract every model family implements.

A diffusers pipeline runs its denoising loop in one call; a step-level server
needs the loop cut open: encode the prompt once, prepare latents and a
per-request noise-scheduler state, run ``denoise_step`` over any list of
requests (each at its own step), decode at the end. All per-request state
lives in ``RequestState`` objects owned by the worker; the adapter itself holds
only weights and is shared by every request on the worker.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field, fields, is_dataclass, replace
from typing import Any, Protocol

import numpy as np

IMAGE = "image"
VIDEO = "video"


@dataclass(frozen=True, slots=True)
class ModelLimits:
    """Sizes a model accepts; dimensions must be multiples of ``size_multiple``."""

    default_width: int
    default_height: int
    max_width: int
    max_height: int
    default_steps: int
    max_steps: int
    default_frames: int = 1
    max_frames: int = 1
    size_multiple: int = 16
    frame_multiple: int = 1  # num_frames must be k*frame_multiple + 1 (video VAEs)
    default_guidance_scale: float = 1.0


@dataclass(frozen=True, slots=True)
class GenParams:
    """One request's generation parameters, already validated and defaulted."""

    prompt: str
    negative_prompt: str
    width: int
    height: int
    num_frames: int
    num_steps: int
    guidance_scale: float
    seed: int


@dataclass(slots=True)
class RequestState:
    """Everything one request needs between steps. Never shared."""

    params: GenParams
    cond: Any  # prompt embeddings (adapter-specific), computed once
    latents: Any  # torch.Tensor
    timesteps: Any  # torch.Tensor, per-request noise-scheduler schedule
    sigmas: Any  # torch.Tensor
    step_index: int = 0
    extra: dict = field(default_factory=dict)

    @property
    def done(self) -> bool:
        return self.step_index >= self.params.num_steps

    @property
    def uses_cfg(self) -> bool:
        """Classifier-free guidance is on, as in the diffusers pipelines."""
        return self.params.guidance_scale > 1.0

    def to(self, device) -> "RequestState":
        """Move every tensor (latents, cond, timesteps, per-request noise
        scheduler in ``extra``) to ``device``, in place; returns self. Used to
        park a preempted request in host memory and bring it back, and to
        send it to another worker. The sigmas go to the host, never from it:
        diffusers' noise schedulers keep them there (``HOST_RESIDENT``)."""
        if _is_host(device):
            self.sigmas = tensors_to(self.sigmas, device)
        self.cond = tensors_to(self.cond, device)
        self.latents = tensors_to(self.latents, device)
        self.timesteps = tensors_to(self.timesteps, device)
        self.extra = tensors_to(self.extra, device)
        return self


@dataclass(frozen=True, slots=True)
class TextCond:
    """Prompt embeddings of one request, batch dimension 1.

    ``neg_*`` hold the negative prompt's embeddings and are set only when the
    request uses classifier-free guidance. ``pooled`` is for families with a
    pooled text vector (SD3); None elsewhere.
    """

    embeds: Any  # torch.Tensor (1, seq_len, dim)
    pooled: Any = None  # torch.Tensor (1, dim) or None
    neg_embeds: Any = None
    neg_pooled: Any = None


# Attributes of plain objects that a move to a device leaves on the host (a
# move to the host takes them, so pickled bytes hold no device tensor):
# diffusers' noise schedulers (FlowMatchEuler, UniPC) keep their sigmas on the
# CPU on purpose, and compute their step coefficients there. Moved to a GPU,
# those would be computed on the device on one worker and on the host on
# another (a state sent to an SP group's members), and the members would no
# longer be bit-identical.
HOST_RESIDENT = frozenset({"sigmas"})


def _is_host(device) -> bool:
    import torch

    return torch.device(device).type == "cpu"


def tensors_to(obj: Any, device) -> Any:
    """``obj`` with every torch tensor inside it moved to ``device``.

    Walks lists, tuples, dicts, dataclasses and plain objects (a diffusers
    noise scheduler keeps its history in attributes); objects are changed in
    place, frozen dataclasses are copied. A plain object's ``HOST_RESIDENT``
    attributes go to the host only.
    """
    import torch

    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    # exact types only: dict subclasses such as a scheduler's FrozenDict
    # config hold no tensors and must keep their type
    if type(obj) is list:
        return [tensors_to(x, device) for x in obj]
    if type(obj) is tuple:
        return tuple(tensors_to(x, device) for x in obj)
    if type(obj) is dict:
        return {k: tensors_to(v, device) for k, v in obj.items()}
    if is_dataclass(obj) and not isinstance(obj, type):
        moved = {f.name: tensors_to(getattr(obj, f.name), device) for f in fields(obj)}
        return replace(obj, **moved)
    if hasattr(obj, "__dict__") and not isinstance(obj, type):
        host = _is_host(device)
        for key, value in vars(obj).items():
            if key in HOST_RESIDENT and not host:
                continue
            if type(value) in (torch.Tensor, list, tuple, dict) or isinstance(value, torch.Tensor):
                setattr(obj, key, tensors_to(value, device))
    return obj


def tensors_in(obj: Any):
    """Every torch tensor inside ``obj``, walked as ``tensors_to`` walks it,
    the host-resident attributes included; a tensor reached twice comes twice."""
    import torch

    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for x in obj:
            yield from tensors_in(x)
    elif isinstance(obj, dict):
        for x in obj.values():
            yield from tensors_in(x)
    elif is_dataclass(obj) and not isinstance(obj, type):
        for f in fields(obj):
            yield from tensors_in(getattr(obj, f.name))
    elif hasattr(obj, "__dict__") and not isinstance(obj, type):
        for value in vars(obj).values():
            if isinstance(value, (torch.Tensor, list, tuple, dict)):
                yield from tensors_in(value)


def synchronize(device) -> None:
    """Wait for the work queued on ``device``: CUDA runs kernels
    asynchronously, so a clock read after a step would time its launch, and
    the rest would land on whatever waits next (the decode's copy to the
    host). Nothing to wait for on the CPU."""
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


class ModelAdapter(Protocol):
    """Weights of one model, shared by every request on a worker.

    Call order per request: ``encode_prompt`` once, ``prepare`` once,
    ``denoise_step`` ``num_steps`` times (in any batches, interleaved with
    other requests), ``decode`` once when ``state.done``.
    """

    name: str
    task: str  # IMAGE or VIDEO
    limits: ModelLimits

    def encode_prompt(self, params: GenParams) -> Any:
        """Prompt embeddings (a ``TextCond``); the negative prompt too when
        ``params.guidance_scale > 1``."""

    def prepare(self, params: GenParams, cond: Any) -> RequestState:
        """Initial noise from ``params.seed`` (CPU generator, so the same on
        every device) and this request's own noise-scheduler schedule."""

    def denoise_step(self, states: list[RequestState]) -> None:
        """Advance every state by one step (batched where shapes agree).
        A video adapter's step over an SP group raises ``CollectiveError``
        when one of its collectives fails."""

    def decode(self, state: RequestState) -> np.ndarray:
        """uint8 RGB array of shape (frames, height, width, 3)."""

    def set_attention(self, backend: str) -> None:
        """Pick the attention kernel (``sdpa`` default, ``xformers`` on CUDA)."""


class CollectiveError(RuntimeError):
    """A collective over a sequence-parallel group failed, typically because a
    member died (gloo raises within milliseconds of it; NCCL may block
    instead). The group is broken for good: every later collective over it
    fails too, so its members end what they were doing together."""


@contextlib.contextmanager
def collective(what: str):
    """Run one torch.distributed collective: its failure (torch raises
    RuntimeError) is a ``CollectiveError``, which a worker can tell from a
    fault of its own step."""
    try:
        yield
    except RuntimeError as exc:
        raise CollectiveError(f"{what} failed: {exc}") from exc

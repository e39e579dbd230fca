"""Proto ⇄ dataclass conversion and request validation at the edge.

Every refusal is a ``RequestError`` naming the offending field, so a client
sees e.g. ``INVALID_ARGUMENT: width: 70 is not a multiple of 16``.
"""
from __future__ import annotations

import math
import secrets
import time
import uuid
from dataclasses import replace

from genserve.config import Limits
from genserve.models.base import GenParams
from genserve.types import (DEFAULT_FORMAT, DEFAULT_FPS, IMAGE, IMAGE_FORMATS, VIDEO, VIDEO_FORMATS, Event,
                            EventType, Request, RequestError, Result)
from genserve.v1 import genserve_pb2 as pb
from genserve.workers.protocol import ModelCard

TASK_FROM_PB = {pb.TASK_TEXT_TO_IMAGE: IMAGE, pb.TASK_TEXT_TO_VIDEO: VIDEO}
TASK_TO_PB = {v: k for k, v in TASK_FROM_PB.items()}
FORMAT_FROM_PB = {pb.OUTPUT_FORMAT_PNG: "png", pb.OUTPUT_FORMAT_JPEG: "jpeg",
                  pb.OUTPUT_FORMAT_WEBP: "webp", pb.OUTPUT_FORMAT_MP4: "mp4",
                  pb.OUTPUT_FORMAT_GIF: "gif", pb.OUTPUT_FORMAT_RAW: "raw"}
FORMAT_TO_PB = {v: k for k, v in FORMAT_FROM_PB.items()}
MAX_FPS = 60
MAX_GUIDANCE = 100.0
MAX_REQUEST_ID_CHARS = 128


def _bad(message: str) -> RequestError:
    return RequestError("INVALID_ARGUMENT", message)


def check_request_id(request_id: str, empty_ok: bool) -> None:
    """RequestError (INVALID_ARGUMENT) unless ``request_id`` can name a
    request: printable, at most MAX_REQUEST_ID_CHARS, not only spaces."""
    if not request_id and empty_ok:
        return
    if (not request_id.strip() or len(request_id) > MAX_REQUEST_ID_CHARS
            or not request_id.isprintable()):
        raise _bad(f"request_id: 1 to {MAX_REQUEST_ID_CHARS} printable characters, not only spaces")


class Validator:
    """Turns GenerateRequest protos into validated ``Request``s.

    ``cards`` holds each model's limits with the operator's caps applied
    (``Limits.effective``): what ListModels publishes is what is enforced, and
    an unset field's default is always within them. ValueError when a cap
    leaves a model no valid value."""

    def __init__(self, cards: dict[str, ModelCard], limits: Limits):
        self.limits = limits
        self.cards = {name: replace(card, limits=limits.effective(name, card.limits))
                      for name, card in cards.items()}
        self.defaults: dict[str, str] = {}
        for card in cards.values():  # the first model of each task is its default
            self.defaults.setdefault(card.task, card.name)

    def request(self, msg: pb.GenerateRequest) -> Request:
        card = self._card(msg)
        if not msg.prompt.strip():
            raise _bad("prompt: must not be empty")
        for field in ("prompt", "negative_prompt"):
            if len(getattr(msg, field)) > self.limits.max_prompt_chars:
                raise _bad(f"{field}: longer than the limit of {self.limits.max_prompt_chars} characters")
        check_request_id(msg.request_id, empty_ok=True)
        lim = card.limits
        width = self._dim(msg, "width", lim.default_width, lim.max_width, lim.size_multiple)
        height = self._dim(msg, "height", lim.default_height, lim.max_height, lim.size_multiple)
        frames = self._frames(msg, card)
        steps = msg.num_inference_steps if msg.HasField("num_inference_steps") else lim.default_steps
        if not 1 <= steps <= lim.max_steps:
            raise _bad(f"num_inference_steps: {steps} is outside 1..{lim.max_steps}")
        guidance = msg.guidance_scale if msg.HasField("guidance_scale") else lim.default_guidance_scale
        if not math.isfinite(guidance) or not 0.0 <= guidance <= MAX_GUIDANCE:
            raise _bad(f"guidance_scale: {guidance} is outside 0..{MAX_GUIDANCE:g}")
        fps = self._fps(msg, card)
        # the noise comes from torch's CPU generator, which (like diffusers with it) uses the
        # seed's low 32 bits: a random seed has no more, so different seeds give different noise
        seed = msg.seed if msg.HasField("seed") else secrets.randbits(32)
        params = GenParams(msg.prompt, msg.negative_prompt, width, height, frames, steps, float(guidance), seed)
        return Request(msg.request_id or uuid.uuid4().hex, card.name, card.task, params,
                       self._format(msg, card), fps, msg.slo_ms, time.monotonic())

    def _card(self, msg: pb.GenerateRequest) -> ModelCard:
        if msg.task not in (pb.TASK_UNSPECIFIED, *TASK_FROM_PB):
            raise _bad(f"task: unknown value {msg.task}")
        task = TASK_FROM_PB.get(msg.task)
        if msg.model:
            card = self.cards.get(msg.model)
            if card is None:
                raise _bad(f"model: unknown model {msg.model!r}; served: {', '.join(sorted(self.cards))}")
            if task is not None and task != card.task:
                raise _bad(f"task: model {card.name!r} does text-to-{card.task}, not text-to-{task}")
            return card
        if task is None:
            raise _bad("task: set task (TASK_TEXT_TO_IMAGE or TASK_TEXT_TO_VIDEO) or model")
        if task not in self.defaults:
            raise _bad(f"task: no served model does text-to-{task}")
        return self.cards[self.defaults[task]]

    @staticmethod
    def _dim(msg, field: str, default: int, maximum: int, multiple: int) -> int:
        if not msg.HasField(field):
            return default
        value = getattr(msg, field)
        if value == 0:
            raise _bad(f"{field}: must be positive (leave it unset for the default {default})")
        if value > maximum:
            raise _bad(f"{field}: {value} exceeds the maximum of {maximum}")
        if value % multiple:
            raise _bad(f"{field}: {value} is not a multiple of {multiple}")
        return value

    @staticmethod
    def _frames(msg, card: ModelCard) -> int:
        lim = card.limits
        if card.task == IMAGE:
            if msg.HasField("num_frames") and msg.num_frames != 1:
                raise _bad(f"num_frames: images have 1 frame, not {msg.num_frames}")
            return 1
        if not msg.HasField("num_frames"):
            return lim.default_frames
        n = msg.num_frames
        if n == 0 or n > lim.max_frames:
            raise _bad(f"num_frames: {n} is outside 1..{lim.max_frames}")
        if (n - 1) % lim.frame_multiple:
            raise _bad(f"num_frames: {n} must be {lim.frame_multiple}k+1 for model {card.name!r}")
        return n

    @staticmethod
    def _fps(msg, card: ModelCard) -> int:
        if not msg.HasField("fps") or card.task != VIDEO:  # videos only: an image's is ignored
            return DEFAULT_FPS
        if not 1 <= msg.fps <= MAX_FPS:
            raise _bad(f"fps: {msg.fps} is outside 1..{MAX_FPS}")
        return msg.fps

    @staticmethod
    def _format(msg, card: ModelCard) -> str:
        if msg.output_format == pb.OUTPUT_FORMAT_UNSPECIFIED:
            return DEFAULT_FORMAT[card.task]
        fmt = FORMAT_FROM_PB.get(msg.output_format)
        if fmt is None:
            raise _bad(f"output_format: unknown value {msg.output_format}")
        allowed = IMAGE_FORMATS if card.task == IMAGE else VIDEO_FORMATS
        if fmt not in allowed:
            kind = "an image" if card.task == IMAGE else "a video"
            raise _bad(f"output_format: {fmt.upper()} is not {kind} format "
                       f"(use one of {', '.join(f.upper() for f in allowed)})")
        return fmt


def result_to_pb(r: Result) -> pb.GenerateResponse:
    media = pb.Media(data=r.data, mime_type=r.mime_type, width=r.width, height=r.height,
                     num_frames=r.num_frames, fps=r.fps, format=FORMAT_TO_PB[r.output_format])
    return pb.GenerateResponse(
        request_id=r.req_id, media=media, model=r.model, task=TASK_TO_PB[r.task],
        queue_ms=r.queue_ms, latency_ms=r.latency_ms, slo_ms=r.slo_ms, slo_met=r.slo_met,
        num_preemptions=r.num_preemptions, sp_degrees=list(r.sp_degrees), seed=r.seed,
        num_inference_steps=r.num_steps)


def event_to_pb(e: Event) -> pb.GenerateEvent:
    msg = pb.GenerateEvent(
        request_id=e.req_id, type=pb.GenerateEvent.Type.Value(e.type.value), elapsed_s=e.elapsed_s,
        queue_position=e.queue_position, step=e.step, num_steps=e.num_steps, eta_s=e.eta_s,
        sp_degree=e.sp_degree, reason=e.reason)
    if e.type == EventType.COMPLETED and e.result is not None:
        msg.response.CopyFrom(result_to_pb(e.result))
    if e.type in (EventType.FAILED, EventType.CANCELLED):
        msg.status_code = e.status
    return msg


def card_to_pb(card: ModelCard, is_default: bool, max_sp_degree: int = 1) -> pb.ModelInfo:
    """ListModels' entry for ``card``, limits as they stand: give it a
    ``Validator``'s cards, whose limits carry the operator's caps, so clients
    are told the limits the server enforces; ``max_sp_degree``: the largest
    SP group the server runs the model's steps on now."""
    lim = card.limits
    formats = IMAGE_FORMATS if card.task == IMAGE else VIDEO_FORMATS
    return pb.ModelInfo(
        name=card.name, task=TASK_TO_PB[card.task], is_default=is_default,
        default_width=lim.default_width, default_height=lim.default_height,
        max_width=lim.max_width, max_height=lim.max_height,
        default_num_frames=lim.default_frames, max_num_frames=lim.max_frames,
        default_steps=lim.default_steps, max_steps=lim.max_steps, size_multiple=lim.size_multiple,
        default_guidance_scale=lim.default_guidance_scale,
        default_fps=DEFAULT_FPS if card.task == VIDEO else 0,
        output_formats=[FORMAT_TO_PB[f] for f in formats], max_sp_degree=max_sp_degree)

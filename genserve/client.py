"""Python clients for product code: ``Client`` (blocking) and ``AsyncClient``.

    from genserve.client import Client
    with Client("127.0.0.1:50051") as c:
        resp = c.generate("a red fox in snow", task="image", output_format="png")
        open("fox.png", "wb").write(resp.media.data)

Errors surface as ``grpc.RpcError`` with the server's status code and message.
"""
from __future__ import annotations

import ipaddress
import urllib.parse
import warnings
from typing import AsyncIterator, Iterator, Sequence

import grpc
import numpy as np

from genserve.v1 import genserve_pb2 as pb
from genserve.v1 import genserve_pb2_grpc as pb_grpc

TASKS = {"image": pb.TASK_TEXT_TO_IMAGE, "video": pb.TASK_TEXT_TO_VIDEO, "": pb.TASK_UNSPECIFIED}
FORMATS = {"": pb.OUTPUT_FORMAT_UNSPECIFIED, "png": pb.OUTPUT_FORMAT_PNG, "jpeg": pb.OUTPUT_FORMAT_JPEG,
           "webp": pb.OUTPUT_FORMAT_WEBP, "mp4": pb.OUTPUT_FORMAT_MP4, "gif": pb.OUTPUT_FORMAT_GIF,
           "raw": pb.OUTPUT_FORMAT_RAW, "jpg": pb.OUTPUT_FORMAT_JPEG}  # jpg: jpeg, as the CLI takes it
_OPTIONS = [("grpc.max_receive_message_length", 512 << 20)]
UINT32_MAX = 2**32 - 1
INT64_MIN, INT64_MAX = -2**63, 2**63 - 1


def build_request(prompt: str, *, task: str = "image", model: str = "", negative_prompt: str = "",
                  width: int | None = None, height: int | None = None, num_frames: int | None = None,
                  fps: int | None = None, steps: int | None = None, guidance_scale: float | None = None,
                  seed: int | None = None, slo_ms: int = 0, output_format: str = "",
                  request_id: str = "", num_inference_steps: int | None = None) -> pb.GenerateRequest:
    """A GenerateRequest; ``None`` leaves a field unset (the server's default).
    ``num_inference_steps`` (the request field's name) is another name for
    ``steps``; give either, or both with the same value.

    ValueError names a field that cannot be sent (the server decides what is
    served: a size it does not support is INVALID_ARGUMENT there)."""
    if num_inference_steps is not None:
        if steps is not None and steps != num_inference_steps:
            raise ValueError(f"steps and num_inference_steps are the same field; got {steps} and "
                             f"{num_inference_steps}")
        steps = num_inference_steps
    if task not in TASKS:
        raise ValueError(f"task must be one of {', '.join(t for t in TASKS if t)}, got {task!r}")
    if output_format.lower() not in FORMATS:
        raise ValueError(f"output_format must be one of {', '.join(f for f in FORMATS if f)} (any case), "
                         f"got {output_format!r}")
    sizes = {"width": width, "height": height, "num_frames": num_frames, "fps": fps,
             "steps": steps, "slo_ms": slo_ms}
    for name, value in sizes.items():  # unsigned 32-bit in the request
        if value is not None and not 0 <= value <= UINT32_MAX:
            raise ValueError(f"{name} must be in 0..{UINT32_MAX}, got {value}")
    if seed is not None and not INT64_MIN <= seed <= INT64_MAX:  # signed 64-bit
        raise ValueError(f"seed must be in {INT64_MIN}..{INT64_MAX}, got {seed}")
    req = pb.GenerateRequest(request_id=request_id, model=model, task=TASKS[task], prompt=prompt,
                             negative_prompt=negative_prompt, slo_ms=slo_ms,
                             output_format=FORMATS[output_format.lower()])
    optional = {"width": width, "height": height, "num_frames": num_frames, "fps": fps,
                "num_inference_steps": steps, "guidance_scale": guidance_scale, "seed": seed}
    for name, value in optional.items():
        if value is not None:
            setattr(req, name, value)
    return req


def raw_frames(media: pb.Media) -> np.ndarray:
    """RAW media as a uint8 array of shape (frames, height, width, 3)."""
    return np.frombuffer(media.data, np.uint8).reshape(media.num_frames, media.height, media.width, 3)


def check_token(token: str | None) -> str | None:
    """``token`` without surrounding whitespace (a file's line ending, say), or
    None when that leaves nothing. ValueError for a character a gRPC metadata
    value cannot carry (grpc would fail every call INTERNAL: Invalid metadata);
    the message never shows the token."""
    token = (token or "").strip()
    for position, char in enumerate(token, 1):
        if not " " <= char <= "~":
            what = f"a control character (U+{ord(char):04X})" if char.isascii() else "a non-ASCII character"
            raise ValueError(f"the token has {what} at position {position}: a bearer token travels in gRPC "
                             "metadata, which takes printable ASCII only")
    return token or None


def _metadata(token: str | None):
    token = check_token(token)
    return (("authorization", f"Bearer {token}"),) if token else None


def _channel_options(extra: Sequence[tuple[str, object]]) -> list[tuple[str, object]]:
    """genserve's options with ``extra``'s; a key in both takes ``extra``'s value."""
    return list({**dict(_OPTIONS), **dict(extra)}.items())


def _is_loopback(target: str) -> bool:
    """Whether ``target`` (HOST:PORT, [IPV6]:PORT, dns:///HOST:PORT, unix:PATH) is this machine."""
    if target.startswith(("unix:", "unix-abstract:")):
        return True
    address = target.partition(":///")[2] or target.removeprefix("ipv4:").removeprefix("ipv6:")
    try:
        host = urllib.parse.urlsplit("//" + address.split(",")[0]).hostname or ""
    except ValueError:  # e.g. an IPv6 literal without brackets
        host = address
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a name: it may resolve anywhere
        return False


def _warn_if_token_in_clear(target: str, credentials, metadata) -> None:
    if metadata and credentials is None and not _is_loopback(target):
        warnings.warn(f"sending a bearer token to {target} without TLS: anyone on the path can read it "
                      "(pass credentials=genserve.security.channel_credentials(...))", stacklevel=3)


class Client:
    """Blocking client. ``target`` is HOST:PORT (or any gRPC target: dns:///,
    unix:); pass ``credentials`` for TLS. ``token`` is sent as
    ``authorization: Bearer TOKEN`` (surrounding whitespace stripped;
    ValueError for a character gRPC metadata cannot carry); without
    ``credentials`` to another host it warns once, as it travels in clear.
    ``channel_options`` are gRPC channel arguments, e.g.
    ``("grpc.ssl_target_name_override", "genserve.internal")``,
    ``("grpc.keepalive_time_ms", 30000)``,
    ``("grpc.lb_policy_name", "round_robin")``,
    ``("grpc.max_reconnect_backoff_ms", 2000)``."""

    def __init__(self, target: str = "127.0.0.1:50051", *, credentials: grpc.ChannelCredentials | None = None,
                 token: str | None = None, channel_options: Sequence[tuple[str, object]] = ()):
        self.metadata = _metadata(token)  # first: a token that cannot be sent opens no channel
        _warn_if_token_in_clear(target, credentials, self.metadata)
        options = _channel_options(channel_options)
        self.channel = (grpc.secure_channel(target, credentials, options) if credentials
                        else grpc.insecure_channel(target, options))
        self.stub = pb_grpc.GenServeStub(self.channel)

    def generate(self, prompt: str, *, timeout_s: float | None = None, wait_for_ready: bool = False,
                 **fields) -> pb.GenerateResponse:
        """The result. ``wait_for_ready``: while the server cannot be reached
        (not up yet, restarting), wait for it up to ``timeout_s`` instead of
        failing UNAVAILABLE at once."""
        return self.stub.Generate(build_request(prompt, **fields), timeout=timeout_s, metadata=self.metadata,
                                  wait_for_ready=wait_for_ready)

    def stream(self, prompt: str, *, timeout_s: float | None = None, wait_for_ready: bool = False,
               **fields) -> Iterator[pb.GenerateEvent]:
        """Events as they happen; the last is COMPLETED, FAILED or CANCELLED (a
        request refused before it was accepted raises instead, as ``generate``
        does). ``wait_for_ready`` as for ``generate``."""
        return self.stub.GenerateStream(build_request(prompt, **fields), timeout=timeout_s,
                                        metadata=self.metadata, wait_for_ready=wait_for_ready)

    def cancel(self, request_id: str, *, timeout_s: float | None = None, wait_for_ready: bool = False) -> bool:
        return self.stub.Cancel(pb.CancelRequest(request_id=request_id), timeout=timeout_s,
                                metadata=self.metadata, wait_for_ready=wait_for_ready).cancelled

    def models(self, *, timeout_s: float | None = None, wait_for_ready: bool = False) -> list[pb.ModelInfo]:
        """The served models; ``wait_for_ready``: wait (up to ``timeout_s``) for
        a server that is not reachable yet instead of failing at once."""
        return list(self.stub.ListModels(pb.ListModelsRequest(), timeout=timeout_s, metadata=self.metadata,
                                         wait_for_ready=wait_for_ready).models)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class AsyncClient:
    """asyncio client with the same arguments and methods as ``Client``. Make
    it inside the event loop that uses it (grpc.aio binds a channel to the
    running loop)."""

    def __init__(self, target: str = "127.0.0.1:50051", *, credentials: grpc.ChannelCredentials | None = None,
                 token: str | None = None, channel_options: Sequence[tuple[str, object]] = ()):
        self.metadata = _metadata(token)  # first: a token that cannot be sent opens no channel
        _warn_if_token_in_clear(target, credentials, self.metadata)
        options = _channel_options(channel_options)
        self.channel = (grpc.aio.secure_channel(target, credentials, options) if credentials
                        else grpc.aio.insecure_channel(target, options))
        self.stub = pb_grpc.GenServeStub(self.channel)

    async def generate(self, prompt: str, *, timeout_s: float | None = None, wait_for_ready: bool = False,
                       **fields) -> pb.GenerateResponse:
        """As ``Client.generate``."""
        return await self.stub.Generate(build_request(prompt, **fields), timeout=timeout_s,
                                        metadata=self.metadata, wait_for_ready=wait_for_ready)

    async def stream(self, prompt: str, *, timeout_s: float | None = None, wait_for_ready: bool = False,
                     **fields) -> AsyncIterator[pb.GenerateEvent]:
        """As ``Client.stream``. Leaving early (``break``, then ``aclose()`` or
        ``async with contextlib.aclosing(...)``) cancels the request, as
        dropping the blocking client's iterator does."""
        call = self.stub.GenerateStream(build_request(prompt, **fields), timeout=timeout_s,
                                        metadata=self.metadata, wait_for_ready=wait_for_ready)
        try:
            async for event in call:
                yield event
        finally:
            call.cancel()  # (a no-op once the call has ended)

    async def cancel(self, request_id: str, *, timeout_s: float | None = None,
                     wait_for_ready: bool = False) -> bool:
        reply = await self.stub.Cancel(pb.CancelRequest(request_id=request_id), timeout=timeout_s,
                                       metadata=self.metadata, wait_for_ready=wait_for_ready)
        return reply.cancelled

    async def models(self, *, timeout_s: float | None = None, wait_for_ready: bool = False) -> list[pb.ModelInfo]:
        """As ``Client.models``."""
        reply = await self.stub.ListModels(pb.ListModelsRequest(), timeout=timeout_s, metadata=self.metadata,
                                           wait_for_ready=wait_for_ready)
        return list(reply.models)

    async def close(self) -> None:
        await self.channel.close()

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

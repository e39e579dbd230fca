"""The async send loop: open loop (planned arrival times) or closed loop (N clients).

One ``GenerateStream`` call per request, on one shared channel of an
``AsyncClient``; the first streamed event gives the first-event time, the
terminal event (or the RPC error) the outcome. ``send_one`` never raises: every
request it is handed ends as exactly one ``RequestRecord``, whatever happens
(OK, FAILED with the server's status, an RPC error such as INVALID_ARGUMENT
at submit, a client deadline, or CANCELLED when the run stops waiting).

Times are seconds on ``time.monotonic()`` since the run's start (``t0``); the
metrics scraper uses the same clock, so the two line up.
"""
from __future__ import annotations

import asyncio
import secrets
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import grpc

from genserve.client import AsyncClient, build_request
from genserve.scheduler.workload import TraceRequest
from genserve.v1 import genserve_pb2 as pb

from .records import OK, RequestRecord

EV = pb.GenerateEvent.Type
SEED_STRIDE = 1_000_003  # request seed = run seed * stride + index (reproducible media)
# A request id is PREFIX-000042: up to 80 characters leave room for compare's
# "-NAME" and the index within the API's 128.
MAX_ID_PREFIX_CHARS = 80


def new_id_prefix() -> str:
    """A run's own request-id prefix, ``lg-`` and 8 random hex digits. Ids
    name requests on the server: two runs sending the same ids to one server
    interfere (a call with an unfinished request's id is attached to it, or
    refused ALREADY_EXISTS), so no two runs share a default prefix."""
    return f"lg-{secrets.token_hex(4)}"


@dataclass(frozen=True, slots=True)
class RunOptions:
    """How to send (the workload says what)."""

    target: str
    concurrency: int = 0  # > 0: closed loop with this many clients; 0: open loop
    duration_s: float = 0.0  # closed loop: stop sending after this long (0: when the workload ends)
    warmup_s: float = 0.0  # requests planned (open) or sent (closed) before this are warm-up
    warmup_requests: int = 0  # the first N requests are warm-up
    timeout_s: float = 0.0  # per-request gRPC deadline (0: none)
    drain_timeout_s: float = 600.0  # after the last send, wait this long for stragglers
    output_format: str = ""  # "": PNG / MP4
    prompt: str = "a lighthouse on a cliff at dusk"
    seed: int = 0
    id_prefix: str = ""  # request ids are PREFIX-000000, ...; "": new_id_prefix(), per run_load
    progress: bool = True


@dataclass(slots=True)
class _Outcome:
    """Mutable scratch of one request while its stream is open."""

    first_event_s: float = -1.0
    status: str = ""
    reason: str = ""
    response: pb.GenerateResponse | None = None
    num_preemptions: int = 0
    sp_degrees: list[int] = field(default_factory=list)
    retry_after_s: float = 0.0  # a refusal's retry-after-ms hint
    stopped: bool = False  # the load generator cancelled it (drain timeout or Ctrl-C)


def _retry_after_s(err: grpc.aio.AioRpcError) -> float:
    for key, value in err.trailing_metadata() or ():
        if key == "retry-after-ms":
            try:
                return max(0.0, float(value) / 1e3)
            except ValueError:
                return 0.0
    return 0.0


class Clock:
    """Seconds since ``t0`` on the monotonic clock."""

    def __init__(self, t0: float | None = None):
        self.t0 = time.monotonic() if t0 is None else t0

    def __call__(self) -> float:
        return time.monotonic() - self.t0


def wire_slo_ms(slo_ms: float) -> int:
    """The API's whole milliseconds; a positive SLO stays positive (rounding
    it to 0 would ask for the server's default SLO instead)."""
    return max(1, round(slo_ms)) if slo_ms > 0 else 0


def to_proto(item: TraceRequest, index: int, opts: RunOptions) -> pb.GenerateRequest:
    """The GenerateRequest of one workload item; 0 in steps means the server's default."""
    is_video = item.task == "video"
    return build_request(
        opts.prompt, task=item.task, model=item.model, width=item.width, height=item.height,
        num_frames=item.num_frames if is_video else None,
        steps=item.num_inference_steps or None, seed=opts.seed * SEED_STRIDE + index,
        slo_ms=wire_slo_ms(item.slo_ms), output_format=opts.output_format,
        request_id=f"{opts.id_prefix}-{index:06d}")


def _on_event(ev: pb.GenerateEvent, out: _Outcome) -> None:
    if ev.type == EV.PREEMPTED:
        out.num_preemptions += 1
    elif ev.type in (EV.STARTED, EV.RESUMED, EV.RESHARDED) and ev.sp_degree:
        if ev.sp_degree not in out.sp_degrees:
            out.sp_degrees.append(ev.sp_degree)
    elif ev.type == EV.COMPLETED:
        out.status, out.response = OK, ev.response
    elif ev.type == EV.FAILED:
        out.status, out.reason = ev.status_code or "UNKNOWN", ev.reason
    elif ev.type == EV.CANCELLED:
        out.status, out.reason = "CANCELLED", ev.reason


async def _stream(client: AsyncClient, request: pb.GenerateRequest, opts: RunOptions,
                  clock: Clock, out: _Outcome) -> None:
    call = client.stub.GenerateStream(request, timeout=opts.timeout_s or None,
                                      metadata=client.metadata)
    try:
        async for ev in call:
            if out.first_event_s < 0:
                out.first_event_s = clock()
            _on_event(ev, out)
            if out.status:
                return
        out.status, out.reason = "UNKNOWN", "stream ended without a terminal event"
    except grpc.aio.AioRpcError as err:
        out.status, out.reason = err.code().name, err.details() or ""
        out.retry_after_s = _retry_after_s(err)
    except asyncio.CancelledError:
        call.cancel()
        out.status, out.reason = "CANCELLED", "the load generator stopped waiting (drain timeout or Ctrl-C)"
        out.stopped = True


def _record(req_id: str, item: TraceRequest, index: int, intended_s: float, send_s: float,
            finish_s: float, out: _Outcome, warmup: bool) -> RequestRecord:
    resp = out.response
    return RequestRecord(
        req_id=req_id, index=index, task=item.task,
        model=(resp.model if resp and resp.model else item.model), width=item.width,
        height=item.height, num_frames=item.num_frames,
        num_steps=(resp.num_inference_steps if resp else item.num_inference_steps),
        intended_s=intended_s, send_s=send_s, first_event_s=out.first_event_s, finish_s=finish_s,
        status=out.status, slo_ms=float(resp.slo_ms if resp else item.slo_ms),
        slo_met=bool(resp and resp.slo_met),
        num_preemptions=resp.num_preemptions if resp else out.num_preemptions,
        sp_degrees=tuple(resp.sp_degrees) if resp else tuple(out.sp_degrees),
        queue_ms=resp.queue_ms if resp else 0.0, latency_ms=resp.latency_ms if resp else 0.0,
        warmup=warmup, reason=out.reason)


async def send_one(client: AsyncClient, item: TraceRequest, index: int, intended_s: float,
                   opts: RunOptions, clock: Clock) -> RequestRecord:
    """Send one request and wait for its outcome; never raises (see module docstring)."""
    return (await _send_one(client, item, index, intended_s, opts, clock))[0]


async def _send_one(client: AsyncClient, item: TraceRequest, index: int, intended_s: float,
                    opts: RunOptions, clock: Clock) -> tuple[RequestRecord, _Outcome]:
    """(its record, its outcome: the retry-after hint of a refusal, whether it was stopped)."""
    out = _Outcome()
    request = to_proto(item, index, opts)
    send_s = clock()
    warmup = index < opts.warmup_requests or (intended_s if intended_s >= 0 else send_s) < opts.warmup_s
    try:
        await _stream(client, request, opts, clock, out)
    except Exception as err:  # noqa: BLE001 - a record, never a crash
        out.status, out.reason = out.status or "UNKNOWN", f"{type(err).__name__}: {err}"
    return _record(request.request_id, item, index, intended_s, send_s, clock(), out, warmup), out


async def _drain(tasks: Sequence[asyncio.Task], timeout_s: float) -> list[RequestRecord]:
    if tasks:
        _, pending = await asyncio.wait(tasks, timeout=timeout_s or None)
        for task in pending:
            task.cancel()
    return list(await asyncio.gather(*tasks))


async def _until(stop: asyncio.Event | None, delay_s: float) -> bool:
    """Wait ``delay_s``; True (at once) when ``stop`` is set before then."""
    if stop is None:
        await asyncio.sleep(delay_s)
        return False
    try:
        await asyncio.wait_for(stop.wait(), delay_s)
    except asyncio.TimeoutError:
        return False
    return True


async def open_loop(client: AsyncClient, items: Sequence[TraceRequest], opts: RunOptions,
                    clock: Clock, done: Callable[[RequestRecord], None],
                    stop: asyncio.Event | None = None) -> list[RequestRecord]:
    """Send each item at its ``arrival_s`` (never waiting on earlier ones).
    When ``stop`` is set: send no more, and cancel the requests still open."""
    tasks = []
    for index, item in enumerate(items):
        while (delay_s := item.arrival_s - clock()) > 0 and not await _until(stop, delay_s):
            pass
        if stop is not None and stop.is_set():
            break
        task = asyncio.create_task(send_one(client, item, index, item.arrival_s, opts, clock))
        task.add_done_callback(lambda t: t.cancelled() or done(t.result()))
        tasks.append(task)
    return await _unless_stopped(stop, _drain(tasks, opts.drain_timeout_s), tasks)


async def closed_loop(client: AsyncClient, items: Sequence[TraceRequest], opts: RunOptions,
                      clock: Clock, done: Callable[[RequestRecord], None],
                      stop: asyncio.Event | None = None) -> list[RequestRecord]:
    """``opts.concurrency`` clients, each sending its next request when the last ends
    (after the server's retry-after hint when it refused the last one, as a real
    client backs off: else a client over a per-client limit burns the workload
    in refusals). A client that is cancelled, or sees ``stop``, sends no more."""
    queue = iter(enumerate(items))
    records: list[RequestRecord] = []

    async def client_loop() -> None:
        for index, item in queue:  # shared: each client takes the next unsent item
            if (opts.duration_s and clock() >= opts.duration_s) or (stop is not None and stop.is_set()):
                return
            record, out = await _send_one(client, item, index, -1.0, opts, clock)
            records.append(record)
            done(record)
            if out.stopped or (out.retry_after_s > 0 and await _until(stop, out.retry_after_s)):
                return

    clients = [asyncio.create_task(client_loop()) for _ in range(opts.concurrency)]
    # (a client stopped in its retry-after wait ends cancelled: not an error)
    await _unless_stopped(stop, asyncio.gather(*clients, return_exceptions=stop is not None), clients)
    return records


async def _unless_stopped(stop: asyncio.Event | None, work, tasks: Sequence[asyncio.Task]):
    """Await ``work``; if ``stop`` is set first, cancel ``tasks`` (a request
    in flight still records its outcome, CANCELLED) and then await it."""
    work = asyncio.ensure_future(work)
    if stop is not None:
        waiting = asyncio.ensure_future(stop.wait())
        await asyncio.wait((waiting, work), return_when=asyncio.FIRST_COMPLETED)
        waiting.cancel()
        for task in tasks:
            task.cancel()  # (those done already are left as they are)
    return await work

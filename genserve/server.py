"""The gRPC frontend: proto ⇄ dataclasses, no policy.

Runs on grpc.aio (uvloop where available); the engine runs on its own thread,
and events cross over with ``call_soon_threadsafe``, so neither loop starves
the other.
"""
from __future__ import annotations

import asyncio
import hashlib
import logging
from dataclasses import replace

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from genserve.convert import (TASK_FROM_PB, Validator, card_to_pb, check_request_id, event_to_pb,
                              result_to_pb)
from genserve.engine import Engine
from genserve.security import SHUTTING_DOWN, current_tenant
from genserve.types import Event, EventType, RequestError
from genserve.v1 import genserve_pb2 as pb
from genserve.v1 import genserve_pb2_grpc as pb_grpc

log = logging.getLogger("genserve.server")
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["GenServe"].full_name


def _code(status: str) -> grpc.StatusCode:
    return getattr(grpc.StatusCode, status, grpc.StatusCode.UNKNOWN)


TENANT_SEP = "\x1f"  # tenant-scoped engine ids: TENANT<sep>CLIENT_ID


def client_id(req_id: str) -> str:
    """The id the client knows (without the tenant scope)."""
    return req_id.rpartition(TENANT_SEP)[2]


RETRY_AFTER_MS = 1000  # hint sent with RESOURCE_EXHAUSTED (trailing metadata retry-after-ms)


def fingerprint(request: pb.GenerateRequest) -> str:
    """What a request asks for, without its id: resubmitting a running id
    attaches only with the same request (an id is an idempotency key)."""
    rest = pb.GenerateRequest()
    rest.CopyFrom(request)
    rest.request_id = ""
    return hashlib.sha256(rest.SerializeToString(deterministic=True)).hexdigest()


# A client's deadline fires on the client, which then cancels the call; the
# server's copy of it counts from when the call arrived, so it still has that
# transit time left (0-7 ms on loopback measured; more on a loaded machine).
DEADLINE_SLACK_S = 1.0


def _gone_status(context, budget_s: float | None) -> str:
    """Why a caller left before its request ended: its deadline (within
    DEADLINE_SLACK_S of it, and within the last half of a shorter call's
    ``budget_s``: the time it had when the handler started), or not."""
    left = context.time_remaining()
    if left is None or budget_s is None:
        return "CANCELLED"
    return "DEADLINE_EXCEEDED" if left <= min(DEADLINE_SLACK_S, budget_s / 2) else "CANCELLED"


async def _abort(context, status: str, message: str):
    if status == "RESOURCE_EXHAUSTED":
        context.set_trailing_metadata((("retry-after-ms", str(RETRY_AFTER_MS)),))
    await context.abort(_code(status), message)


class GenServeService(pb_grpc.GenServeServicer):
    def __init__(self, engine: Engine, validator: Validator):
        self.engine, self.validator = engine, validator
        self.draining = False  # set on SIGTERM: new requests get UNAVAILABLE

    async def _submit(self, request: pb.GenerateRequest, context):
        """(engine id, the call's event queue, its sink: what abandon takes).
        A refusal is counted in the metrics like a request that ended."""
        if self.draining:
            self.count_refused(request, "UNAVAILABLE")
            await context.abort(grpc.StatusCode.UNAVAILABLE, SHUTTING_DOWN)
        try:
            req = replace(self.validator.request(request), fingerprint=fingerprint(request))
            tenant = current_tenant.get()
            if tenant:  # ids are per tenant: nobody attaches to or cancels another's request
                req = replace(req, req_id=f"{tenant}{TENANT_SEP}{req.req_id}")
            events: asyncio.Queue[Event] = asyncio.Queue()
            loop = asyncio.get_running_loop()

            def sink(ev: Event) -> None:
                loop.call_soon_threadsafe(events.put_nowait, ev)

            self.engine.submit(req, sink)
        except RequestError as err:
            self.count_refused(request, err.status)
            await _abort(context, err.status, err.message)
        return req.req_id, events, sink

    def count_refused(self, request: pb.GenerateRequest, status: str) -> None:
        card = self.validator.cards.get(request.model or self.validator.defaults.get(TASK_FROM_PB.get(request.task), ""))
        # labels only from served models: a refused request's free text must not take label slots
        self.engine.metrics.request_finished(card.task if card else "", card.name if card else "",
                                             status, None, None, None)

    async def Generate(self, request, context):
        budget_s = context.time_remaining()
        req_id, events, sink = await self._submit(request, context)
        event = None
        try:
            while not (event := await events.get()).terminal:
                pass
        finally:
            if event is None or not event.terminal:  # deadline or cancel: this caller is gone
                self.engine.abandon(req_id, sink, _gone_status(context, budget_s))
        if event.type == EventType.COMPLETED:
            reply = result_to_pb(event.result)
            reply.request_id = client_id(req_id)
            return reply
        await _abort(context, event.status, event.reason)

    async def GenerateStream(self, request, context):
        budget_s = context.time_remaining()
        req_id, events, sink = await self._submit(request, context)
        finished = False
        try:
            while not finished:
                event = await events.get()
                finished = event.terminal
                if event.status == "ALREADY_EXISTS":  # refused, never accepted: a gRPC error like other refusals
                    await _abort(context, event.status, event.reason)
                msg = event_to_pb(event)
                msg.request_id = client_id(req_id)
                if msg.HasField("response"):
                    msg.response.request_id = msg.request_id
                yield msg
        finally:
            # Cancelled, past its deadline, or closed by a client that stopped
            # reading (GeneratorExit): the request ends with its last caller.
            if not finished:
                self.engine.abandon(req_id, sink, _gone_status(context, budget_s))

    async def Cancel(self, request, context):
        try:  # what Generate would refuse cannot name a request
            check_request_id(request.request_id, empty_ok=False)
        except RequestError as err:
            await _abort(context, err.status, err.message)
        loop = asyncio.get_running_loop()
        tenant = current_tenant.get()
        req_id = f"{tenant}{TENANT_SEP}{request.request_id}" if tenant else request.request_id
        cancelled = await loop.run_in_executor(None, self.engine.cancel, req_id)
        return pb.CancelResponse(cancelled=cancelled)

    async def ListModels(self, request, context):
        defaults = set(self.validator.defaults.values())
        return pb.ListModelsResponse(models=[card_to_pb(c, c.name in defaults, self.engine.sp_degree_of(c.name))
                                             for c in self.validator.cards.values()])


class _UndeliveredResponse(logging.Filter):
    """grpc logs a response its client would not take (over the client's
    receive limit, or the call already gone) as an ERROR with a core traceback
    (ExecuteBatchError); it is the client's doing and the server goes on, so
    it becomes one WARNING line that says what to do."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if type(exc).__name__ == "ExecuteBatchError":
            method = record.getMessage().rpartition("[")[2].rstrip("]") or "a call"
            record.levelno, record.levelname = logging.WARNING, "WARNING"
            record.msg = ("the response to %s was not delivered: the client closed the call or "
                          "refused the message (larger than its receive limit? genserve's client "
                          "accepts 512 MiB; raise grpc.max_receive_message_length in others)")
            record.args, record.exc_info, record.exc_text = (method,), None, None
        return True


def _quiet_undelivered() -> None:
    core = logging.getLogger("grpc._cython.cygrpc")
    if not any(isinstance(f, _UndeliveredResponse) for f in core.filters):
        core.addFilter(_UndeliveredResponse())


def bare_host(host: str) -> str:
    """``host`` without the brackets an IPv6 literal may come in (``[::1]``)."""
    return host[1:-1] if host.startswith("[") and host.endswith("]") else host


def host_port(host: str, port: int) -> str:
    """``HOST:PORT`` as gRPC addresses and URLs write it: an IPv6 literal
    (bracketed or not) in brackets, since its own colons would split it."""
    host = bare_host(host)
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


async def start_grpc(service: GenServeService, host: str, port: int, max_message_bytes: int, *,
                     credentials: grpc.ServerCredentials | None = None, interceptors: tuple = ()
                     ) -> tuple[grpc.aio.Server, int, health.aio.HealthServicer]:
    """Start the gRPC server with health and reflection; returns the bound port.
    With ``credentials`` it listens with TLS only (see genserve.security)."""
    _quiet_undelivered()
    server = grpc.aio.server(interceptors=interceptors, options=[
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", 512 << 20),  # videos can be large
        ("grpc.so_reuseport", 0),
    ])
    pb_grpc.add_GenServeServicer_to_server(service, server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
         reflection.SERVICE_NAME), server)
    address = host_port(host, port)
    bound = server.add_secure_port(address, credentials) if credentials else server.add_insecure_port(address)
    if bound == 0:
        raise RuntimeError(f"cannot listen on {address}")
    await server.start()
    serving = health_pb2.HealthCheckResponse.SERVING
    await health_servicer.set("", serving)
    await health_servicer.set(SERVICE_NAME, serving)
    return server, bound, health_servicer

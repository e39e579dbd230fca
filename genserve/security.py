"""Transport security and admission at the gRPC edge: TLS / mutual TLS
(its files: tls.py), bearer-token authentication, and a cap on concurrent
generations per client.

``config.Security`` says what is wanted and validates without I/O;
``load_security`` reads the files named there (certificates, the token file)
and returns what ``start_grpc`` needs. Loading fails early, before any worker
starts, with a ``SecurityError`` naming the file and line.

Choices worth knowing:

- The gRPC health service and server reflection need no token, so Kubernetes
  probes and ``grpcurl list`` work without a secret. They reveal only that the
  server is up and the public API's shape. Under mutual TLS every call,
  these included, still needs a client certificate: TLS is decided before any
  method is known.
- A client's identity for the stream limit is its tenant when tokens are on,
  else the host part of its peer address (clients behind one proxy or NAT share
  one budget then).
- Tokens are compared in constant time: every known token's SHA-256 is
  compared with ``hmac.compare_digest``, with no early exit.
"""
from __future__ import annotations

import contextvars
import hashlib
import hmac
import inspect
import logging
from dataclasses import dataclass
from typing import Callable

import grpc

from genserve.config import Security
# TLS files (tls.py); channel_credentials and SecurityError are this module's API too
from genserve.tls import SecurityError, channel_credentials, read_file, server_credentials
from genserve.v1 import genserve_pb2 as pb

log = logging.getLogger("genserve.security")

_SERVICE = pb.DESCRIPTOR.services_by_name["GenServe"].full_name
LIMITED_METHODS = frozenset(f"/{_SERVICE}/{m}" for m in ("Generate", "GenerateStream"))
OPEN_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.v1alpha.ServerReflection/",
                 "/grpc.reflection.v1.ServerReflection/")
MISSING_TOKEN = "missing credentials: send metadata 'authorization: Bearer <token>'"
BAD_TOKEN = "invalid bearer token"
SHUTTING_DOWN = "server is shutting down; retry on another replica"

# The authenticated tenant of the call being served ("" without token auth).
current_tenant: contextvars.ContextVar[str] = contextvars.ContextVar("genserve_tenant", default="")


# ---- tokens ---------------------------------------------------------------
class TokenTable:
    """Bearer tokens and their tenants. Holds digests, never compares raw
    tokens, and looks at every entry on each check."""

    def __init__(self, tokens: dict[str, str]):
        self._entries = [(_digest(token), tenant) for token, tenant in tokens.items()]

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def tenants(self) -> set[str]:
        return {tenant for _, tenant in self._entries}

    def tenant(self, token: str) -> str | None:
        """The tenant owning ``token``, or None."""
        probe, found = _digest(token), None
        for digest, tenant in self._entries:
            if hmac.compare_digest(probe, digest) and found is None:
                found = tenant
        return found


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()


def parse_tokens(text: str, source: str = "<tokens>") -> TokenTable:
    """``TOKEN TENANT`` per line; ``#`` starts a comment; blank lines are
    skipped. Tokens are printable ASCII without spaces (they travel in an HTTP
    header) and unique. Raises SecurityError naming the first bad line."""
    tokens: dict[str, str] = {}
    text = text.removeprefix("\ufeff")  # a byte-order mark some editors write
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        where = f"{source} line {number}"
        fields = line.split()
        if len(fields) != 2:
            raise SecurityError(f"{where}: expected 'TOKEN TENANT', found {len(fields)} field(s)")
        token, tenant = fields
        if not (token.isascii() and token.isprintable()):
            raise SecurityError(f"{where}: the token must be printable ASCII")
        if not tenant.isprintable():
            raise SecurityError(f"{where}: the tenant must be printable")
        if token in tokens:
            raise SecurityError(f"{where}: duplicate token (also used for tenant {tokens[token]!r})")
        tokens[token] = tenant
    if not tokens:
        raise SecurityError(f"{source}: no tokens (every request would be refused)")
    return TokenTable(tokens)


def bearer_token(metadata) -> str | None:
    """The token of the first ``authorization: Bearer ...`` entry, or None."""
    for key, value in metadata or ():
        if key == "authorization":
            if isinstance(value, bytes):
                value = value.decode("latin-1")
            scheme, _, token = value.strip().partition(" ")
            return token.strip() if scheme.lower() == "bearer" and token.strip() else None
    return None


# ---- the interceptor ------------------------------------------------------
class StreamCounter:
    """In-flight calls per client key. Used from the event loop thread only,
    so it needs no lock; keys at zero are dropped so the map stays small."""

    def __init__(self, limit: int):
        self.limit = limit
        self.active: dict[str, int] = {}

    def acquire(self, key: str) -> bool:
        n = self.active.get(key, 0)
        if n >= self.limit:
            return False
        self.active[key] = n + 1
        return True

    def release(self, key: str) -> None:
        n = self.active.get(key, 0) - 1
        if n > 0:
            self.active[key] = n
        else:
            self.active.pop(key, None)


def client_key(tenant: str, peer: str) -> str:
    """The identity a stream budget belongs to: the tenant, else the peer's host."""
    if tenant:
        return "tenant:" + tenant
    host = peer.rsplit(":", 1)[0] if peer.startswith(("ipv4:", "ipv6:")) else peer
    return "peer:" + host


class Gate(grpc.aio.ServerInterceptor):
    """Authenticates calls (when ``tokens`` is set) and caps concurrent
    Generate/GenerateStream calls per client (when ``max_streams`` > 0).

    Refusals: UNAUTHENTICATED (no or unknown token; the token is never
    echoed), RESOURCE_EXHAUSTED (over the limit; with ``retry-after-ms``
    trailing metadata) and INVALID_ARGUMENT (request bytes that do not parse,
    which grpc.aio alone would answer UNKNOWN). A slot is taken when the call
    starts and given back exactly once when it ends in any way: result, error,
    client cancel or deadline.
    """

    def __init__(self, tokens: TokenTable | None, max_streams: int,
                 refused: Callable[..., None] = lambda status, request=None: None,
                 draining: Callable[[], bool] = lambda: False):
        self.tokens = tokens
        self.streams = StreamCounter(max_streams) if max_streams > 0 else None
        # told the status (and the request, once parsed) of each generation
        # refused here: the request metrics
        self.refused = refused
        # a draining server sends every new call elsewhere, a client at its limit too
        self.draining = draining

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None or details.method.startswith(OPEN_PREFIXES):
            return handler
        tenant = ""
        if self.tokens is not None:
            token = bearer_token(details.invocation_metadata)
            tenant = self.tokens.tenant(token) if token else None
            if tenant is None:
                log.debug("refused %s: %s", details.method, "bad token" if token else "no token")
                if details.method in LIMITED_METHODS:
                    self.refused("UNAUTHENTICATED")
                return _deny(handler, grpc.StatusCode.UNAUTHENTICATED, BAD_TOKEN if token else MISSING_TOKEN)
        limited = details.method in LIMITED_METHODS
        return _wrap(handler, tenant, self.streams if limited else None,
                     self.refused if limited else lambda status, request=None: None, self.draining)


def _deny(handler, code: grpc.StatusCode, message: str):
    """``handler``'s shape with a body that only refuses; the request bytes
    are not even parsed."""
    async def refuse(request, context):
        await context.abort(code, message)

    async def refuse_stream(request, context):
        await context.abort(code, message)
        yield  # pragma: no cover  (makes this an async generator)

    if handler.response_streaming:
        kind = "stream_stream" if handler.request_streaming else "unary_stream"
        body = refuse_stream
    else:
        kind = "stream_unary" if handler.request_streaming else "unary_unary"
        body = refuse
    return handler._replace(request_deserializer=None, **{kind: body})


def _wrap(handler, tenant: str, counter: StreamCounter | None, refused: Callable[..., None],
          draining: Callable[[], bool] = lambda: False):
    """``handler`` with the tenant set for the servicer and, for limited
    methods, a stream slot held for the call's lifetime. The slot is given
    back when the body returns or raises (before the client sees the end, so a
    client at its limit may start its next call at once) or, at the latest,
    when the RPC ends: an abandoned stream's generator may never resume."""
    if handler.request_streaming:  # GenServe has none; nothing to add for them
        return handler
    handler = _parse_safely(handler)

    async def admit(context, request):
        """Returns the release function (idempotent)."""
        current_tenant.set(tenant)
        if counter is None:
            return lambda: None
        if draining():  # not RESOURCE_EXHAUSTED, whose retry-after-ms says "retry here"
            refused("UNAVAILABLE", request)
            await context.abort(grpc.StatusCode.UNAVAILABLE, SHUTTING_DOWN)
        key = client_key(tenant, context.peer())
        if not counter.acquire(key):
            refused("RESOURCE_EXHAUSTED", request)
            context.set_trailing_metadata((("retry-after-ms", "1000"),))
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                f"too many concurrent generations from this client (limit "
                                f"{counter.limit} per client); retry when one finishes")
        held = [True]

        def release(*_):
            if held[0]:
                held[0] = False
                counter.release(key)
        context.add_done_callback(release)
        return release

    if not handler.response_streaming:
        inner = handler.unary_unary

        async def unary(request, context):
            await _refuse_malformed(request, context, refused)
            release = await admit(context, request)
            try:
                return await inner(request, context)
            finally:
                release()
        return handler._replace(unary_unary=unary)

    inner_stream = handler.unary_stream
    if not inspect.isasyncgenfunction(inner_stream):  # a coroutine using context.write
        async def writer(request, context):
            await _refuse_malformed(request, context, refused)
            release = await admit(context, request)
            try:
                return await inner_stream(request, context)
            finally:
                release()
        return handler._replace(unary_stream=writer)

    async def stream(request, context):
        await _refuse_malformed(request, context, refused)
        release = await admit(context, request)
        try:
            async for item in inner_stream(request, context):
                yield item
        finally:
            release()
    return handler._replace(unary_stream=stream)


class _Malformed:
    """Stands in for a request whose bytes did not parse."""

    def __init__(self, error: Exception):
        self.error = error


def _parse_safely(handler):
    """A deserializer that never raises: grpc.aio would answer UNKNOWN with
    the parser's exception text; we answer INVALID_ARGUMENT instead."""
    parse = handler.request_deserializer
    if parse is None:
        return handler

    def parse_or_mark(data: bytes):
        try:
            return parse(data)
        except Exception as err:  # the parser's own errors (DecodeError, ...)
            return _Malformed(err)
    return handler._replace(request_deserializer=parse_or_mark)


async def _refuse_malformed(request, context, refused: Callable[..., None]) -> None:
    if isinstance(request, _Malformed):
        refused("INVALID_ARGUMENT")
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "request: the message does not parse "
                            f"({type(request.error).__name__})")


# ---- assembly -------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class LoadedSecurity:
    """What ``start_grpc`` needs, with the files already read."""

    credentials: grpc.ServerCredentials | None
    interceptors: tuple
    summary: str  # one line for the start-up log


def load_security(sec: Security, refused: Callable[..., None] = lambda status, request=None: None,
                  draining: Callable[[], bool] = lambda: False) -> LoadedSecurity:
    """Read the files ``sec`` names. Raises SecurityError on any problem.
    ``refused`` is told the status of each generation refused at the edge;
    ``draining`` says whether the server is shutting down."""
    sec.validate()
    credentials = server_credentials(sec)
    tokens = None
    if sec.auth_tokens:
        tokens = parse_tokens(read_file(sec.auth_tokens, "--auth-tokens").decode("utf-8", "replace"),
                              sec.auth_tokens)
    parts = ["mutual TLS" if sec.tls_client_ca else "TLS" if credentials else "plaintext",
             f"token auth ({len(tokens.tenants)} tenant(s))" if tokens else "no auth",
             f"max {sec.max_streams_per_client} streams per client" if sec.max_streams_per_client
             else "no per-client stream limit"]
    # Always installed: it also turns unparsable requests into INVALID_ARGUMENT.
    return LoadedSecurity(credentials, (Gate(tokens, sec.max_streams_per_client, refused, draining),), ", ".join(parts))


def exposure_warnings(host: str, sec: Security) -> list[str]:
    """Warnings for a server reachable beyond this host without protection."""
    if host in ("127.0.0.1", "localhost", "::1"):
        return []
    out = []
    if not sec.tls_cert:
        out.append(f"listening on {host} without TLS: requests and media travel in clear text")
    if not sec.auth_tokens and not sec.tls_client_ca:
        out.append(f"listening on {host} without authentication: anyone who can reach it can submit work")
    return out

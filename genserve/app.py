"""Assembly: workers → cost model and policy → engine → gRPC frontend."""
from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import threading
import time
from dataclasses import replace

from genserve import __version__
from genserve.config import CAPPED_FIELDS, Limits, ServerConfig
from genserve.convert import Validator
from genserve.engine import Engine
from genserve.metrics import Metrics
from genserve.profile import warm_up_sp
from genserve.scheduler import (DecodeSample, LatencyModel, Profile, ProfileError, StepSample,
                                load_profile, make_policy)
from genserve.security import exposure_warnings, load_security
from genserve.server import SERVICE_NAME, GenServeService, bare_host, host_port, start_grpc
from genserve.workers.executor import (InProcessExecutor, MultiprocessExecutor, WorkerStartError,
                                       make_worker_specs)
from genserve.workers.protocol import ModelCard

log = logging.getLogger("genserve")
WORKERS_HEALTH_SERVICE = "genserve.workers"


class ListenError(OSError):
    """A port the server needs cannot be listened on."""


def check_listen(host: str, port: int, what: str) -> None:
    """ListenError unless ``host:port`` can be bound now: asked before the
    workers load models (minutes for real checkpoints), so a port already in
    use or a bad host is one line at once. (Binding for real may still fail
    in a race; serve() reports that the same way.)"""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as err:
        raise ListenError(f"cannot listen on {host_port(host, port)} ({what}): {err.strerror}") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as servers do: TIME_WAIT is no conflict
        try:
            s.bind(address)
        except OSError as err:
            raise ListenError(f"cannot listen on {host_port(host, port)} ({what}): {err.strerror}") from None


def _stop_starting(signum, frame) -> None:
    log.info("%s during start-up: stopping the workers", signal.Signals(signum).name)
    raise SystemExit(128 + signum)


def threads_per_worker(config: ServerConfig) -> int:
    """Each CPU worker gets its share of the cores, so workers don't fight
    over them and measured step times stay honest."""
    if config.threads_per_worker > 0:
        return config.threads_per_worker
    if config.device == "cuda":
        return 1
    return max(1, (os.cpu_count() or 1) // config.num_workers)


def build_cost_model(profile: str, ready: dict, sp_steps: list[StepSample] = ()) -> LatencyModel:
    """The named profile; served models it lacks are profiled from the
    workers' warm-up timings (and ``sp_steps``, their SP steps measured at
    start-up: ``warm_up_sp``). Either way the model keeps calibrating online
    from measured steps. ProfileError when the profile has a served model's
    name for the other task: a profile of other models, not one to mix."""
    warmups = {w.model: w for r in ready.values() for w in r.warmups}  # one per model suffices
    cards = {c.name: c for r in ready.values() for c in r.models}
    base = load_profile(profile) if profile else None
    known = {m.name for m in base.models} if base else set()
    wrong = [f"model {m.name!r} serves {cards[m.name].task} but profile {base.name!r} has it as {m.task}"
             for m in (base.models if base else ()) if m.name in cards and cards[m.name].task != m.task]
    if wrong:
        raise ProfileError("; ".join(wrong) + " (use a profile of these models, e.g. from `genserve profile`, "
                           "rename the model, or leave out --profile)")
    missing = [w for name, w in warmups.items() if name not in known]
    if not missing:
        return LatencyModel(base)
    measured = {w.model for w in missing}
    warm = Profile.from_measurements(
        "warm-up",
        steps=[StepSample(w.model, cards[w.model].task, w.width, w.height, w.num_frames, 1, 1, w.step_ms)
               for w in missing] + [s for s in sp_steps if s.model in measured],
        decodes=[DecodeSample(w.model, w.width, w.height, w.num_frames, 1, w.decode_ms) for w in missing],
        encode_ms={w.model: w.encode_ms for w in missing},
        default_steps={w.model: cards[w.model].limits.default_steps for w in missing},
        hardware="measured at start-up")
    if base is None:
        return LatencyModel(warm)
    return LatencyModel(replace(base, models=base.models + warm.models))


def served_cards(cards, limits: Limits) -> dict[str, ModelCard]:
    """The loaded models' cards with the operator's caps applied
    (``Limits.effective``). A default the caps lowered is logged: requests
    that leave the field unset now get the lower value."""
    served = {}
    for card in cards:
        own, capped = card.limits, limits.effective(card.name, card.limits)
        for cap, field in CAPPED_FIELDS.items():
            default = cap.replace("max_", "default_")
            if getattr(capped, default) != getattr(own, default):
                log.info("model %s: default %s lowered from %d to %d by --%s %d", card.name, field,
                         getattr(own, default), getattr(capped, default), cap.replace("_", "-"),
                         getattr(limits, cap))
        served[card.name] = replace(card, limits=capped)
    return served


class Server:
    """A running GenServe: call ``start_workers`` (blocking), then ``serve``."""

    def __init__(self, config: ServerConfig):
        config.validate()
        # an IPv6 host may come bracketed ("[::1]"); sockets take it bare
        self.config = config = replace(config, host=bare_host(config.host))
        self.metrics = Metrics(version=__version__, policy=config.engine.policy, device_kind=config.device)
        self.engine: Engine | None = None
        self.port = 0
        self.service: GenServeService | None = None  # made by serve()
        # reads certificates and tokens: fail before workers start
        self.security = load_security(config.security, refused=self._refused_at_the_edge,
                                      draining=lambda: self.service is not None and self.service.draining)
        if config.port:  # (0: any free port)
            check_listen(config.host, config.port, "gRPC, --port")
        if config.metrics_port:
            check_listen(config.host, config.metrics_port, "--metrics-port")

    def _refused_at_the_edge(self, status: str, request=None) -> None:
        """Count a generation the security gate refused: labelled by its
        model once the request is parsed (a stream limit, the drain), else
        task and model unknown (a missing token)."""
        if request is not None and self.service is not None:
            self.service.count_refused(request, status)
        else:
            self.metrics.request_finished("", "", status, None, None, None)

    def start_workers(self) -> None:
        c = self.config
        specs = make_worker_specs(c.device, c.num_workers, c.models, c.dtype, threads_per_worker(c),
                                  c.max_sp_degree, c.paused_budget_mb, c.attention,
                                  logging.getLogger().getEffectiveLevel(), c.limits, c.log_format)
        executor = (InProcessExecutor if c.in_process else MultiprocessExecutor)(specs)
        t0 = time.perf_counter()
        log.info("starting %d %s worker(s) with models %s", len(specs), c.device, ", ".join(c.models))
        # SIGTERM while models load (a rollout, a restart) stops the workers
        # too: they would otherwise load on, orphaned, holding their devices
        main = threading.current_thread() is threading.main_thread()
        previous = signal.signal(signal.SIGTERM, _stop_starting) if main else None
        try:
            ready = executor.start()
            log.info("workers ready in %.1f s", time.perf_counter() - t0)
            # the presets were checked before the workers started; checkpoints and tasks only now
            cards = served_cards(ready[0].models, c.limits)
            sp_steps = self._warm_up_sp(executor, cards)
            cost = build_cost_model(c.engine.profile, ready, sp_steps)
        except ValueError as err:
            executor.shutdown()
            raise WorkerStartError(str(err)) from None
        except BaseException:  # Ctrl-C and SIGTERM included
            executor.shutdown(timeout_s=2.0)
            raise
        finally:
            if main:
                signal.signal(signal.SIGTERM, previous)
        self.metrics.prepare(len(specs))
        engine = Engine(c.engine, executor,
                        lambda spec: make_policy(c.engine.policy, spec,
                                                 admission_control=c.engine.admission_control,
                                                 chunk_ms=c.engine.chunk_ms),
                        cost, self.metrics, cards, c.limits.max_queue)
        self.engine = engine
        engine.start()

    @staticmethod
    def _warm_up_sp(executor, cards: dict[str, ModelCard]) -> list[StepSample]:
        """SP steps of the video models on every block (``warm_up_sp``);
        WorkerStartError when one fails: a model or world that cannot run
        what the plans would send it is found now, not on a request."""
        if executor.max_sp_degree < 2:
            return []
        for card in cards.values():
            if card.task == "video" and card.max_sp_degree < executor.max_sp_degree:
                log.info("model %s: its attention heads split evenly over at most %d devices, so its "
                         "videos run on at most %d", card.name, card.max_sp_degree, card.max_sp_degree)
        t0 = time.perf_counter()
        try:
            samples = warm_up_sp(executor, cards)
        except RuntimeError as err:
            raise WorkerStartError(f"sequence-parallel warm-up failed: {err} (--max-sp-degree 1 serves "
                                   "without SP)") from None
        if samples:
            log.info("SP warmed up in %.1f s", time.perf_counter() - t0)
        return samples

    async def serve(self, ready_callback=None) -> None:
        """Serve gRPC until SIGINT/SIGTERM, then drain and stop."""
        c, engine = self.config, self.engine
        validator = Validator(engine.cards, c.limits)
        self.service = service = GenServeService(engine, validator)
        server = None
        try:
            server, self.port, health = await start_grpc(service, c.host, c.port, c.limits.max_message_bytes,
                                                         credentials=self.security.credentials,
                                                         interceptors=self.security.interceptors)
            metrics_http = self.metrics.start_http_server(c.metrics_port, c.host) if c.metrics_port else None
        except (RuntimeError, OSError) as err:  # taken since check_listen looked (grpc raises RuntimeError)
            if server is not None:  # stopped on this loop: left to __del__, it tracebacks on a closed one
                await server.stop(None)
            engine.stop()
            engine.executor.shutdown()
            raise ListenError(f"cannot listen on {host_port(c.host, c.port)} or metrics port {c.metrics_port}: "
                              f"{err}") from None
        log.info("gRPC security: %s", self.security.summary)
        for warning in exposure_warnings(c.host, c.security):
            log.warning("%s", warning)
        loop = asyncio.get_running_loop()
        num_devices = engine.executor.num_devices
        await set_workers_health(health, len(engine.down), num_devices)
        engine.on_workers_down = lambda num_down: loop.call_soon_threadsafe(
            lambda: loop.create_task(set_workers_health(health, num_down, num_devices)))
        stop = asyncio.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        if ready_callback:
            ready_callback(self)
        await stop.wait()
        stop.clear()  # a second SIGINT/SIGTERM cuts the drain short
        await self._drain(service, health, c.grace_s, stop)
        await server.stop(grace=1.0)
        engine.stop()
        engine.executor.shutdown()
        if metrics_http is not None:
            metrics_http.shutdown()
        log.info("stopped")

    async def _drain(self, service: GenServeService, health, grace_s: float, cut: asyncio.Event) -> None:
        """Health goes NOT_SERVING and new requests get UNAVAILABLE; requests
        already accepted get up to ``grace_s`` to finish, or until ``cut``."""
        service.draining = True
        await health.enter_graceful_shutdown()
        log.info("draining: %d unfinished request(s), up to %.0f s (signal again to stop now)",
                 self.engine.num_unfinished, grace_s)
        deadline = time.monotonic() + grace_s
        while self.engine.num_unfinished and time.monotonic() < deadline and not cut.is_set():
            await asyncio.sleep(0.05)
        if self.engine.num_unfinished:
            second = cut.is_set()
            log.warning("%s: %d request(s) end UNAVAILABLE", "a second signal" if second else "grace period over",
                        self.engine.num_unfinished)
            why = "a second stop signal" if second else f"its {grace_s:g} s grace period ended"
            self.engine.end_all("UNAVAILABLE", f"the server shut down before this request finished ({why}); "
                                               "retry on another replica")
            deadline = time.monotonic() + 2.0  # the callers are told before the gRPC server stops
            while self.engine.num_unfinished and time.monotonic() < deadline:
                await asyncio.sleep(0.02)


async def set_workers_health(health, num_down: int, num_devices: int) -> None:
    """The ``genserve.workers`` health service is NOT_SERVING while any worker
    is down (degraded: the server still serves on the others); the server's
    own ("" and GenServe, what probes and load balancers check) while every
    worker is down, when new calls get UNAVAILABLE. (Ignored once draining.)"""
    from grpc_health.v1 import health_pb2

    serving, not_serving = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
    await health.set(WORKERS_HEALTH_SERVICE, serving if num_down == 0 else not_serving)
    for service in ("", SERVICE_NAME):
        await health.set(service, serving if num_down < num_devices else not_serving)


def run_server(config: ServerConfig, ready_callback=None) -> None:
    server = Server(config)
    server.start_workers()
    try:
        import uvloop
        uvloop.run(server.serve(ready_callback))
    except ImportError:
        asyncio.run(server.serve(ready_callback))


__all__ = ["Server", "run_server", "SERVICE_NAME"]

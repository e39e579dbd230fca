"""Starting a worker: load its models, join the SP world, warm up, and the
spawned process's entry point (``worker_main``).

Every start-up failure is one ``StartFailed`` naming the worker (and the
model, for a warm-up), so the engine reports one line rather than a
traceback from each process.
"""
from __future__ import annotations

import logging
import signal
import threading
import time

from genserve import logs
from genserve.config import Limits
from genserve.models.base import GenParams, ModelLimits, synchronize
from genserve.models.media import encode_media
from genserve.types import DEFAULT_FORMAT, DEFAULT_FPS
from genserve.workers import protocol as P
from genserve.workers.parallel import Groups
from genserve.workers.worker import Worker, WorkerSpec

log = logging.getLogger("genserve.worker")


class WarmUpError(RuntimeError):
    """A model loaded but its warm-up request failed."""


class StartFailed(RuntimeError):
    """A worker could not load its models or warm them up; the message names
    the worker (and the model, for a warm-up)."""


def load(spec: WorkerSpec) -> Worker:
    """The worker of ``spec`` with its models loaded and its SP world joined."""
    import torch

    from genserve.models.registry import build_model
    from genserve.models.sp import check_backend

    check_backend(spec.attention, spec.device)  # before minutes of loading
    if spec.num_threads > 0:
        torch.set_num_threads(spec.num_threads)
    if spec.device.startswith("cuda"):
        torch.cuda.set_device(torch.device(spec.device))
    dtype = getattr(torch, spec.dtype)
    models = {}
    for model_spec in spec.model_specs:
        adapter = build_model(model_spec, device=spec.device, dtype=dtype)
        adapter.set_attention(spec.attention)
        models[adapter.name] = adapter
    groups = Groups.join(spec.dist, spec.device_id, spec.device) if spec.dist else None
    return Worker(spec, models, groups)


def warm_up(models: dict, caps: Limits = Limits()) -> tuple[P.Warmup, ...]:
    """Run a short request per model twice, through decoding and encoding
    its output in the default format (as a request's decode is measured):
    the first pays one-time costs (lazy imports, allocator, kernels, the
    codec's set-up) before real traffic; the second is
    measured for the latency model when no profile is given. Each runs at
    its served default shape (``Limits.effective``: the model's own, lowered
    by the caps), a shape requests can have. WarmUpError, naming the model,
    when one fails (a bad shape, an OOM)."""
    out = []
    for model in models.values():
        try:
            limits = caps.effective(model.name, model.limits)
            out.append([_warm_once(model, limits) for _ in range(2)][-1])
        except Exception as exc:
            raise WarmUpError(f"model {model.name}: {exc}") from exc
    return tuple(out)


def _warm_once(model, lim: ModelLimits) -> P.Warmup:
    params = GenParams("warm-up", "", lim.default_width, lim.default_height,
                       lim.default_frames, 2, lim.default_guidance_scale, 0)
    device = getattr(model, "device", "cpu")
    t0 = time.perf_counter()
    state = model.prepare(params, model.encode_prompt(params))
    synchronize(device)
    t1 = time.perf_counter()
    model.denoise_step([state])
    synchronize(device)
    t2 = time.perf_counter()
    model.denoise_step([state])
    synchronize(device)
    t3 = time.perf_counter()
    encode_media(model.decode(state), DEFAULT_FORMAT[model.task], DEFAULT_FPS)
    t4 = time.perf_counter()
    return P.Warmup(model.name, params.width, params.height, params.num_frames,
                    (t1 - t0) * 1e3, min(t2 - t1, t3 - t2) * 1e3, (t4 - t3) * 1e3)


def max_sp_degree(model, largest: int = 8) -> int:
    """The largest power of two up to ``largest`` that ``model`` can run a
    step at (every smaller power too); 1 for a model with no SP path."""
    supports = getattr(model, "supports_sp", None)
    degree = 1
    while supports is not None and degree * 2 <= largest and supports(degree * 2):
        degree *= 2
    return degree


def boot(spec: WorkerSpec) -> tuple[Worker, P.Ready]:
    """Load the models and warm them up: the worker and its Ready message,
    which says it may take steps."""
    t0 = time.perf_counter()
    try:
        worker = load(spec)
    except Exception as exc:
        raise StartFailed(f"worker {spec.device_id} failed to load models: {exc}") from exc
    load_s = time.perf_counter() - t0
    try:
        warmups = warm_up(worker.models, spec.caps)
    except WarmUpError as exc:
        raise StartFailed(f"worker {spec.device_id} failed to warm up {exc}") from exc
    cards = tuple(P.ModelCard(m.name, m.task, m.limits, max_sp_degree(m)) for m in worker.models.values())
    return worker, P.Ready(spec.device_id, cards, load_s, warmups)


def _bars_lock_in_process() -> None:
    """Give tqdm (the loading bars of diffusers and transformers) a thread
    lock. Its default one holds a multiprocessing RLock: a named semaphore
    registered with the server's resource tracker, which a worker killed
    with SIGKILL (a crash, a hung worker) never unregisters, so the server
    warns of "leaked semaphore objects" at exit. A spawned worker shares
    its bars with no other process: a thread lock is all they need."""
    import tqdm

    tqdm.tqdm.set_lock(threading.RLock())


def worker_main(spec: WorkerSpec, conn) -> None:
    """Entry point of a spawned worker process."""
    # Ctrl-C at a terminal, `timeout`, `kill -- -PGID` and systemd's default
    # KillMode=control-group signal every process of the group: the server
    # drains and then stops its workers (a Shutdown; a kill at start-up or when
    # one does not stop), so a worker ignores SIGINT and SIGTERM rather than die
    # mid-step, failing what the drain would finish. It still ends when the
    # server does: its pipe closes (SIGKILL and SIGSTOP, which the watchdog
    # uses, cannot be ignored).
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    logs.configure(spec.log_level, spec.log_format, f"worker{spec.device_id}")
    _bars_lock_in_process()
    try:
        worker, ready = boot(spec)
    except StartFailed as exc:  # the engine logs the message; the traceback with --verbose
        log.debug("failed to start", exc_info=True)
        conn.send(P.Failed("", "INTERNAL", str(exc)))
        raise SystemExit(1) from None
    try:
        worker.serve(conn, ready)
    except Exception:  # logged here, in --log-format, not by multiprocessing's bare print
        log.critical("worker %d stopped on an unexpected error", spec.device_id, exc_info=True)
        raise SystemExit(1) from None

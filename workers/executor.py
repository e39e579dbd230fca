"""Executors: how the engine reaches its workers.

One interface, two backends. ``MultiprocessExecutor`` spawns one process per
device (serving); ``InProcessExecutor`` runs the same worker loop in threads
(unit tests, debugging). Both talk over local pipes, so the engine's code path
is identical: ``send`` a message to a device, ``wait`` for replies, notice a
dead worker, ``kill`` a hung one, ``restart`` it.
"""
from __future__ import annotations

import contextlib
import logging
import multiprocessing as mp
import os
import signal
import threading
import time
from dataclasses import dataclass, replace
from multiprocessing.connection import Connection, wait

from genserve.config import Limits
from genserve.workers import protocol as P
from genserve.workers.parallel import DistSpec, dist_spec, remove_world
from genserve.workers.startup import StartFailed, boot, worker_main
from genserve.workers.worker import Worker, WorkerSpec

log = logging.getLogger("genserve.executor")


class WorkerStartError(RuntimeError):
    """The workers could not start (no such device, a model failed to load, a
    worker not ready in time): the command reports it and exits."""


@dataclass(frozen=True, slots=True)
class WorkerDied:
    """Reported by ``wait`` when a worker process exits unexpectedly."""

    device_id: int
    exitcode: int | None


class _Waker:
    """A self-pipe so another thread can interrupt ``Executor.wait``."""

    def __init__(self):
        self.reader, self._writer = mp.Pipe(duplex=False)
        self._lock = threading.Lock()

    def wake(self) -> None:
        with self._lock:
            self._writer.send_bytes(b"w")

    def drain(self) -> None:
        while self.reader.poll():
            self.reader.recv_bytes()


class Executor:
    """Base: pipes and waiting. Subclasses start and stop the workers."""

    def __init__(self, specs: list[WorkerSpec]):
        self.specs = {s.device_id: s for s in specs}
        self.conns: dict[int, Connection] = {}
        self.ready: dict[int, P.Ready] = {}
        self._waker = _Waker()
        self._send_lock = threading.Lock()
        self.configured_sp_degree = self.max_sp_degree  # what a crash takes away and a rejoin restores
        # rendezvous folders of every world made for these workers, removed at shutdown
        self._worlds: list[DistSpec] = [s.dist for s in specs[:1] if s.dist]

    @property
    def num_devices(self) -> int:
        return len(self.specs)

    @property
    def max_sp_degree(self) -> int:
        """The largest SP block the workers can form (1: no process groups)."""
        dists = [s.dist for s in self.specs.values()]
        return dists[0].max_block if dists and all(dists) else 1

    def start(self, timeout_s: float = 600.0) -> dict[int, P.Ready]:
        for device_id in self.specs:
            self._start_one(device_id)
        return self.await_ready(list(self.specs), timeout_s)

    def await_ready(self, device_ids: list[int], timeout_s: float) -> dict[int, P.Ready]:
        deadline = time.monotonic() + timeout_s
        for device_id in device_ids:
            conn = self.conns[device_id]
            if not conn.poll(max(0.0, deadline - time.monotonic())):
                raise WorkerStartError(f"worker {device_id} did not become ready in {timeout_s:.0f} s")
            try:
                msg = conn.recv()
            except (EOFError, OSError):  # it died before a word (killed, out of memory)
                raise WorkerStartError(f"worker {device_id} exited before it was ready "
                                       f"(exit code {self._exitcode(device_id)})") from None
            if not isinstance(msg, P.Ready):
                raise WorkerStartError(getattr(msg, "message", f"worker {device_id} failed to start"))
            self.ready[device_id] = msg
        return dict(self.ready)

    def send(self, device_id: int, msg) -> bool:
        """Send to a worker; False if its pipe is gone (it died)."""
        try:
            with self._send_lock:
                self.conns[device_id].send(msg)
            return True
        except (OSError, EOFError, BrokenPipeError, KeyError):
            return False

    def wake(self) -> None:
        """Interrupt a ``wait`` from another thread."""
        self._waker.wake()

    def wait(self, timeout_s: float | None) -> list[tuple[int, object]]:
        """Block until a worker replies, a worker dies, ``wake`` is called or
        the timeout passes; return the replies (possibly none)."""
        by_obj = {conn: d for d, conn in self.conns.items()}
        sentinels = self._sentinels()
        ready = wait([self._waker.reader, *by_obj, *sentinels], timeout_s)
        if self._waker.reader in ready:
            self._waker.drain()
        dead = [sentinels[obj] for obj in ready if obj in sentinels and sentinels[obj] in self.conns]
        # A dead worker's last replies, then its death, then the survivors'
        # replies: a survivor's step that failed because its peer vanished
        # reads as a consequence of the death, not as a fault of its own.
        out: list[tuple[int, object]] = []
        for device_id in dead:
            out += self._drain(device_id)
            out.append((device_id, WorkerDied(device_id, self._exitcode(device_id))))
            self._forget(device_id)
        for obj in ready:
            if obj in by_obj and by_obj[obj] in self.conns:
                out += self._drain(by_obj[obj])
        return out

    def _drain(self, device_id: int) -> list[tuple[int, object]]:
        conn, out = self.conns[device_id], []
        try:
            while conn.poll():
                out.append((device_id, conn.recv()))
        except (EOFError, OSError):
            pass  # the sentinel reports the death
        return out

    def new_world(self) -> DistSpec | None:
        """A fresh SP world for every worker to join (``P.Rejoin``) once a
        crash broke the old one; None when the workers run no SP."""
        if self.configured_sp_degree < 2:
            return None
        world = dist_spec(self.num_devices, next(iter(self.specs.values())).device,
                          self.configured_sp_degree)
        self._worlds.append(world)
        return world

    def respawn(self, device_id: int, standalone: bool = False) -> None:
        """Start a dead worker again without waiting: its ``Ready`` message
        arrives through ``wait`` like any reply. ``standalone``: it cannot
        rejoin the process groups, so no worker runs SP from now on."""
        self._forget(device_id)
        if standalone:
            self.specs = {d: replace(s, dist=None) for d, s in self.specs.items()}
        self._start_one(device_id)

    def kill(self, device_ids: list[int]) -> None:
        """Kill these workers now (they hang): each death arrives through
        ``wait``, as a crash's does."""
        raise NotImplementedError

    # backend hooks
    def _start_one(self, device_id: int) -> None:
        raise NotImplementedError

    def _sentinels(self) -> dict:
        return {}

    def _exitcode(self, device_id: int) -> int | None:
        return None

    def _forget(self, device_id: int) -> None:
        conn = self.conns.pop(device_id, None)
        if conn is not None:
            conn.close()

    def shutdown(self, timeout_s: float = 10.0) -> None:
        for device_id in list(self.conns):
            self.send(device_id, P.Shutdown())

    def _remove_worlds(self) -> None:
        """Once the workers are gone: delete the worlds' rendezvous folders."""
        for world in self._worlds:
            remove_world(world)
        self._worlds = []


class MultiprocessExecutor(Executor):
    """One spawned process per device (``spawn``: CUDA needs it)."""

    def __init__(self, specs: list[WorkerSpec]):
        super().__init__(specs)
        self._ctx = mp.get_context("spawn")
        self.procs: dict[int, mp.Process] = {}

    def _start_one(self, device_id: int) -> None:
        parent, child = self._ctx.Pipe(duplex=True)
        proc = self._ctx.Process(target=worker_main, args=(self.specs[device_id], child),
                                 name=f"genserve-worker-{device_id}", daemon=True)
        proc.start()
        child.close()
        self.conns[device_id], self.procs[device_id] = parent, proc

    def _sentinels(self) -> dict:
        return {p.sentinel: d for d, p in self.procs.items() if d in self.conns}

    def _exitcode(self, device_id: int) -> int | None:
        proc = self.procs[device_id]
        proc.join(timeout=1.0)
        return proc.exitcode

    def pid(self, device_id: int) -> int | None:
        return self.procs[device_id].pid

    def kill(self, device_ids: list[int]) -> None:
        # All stopped before any dies: a peer blocked in a collective with a
        # dying worker would wake, and could report a failure of its own
        # before the engine learns of the death it follows from.
        alive = [self.procs[d].pid for d in device_ids if d in self.conns]
        for sig in (signal.SIGSTOP, signal.SIGKILL):  # (a stopped process still dies of SIGKILL)
            for pid in alive:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)

    def shutdown(self, timeout_s: float = 10.0) -> None:
        super().shutdown(timeout_s)
        deadline = time.monotonic() + timeout_s
        for proc in self.procs.values():
            proc.join(max(0.0, deadline - time.monotonic()))
            if proc.is_alive():
                proc.kill()
                proc.join(1.0)
        for device_id in list(self.conns):
            self._forget(device_id)
        self._remove_worlds()


class InProcessExecutor(Executor):
    """The worker loop in threads of this process: no spawn cost, same pipes.

    Torch thread settings are process-wide here, so ``num_threads`` is ignored.
    """

    def __init__(self, specs: list[WorkerSpec]):
        # Torch threads and the torch.distributed world are per process:
        # threads can't have their own, so no thread pinning and no SP here.
        super().__init__([replace(s, num_threads=0, dist=None) for s in specs])
        for world in {s.dist.init_method: s.dist for s in specs if s.dist}.values():
            remove_world(world)  # (made for the specs; nobody joins it)
        self.threads: dict[int, threading.Thread] = {}
        self.workers: dict[int, Worker] = {}  # reachable in-process: tests may inspect them

    def _start_one(self, device_id: int) -> None:
        parent, child = mp.Pipe(duplex=True)
        spec = self.specs[device_id]

        def run():
            try:
                worker, ready = boot(spec)
            except StartFailed as exc:
                log.exception("in-process worker %d failed to start", device_id)
                child.send(P.Failed("", "INTERNAL", str(exc)))
                return
            self.workers[device_id] = worker
            worker.serve(child, ready)

        thread = threading.Thread(target=run, name=f"genserve-worker-{device_id}", daemon=True)
        thread.start()
        self.conns[device_id], self.threads[device_id] = parent, thread

    def kill(self, device_ids: list[int]) -> None:
        log.error("worker(s) %s cannot be killed: they are threads of this process", device_ids)

    def shutdown(self, timeout_s: float = 10.0) -> None:
        super().shutdown(timeout_s)
        for thread in self.threads.values():
            thread.join(timeout_s)
        for device_id in list(self.conns):
            self._forget(device_id)


def make_worker_specs(device: str, num_workers: int, model_specs: tuple[str, ...],
                      dtype: str = "float32", num_threads: int = 0, max_sp_degree: int = 8,
                      paused_budget_mb: float = 0.0, attention: str = "sdpa",
                      log_level: int = logging.INFO, caps: Limits = Limits(),
                      log_format: str = "text") -> list[WorkerSpec]:
    """One WorkerSpec per device: ``cpu`` × num_workers, or every visible GPU
    (``num_workers`` > 0 caps the count). With several devices and
    max_sp_degree > 1 the workers join one world for sequence parallelism.
    ``caps``: the server's size caps, which the warm-up keeps to."""
    if device == "cuda":
        import torch

        count = torch.cuda.device_count()
        if count == 0:
            raise WorkerStartError("--device cuda: no CUDA device is visible")
        devices = [f"cuda:{i}" for i in range(count if num_workers <= 0 else min(count, num_workers))]
    else:
        devices = ["cpu"] * max(1, num_workers)
    dist = dist_spec(len(devices), devices[0], max_sp_degree)
    return [WorkerSpec(i, d, model_specs, dtype, num_threads, dist, paused_budget_mb, attention,
                       log_level, caps, log_format) for i, d in enumerate(devices)]

"""The device worker: holds the models and every request's state between steps.

One worker per device. It answers ``RunSteps`` with a ``StepDone`` after each
step and one ``DispatchDone``; errors in a step fail that step's requests with
a status and the worker goes on. The same ``Worker.serve`` loop runs in a
spawned process (serving) or a thread (unit tests).
"""
from __future__ import annotations

import logging
import time
import traceback
from dataclasses import dataclass

from genserve.models.base import GenParams, RequestState
from genserve.workers import protocol as P

log = logging.getLogger("genserve.worker")


@dataclass(frozen=True, slots=True)
class WorkerSpec:
    """How to start one worker. Plain data, so it pickles into a spawned process."""

    device_id: int
    device: str  # "cpu", "cuda:0", ...
    model_specs: tuple[str, ...]  # preset names or NAME=PATH
    dtype: str = "float32"
    num_threads: int = 0  # torch intra-op threads; 0 leaves torch's default
    seed_offset: int = 0


@dataclass(slots=True)
class _Live:
    """A request resident on this worker."""

    new: P.NewRequest
    state: RequestState


class Worker:
    def __init__(self, spec: WorkerSpec, models: dict):
        self.spec = spec
        self.models = models  # name -> ModelAdapter
        self.live: dict[str, _Live] = {}

    @classmethod
    def start(cls, spec: WorkerSpec) -> "Worker":
        import torch

        from genserve.models.registry import build_model

        if spec.num_threads > 0:
            torch.set_num_threads(spec.num_threads)
        dtype = getattr(torch, spec.dtype)
        models = {}
        for model_spec in spec.model_specs:
            adapter = build_model(model_spec, device=spec.device, dtype=dtype)
            models[adapter.name] = adapter
        return cls(spec, models)

    # ---- the loop -------------------------------------------------------
    def warm_up(self) -> tuple[P.Warmup, ...]:
        """Run a short request per model twice: the first pays one-time costs
        (lazy imports, allocator, kernels) before real traffic; the second is
        measured for the latency model when no profile is given."""
        return tuple([self._warm_once(m) for _ in range(2)][-1] for m in self.models.values())

    @staticmethod
    def _warm_once(model) -> P.Warmup:
        lim = model.limits
        params = GenParams("warm-up", "", lim.default_width, lim.default_height,
                           lim.default_frames, 2, lim.default_guidance_scale, 0)
        t0 = time.perf_counter()
        state = model.prepare(params, model.encode_prompt(params))
        t1 = time.perf_counter()
        model.denoise_step([state])
        t2 = time.perf_counter()
        model.denoise_step([state])
        t3 = time.perf_counter()
        model.decode(state)
        t4 = time.perf_counter()
        return P.Warmup(model.name, params.width, params.height, params.num_frames,
                        (t1 - t0) * 1e3, min(t2 - t1, t3 - t2) * 1e3, (t4 - t3) * 1e3)

    def serve(self, conn, load_s: float = 0.0) -> None:
        cards = tuple(P.ModelCard(m.name, m.task, m.limits) for m in self.models.values())
        conn.send(P.Ready(self.spec.device_id, cards, load_s, self.warm_up()))
        while True:
            try:
                msg = conn.recv()
            except (EOFError, OSError):
                return
            if isinstance(msg, P.Shutdown):
                return
            self.handle(msg, conn)

    def handle(self, msg, conn) -> None:
        if isinstance(msg, P.RunSteps):
            conn.send(self.run_steps(msg, conn))
        elif isinstance(msg, P.Drop):
            self.drop(msg.req_ids)
        else:
            log.error("worker %d: unknown message %r", self.spec.device_id, type(msg))

    def drop(self, req_ids) -> list[str]:
        return [r for r in req_ids if self.live.pop(r, None) is not None]

    # ---- one dispatch ---------------------------------------------------
    def run_steps(self, msg: P.RunSteps, conn) -> P.DispatchDone:
        failed: list[P.Failed] = []
        t0 = time.perf_counter()
        for new in msg.new:
            try:
                self._admit(new)
            except Exception as exc:  # bad params, OOM: fail the request, not the worker
                log.exception("prepare failed for %s", new.req_id)
                failed.append(P.Failed(new.req_id, "INTERNAL", f"prepare failed: {exc}"))
        encode_ms = (time.perf_counter() - t0) * 1e3
        batch = [r for r in msg.req_ids if r in self.live]
        for r in msg.req_ids:
            if r not in self.live and not any(f.req_id == r for f in failed):
                failed.append(P.Failed(r, "INTERNAL", f"worker {self.spec.device_id} holds no state for {r}"))
        finished: list[P.Finished] = []
        for _ in range(msg.num_steps):
            batch = [r for r in batch if r in self.live and not self.live[r].state.done]
            if not batch:
                break
            failed += self._one_step(msg, batch, conn)
            for r in [r for r in batch if r in self.live and self.live[r].state.done]:
                result = self._finish(r)
                (finished if isinstance(result, P.Finished) else failed).append(result)
            self._poll_drops(conn, batch, failed)
        paused = tuple(r for r in batch if r in self.live)
        return P.DispatchDone(msg.dispatch_id, paused, tuple(finished), tuple(failed), encode_ms)

    def _admit(self, new: P.NewRequest) -> None:
        model = self.models[new.model]
        cond = model.encode_prompt(new.params)
        self.live[new.req_id] = _Live(new, model.prepare(new.params, cond))

    def _one_step(self, msg: P.RunSteps, batch: list[str], conn) -> list[P.Failed]:
        states = [self.live[r].state for r in batch]
        t0 = time.perf_counter()
        try:
            self.models[msg.model].denoise_step(states)
        except Exception as exc:
            log.error("step failed on worker %d: %s", self.spec.device_id, traceback.format_exc())
            self.drop(batch)
            return [P.Failed(r, "INTERNAL", f"denoising step failed: {exc}") for r in batch]
        step_ms = (time.perf_counter() - t0) * 1e3
        conn.send(P.StepDone(msg.dispatch_id, tuple(batch),
                             tuple(s.step_index for s in states), step_ms))
        return []

    def _finish(self, req_id: str):
        from genserve.models.media import encode_media

        live = self.live.pop(req_id)
        t0 = time.perf_counter()
        try:
            frames = self.models[live.new.model].decode(live.state)
            data, mime = encode_media(frames, live.new.output_format, live.new.fps)
        except Exception as exc:
            log.exception("decode failed for %s", req_id)
            return P.Failed(req_id, "INTERNAL", f"decode failed: {exc}")
        n, h, w = frames.shape[:3]
        return P.Finished(req_id, data, mime, w, h, n, (time.perf_counter() - t0) * 1e3)

    def _poll_drops(self, conn, batch: list[str], failed: list[P.Failed]) -> None:
        """Between steps, honour Drop messages (cancels) that arrived meanwhile."""
        while conn.poll():
            msg = conn.recv()
            if isinstance(msg, P.Drop):
                for r in self.drop(msg.req_ids):
                    if r in batch:
                        failed.append(P.Failed(r, "CANCELLED", "cancelled"))
            else:  # only Drop may arrive while a dispatch runs
                log.error("worker %d: unexpected %r during a dispatch", self.spec.device_id, type(msg))


def worker_main(spec: WorkerSpec, conn) -> None:
    """Entry point of a spawned worker process."""
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s worker{spec.device_id} %(levelname)s %(message)s")
    t0 = time.perf_counter()
    try:
        worker = Worker.start(spec)
    except Exception as exc:
        conn.send(P.Failed("", "INTERNAL", f"worker {spec.device_id} failed to load models: {exc}"))
        raise
    worker.serve(conn, load_s=time.perf_counter() - t0)

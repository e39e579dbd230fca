"""A worker's start: load the models, warm them up at a shape requests can
have, and end any failure in one start error that names the worker (and the
model), never in a traceback."""
from __future__ import annotations

import json
import multiprocessing as mp
import os

import numpy as np
import pytest

from genserve.config import Limits
from genserve.models.base import IMAGE, VIDEO, ModelLimits
from genserve.workers.executor import Executor, MultiprocessExecutor, WorkerStartError, make_worker_specs
from genserve.workers.parallel import remove_world
from genserve.workers import startup
from genserve.workers.startup import max_sp_degree, warm_up
from genserve.workers.worker import WorkerSpec


class ShapeRecorder:
    """A model that records the shape of every request it is given."""

    name, task = "v", VIDEO
    limits = ModelLimits(256, 256, 256, 256, 50, 50, default_frames=33, max_frames=33, frame_multiple=4)

    def __init__(self):
        self.shapes: list[tuple[int, int, int]] = []

    def encode_prompt(self, params):
        self.shapes.append((params.width, params.height, params.num_frames))

    def prepare(self, params, cond):
        return params

    def denoise_step(self, states):
        pass

    def decode(self, state):
        return np.zeros((state.num_frames, 16, 16, 3), np.uint8)


def test_the_warm_up_keeps_to_the_servers_caps():
    model = ShapeRecorder()
    caps = Limits(max_width=64, max_height=48, max_frames=9)
    (warm,) = warm_up({"v": model}, caps)
    assert model.shapes == [(64, 48, 9)] * 2
    assert (warm.width, warm.height, warm.num_frames) == (64, 48, 9)  # what the latency model learns
    specs = make_worker_specs("cpu", 2, (), caps=caps)
    remove_world(specs[0].dist)  # (no executor: nothing else removes its rendezvous folder)
    assert specs[1].caps == caps


def test_without_caps_the_warm_up_uses_the_models_defaults():
    model = ShapeRecorder()
    warm_up({"v": model})
    assert model.shapes == [(256, 256, 33)] * 2


def test_the_warm_up_encodes_each_output_in_its_tasks_default_format(monkeypatch):
    """A request's measured decode includes encoding its media, and the first
    mp4 pays the codec's set-up: the warm-up pays it and measures the same."""
    encoded = []

    def encode(frames, fmt, fps):
        encoded.append((len(frames), fmt, fps))
        return b"", ""

    monkeypatch.setattr(startup, "encode_media", encode)
    image = ShapeRecorder()
    image.name, image.task = "i", IMAGE
    image.limits = ModelLimits(64, 64, 64, 64, 4, 4)
    warm_up({"v": ShapeRecorder(), "i": image})
    assert encoded == [(33, "mp4", 8)] * 2 + [(1, "png", 8)] * 2


class Heads:
    """A model whose step splits its ``heads`` attention heads over an SP group."""

    def __init__(self, heads: int):
        self.heads = heads

    def supports_sp(self, size: int) -> bool:
        return self.heads % size == 0


@pytest.mark.parametrize("heads, degree", [(12, 4), (40, 8), (8, 8), (6, 2), (3, 1)])
def test_a_models_sp_limit_is_the_largest_power_of_two_its_heads_split_over(heads, degree):
    assert max_sp_degree(Heads(heads)) == degree
    assert max_sp_degree(Heads(heads), largest=2) == min(degree, 2)


def test_a_model_with_no_sp_path_runs_on_one_device():
    assert max_sp_degree(ShapeRecorder()) == 1


def test_a_model_that_fails_its_warm_up_is_one_error_naming_it(tmp_path):
    from genserve.models.presets import build_sd3_tiny
    from genserve.models.sd3 import save_sd3

    save_sd3(build_sd3_tiny(), str(tmp_path))
    limits = json.loads((tmp_path / "genserve_limits.json").read_text())
    (tmp_path / "genserve_limits.json").write_text(json.dumps({**limits, "default_width": 72}))
    executor = MultiprocessExecutor(make_worker_specs("cpu", 1, (f"bad={tmp_path}",), num_threads=1))
    try:
        with pytest.raises(WorkerStartError) as err:
            executor.start(timeout_s=300)
    finally:
        executor.shutdown(timeout_s=5)
    assert str(err.value) == "worker 0 failed to warm up model bad: width and height must be multiples of 16"
    assert executor.procs[0].exitcode == 1


class OneProcess(Executor):
    def __init__(self, proc, conn):
        super().__init__([])
        self.proc, self.conns = proc, {0: conn}

    def _exitcode(self, device_id: int) -> int | None:
        self.proc.join(10)
        return self.proc.exitcode


def test_a_worker_that_dies_before_a_word_is_one_error_with_its_exit_code():
    ctx = mp.get_context("fork")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=os._exit, args=(3,))
    proc.start()
    child.close()
    with pytest.raises(WorkerStartError, match=r"^worker 0 exited before it was ready \(exit code 3\)$"):
        OneProcess(proc, parent).await_ready([0], timeout_s=30)


def test_a_worker_stopped_by_an_unexpected_error_logs_it_and_exits_1(monkeypatch, caplog):
    from genserve.workers import startup as W

    class Broken:
        def serve(self, conn, ready):
            raise RuntimeError("a collective failed")

    monkeypatch.setattr(W.logs, "configure", lambda *a: None)  # keep pytest's log capture
    monkeypatch.setattr(W, "boot", lambda spec: (Broken(), None))
    with pytest.raises(SystemExit) as stop:
        W.worker_main(WorkerSpec(3, "cpu", ()), conn=None)
    assert stop.value.code == 1
    (record,) = [r for r in caplog.records if r.levelname == "CRITICAL"]
    assert record.getMessage() == "worker 3 stopped on an unexpected error"
    assert "a collective failed" in str(record.exc_info[1])

"""A worker's start: load the models, warm them up, and end any failure in
one start error that names the worker (and the model), never in a traceback."""
from __future__ import annotations

import json
import multiprocessing as mp
import os

import pytest

from genserve.workers.executor import Executor, MultiprocessExecutor, WorkerStartError, make_worker_specs


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

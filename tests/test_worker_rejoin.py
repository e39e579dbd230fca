"""A worker told to join a new process group (P.Rejoin): at once between the
steps of a single-device dispatch, only after the dispatch when it is an SP
step of the old world, and always answering from its own thread."""
from __future__ import annotations

import multiprocessing as mp
import os
import tempfile

from genserve.workers import protocol as P
from genserve.workers.parallel import DistSpec
from genserve.workers.worker import Worker, WorkerSpec, _LockedConn


def one_rank_world() -> DistSpec:
    return DistSpec(f"file://{os.path.join(tempfile.mkdtemp(), 'rendezvous')}", 1, "gloo", 1)


def test_rejoin_waits_for_an_sp_dispatch_but_not_for_a_single_device_one():
    engine_end, worker_end = mp.Pipe()
    conn = _LockedConn(worker_end)
    worker = Worker(WorkerSpec(0, "cpu", ()), models={})
    sp_world = one_rank_world()
    engine_end.send(P.Rejoin(sp_world))
    worker._poll_drops(conn, [], [], (0, 1))  # between two steps of an old-world SP dispatch
    assert worker._deferred == [P.Rejoin(sp_world)] and worker._joining is None
    worker._deferred.clear()

    world = one_rank_world()
    engine_end.send(P.Rejoin(world))
    worker._poll_drops(conn, [], [], (0,))  # a single-device dispatch: join beside it
    assert engine_end.poll(60), "no answer"
    reply = engine_end.recv()
    try:
        assert reply == P.Rejoined(0, world.init_method, True)
        assert worker.groups is not None and worker.groups.rank == 0
        worker._joining.join()
    finally:
        worker.groups.close()

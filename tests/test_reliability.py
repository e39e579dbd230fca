"""Faults and shutdown on real server processes: a worker killed mid-step,
SIGTERM drain, client deadlines and dropped streams."""
from __future__ import annotations

import os
import signal
import threading
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from conftest import ServerProcess, wait_for
from genserve.client import Client
from genserve.v1 import genserve_pb2 as pb

pytestmark = pytest.mark.slow
T = pb.GenerateEvent.Type
LONG_VIDEO = dict(task="video", width=256, height=256, num_frames=33, steps=50)  # ~1 s/step here


def health(target: str, service: str = "") -> int:
    with grpc.insecure_channel(target) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
    return reply.status


def worker_pids(server_pid: int) -> list[int]:
    """The server's spawned worker processes (not multiprocessing's resource tracker)."""
    out = []
    for task in os.listdir(f"/proc/{server_pid}/task"):
        with open(f"/proc/{server_pid}/task/{task}/children") as f:
            for pid in map(int, f.read().split()):
                with open(f"/proc/{pid}/cmdline", "rb") as c:
                    cmdline = c.read()
                if b"spawn_main" in cmdline and b"resource_tracker" not in cmdline:
                    out.append(pid)
    return sorted(out)


@pytest.fixture(scope="module")
def one_worker():
    srv = ServerProcess("--num-workers", "1")
    yield srv
    srv.stop()


def test_deadline_aborts_and_frees_the_device(one_worker):
    with Client(one_worker.target) as client:
        t0 = time.monotonic()
        with pytest.raises(grpc.RpcError) as err:
            client.generate("a long video", timeout_s=3.0, **LONG_VIDEO)
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        nxt = client.generate("next", task="image", steps=2)
    # the aborted video stopped at its next step boundary: the image did not wait for its 50 steps
    assert nxt.queue_ms < 5000, nxt.queue_ms
    assert time.monotonic() - t0 < 20


def test_dropped_stream_aborts_and_frees_the_device(one_worker):
    with Client(one_worker.target) as client:
        call = client.stream("a long video", **LONG_VIDEO)
        for event in call:
            if event.type == T.STEP:
                break
        call.cancel()
        t0 = time.monotonic()
        nxt = client.generate("next", task="image", steps=2)
    assert nxt.queue_ms < 5000 and time.monotonic() - t0 < 15


def test_worker_killed_under_load_every_request_ends():
    srv = ServerProcess("--num-workers", "2")
    try:
        pids = worker_pids(srv.proc.pid)
        assert len(pids) == 2, pids
        outcomes, lock = [], threading.Lock()

        def one(i: int) -> None:
            with Client(srv.target) as client:
                try:
                    # long enough that the kill lands mid-run on a fast machine too
                    kw = dict(task="video", width=128, height=128, num_frames=33, steps=50) if i % 2 else \
                        dict(task="image", steps=50)
                    client.generate(f"load {i}", seed=i, timeout_s=120, **kw)
                    code = grpc.StatusCode.OK
                except grpc.RpcError as err:
                    code = err.code()
            with lock:
                outcomes.append(code)

        threads = [threading.Thread(target=one, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        time.sleep(3.0)
        os.kill(pids[1], signal.SIGKILL)
        for t in threads:
            t.join(150)
        assert len(outcomes) == 8, "a request hung after the crash"
        assert set(outcomes) <= {grpc.StatusCode.OK, grpc.StatusCode.UNAVAILABLE}, outcomes
        assert wait_for(lambda: "worker 1 died" in srv.output, 30)  # (the log is read by a thread)
        assert wait_for(lambda: len(worker_pids(srv.proc.pid)) == 2, 60), "worker not restarted"
        assert wait_for(lambda: health(srv.target, "genserve.workers") == health_pb2.HealthCheckResponse.SERVING, 60)
        with Client(srv.target) as client:
            assert client.generate("after the crash", task="image", steps=2).media.data
            assert client.generate("video after", task="video", steps=2).media.num_frames == 9
        # the workers joined a new process group (test_step_execution runs an SP step in one)
        assert wait_for(lambda: "sequence parallelism is back" in srv.output, 120), srv.output[-3000:]
        with Client(srv.target) as client:
            assert client.generate("video after the rejoin", task="video", steps=2).media.num_frames == 9
    finally:
        srv.stop()


def _long_video_in_background(target: str, prompt: str):
    """Streams a 50-step video from a thread: (thread, set at its first step,
    what it saw: the events, then the RpcError that ended it if one did)."""
    seen, started = [], threading.Event()

    def long_request():
        with Client(target) as client:
            try:
                for event in client.stream(prompt, task="video", width=128, height=128,
                                           num_frames=17, steps=50):
                    seen.append(event)
                    if event.type == T.STEP:
                        started.set()
            except grpc.RpcError as err:
                seen.append(err)
            started.set()

    thread = threading.Thread(target=long_request)
    thread.start()
    return thread, started, seen


@pytest.mark.parametrize("stop", ["sigterm", "ctrl-c", "group-sigterm"])
def test_sigterm_drains_in_flight_then_exits_zero(stop):
    """SIGTERM to the server (an orchestrator), or SIGINT to its whole
    process group (Ctrl-C at a terminal: the workers used to die of it at
    once, each with a KeyboardInterrupt traceback, failing the drain), or
    SIGTERM to the whole group (`timeout`, systemd's default KillMode: the
    workers used to die of it and be restarted in the middle of the drain)."""
    srv = ServerProcess("--num-workers", "1", "--grace-s", "60")
    try:
        thread, started, events = _long_video_in_background(srv.target, "finish me")
        assert started.wait(60)
        if stop == "sigterm":  # with ~49 steps and a decode still to go
            srv.proc.send_signal(signal.SIGTERM)
        else:  # its own session: the group is the server's
            os.killpg(srv.proc.pid, signal.SIGINT if stop == "ctrl-c" else signal.SIGTERM)
        assert wait_for(lambda: health(srv.target) == health_pb2.HealthCheckResponse.NOT_SERVING, 10)
        with Client(srv.target) as client:
            with pytest.raises(grpc.RpcError) as err:
                client.generate("too late", task="image", steps=2)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        thread.join(120)
        assert events and not isinstance(events[-1], grpc.RpcError), events[-1]
        assert events[-1].type == T.COMPLETED and events[-1].response.media.num_frames == 17
        assert srv.proc.wait(60) == 0
        assert wait_for(lambda: "stopped" in srv.output, 10)
        assert "Traceback" not in srv.output, srv.output
        assert "died" not in srv.output and "restarting" not in srv.output, srv.output
    finally:
        srv.stop()


def _alive(pid: int) -> bool:
    """Running (not gone, not a zombie waiting for a reaper)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_a_killed_server_leaves_no_worker_behind():
    """The workers ignore SIGTERM (a group-wide stop must not kill them
    mid-drain); with the server gone for good they end of their own accord,
    when their pipe closes, one of them in the middle of a video."""
    srv = ServerProcess("--num-workers", "2", "--max-sp-degree", "1")
    try:
        pids = worker_pids(srv.proc.pid)
        assert len(pids) == 2
        thread, started, _ = _long_video_in_background(srv.target, "orphaned")
        assert started.wait(60)
        srv.proc.kill()
        assert wait_for(lambda: not any(_alive(p) for p in pids), 60), [p for p in pids if _alive(p)]
        thread.join(30)
    finally:
        srv.stop()


def test_a_second_sigterm_cuts_the_drain_short():
    """The first signal drains (up to --grace-s); a second one ends the
    requests left UNAVAILABLE at once, and the workers stop at their step
    boundary (a Shutdown during a dispatch used to be dropped: the workers
    were killed 10 s later)."""
    srv = ServerProcess("--num-workers", "1", "--grace-s", "600")
    try:
        thread, started, seen = _long_video_in_background(srv.target, "never mind")
        assert started.wait(60)
        srv.proc.send_signal(signal.SIGTERM)
        assert wait_for(lambda: "draining" in srv.output, 10)
        t0 = time.monotonic()
        srv.proc.send_signal(signal.SIGTERM)
        assert srv.proc.wait(30) == 0
        assert time.monotonic() - t0 < 10  # not the 600 s grace, nor a 10 s kill of the worker
        thread.join(30)
        # the stream's caller is told why (not gRPC's generic "Cancelling all calls")
        assert seen[-1].type == T.FAILED and seen[-1].status_code == "UNAVAILABLE", seen[-1]
        assert seen[-1].reason == ("the server shut down before this request finished (a second stop "
                                   "signal); retry on another replica")
        assert "a second signal: 1 request(s) end UNAVAILABLE" in srv.output
        assert "during a dispatch" not in srv.output
    finally:
        srv.stop()


def test_a_worker_that_cannot_restart_backs_off_and_returns(tmp_path):
    """Its checkpoint's volume is gone: every restart fails, ever later, while
    the other worker serves; once the files are back, so is the worker."""
    from genserve.models.presets import build_sd3_tiny
    from genserve.models.sd3 import save_sd3

    ckpt, gone = tmp_path / "sd3", tmp_path / "gone"
    save_sd3(build_sd3_tiny(), str(ckpt))
    srv = ServerProcess("--num-workers", "2", "--max-sp-degree", "1", "--model", f"sd3={ckpt}",
                        "--model", "wan-tiny")
    try:
        pids = worker_pids(srv.proc.pid)
        ckpt.rename(gone)
        os.kill(pids[1], signal.SIGKILL)
        assert wait_for(lambda: "restarting it in 1 s" in srv.output, 120), srv.output[-3000:]
        assert "worker 1 failed to start" in srv.output
        with Client(srv.target) as client:
            assert client.generate("served meanwhile", task="image", steps=2).media.data
        assert health(srv.target, "genserve.workers") == health_pb2.HealthCheckResponse.NOT_SERVING
        gone.rename(ckpt)
        assert wait_for(lambda: "worker 1 is back" in srv.output, 120), srv.output[-3000:]
        assert wait_for(lambda: health(srv.target, "genserve.workers") == health_pb2.HealthCheckResponse.SERVING, 30)
    finally:
        srv.stop()

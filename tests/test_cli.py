"""The command line against the shared live server."""
import socket
import subprocess
import sys

import pytest


def genserve(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "genserve", *args], capture_output=True, text=True,
                          timeout=timeout)


def test_help_lists_commands():
    out = genserve("--help").stdout
    for command in ("serve", "generate", "models", "profile", "simulate", "loadgen"):
        assert command in out
    assert "--num-workers" in genserve("serve", "--help").stdout


def test_help_shows_defaults_once():
    from genserve.cli import build_parser

    def help_of(command):
        return " ".join(build_parser()._subparsers._group_actions[0].choices[command].format_help().split())

    simulate, loadgen, serve = help_of("simulate"), help_of("loadgen"), help_of("serve")
    assert "arrivals per second (default: 0.4)" in simulate  # the help did not say it
    assert "--max-sp-degree MAX_SP_DEGREE default: 8" in simulate  # there was no help at all
    assert "--out OUT output directory (default: loadgen-out)" in loadgen
    assert "address to listen on (default 127.0.0.1) " in serve  # already told: not twice
    assert "only log a warning) (default: 300.0)" in serve
    assert "--admission-control (default" not in serve  # a switch has nothing to tell


def test_simulate_refusal_exits_2_under_the_main_cli(tmp_path):
    """``genserve simulate`` (not only ``python -m genserve.scheduler.cli``):
    a CI step that runs a bad simulation must fail."""
    for args in (["--policy", "nope"], ["--trace", str(tmp_path / "missing.jsonl")], ["--rate", "0"]):
        done = genserve("simulate", "--num-requests", "5", *args)
        assert done.returncode == 2, (args, done.stderr)
        assert done.stderr.startswith("genserve simulate: ") and "Traceback" not in done.stderr
    assert genserve("simulate", "--num-requests", "5", "--policy", "fcfs", "--quiet").returncode == 0


def test_generate_and_models(server, tmp_path):
    path = tmp_path / "cat.png"
    done = genserve("generate", "a cat", "--target", server.target, "--steps", "3", "--seed", "5", "-o", str(path))
    assert done.returncode == 0, done.stderr
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "64x64" in done.stdout and "SLO" in done.stdout
    models = genserve("models", "--target", server.target)
    assert models.returncode == 0 and "sd3-tiny" in models.stdout and "wan-tiny" in models.stdout
    rows = {line.split()[0]: line.split() for line in models.stdout.splitlines()[1:]}
    assert models.stdout.splitlines()[0].endswith("max SP")
    assert (rows["wan-tiny"][-1], rows["sd3-tiny"][-1]) == ("2", "1")  # two workers; SD3 has no SP path


def test_generate_bad_input_exits_nonzero(server):
    done = genserve("generate", "a cat", "--target", server.target, "--width", "30")
    assert done.returncode != 0 and "width" in done.stderr


def test_bad_flags_fail_before_anything_starts(tmp_path):
    """One ``error:`` line and a non-zero exit, no traceback, nothing started:
    ``serve`` would otherwise load models and workers first."""
    bad_profile = tmp_path / "profile.json"
    bad_profile.write_text('{"models": 5}')
    cases = [
        (("serve", "--policy", "nope"), "unknown policy 'nope'"),
        (("serve", "--profile", "no-such-profile"), "no built-in profile or file named"),
        (("serve", "--profile", str(bad_profile)), "is not a valid profile"),
        (("serve", "--grace-s", "-1"), "--grace-s must not be negative"),
        (("serve", "--max-steps", "0"), "--max-steps must be at least 1, got 0"),
        (("serve", "--max-frames", "-3"), "--max-frames must be at least 1, got -3"),
        (("serve", "--paused-budget-mb", "-1"), "--paused-budget-mb must not be negative"),
        (("serve", "--threads-per-worker", "-2"), "--threads-per-worker must not be negative"),
        (("serve", "--chunk-ms", "-1"), "--chunk-ms must be a number >= 0, not -1.0"),
        (("serve", "--chunk-ms", "nan"), "--chunk-ms must be a number >= 0, not nan"),
        (("serve", "--default-slo-scale", "inf"), "--default-slo-scale must be a positive number, not inf"),
        (("serve", "--hung-worker-s", "-1"), "--hung-worker-s must be a number >= 0, not -1.0"),
        (("serve", "--hung-worker-s", "inf"), "--hung-worker-s must be a number >= 0, not inf"),
        (("serve", "--max-queue", "0"), "--max-queue must be positive"),
        (("serve", "--port", "70000"), "--port and --metrics-port must be in 0..65535"),
        (("serve", "--port", "50999", "--metrics-port", "50999"), "--port and --metrics-port are both 50999"),
        (("serve", "--max-width", "8"), "error: --max-width 8 leaves model 'sd3-tiny' no valid width"),
        (("serve", "--model", "wan-tiny", "--max-height", "12"), "--max-height 12 leaves model 'wan-tiny'"),
        (("serve", "--model", "x=/a", "--model", "x=/b"), "error: two models are named 'x' (--model x=/a and "
                                                         "--model x=/b); give each its own name"),
        (("serve", "--model", "sd3-tiny", "--model", "sd3-tiny=/b"), "two models are named 'sd3-tiny'"),
        (("generate", "a cat", "--target", "127.0.0.1:1", "--width", "-5"), "--width must be in 0..4294967295"),
        (("generate", "a cat", "--target", "127.0.0.1:1", "--steps", "4294967296"), "--steps must be in 0.."),
        (("profile", "--out", str(tmp_path / "p.json"), "--steps", "1"), "--steps must be at least 2"),
        (("profile", "--out", str(tmp_path / "p.json"), "--repeats", "0"), "--repeats must be at least 1"),
    ]
    for args, message in cases:
        done = genserve(*args, timeout=60)
        assert done.returncode != 0, args
        assert message in done.stderr and "Traceback" not in done.stderr, (args, done.stderr)
    assert not (tmp_path / "p.json").exists()


def test_a_port_in_use_is_one_line_before_the_workers_start():
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = str(busy.getsockname()[1])
        for args, what in ((("--port", port), "(gRPC, --port)"),
                           (("--port", "0", "--metrics-port", port), "(--metrics-port)")):
            done = genserve("serve", *args, timeout=60)
            assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
            assert f"error: cannot listen on 127.0.0.1:{port} {what}" in done.stderr
            assert "starting" not in done.stderr  # no worker was started


def test_a_bad_checkpoint_path_is_one_line_before_the_workers_start(tmp_path):
    """A typo in the second --model path failed only once the first model
    had loaded on every worker (minutes on GPUs)."""
    done = genserve("serve", "--port", "0", "--model", "sd3-tiny", "--model", f"v={tmp_path / 'wna'}", timeout=60)
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    assert f"error: model 'v': {tmp_path / 'wna'} does not exist" in done.stderr
    assert "starting" not in done.stderr  # no worker was started


TAKEN_AFTER_THE_CHECK = """
import asyncio, socket, sys
from genserve.app import ListenError, Server
from genserve.config import ServerConfig
port = int(sys.argv[1])
server = Server(ServerConfig(port=0, metrics_port=port, num_workers=1, models=("sd3-tiny",), in_process=True))
with socket.socket() as taken:  # after the pre-flight check: a race it cannot see
    taken.bind(("127.0.0.1", port))
    taken.listen()
    server.start_workers()
    try:
        asyncio.run(server.serve())
    except ListenError as err:
        print("error:", err)
"""


def test_a_metrics_port_taken_after_the_check_stops_the_grpc_server_cleanly():
    """gRPC has started when /metrics fails to bind: it is stopped on its
    event loop (left to grpc's __del__, it printed a traceback, 'Event loop
    is closed', once the loop had closed)."""
    from genserve.loadgen.launch import free_port

    port = free_port()
    done = subprocess.run([sys.executable, "-c", TAKEN_AFTER_THE_CHECK, str(port)], capture_output=True,
                          text=True, timeout=120)
    assert f"error: cannot listen on 127.0.0.1:0 or metrics port {port}" in done.stdout, done.stderr
    assert "Traceback" not in done.stderr and "Exception ignored" not in done.stderr, done.stderr


def test_sigterm_while_the_workers_start_stops_them_too():
    """A rollout's SIGTERM during model loading: the server exits and takes
    its workers along (they used to load on, orphaned, for tens of seconds)."""
    import os
    import signal
    import time

    proc = subprocess.Popen([sys.executable, "-m", "genserve", "serve", "--port", "0"],
                            stderr=subprocess.PIPE, text=True)
    try:
        for line in proc.stderr:  # the workers are being spawned
            if "starting" in line and "worker(s)" in line:
                break
        time.sleep(1.0)
        children = [int(p) for p in os.listdir("/proc") if p.isdigit() and _ppid(int(p)) == proc.pid]
        assert children, "no worker process seen"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 128 + signal.SIGTERM
        deadline = time.monotonic() + 10
        while any(os.path.exists(f"/proc/{c}") and _ppid(c) is not None for c in children):
            assert time.monotonic() < deadline, "a worker outlived the server"
            time.sleep(0.1)
    finally:
        proc.kill()
        proc.wait()


def _ppid(pid: int) -> int | None:
    """Parent of a live (not zombie) process, else None."""
    try:
        fields = open(f"/proc/{pid}/stat").read().rpartition(")")[2].split()
    except OSError:
        return None
    return None if fields[0] == "Z" else int(fields[1])


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.skipif(not _ipv6_loopback(), reason="this machine has no IPv6 loopback (::1)")
def test_an_ipv6_host_serves_grpc_and_metrics():
    """``--host [::1]`` (and so ``::1``): the gRPC address needs brackets,
    the sockets none (it was 'Name or service not known' at once, and
    ``::1`` failed 'address lookup failed' only after the models loaded)."""
    import urllib.request

    from conftest import ServerProcess
    from genserve.client import Client

    with socket.socket(socket.AF_INET6) as s:
        s.bind(("::1", 0))
        metrics_port = s.getsockname()[1]
    srv = ServerProcess("--host", "[::1]", "--metrics-port", str(metrics_port), "--num-workers", "1",
                        "--model", "sd3-tiny")
    try:
        assert srv.target.startswith("[::1]:"), srv.output
        with Client(srv.target) as client:
            assert client.generate("over IPv6", steps=2).media.data
        with urllib.request.urlopen(f"http://[::1]:{metrics_port}/metrics", timeout=10) as reply:
            assert b"genserve_requests_total" in reply.read()
    finally:
        srv.stop()


def test_the_demo_of_a_server_of_one_task_demos_that_one(tmp_path, monkeypatch):
    """--demo on a server with only an image model: the video demo was a raw
    traceback (INVALID_ARGUMENT in the demo's thread) and no 'done' line."""
    from conftest import ServerProcess, wait_for

    monkeypatch.chdir(tmp_path)  # the demo writes demo-out/ here
    srv = ServerProcess("--num-workers", "1", "--model", "sd3-tiny", "--demo")
    try:
        assert wait_for(lambda: "demo: done" in srv.output, 120), srv.output
        assert "demo: image 64x64x1" in srv.output
        assert "demo: no video: no served model does text-to-video" in srv.output
        assert "Traceback" not in srv.output
        assert (tmp_path / "demo-out" / "demo-image.png").stat().st_size > 0
    finally:
        srv.stop()
